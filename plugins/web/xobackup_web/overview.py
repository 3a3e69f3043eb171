"""What the web pages and the JSON API show, read from the same places the CLI reads.

Jobs and schedules come from the config (next runs as ``xobackup schedules`` computes them),
runs and their task trees from the SQLite run log (as ``xobackup logs`` reads them), backups
from the remotes (as ``xobackup backups list`` lists them). "Run now" starts the job as
``xobackup run`` does, in a thread of the server process, after the same "already running"
check; the run's own job lock on its remotes still guards against other hosts.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from xobackup_core.cli.context import AppContext
from xobackup_core.config import Config, Secret, redact_url
from xobackup_core.engine.progress import Progress
from xobackup_core.engine.repository import BackupRepository
from xobackup_core.engine.runner import JobRunner
from xobackup_core.errors import UsageError, XobackupError
from xobackup_core.hookspecs import hookimpl
from xobackup_core.logs import LogStore, RunFilter, RunRecord, Status
from xobackup_core.plugins import Plugins
from xobackup_core.scheduler.clock import SystemClock
from xobackup_core.scheduler.daemon import cron_of, running_run_of

START_TIMEOUT = 60.0
"""Seconds "run now" waits for the engine to open the run's log entry."""


class JobRunningError(UsageError):
    """The job already has a run in progress (``run_id``), here or in another process."""

    def __init__(self, job: str, run_id: str) -> None:
        super().__init__(f"job {job!r} is already running (run {run_id})")
        self.run_id = run_id


class UnknownError(UsageError):
    """A job, schedule, run or remote the request names does not exist."""


class SecretScrubber:
    """Replaces every secret of the config (and the server's own token) in text shown.

    Config secrets are :class:`~xobackup_core.config.Secret` objects that already print as
    ``***``; this is the second line of defence for values that reach a page or an answer
    in another way (an error message quoting a URL, a plugin's task data).
    """

    def __init__(self, secrets: Iterable[str]) -> None:
        # longest first, so a secret containing another is replaced whole
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    @classmethod
    def from_config(cls, config: Config, extra: Iterable[Secret | None] = ()) -> SecretScrubber:
        """Every password, secret key and URL password of the config, and ``extra``."""
        values: list[str] = []
        for server in config.servers.values():
            if server.password is not None:
                values.append(server.password.reveal())
            values.append(urlsplit(server.url).password or "")
        for remote in config.remotes.values():
            for secret in (remote.password, remote.secret_key, remote.encryption_key):
                if secret is not None:
                    values.append(secret.reveal())
            try:
                values.append(urlsplit(remote.url).password or "")
            except ValueError:
                values.append(remote.url)  # unparsable: never show it at all
        values += [secret.reveal() for secret in extra if secret is not None]
        return cls(values)

    def text(self, value: str) -> str:
        for secret in self.secrets:
            if secret in value:
                value = value.replace(secret, "***")
        return value

    def data(self, value: Any) -> Any:
        """``value`` (JSON-like: dicts, lists, strings...) with secrets replaced in strings."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {self.text(str(k)): self.data(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.data(item) for item in value]
        if isinstance(value, Secret):
            return "***"
        return value


@dataclass
class VmProgress:
    """Live figures of one VM of a run started by this server."""

    name: str
    stage: str = "starting"
    transferred: int = 0
    started: float = field(default_factory=time.monotonic)
    status: str | None = None

    def to_dict(self) -> dict[str, Any]:
        elapsed = max(time.monotonic() - self.started, 1e-3)
        return {
            "name": self.name,
            "stage": self.status or self.stage,
            "transferred": self.transferred,
            "speed": self.transferred / elapsed if self.transferred else None,
        }


class LiveProgress(Progress):
    """Keeps the engine's progress events of one run for the pages (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.vms: dict[str, VmProgress] = {}

    def vm_started(self, vm_uuid: str, name: str) -> None:
        with self._lock:
            self.vms[vm_uuid] = VmProgress(name)

    def stage(self, vm_uuid: str, stage: str) -> None:
        with self._lock:
            if vm_uuid in self.vms:
                self.vms[vm_uuid].stage = stage

    def transferred(self, vm_uuid: str, size: int) -> None:
        with self._lock:
            if vm_uuid in self.vms:
                self.vms[vm_uuid].transferred += size

    def vm_finished(self, vm_uuid: str, status: str) -> None:
        with self._lock:
            if vm_uuid in self.vms:
                self.vms[vm_uuid].status = status

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """VM uuid → name, stage, bytes transferred so far and speed (bytes/s)."""
        with self._lock:
            return {uuid: vm.to_dict() for uuid, vm in self.vms.items()}


