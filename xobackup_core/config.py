"""The TOML configuration: servers (pools), remotes, jobs, schedules and settings.

Settings keep Xen Orchestra's names (``exportRetention``, ``fullInterval``, ``concurrency``...,
reference: xo-backups.md §3) so users and their habits move over unchanged. The effective value
of a setting is, from weakest to strongest: library default < ``[settings]`` < the job's
``settings`` < the schedule < ``vm_settings[<vm>]`` < ``target_settings[<remote or SR>]``.

Secrets (passwords, keys) are :class:`Secret` values: they print as ``'***'`` everywhere and
can be written inline, read from an environment variable (``{ env = "NAME" }``), read from a
file (``{ file = "/path" }``), or come from a separate secrets file (``secrets_file``) with the
same tables as the config, which is merged in before validation.

Every validation problem becomes a :class:`~xobackup_core.errors.ConfigError` that names the
file, the dotted key and the problem, and lists the valid choices where there are some.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    field_validator,
    model_validator,
)

from xobackup_core.errors import ConfigError

JOB_NAMESPACE = uuid.UUID("4b4f5c8e-1d5e-4c1e-9a57-6f3b9f0d3a10")
"""Namespace of job ids derived from job names, so a job keeps its id (and its delta chains
under ``vdis/<job id>/``) across config edits that do not rename it."""


def default_config_path() -> Path:
    """``$XDG_CONFIG_HOME/xobackup/config.toml`` (``~/.config/xobackup/config.toml``)."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(Path.home(), ".config")
    return Path(base) / "xobackup" / "config.toml"


