import json
import textwrap

import pytest

from xobackup_core.config import (
    Secret,
    load_config,
    parse_config,
    parse_duration,
    redact_url,
)
from xobackup_core.errors import ConfigError, ExitCode

GOOD = """
log_db = "/tmp/logs.sqlite"

[settings]
concurrency = 4
reportWhen = "always"

[limits]
snapshots = 3

[servers.lab]
url = "https://pool-master.example"
password = "{password}"

[remotes.nas]
url = "file:///srv/backups"

[remotes.s3]
url = "s3://bucket/prefix"
access_key = "AKIA"
secret_key = {{ env = "TEST_S3_SECRET" }}

[jobs.nightly]
mode = "delta"
remotes = ["nas", "s3"]
smart = {{ pools = ["lab"], tags = ["prod"], not_tags = ["scratch"] }}
settings = {{ fullInterval = 7, timeout = "2h" }}
vm_settings = {{ "vm-1" = {{ concurrency = 1 }} }}
target_settings = {{ s3 = {{ exportRetention = 30 }} }}

[schedules.every-night]
job = "nightly"
cron = "0 3 * * *"
timezone = "Europe/Paris"
exportRetention = 7
"""


def write(tmp_path, text, name="config.toml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_valid_config_and_layered_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_S3_SECRET", "s3-secret-value")
    config = load_config(write(tmp_path, GOOD.format(password="pool-pw")))
    assert config.limits.snapshots == 3 and config.limits.disk_exports == 12
    assert config.servers["lab"].password.reveal() == "pool-pw"
    assert config.remotes["s3"].secret_key.reveal() == "s3-secret-value"
    job = config.jobs["nightly"]
    assert job.smart.tags == ["prod"]
    base = config.effective_settings("nightly")
    assert base["concurrency"] == 4 and base["fullInterval"] == 7 and base["timeout"] == 7200
    assert base["exportRetention"] == 1 and base["snapshotRetention"] == 0
    scheduled = config.effective_settings("nightly", schedule_key="every-night")
    assert scheduled["exportRetention"] == 7
    per_target = config.effective_settings("nightly", schedule_key="every-night", target="s3")
    assert per_target["exportRetention"] == 30
    per_vm = config.effective_settings("nightly", vm_uuid="vm-1")
    assert per_vm["concurrency"] == 1
    assert config.job_id("nightly") == config.job_id("nightly")
    assert config.job_view("nightly")["id"] == config.job_id("nightly")


def test_job_id_is_stable_and_distinct():
    data = {
        "remotes": {"r": {"url": "file:///x"}},
        "jobs": {"a": {"mode": "full", "remotes": ["r"]}, "b": {"mode": "full", "remotes": ["r"]}},
    }
    first, second = parse_config(data), parse_config(data)
    assert first.job_id("a") == second.job_id("a") != first.job_id("b")


def test_secrets_never_show(tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_S3_SECRET", "s3-secret-value")
    config = load_config(write(tmp_path, GOOD.format(password="pool-pw")))
    dumped = config.model_dump_json()
    assert '"password":"***"' in dumped
    assert config.server_view("lab")["password"].reveal() == "pool-pw"
    shown = " ".join(
        [repr(config), str(config), dumped, json.dumps(config.model_dump(), default=str)]
    )
    assert "pool-pw" not in shown and "s3-secret-value" not in shown
    assert str(Secret("x")) == "***" and repr(Secret("x")) == "Secret('***')"


def test_secret_from_file_and_secrets_file(tmp_path):
    (tmp_path / "pw.txt").write_text("from-file\n")
    (tmp_path / "secrets.toml").write_text('[servers.lab]\npassword = "from-secrets-file"\n')
    config = load_config(
        write(
            tmp_path,
            f"""
            secrets_file = "secrets.toml"
            [servers.lab]
            url = "https://h"
            [servers.other]
            url = "https://o"
            password = {{ file = "{tmp_path / "pw.txt"}" }}
            """,
        )
    )
    assert config.servers["lab"].password.reveal() == "from-secrets-file"
    assert config.servers["other"].password.reveal() == "from-file"


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [
        ("[jobs.a]\nmode = 'fast'\n", "jobs.a.mode", "'full' or 'delta'"),
        (
            "[jobs.a]\nmode = 'full'\nremotes = ['nope']\n",
            "jobs.a.remotes",
            "unknown remote 'nope'",
        ),
        ("[remotes.n]\nurl = 'file:///x'\nbogus = 1\n", "remotes.n.bogus", "valid keys here: "),
        ("[settings]\nconcurrenc = 2\n", "settings.concurrenc", "concurrency"),
        ("[settings]\nconcurrency = 'two'\n", "settings.concurrency", "integer"),
        ("[settings]\nexportRetention = -1\n", "settings.exportRetention", "greater than or equal"),
        ("[settings]\ntimeout = 'soon'\n", "settings.timeout", "not a duration"),
        ("[settings]\ntimezone = 'Mars/Olympus'\n", "settings.timezone", "unknown IANA timezone"),
        ("[servers.p]\nusername = 'root'\n", "servers.p.url", "required key is missing"),
        ("[remotes.n]\nurl = '/srv/backups'\n", "remotes.n.url", "has no scheme"),
        (
            "[remotes.r]\nurl='file:///x'\n[jobs.a]\nmode='full'\nremotes=['r']\n"
            "[schedules.s]\njob='b'\ncron='0 3 * * *'\n",
            "schedules.s.job",
            "unknown job 'b'; defined jobs: a",
        ),
        (
            "[remotes.r]\nurl='file:///x'\n[jobs.a]\nmode='full'\nremotes=['r']\n"
            "[schedules.s]\njob='a'\ncron='every night'\n",
            "schedules.s.cron",
            "5 fields",
        ),
        ("[jobs.a]\nmode = 'full'\n", "jobs.a", "no target"),
        (
            "[remotes.r]\nurl='file:///x'\n[jobs.a]\nmode='full'\nremotes=['r']\nvms=['x']\n"
            "smart={}\n",
            "jobs.a",
            "not both",
        ),
    ],
)
def test_invalid_configs_name_key_and_problem(tmp_path, text, key, fragment):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: {key}: "), message
    assert fragment in message
    assert caught.value.exit_code == ExitCode.USAGE


def test_malformed_toml_gives_line(tmp_path):
    path = write(tmp_path, "[jobs.a\nmode = 'full'\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value).startswith(f"{path}: not valid TOML")
    assert "line 1, column 8" in str(caught.value)


def test_missing_env_secret_is_reported_without_value(tmp_path, monkeypatch):
    monkeypatch.delenv("NO_SUCH_SECRET", raising=False)
    path = write(
        tmp_path, "[servers.p]\nurl = 'https://h'\npassword = { env = 'NO_SUCH_SECRET' }\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert "servers.p.password" in str(caught.value)
    assert "NO_SUCH_SECRET is not set" in str(caught.value)


def test_wrong_type_on_password_does_not_echo_it(tmp_path):
    path = write(tmp_path, "[servers.p]\nurl = 'https://h'\npassword = ['hunter2']\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert "hunter2" not in str(caught.value)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(tmp_path)


def test_durations_and_url_redaction():
    assert parse_duration("10m") == 600 and parse_duration(5) == 5 and parse_duration("1d") == 86400
    assert parse_duration("500ms") == 0.5
    with pytest.raises(ValueError):
        parse_duration("-1")
    assert redact_url("s3://AKIA:topsecret@host/bucket") == "s3://AKIA:***@host/bucket"
    assert redact_url("smb://user@host/share") == "smb://user@host/share"
