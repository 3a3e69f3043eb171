"""``xobackup logs`` and ``xobackup logs show``: output, JSON, colours, exit codes."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys

import pytest
from click.testing import CliRunner

from tests.logs.conftest import record_backup, vm
from tests.logs.test_interrupted import start_child
from xobackup_core.cli.main import cli
from xobackup_core.errors import ExitCode
from xobackup_core.logs import LogStore
from xobackup_core.logs.render import format_time

ANSI = re.compile(r"\x1b\[[0-9;]*m")
GREEN, RED, YELLOW = "\x1b[32m", "\x1b[31m", "\x1b[33m"


@pytest.fixture
def home(tmp_path, monkeypatch):
    """No config file; the state folder (the default log's home) inside tmp_path."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.delenv("XOBACKUP_CONFIG", raising=False)
    monkeypatch.delenv("NO_COLOR", raising=False)
    return tmp_path


@pytest.fixture
def default_db(home):
    return home / "state" / "xobackup" / "logs.sqlite"


def invoke(*args, color=False, env=None):
    runner = CliRunner()
    return runner.invoke(cli, ["--no-plugin-autoload", *args], color=color, env=env)


@pytest.fixture
def recorded(default_db):
    """Three runs: a success (2 VMs, 1 MiB each), a failure, a skip, plus a warning."""
    with LogStore(default_db) as store:
        ok = record_backup(store, "job-a", "Nightly", [("u1", "web01"), ("u2", "db01")], size=2**20)
        failed = record_backup(store, "job-a", "Nightly", [("u1", "web01")], fail=("web01",))
        skipped = record_backup(store, "job-b", "Weekly", [("u3", "mail")], skip=("mail",))
        recorder = store.start_run("job-b", "Weekly", heartbeat_interval=None)
        with recorder, recorder.task("backup VM", vm("u4", "files")) as task:
            task.warning("Backup fell back to a full")
            task.task("transfer").finish(size=5 * 2**30)
    return {"ok": ok, "failed": failed, "skipped": skipped, "warned": recorder.record}


def test_missing_log_lists_nothing(home, default_db):
    result = invoke("logs")
    assert result.exit_code == 0 and result.output == ""
    result = invoke("logs", "--json")
    assert result.exit_code == 0 and json.loads(result.output) == []
    assert not default_db.exists()  # reading never creates it


def test_plain_listing(recorded):
    result = invoke("logs")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert not ANSI.search(result.output)  # not a terminal: no colour
    order = ["warned", "skipped", "failed", "ok"]
    assert len(lines) == 4
    for line, key in zip(lines, order, strict=True):
        run = recorded[key]
        assert line.startswith(f"{format_time(run.start)}  {run.run_id[:8]}  ")
        assert run.status.value in line.split()
    assert lines[3].split()[3] == "Nightly" and lines[3].endswith("2.0 MiB")
    assert lines[0].endswith("5.0 GiB")
    assert lines[1].split()[-1] == "-"  # a skipped run moved nothing
    # aligned columns: the status column starts at the same place on every line
    assert (
        len({line.index(recorded[k].status.value) for line, k in zip(lines, order, strict=True)})
        == 1
    )


def test_listing_filters(recorded):
    def listed(*args):
        result = invoke("logs", *args)
        assert result.exit_code == 0, result.output
        return [line.split()[2] for line in result.output.splitlines()]

    short = {key: run.run_id[:8] for key, run in recorded.items()}
    assert listed("--status", "failure") == [short["failed"]]
    assert listed("--status", "skipped", "--status", "failure") == [
        short["skipped"],
        short["failed"],
    ]
    assert listed("--job", "weekly") == [short["warned"], short["skipped"]]
    assert listed("--vm", "db01") == [short["ok"]]
    assert listed("--search", "fell back") == [short["warned"]]
    assert listed("--since", "1h", "--limit", "1") == [short["warned"]]
    assert listed("--since", "2099-01-01") == []


def test_json_listing(recorded):
    result = invoke("logs", "--json", "--job", "job-a")
    assert result.exit_code == 0
    payload = json.loads(result.output)
    assert [run["runId"] for run in payload] == [
        recorded["failed"].run_id,
        recorded["ok"].run_id,
    ]
    assert payload[1]["status"] == "success" and payload[1]["size"] == 2 * 2**20
    assert payload[0]["status"] == "failure" and "tasks" not in payload[0]


def test_colours_on_a_terminal(recorded, monkeypatch):
    result = invoke("logs", color=True)
    assert f"{GREEN}success" in result.output and f"{RED}" in result.output
    assert "\x1b[2mskipped" in result.output  # dim
    forced = invoke("logs", "--color", "always")
    assert f"{GREEN}success" in forced.output
    never = invoke("logs", "--color", "never", color=True)
    assert not ANSI.search(never.output)
    no_color = invoke("logs", color=True, env={"NO_COLOR": "1"})
    assert not ANSI.search(no_color.output)
    assert ANSI.sub("", result.output) == no_color.output


def test_show_tree(recorded, default_db):
    run = recorded["ok"]
    with sqlite3.connect(default_db) as raw:  # each transfer took 2 s: 1 MiB at 512 KiB/s
        raw.execute("UPDATE tasks SET end_time = start_time + 2000 WHERE name = 'transfer'")
    result = invoke("logs", "show", run.run_id[:8])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"run {run.run_id}  success"
    assert lines[1] == "job Nightly (job-a)"
    tree = [line for line in lines if line.lstrip().startswith("- ")]
    assert tree[0].startswith("- backup VM web01 (u1)  success  ")
    assert tree[1].startswith("  - snapshot  success")
    assert tree[2].startswith("  - export remote nas  success")
    assert tree[3].startswith("    - transfer  success")
    assert tree[3].endswith("  2.0s  1.0 MiB  512.0 KiB/s")
    assert tree[4].startswith("- backup VM db01 (u2)")
    assert len(tree) == 8


def test_show_failure_and_warnings_coloured(recorded):
    failed = invoke("logs", "show", recorded["failed"].run_id, "--color", "always")
    assert failed.exit_code == 0
    assert f"run {recorded['failed'].run_id}  {RED}" in failed.output
    assert f"{RED}internal error: RuntimeError" in failed.output
    warned = invoke("logs", "show", recorded["warned"].run_id[:12], color=True)
    assert f"{YELLOW}warning: Backup fell back to a full" in warned.output
    assert "5.0 GiB" in warned.output
    skipped = invoke("logs", "show", recorded["skipped"].run_id)
    assert "no disks found" in skipped.output and "skipped" in skipped.output


def test_show_json(recorded):
    run = recorded["failed"]
    result = invoke("logs", "show", run.run_id[:8], "--json")
    assert result.exit_code == 0
    payload = json.loads(result.output)
    assert payload["runId"] == run.run_id and payload["status"] == "failure"
    [vm_task] = payload["tasks"]
    assert vm_task["data"] == vm("u1", "web01")
    assert vm_task["result"]["message"] == "internal error: RuntimeError"
    assert [t["name"] for t in vm_task["tasks"]] == ["snapshot", "export"]


def test_show_unknown_and_ambiguous_ids(recorded, default_db):
    result = invoke("logs", "show", "ffffffff-nope")
    assert result.exit_code == ExitCode.USAGE
    assert "no run 'ffffffff-nope' in the log database" in result.output
    with sqlite3.connect(default_db) as raw:
        raw.execute("UPDATE runs SET run_id = 'abc1' || run_id WHERE job_id = 'job-a'")
    result = invoke("logs", "show", "abc1")
    assert result.exit_code == ExitCode.USAGE and "matches several runs" in result.output


def test_bad_arguments_exit_2(recorded):
    result = invoke("logs", "--status", "weird")
    assert result.exit_code == ExitCode.USAGE and "valid statuses" in result.output
    result = invoke("logs", "--since", "last tuesday")
    assert result.exit_code == ExitCode.USAGE and "neither an age" in result.output


def test_show_without_a_log(home):
    result = invoke("logs", "show", "abc")
    assert result.exit_code == ExitCode.USAGE and "no log database" in result.output


def test_db_option_and_config_log_db(home, recorded):
    other = home / "elsewhere.sqlite"
    with LogStore(other) as store:
        only = record_backup(store, "job-z", "Other", [("u9", "z")])
    result = invoke("logs", "--db", str(other))
    assert [line.split()[2] for line in result.output.splitlines()] == [only.run_id[:8]]
    result = invoke("logs", "show", only.run_id[:8], "--db", str(other))
    assert result.exit_code == 0 and "job Other (job-z)" in result.output
    # --db on the group reaches show too
    result = invoke("logs", "--db", str(other), "show", only.run_id[:8])
    assert result.exit_code == 0

    config = home / "conf" / "config.toml"
    config.parent.mkdir()
    config.write_text('log_db = "../elsewhere.sqlite"\n')  # relative to the config file
    result = invoke("--config", str(config), "logs", "--json")
    assert [run["runId"] for run in json.loads(result.output)] == [only.run_id]


def test_the_command_sweeps_dead_runs(default_db):
    default_db.parent.mkdir(parents=True)
    child, run_id = start_child(default_db)
    child.kill()
    child.wait(timeout=10)
    child.stdout.close()
    result = invoke("logs", "--status", "interrupted")
    assert [line.split()[2] for line in result.output.splitlines()] == [run_id[:8]]


def test_real_process_exit_codes(recorded, default_db):
    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", "xobackup_core.cli", "--no-plugin-autoload", "logs", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )

    listed = run("--db", str(default_db), "--status", "failure")
    assert listed.returncode == 0 and recorded["failed"].run_id[:8] in listed.stdout
    assert not ANSI.search(listed.stdout)
    unknown = run("show", "0000", "--db", str(default_db))
    assert unknown.returncode == ExitCode.USAGE
    assert unknown.stderr.startswith("xobackup: error: no run '0000'")
    assert "Traceback" not in unknown.stderr


def test_show_a_running_run_with_its_progress(default_db):
    with LogStore(default_db) as store:
        run = store.start_run("job-a", "Nightly", heartbeat_interval=None)  # this process: alive
        run.task("backup VM", vm("u1", "web01"))
        store.record_progress(
            run.run_id, "u1", name="web01", stage="export", transferred=3 * 2**20, start=0, at=2000
        )
        result = invoke("logs", "show", run.run_id)
        assert result.exit_code == 0, result.output
        assert result.output.splitlines()[-1] == "now: web01  export  3.0 MiB  1.5 MiB/s"
        run.finish()
    ended = invoke("logs", "show", run.run_id)
    assert ended.exit_code == 0 and "now:" not in ended.output