def default_state_dir() -> Path:
    """``$XDG_STATE_HOME/xobackup`` (``~/.local/state/xobackup``): the log database lives here."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(Path.home(), ".local", "state")
    return Path(base) / "xobackup"


# -- secrets ---------------------------------------------------------------------------------
class Secret:
    """A secret value that never shows itself: ``str()``, ``repr()`` and JSON give ``'***'``."""

    __slots__ = ("_value", "origin")

    def __init__(self, value: str, origin: str = "inline") -> None:
        self._value = value
        self.origin = origin

    def reveal(self) -> str:
        """The secret itself, for the one place that must send it (a login, a signature)."""
        return self._value

    def __str__(self) -> str:
        return "***"

    def __repr__(self) -> str:
        return "Secret('***')"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def _to_secret(value: Any) -> Secret:
    if isinstance(value, Secret):
        return value
    if isinstance(value, str):
        return Secret(value)
    if isinstance(value, Mapping) and set(value) == {"env"}:
        name = value["env"]
        if name not in os.environ:
            raise ValueError(f"environment variable {name} is not set")
        return Secret(os.environ[name], origin=f"env:{name}")
    if isinstance(value, Mapping) and set(value) == {"file"}:
        path = Path(os.path.expanduser(value["file"]))
        try:
            return Secret(path.read_text().rstrip("\r\n"), origin=f"file:{path}")
        except OSError as error:
            raise ValueError(f"cannot read secret file {path}: {error.strerror}") from None
    raise ValueError('a secret is a string, { env = "NAME" } or { file = "/path" }')


SecretValue = Annotated[
    Secret,
    BeforeValidator(_to_secret),
    PlainSerializer(lambda secret: str(secret), return_type=str, when_used="json"),
]


URL_SECRET_OPTIONS = ("encryptionKey",)
"""Query options of a remote URL that are secrets (Xen Orchestra writes an encrypted remote as
``file:///srv/backups?encryptionKey="…"``)."""


def split_url_secrets(url: str) -> tuple[str, dict[str, str]]:
    """``url`` without its secret query options, and those options.

    Xen Orchestra JSON-encodes the values of a remote URL's query (``encryptionKey="…"``): a
    value that is a JSON string is decoded, any other is taken as written.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return url, {}
    kept: list[tuple[str, str]] = []
    found: dict[str, str] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key not in URL_SECRET_OPTIONS:
            kept.append((key, value))
            continue
        try:
            decoded = json.loads(value)
        except ValueError:
            decoded = value
        found[key] = decoded if isinstance(decoded, str) else value
    if not found:
        return url, {}
    return urlunsplit(parts._replace(query=urlencode(kept))), found


def url_secrets_into_options(url: str, options: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """``url`` without its secret query options, and ``options`` with them added.

    ValueError when an option is set both ways (an empty value counts as not set, as an empty
    ``encryptionKey`` means no encryption).
    """
    url, secrets = split_url_secrets(url)
    merged = dict(options)
    for key, value in secrets.items():
        if value and merged.get(key) not in (None, ""):
            raise ValueError(f"{key} is given twice (the URL and options): keep one")
        if value or key not in merged:
            merged[key] = value
    return url, merged


def redact_url(url: str) -> str:
    """``url`` with any password (or S3 secret key) in its user-info, and any secret query
    option (``encryptionKey``), replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<invalid URL>"
    query = parse_qsl(parts.query, keep_blank_values=True)
    if any(key in URL_SECRET_OPTIONS for key, _ in query):
        query = [(key, "***" if key in URL_SECRET_OPTIONS else value) for key, value in query]
        parts = parts._replace(query=urlencode(query, safe="*"))
    if parts.password is None:
        return urlunsplit(parts)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    netloc = f"{parts.username}:***@{host}"
    return urlunsplit(parts._replace(netloc=netloc))


# -- durations -------------------------------------------------------------------------------
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(value: Any) -> float:
    """Seconds from ``90``, ``"90s"``, ``"10m"``, ``"2h"``, ``"1d"`` or ``"500ms"``."""
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or a string like '10m'")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    raise ValueError(f"{value!r} is not a duration (examples: 90, '90s', '10m', '2h', '1d')")


Duration = Annotated[float, BeforeValidator(parse_duration)]
NonNegative = Annotated[int, Field(ge=0)]


# -- models ----------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


class LongTermRetentionPeriod(_Strict):
    retention: NonNegative


class LongTermRetention(_Strict):
    """GFS: keep the oldest backup of each of the last N days, weeks, months, years."""

    daily: LongTermRetentionPeriod | None = None
    weekly: LongTermRetentionPeriod | None = None
    monthly: LongTermRetentionPeriod | None = None
    yearly: LongTermRetentionPeriod | None = None


class Settings(_Strict):
    """Backup settings with Xen Orchestra's names. ``None`` means "inherit"."""

    exportRetention: NonNegative | None = None
    copyRetention: NonNegative | None = None
    snapshotRetention: NonNegative | None = None
    fullInterval: NonNegative | None = None
    concurrency: NonNegative | None = None
    diskPerVmConcurrency: NonNegative | None = None
    maxExportRate: NonNegative | None = None
    """Bytes per second for the whole run; 0 is no limit."""
    offlineBackup: bool | None = None
    offlineSnapshot: bool | None = None
    forceShutdownAfter: Duration | None = None
    """Offline modes: seconds after which a guest still running after the clean shutdown is
    powered off hard; 0 waits for it, as Xen Orchestra does."""
    checkpointSnapshot: bool | None = None
    unconditionalSnapshot: bool | None = None
    quiesce: bool | None = None
    """Ask for a quiesced snapshot, falling back to a plain one with a warning."""
    deleteFirst: bool | None = None
    mergeBackupsSynchronously: bool | None = None
    maxMergedDeltasPerRun: NonNegative | None = None
    nRetriesVmBackupFailures: NonNegative | None = None
    timeout: Duration | None = None
    vmTimeout: Duration | None = None
    reportWhen: Literal["always", "failure", "error", "never"] | None = None
    longTermRetention: LongTermRetention | None = None
    timezone: str | None = None
    useVhdDirectory: bool | None = None
    vhdDirectoryCompression: Literal["none", "gzip", "brotli"] | None = None
    bypassVdiChainsCheck: bool | None = None
    bypassCpuCheck: bool | None = None
    """Replicate with memory even where no host of the target pool has a CPU able to resume
    the replica (the run warns, naming both CPUs)."""

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str | None) -> str | None:
        return _check_timezone(value)


