"""Cancel requests, deadlines and the run guard; the schedules and cancel commands."""

from __future__ import annotations

import json
import sqlite3
import threading

import pytest
from click.testing import CliRunner

from tests.scheduler.conftest import write_config
from xobackup_core.cli.main import cli
from xobackup_core.errors import CancelledError
from xobackup_core.logs import store as store_module
from xobackup_core.logs.store import LogStore
from xobackup_core.scheduler.cancel import cancel_request, request_cancel
from xobackup_core.scheduler.guard import Deadline, RunGuard, RunTimeoutError


class FakeTime:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_check_reads_cancel_requests_at_most_every_interval(tmp_path, monkeypatch):
    """Streams call check() per chunk: it must not read SQLite each time, yet it must see a
    cancel request soon after it is made (here with no watcher thread running)."""
    from xobackup_core.scheduler import guard as guard_module

    reads = []
    real = guard_module.cancel_request
    monkeypatch.setattr(
        guard_module, "cancel_request", lambda *args: reads.append(1) or real(*args)
    )
    with LogStore(tmp_path / "logs.sqlite") as store:
        recorder = store.start_run("job-1", "nightly", heartbeat_interval=None)
        guard = RunGuard(store, recorder.run_id)  # not entered: no watcher thread
        for _ in range(2000):
            guard.check()
        assert 1 <= len(reads) <= 3
        request_cancel(store, recorder.run_id, by="alice")
        with pytest.raises(CancelledError, match="cancelled by alice"):
            for _ in range(10**7):
                guard.check()
        recorder.finish()


def test_deadline_names_what_ran_out_and_bounds_its_children():
    clock = FakeTime()
    job = Deadline(7200, what="job 'nightly'", clock=clock)
    vm = job.child(600, what="VM web-1")
    unlimited = Deadline(0, clock=clock)
    clock.now += 599
    vm.check()
    assert vm.remaining() == pytest.approx(1)
    clock.now += 2
    with pytest.raises(
        RunTimeoutError, match=r"VM web-1 exceeded its timeout of 10 min \(setting 'vmTimeout'\)"
    ):
        vm.check()
    job.check()
    late_vm = job.child(3600, what="VM db-1")
    clock.now += 7000
    assert late_vm.remaining() == 0  # the job's budget ends first
    with pytest.raises(
        RunTimeoutError, match=r"job 'nightly' exceeded its timeout of 2 h \(setting 'timeout'\)"
    ):
        late_vm.check()
    assert unlimited.remaining() is None and not unlimited.expired


def test_cancel_request_reaches_the_guard_and_its_callbacks(tmp_path):
    with LogStore(tmp_path / "logs.sqlite") as store:
        recorder = store.start_run("job-1", "nightly", heartbeat_interval=None)
        stopped = threading.Event()
        reasons = []
        with RunGuard(store, recorder.run_id, poll_interval=0.05) as guard:
            guard.on_stop(lambda error: (reasons.append(error), stopped.set()))
            guard.check()  # nothing asked yet
            assert request_cancel(store, recorder.run_id, by="alice")
            assert not request_cancel(store, recorder.run_id, by="bob")
            assert stopped.wait(5)
            with pytest.raises(
                CancelledError, match=f"run {recorder.run_id} was cancelled by alice"
            ):
                guard.check()
        assert isinstance(reasons[0], CancelledError)
        late = []
        guard.on_stop(late.append)  # registered after the fact: called at once
        assert late == [reasons[0]]
        assert cancel_request(store, recorder.run_id).requested_by == "alice"
        recorder.finish()


def test_the_guard_stops_a_run_at_its_deadline(tmp_path):
    with LogStore(tmp_path / "logs.sqlite") as store:
        recorder = store.start_run("job-1", "nightly", heartbeat_interval=None)
        fired = threading.Event()
        with RunGuard(store, recorder.run_id, Deadline(0.2, what="job 'nightly'")) as guard:
            guard.on_stop(lambda _error: fired.set())
            assert fired.wait(5)
            with pytest.raises(RunTimeoutError):
                guard.check()
        recorder.finish()