@dataclass
class _Launch:
    """A "run now" between the click and the run's log entry."""

    job_id: str
    progress: LiveProgress
    started: threading.Event = field(default_factory=threading.Event)
    run_id: str | None = None
    error: str | None = None


class _RunStartedListener:
    """A plugin registered in the server process: learns the id of each run it launched.

    ``xobackup_run_started`` is called right after the engine creates the run's log entry,
    which is the earliest moment its id exists.
    """

    def __init__(self, overview: Overview) -> None:
        self.overview = overview

    @hookimpl
    def xobackup_run_started(self, run: dict[str, Any]) -> None:
        self.overview._run_started(run)


class Overview:
    """The server's view of one config, its run log, its remotes and its plugins."""

    def __init__(self, app: AppContext, *, token: Secret | None = None) -> None:
        self.config = app.config  # first: it may unload plugins the config disables
        self.app = app
        self.plugins: Plugins = app.plugins
        self.store: LogStore = app.log_store()
        self.scrubber = SecretScrubber.from_config(self.config, [token])
        self._lock = threading.Lock()
        self._launching: dict[str, _Launch] = {}
        self._progress: dict[str, LiveProgress] = {}
        self.plugins.register(_RunStartedListener(self), "web.run-started")

    def close(self) -> None:
        self.store.close()

    # -- jobs and schedules ------------------------------------------------------------------
    def job_key(self, name: str) -> str:
        """The config key of a job given by key, name or id; UnknownError otherwise."""
        config = self.config
        for key, job in config.jobs.items():
            if name in (key, job.name, config.job_id(key)):
                return key
        known = ", ".join(sorted(config.jobs)) or "none defined"
        raise UnknownError(f"unknown job {name!r}; jobs in the config: {known}")

    def schedules(self, count: int = 3, job_key: str | None = None) -> list[dict[str, Any]]:
        """Schedules with their next ``count`` runs, as ``xobackup schedules --json``."""
        config = self.config
        now = datetime.fromtimestamp(SystemClock().now(), UTC)
        rows = []
        for key, schedule in config.schedules.items():
            if job_key is not None and schedule.job != job_key:
                continue
            cron = cron_of(config, key)
            upcoming = cron.upcoming(now, count) if schedule.enabled else []
            rows.append(
                {
                    "schedule": key,
                    "name": schedule.name or key,
                    "job": schedule.job,
                    "cron": schedule.cron,
                    "timezone": cron.timezone,
                    "enabled": schedule.enabled,
                    "next": [
                        {
                            "local": moment.isoformat(),
                            "utc": moment.astimezone(UTC).isoformat(),
                            "ms": int(moment.timestamp() * 1000),
                            "text": moment.strftime("%a %Y-%m-%d %H:%M %Z"),
                        }
                        for moment in upcoming
                    ],
                }
            )
        return rows

    def jobs(self) -> list[dict[str, Any]]:
        """Every job: mode, what it selects, targets, schedules, last and running run."""
        config = self.config
        rows = []
        for key, job in config.jobs.items():
            job_id = config.job_id(key)
            last = self.store.list_runs(RunFilter(job=job_id, limit=1))
            if job.vms is not None:
                selection: dict[str, Any] = {"vms": list(job.vms)}
            else:
                smart = job.smart.model_dump() if job.smart else {}
                selection = {"smart": {k: v for k, v in smart.items() if v not in ([], None)}}
            rows.append(
                {
                    "key": key,
                    "id": job_id,
                    "name": job.name or key,
                    "mode": job.mode,
                    "selection": selection,
                    "remotes": list(job.remotes),
                    "srs": list(job.srs),
                    "schedules": self.schedules(job_key=key),
                    "lastRun": last[0].to_dict(tasks=False) if last else None,
                    "runningRunId": running_run_of(self.store, job_id),
                }
            )
        return rows

    # -- runs --------------------------------------------------------------------------------
    def runs(self, run_filter: RunFilter) -> list[RunRecord]:
        """Run summaries, newest first (``xobackup logs``)."""
        return self.store.list_runs(run_filter)

    def notes(self, runs: Iterable[RunRecord]) -> dict[str, dict[str, Any]]:
        """Per run id: the first error (the run's, else its first failed task's, with the VM
        it concerns) and how many warnings the run and its tasks carry, for run lists."""
        notes = {}
        for summary in runs:
            run = self.store.get_run(summary.run_id)
            if run is None:
                continue
            error = run.error
            if error is None and run.status is not Status.SUCCESS:
                for vm_task in run.tasks:
                    failed = next(
                        (t for t in vm_task.walk() if t.error and t.status is not Status.SUCCESS),
                        None,
                    )
                    if failed is not None:
                        data = vm_task.data if isinstance(vm_task.data, dict) else {}
                        where = data.get("name_label") or data.get("id")
                        error = f"{where}: {failed.error}" if where else failed.error
                        break
            warnings = len(run.warnings) + sum(len(task.warnings) for task in run.walk())
            notes[run.run_id] = {"error": error, "warnings": warnings}
        return notes

    def run(self, run_id: str) -> RunRecord:
        """One run with its task tree, by full id or prefix; UnknownError if there is none."""
        full_id = self.store.find_run(run_id)
        run = self.store.get_run(full_id) if full_id else None
        if run is None:
            raise UnknownError(f"no run {run_id!r} in the log")
        return run

    def progress(self, run_id: str) -> dict[str, dict[str, Any]] | None:
        """Live per-VM figures (name, stage, transferred, speed) of a run in progress; None
        once it has ended.

        A run this server started has them in memory; any other (the daemon's, a
        ``xobackup run``'s) from the run log, where its engine records them about once a
        second, so its figures are at most that old.
        """
        live = self._progress.get(run_id)
        if live is not None:
            return live.snapshot()
        recorded = self.store.run_progress(run_id, pending_only=True)
        if not recorded:
            return None
        return {
            uuid: {
                "name": vm.name,
                "stage": vm.status or vm.stage,
                "transferred": vm.transferred,
                "speed": vm.speed,
            }
            for uuid, vm in recorded.items()
        }

    def fingerprint(self) -> str:
        """Changes whenever a page would: a new or ended run, a task or message of a running
        one, bytes moved by a running run. Cheap enough to poll every second."""
        parts: list[Any] = [
            (run.run_id, run.status.value, run.end) for run in self.runs(RunFilter(limit=20))
        ]
        for summary in self.store.running_runs():
            run = self.store.get_run(summary.run_id)
            if run is None:
                continue
            parts.append([(task.id, task.status.value) for task in run.walk()])
            parts.append(sum(len(task.warnings) + len(task.infos) for task in run.walk()))
            parts.append(self.progress(run.run_id))
        return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]

    def running(self) -> list[str]:
        """Ids of the runs in progress, in any live process."""
        return [run.run_id for run in self.store.running_runs()]

    # -- run now -----------------------------------------------------------------------------
    def start_run(self, job: str, schedule: str | None = None) -> str:
        """Start a run of ``job`` in a background thread and return its run id at once.

        Raises :class:`JobRunningError` when the job already runs (in this server, the daemon
        or a ``xobackup run``), :class:`UnknownError` for an unknown job or schedule.
        """
        config = self.config
        job_key = self.job_key(job)
        if schedule is not None:
            if schedule not in config.schedules or config.schedules[schedule].job != job_key:
                mine = [k for k, s in config.schedules.items() if s.job == job_key]
                known = ", ".join(mine) or "none"
                raise UnknownError(
                    f"unknown schedule {schedule!r} for job {job_key!r}; its schedules: {known}"
                )
        else:  # as `xobackup run`: the job's first schedule's settings apply
            schedule = next((k for k, s in config.schedules.items() if s.job == job_key), None)
        job_id = config.job_id(job_key)
        with self._lock:
            if job_id in self._launching:
                raise JobRunningError(job_key, "being started")
            running = running_run_of(self.store, job_id)
            if running is not None:
                raise JobRunningError(job_key, running)
            launch = _Launch(job_id, LiveProgress())
            self._launching[job_id] = launch
        thread = threading.Thread(
            target=self._execute,
            args=(job_key, schedule, launch),
            name=f"web-run-{job_key}",
            daemon=True,  # an unfinished run is marked interrupted by the next reader
        )
        thread.start()
        if not launch.started.wait(START_TIMEOUT) or launch.run_id is None:
            raise XobackupError(
                f"job {job_key!r} did not start: {launch.error or 'no log entry after a minute'}"
            )
        return launch.run_id

    def _run_started(self, run: dict[str, Any]) -> None:
        with self._lock:
            launch = self._launching.pop(str(run.get("jobId")), None)
        if launch is None:
            return
        launch.run_id = str(run["runId"])
        self._progress[launch.run_id] = launch.progress
        launch.started.set()

    def _execute(self, job_key: str, schedule: str | None, launch: _Launch) -> None:
        runner = None
        try:
            runner = JobRunner(self.config, self.plugins, self.store, progress=launch.progress)
            runner.run(job_key, schedule)
        except Exception as error:  # the run's log has the details; the click must not hang
            launch.error = self.scrubber.text(str(error))
        finally:
            if runner is not None:
                runner.close()
            with self._lock:
                self._launching.pop(launch.job_id, None)
            if launch.run_id is not None:
                self._progress.pop(launch.run_id, None)
            launch.started.set()

    # -- backups on remotes ------------------------------------------------------------------
    def remotes(self) -> list[dict[str, Any]]:
        """Configured remotes: name, type, whether enabled, URL without its password."""
        return [
            {
                "name": name,
                "type": remote.url.split("://", 1)[0],
                "url": self.scrubber.text(redact_url(remote.url)),
                "enabled": remote.enabled,
            }
            for name, remote in self.config.remotes.items()
        ]

    def backups(self, vm: str | None = None, remote: str | None = None) -> dict[str, Any]:
        """Every backup on the remotes (``xobackup backups list --json`` rows), and the
        remotes that could not be read with the reason."""
        names = list(self.config.remotes)
        if remote is not None:
            if remote not in names:
                raise UnknownError(
                    f"unknown remote {remote!r}; remotes in the config: {', '.join(names)}"
                )
            names = [remote]
        rows: list[dict[str, Any]] = []
        errors: list[dict[str, str]] = []
        for name in names:
            if not self.config.remotes[name].enabled and remote is None:
                continue
            try:
                rows += list(self._remote_backups(name, vm))
            except XobackupError as error:
                errors.append({"remote": name, "error": self.scrubber.text(str(error))})
        rows.sort(key=lambda row: (row["vmName"] or row["vm"], row["remote"], -row["timestamp"]))
        return {"backups": rows, "errors": errors}

    def _remote_backups(self, name: str, vm: str | None) -> Iterator[dict[str, Any]]:
        with self.app.open_remote(name) as remote:
            repository = BackupRepository(remote)
            for vm_uuid in repository.list_vms():
                for backup in repository.list_backups(vm_uuid):
                    if vm and vm not in (backup.vm_uuid, backup.vm_name):
                        continue
                    yield backup.listing(name)

    def backups_per_vm(self, vm: str | None = None) -> dict[str, Any]:
        """Backups grouped by VM, then by remote (newest first), with the unreadable remotes."""
        listing = self.backups(vm=vm)
        jobs = self.config.jobs
        job_names = {self.config.job_id(key): job.name or key for key, job in jobs.items()}
        vms: dict[str, dict[str, Any]] = {}
        for row in listing["backups"]:
            entry = vms.setdefault(
                row["vm"], {"vm": row["vm"], "vmName": row["vmName"], "remotes": {}}
            )
            entry["vmName"] = entry["vmName"] or row["vmName"]
            row = {**row, "jobName": job_names.get(row["jobId"], row["jobId"])}
            entry["remotes"].setdefault(row["remote"], []).append(row)
        return {"vms": list(vms.values()), "errors": listing["errors"]}