DEFAULT_SETTINGS: dict[str, Any] = {
    "exportRetention": 1,
    "copyRetention": 1,
    "snapshotRetention": 0,
    "fullInterval": 0,
    "concurrency": 2,
    "diskPerVmConcurrency": 0,
    "maxExportRate": 0,
    "offlineBackup": False,
    "offlineSnapshot": False,
    "forceShutdownAfter": 0.0,
    "checkpointSnapshot": False,
    "unconditionalSnapshot": False,
    "quiesce": False,
    "deleteFirst": False,
    "mergeBackupsSynchronously": True,
    "maxMergedDeltasPerRun": None,
    "nRetriesVmBackupFailures": 0,
    "timeout": 0.0,
    "vmTimeout": 0.0,
    "reportWhen": "failure",
    "longTermRetention": None,
    "timezone": "UTC",
    "useVhdDirectory": False,
    "vhdDirectoryCompression": "brotli",
    "bypassVdiChainsCheck": False,
    "bypassCpuCheck": False,
}
"""Library defaults, the weakest layer: Xen Orchestra's, with its UI's retention defaults (1)
and merges run inside the job so its log shows them. As in Xen Orchestra, a retention of 0
means the schedule does not write to that kind of target at all."""


def _check_timezone(value: str | None) -> str | None:
    if value is None:
        return value
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown IANA timezone {value!r} (example: 'Europe/Paris')") from None
    return value


class PoolLimits(_Strict):
    """Operations in flight per pool, shared by every job of the process."""

    snapshots: Annotated[int, Field(ge=1)] = 2
    disk_exports: Annotated[int, Field(ge=1)] = 12
    vm_exports: Annotated[int, Field(ge=1)] = 2


class PluginsConfig(_Strict):
    disable: list[str] = []
    """Entry-point names of plugins not to load."""


class ServerConfig(_Strict):
    """A pool to back up, reached through its master."""

    type: str = "xcpng"
    """The hypervisor plugin that handles it (``xobackup plugins`` lists them)."""
    url: str
    username: str = "root"
    password: SecretValue | None = None
    allow_unauthorized: bool = False
    """Accept a self-signed TLS certificate without checking it (opt-out, off by default)."""
    ca_file: str | None = None
    fingerprint: str | None = None
    """SHA-256 fingerprint of the host's certificate, an alternative to a CA."""
    timeout: Duration = 300.0
    options: dict[str, Any] = {}