def test_the_guard_watches_vm_deadlines_without_stopping_the_run(tmp_path):
    with LogStore(tmp_path / "logs.sqlite") as store:
        recorder = store.start_run("job-1", "nightly", heartbeat_interval=None)
        job = Deadline(3600, what="job 'nightly'")
        timed_out = []
        fired = threading.Event()
        with RunGuard(store, recorder.run_id, job, poll_interval=5) as guard:
            slow = job.child(0.2, what="VM web-1")
            guard.watch(slow, lambda error: (timed_out.append(error), fired.set()))
            unwatched = guard.watch(job.child(0.2, what="VM db-1"), timed_out.append)
            unwatched()
            assert fired.wait(5)  # well before the 5 s poll interval
            guard.check()  # the run goes on
        assert [str(error) for error in timed_out] == [
            "VM web-1 exceeded its timeout of 0.2 s (setting 'vmTimeout')"
        ]
        recorder.finish()


def test_a_version_1_log_gains_the_cancel_table(tmp_path):
    path = tmp_path / "old.sqlite"
    raw = sqlite3.connect(path)
    store_module._schema_v1(raw)
    raw.execute("PRAGMA user_version = 1")
    raw.execute(
        "INSERT INTO runs (run_id, job_id, job_name, start_time, status) "
        "VALUES ('r1', 'j', 'nightly', 1, 'pending')"
    )
    raw.commit()
    raw.close()
    with LogStore(path) as store:
        assert store.schema_version == store_module.SCHEMA_VERSION
        assert cancel_request(store, "r1") is None
        assert request_cancel(store, "r1", by="me")
        assert cancel_request(store, "r1").run_id == "r1"


def invoke(path, *args):
    return CliRunner().invoke(cli, ["--config", str(path), *args], catch_exceptions=False)


def test_cancel_command(tmp_path):
    path = write_config(tmp_path, {})
    with LogStore(tmp_path / "logs.sqlite") as store:
        running = store.start_run("job-1", "nightly", heartbeat_interval=None)
        done = store.start_run("job-1", "nightly", heartbeat_interval=None)
        done.finish()
        result = invoke(path, "cancel", running.run_id[:8])
        assert result.exit_code == 0, result.output
        assert f"cancel requested for run {running.run_id}" in result.output
        assert cancel_request(store, running.run_id) is not None
        again = invoke(path, "cancel", running.run_id)
        assert "already requested" in again.output
        ended = invoke(path, "cancel", done.run_id)
        assert ended.exit_code == 2
        assert "is not running: it ended skipped" in ended.output
        assert cancel_request(store, done.run_id) is None
        unknown = invoke(path, "cancel", "ffffffff")
        assert unknown.exit_code == 2 and "no run has the id 'ffffffff'" in unknown.output
        running.finish()


def test_schedules_command_lists_next_runs_in_local_time_and_utc(tmp_path):
    path = write_config(
        tmp_path,
        {
            "night": {"job": "nightly", "cron": "30 2 * * *", "timezone": "Europe/Paris"},
            "off": {"job": "weekly", "cron": "0 4 * * 0", "enabled": False},
        },
    )
    result = invoke(path, "schedules", "--json", "--count", "4")
    assert result.exit_code == 0, result.output
    night, off = json.loads(result.output)
    assert (night["job"], night["cron"], night["timezone"], night["enabled"]) == (
        "nightly",
        "30 2 * * *",
        "Europe/Paris",
        True,
    )
    assert len(night["next"]) == 4
    for moment in night["next"]:
        assert moment["local"][11:16] in ("02:30", "03:00")  # 03:00 on a spring-forward day
        assert moment["utc"].endswith("+00:00")
    assert off["enabled"] is False and off["next"] == []
    text = invoke(path, "schedules").output
    assert "night: job nightly, '30 2 * * *' Europe/Paris, enabled" in text
    assert "off: job weekly, '0 4 * * 0' UTC, disabled" in text


def test_a_cron_the_evaluator_refuses_names_the_schedule(tmp_path):
    path = write_config(tmp_path, {"bad": {"job": "nightly", "cron": "61 * * * *"}})
    result = invoke(path, "schedules")
    assert result.exit_code == 2
    assert "schedules.bad: '61 * * * *' is not a valid cron expression" in result.output