class RemoteConfig(_Strict):
    """Where backups go. The URL scheme picks the remote plugin."""

    url: str
    enabled: bool = True
    username: str | None = None
    password: SecretValue | None = None
    access_key: str | None = None
    secret_key: SecretValue | None = None
    options: dict[str, Any] = {}
    """Options for the remote plugin (documented by each plugin)."""
    encryption_key: SecretValue | None = None
    """The key of an encrypted remote: ``options.encryptionKey``, or ``encryptionKey`` in the
    URL's query as Xen Orchestra writes it. Kept apart so that it shows as ``***``."""

    @model_validator(mode="before")
    @classmethod
    def _take_encryption_key(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        data = dict(data)
        options = data.get("options", {})
        if not isinstance(data.get("url"), str) or not isinstance(options, Mapping):
            return data  # pydantic reports the wrong types
        data["url"], options = url_secrets_into_options(data["url"], options)
        key = options.pop("encryptionKey", None)
        data["options"] = options
        if key in (None, ""):  # an empty key: no encryption, as before it moved here
            return data
        if data.get("encryption_key") is not None:
            raise ValueError(
                "encryptionKey is given twice (the URL or options, and encryption_key): keep one"
            )
        data["encryption_key"] = key
        return data

    @field_validator("url")
    @classmethod
    def _has_scheme(cls, value: str) -> str:
        if "://" not in value:
            raise ValueError(
                f"{redact_url(value)!r} has no scheme; write e.g. 'file:///srv/backups', "
                "'smb://user@host/share', 's3://bucket/prefix'"
            )
        return value

    def plugin_options(self, name: str) -> dict[str, Any]:
        """What the ``xobackup_remote`` hook receives besides the URL."""
        options = dict(self.options)
        for key in ("username", "password", "access_key", "secret_key"):
            value = getattr(self, key)
            if value is not None:
                options[key] = value
        if self.encryption_key is not None:
            options["encryptionKey"] = self.encryption_key  # the core's, never the plugin's
        options["name"] = name
        return options


class SmartRules(_Strict):
    """Smart mode: VMs picked at each run by pool, power state and tags."""

    pools: list[str] = []
    not_pools: list[str] = []
    power_state: Literal["all", "Running", "Halted"] = "all"
    tags: list[str] = []
    not_tags: list[str] = []


class JobConfig(_Strict):
    id: str | None = None
    """A stable UUID; by default derived from the job's key in the config."""
    name: str | None = None
    mode: Literal["full", "delta"]
    vms: list[str] | None = None
    """Explicit VMs by UUID or name; leave out to use ``smart``."""
    smart: SmartRules | None = None
    servers: list[str] | None = None
    """Servers whose VMs the job considers; all servers by default."""
    remotes: list[str] = []
    srs: list[str] = []
    """SR UUIDs to replicate to: disaster recovery (full mode), continuous replication (delta)."""
    compression: Literal["", "none", "native", "gzip", "zstd"] = ""
    """Compression of XVA exports (full backup, disaster recovery); ``native`` is gzip."""
    settings: Settings = Settings()
    vm_settings: dict[str, Settings] = {}
    target_settings: dict[str, Settings] = {}

    @model_validator(mode="after")
    def _one_selection(self) -> JobConfig:
        if self.vms is not None and self.smart is not None:
            raise ValueError("give either 'vms' (explicit list) or 'smart' (rules), not both")
        return self


class ScheduleConfig(Settings):
    """When a job runs; the settings given here override the job's for those runs."""

    job: str
    cron: str
    enabled: bool = True
    id: str | None = None
    name: str | None = None

    @field_validator("cron")
    @classmethod
    def _cron_fields(cls, value: str) -> str:
        if len(value.split()) != 5:
            raise ValueError(
                f"{value!r} is not a cron expression of 5 fields "
                "(minute hour day-of-month month day-of-week), e.g. '0 3 * * *'"
            )
        return value


class Config(_Strict):
    """The whole configuration file."""

    log_db: str | None = None
    """Path of the SQLite run log; default ``$XDG_STATE_HOME/xobackup/logs.sqlite``."""
    secrets_file: str | None = None
    plugins: PluginsConfig = PluginsConfig()
    settings: Settings = Settings()
    limits: PoolLimits = PoolLimits()
    servers: dict[str, ServerConfig] = {}
    remotes: dict[str, RemoteConfig] = {}
    jobs: dict[str, JobConfig] = {}
    schedules: dict[str, ScheduleConfig] = {}

    source: str | None = Field(default=None, exclude=True)

    @model_validator(mode="after")
    def _references(self) -> Config:
        for job_key, job in self.jobs.items():
            for remote in job.remotes:
                if remote not in self.remotes:
                    raise _RefError(f"jobs.{job_key}.remotes", "remote", remote, self.remotes)
            for server in job.servers or []:
                if server not in self.servers:
                    raise _RefError(f"jobs.{job_key}.servers", "server", server, self.servers)
            if not job.remotes and not job.srs and not _has_snapshot_retention(self, job_key):
                raise _RefError(
                    f"jobs.{job_key}",
                    "target",
                    "",
                    {},
                    message="the job has no target: give 'remotes', 'srs', or a "
                    "snapshotRetention (rolling snapshots)",
                )
        for schedule_key, schedule in self.schedules.items():
            if schedule.job not in self.jobs:
                raise _RefError(f"schedules.{schedule_key}.job", "job", schedule.job, self.jobs)
        self._check_offline()
        return self

    def _check_offline(self) -> None:
        """Refuse at load time the offlineBackup combinations a run would refuse, per job and
        per schedule (VM-level settings are checked when the VM is backed up)."""
        for job_key, job in self.jobs.items():
            problem = offline_settings_problem(self.effective_settings(job_key), job.mode)
            if problem:
                raise _RefError(f"jobs.{job_key}.settings", "", "", {}, message=problem)
        for schedule_key, schedule in self.schedules.items():
            settings = self.effective_settings(schedule.job, schedule_key=schedule_key)
            problem = offline_settings_problem(settings, self.jobs[schedule.job].mode)
            if problem:
                raise _RefError(f"schedules.{schedule_key}", "", "", {}, message=problem)

    def job_id(self, job_key: str) -> str:
        job = self.jobs[job_key]
        return job.id or str(uuid.uuid5(JOB_NAMESPACE, job_key))

    def effective_settings(
        self,
        job_key: str,
        *,
        schedule_key: str | None = None,
        vm_uuid: str | None = None,
        target: str | None = None,
    ) -> dict[str, Any]:
        """Every setting's value for one job/schedule/VM/target, layered as the module says."""
        job = self.jobs[job_key]
        layers: list[Settings] = [self.settings, job.settings]
        if schedule_key is not None:
            layers.append(self.schedules[schedule_key])
        if vm_uuid is not None and vm_uuid in job.vm_settings:
            layers.append(job.vm_settings[vm_uuid])
        if target is not None and target in job.target_settings:
            layers.append(job.target_settings[target])
        result = dict(DEFAULT_SETTINGS)
        for layer in layers:
            for key in Settings.model_fields:
                value = getattr(layer, key)
                if value is not None:
                    result[key] = value
        return result

    def server_view(self, server_key: str) -> dict[str, Any]:
        """The server as the ``xobackup_hypervisor`` hook receives it (secrets stay Secret)."""
        server = self.servers[server_key]
        data = {name: getattr(server, name) for name in ServerConfig.model_fields}
        data["name"] = server_key
        return data

    def job_view(self, job_key: str) -> dict[str, Any]:
        """The job as plugins see it (``xobackup_select_vms``): plain data with its id."""
        job = self.jobs[job_key]
        data = job.model_dump()
        data["id"] = self.job_id(job_key)
        data["name"] = job.name or job_key
        data["key"] = job_key
        return data


def _has_snapshot_retention(config: Config, job_key: str) -> bool:
    layers = [config.settings, config.jobs[job_key].settings]
    layers += [s for s in config.schedules.values() if s.job == job_key]
    return any((layer.snapshotRetention or 0) > 0 for layer in layers)


def offline_settings_problem(settings: Mapping[str, Any], mode: str) -> str | None:
    """Why Xen Orchestra would refuse these offline settings, or None (xo-backups.md §3.2).

    ``offlineBackup`` exports the VM itself while it is shut down: there is no snapshot to
    keep, so it cannot go with ``snapshotRetention``; and XO offers it for full backups only
    (a delta needs a snapshot as the next base, which is what ``offlineSnapshot`` gives).
    """
    if not settings["offlineBackup"]:
        return None
    if settings["snapshotRetention"]:
        return (
            f"offlineBackup cannot go with snapshotRetention {settings['snapshotRetention']} "
            "(the VM itself is exported, no snapshot is kept); set snapshotRetention = 0 or use "
            "offlineSnapshot"
        )
    if mode != "full":
        return (
            f'offlineBackup is for full backups (mode = "full"); a {mode} job needs a snapshot '
            "as its next base: use offlineSnapshot instead"
        )
    return None


class _RefError(ValueError):
    """A reference to something the config does not define (carried out of pydantic)."""

    def __init__(
        self, key: str, kind: str, value: str, known: Mapping[str, Any], message: str = ""
    ) -> None:
        self.key = key
        if not message:
            choices = ", ".join(sorted(known)) or f"no {kind}s are defined"
            message = f"unknown {kind} {value!r}; defined {kind}s: {choices}"
        self.message = message
        super().__init__(message)


# -- loading ---------------------------------------------------------------------------------
def _deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_toml(path: Path, what: str) -> dict[str, Any]:
    try:
        with path.open("rb") as stream:
            return tomllib.load(stream)
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except PermissionError:
        raise ConfigError(f"{what} {path} is not readable (permission denied)") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {path} is a folder, not a file") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"not valid TOML: {error}", source=str(path)) from None
    except UnicodeDecodeError:
        raise ConfigError("not valid TOML: the file is not UTF-8 text", source=str(path)) from None


def load_config(path: Path | str | None = None) -> Config:
    """Read and validate a config file (default: :func:`default_config_path`)."""
    path = Path(path) if path is not None else default_config_path()
    data = _read_toml(path, "config file")
    secrets_file = data.get("secrets_file")
    if isinstance(secrets_file, str):
        secrets_path = Path(os.path.expanduser(secrets_file))
        if not secrets_path.is_absolute():
            secrets_path = path.parent / secrets_path
        data = _deep_merge(data, _read_toml(secrets_path, "secrets file"))
    return parse_config(data, source=str(path))


def parse_config(data: Mapping[str, Any], *, source: str = "<config>") -> Config:
    """Validate already-parsed TOML data; raise ConfigError on the first problem."""
    try:
        config = Config.model_validate(dict(data))
    except ValidationError as error:
        raise _config_error(error, source) from None
    return config.model_copy(update={"source": source})


def _config_error(error: ValidationError, source: str) -> ConfigError:
    problems = []
    for item in error.errors():
        context = item.get("ctx") or {}
        inner = context.get("error")
        if isinstance(inner, _RefError):
            problems.append((inner.key, inner.message))
            continue
        loc = [str(part) for part in item["loc"]]
        key = ".".join(loc) or "(top level)"
        kind = item["type"]
        if kind == "extra_forbidden":
            valid = _valid_keys(loc[:-1])
            message = "unknown key" + (f"; valid keys here: {', '.join(valid)}" if valid else "")
        elif kind == "missing":
            message = "required key is missing"
        elif kind in ("value_error", "assertion_error"):
            message = str(item["msg"]).removeprefix("Value error, ")
        elif kind in ("literal_error", "enum"):
            message = f"{item['msg']} (got {item.get('input')!r})"
        else:
            message = f"{item['msg']}"
            if "password" not in key and "secret" not in key:
                message += f" (got {item.get('input')!r})"
        problems.append((key, message))
    key, message = problems[0]
    if len(problems) > 1:
        others = "; ".join(f"{k}: {m}" for k, m in problems[1:4])
        message += f". Also: {others}"
    return ConfigError(message, key=key, source=source)


def _valid_keys(loc: list[str]) -> list[str]:
    """Field names of the model found by following ``loc`` from :class:`Config`."""
    node: Any = Config
    for part in loc:
        if get_origin(node) is dict:  # a table of user-named entries: skip the user's key
            node = _model_in(get_args(node)[1])
            continue
        if not (isinstance(node, type) and issubclass(node, BaseModel)):
            return []
        field = node.model_fields.get(part)
        if field is None:
            return []
        node = _model_in(field.annotation)
    if isinstance(node, type) and issubclass(node, BaseModel):
        return sorted(name for name, f in node.model_fields.items() if not f.exclude)
    return []


def _model_in(annotation: Any) -> Any:
    """Strip ``X | None`` / ``Optional[X]`` down to ``X``."""
    if get_origin(annotation) in (Union, type(int | None)):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation
