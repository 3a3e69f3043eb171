"""The daemon loop under a manual clock: when schedules fire, overlap, reloads, shutdown."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from datetime import UTC, datetime

import pytest

from tests.scheduler.conftest import RunnerFactory, load, wait_until, write_config
from xobackup_core.hookspecs import hookimpl
from xobackup_core.logs.records import Status
from xobackup_core.scheduler.clock import ManualClock
from xobackup_core.scheduler.daemon import Daemon


class Reports:
    """A reporter plugin that remembers the runs it heard of."""

    def __init__(self) -> None:
        self.runs: list[dict] = []

    @hookimpl
    def xobackup_run_finished(self, run):
        self.runs.append(dict(run))


def epoch(*args: int) -> float:
    return datetime(*args, tzinfo=UTC).timestamp()


class Running:
    """A daemon in a thread, driven by a manual clock."""

    def __init__(self, path, store, plugins, start: float, grace: float = 5.0) -> None:
        self.clock = ManualClock(start)
        self.factory = RunnerFactory(self.clock)
        self.daemon = Daemon(
            lambda: load(path),
            plugins,
            store,
            clock=self.clock,
            runner_factory=self.factory,
            shutdown_grace=grace,
        )
        self.thread = threading.Thread(target=self.daemon.run, daemon=True)
        self.thread.start()
        self.settle()

    def settle(self) -> None:
        assert self.clock.wait_until_idle(), "the daemon did not go back to sleep"
        wait_until(lambda: not self.daemon.running_jobs, what="runs to end")

    def at(self, moment: float) -> list[float]:
        """Move the clock to ``moment``; the instants of the runs that started."""
        before = len(self.factory.fired)
        self.clock.set(moment)
        self.settle()
        return [fired.at for fired in self.factory.fired[before:]]

    def stop(self) -> None:
        self.factory.release.set()
        self.daemon.request_stop()
        self.thread.join(10)
        assert not self.thread.is_alive()


@pytest.mark.parametrize(
    ("zone", "start", "fires"),
    [
        (
            "Europe/Paris",
            epoch(2026, 3, 27, 12),
            [epoch(2026, 3, 28, 1, 30), epoch(2026, 3, 29, 1), epoch(2026, 3, 30, 0, 30)],
        ),
        (
            "Europe/Paris",
            epoch(2026, 10, 23, 12),
            [epoch(2026, 10, 24, 0, 30), epoch(2026, 10, 25, 0, 30), epoch(2026, 10, 26, 1, 30)],
        ),
        (
            "America/New_York",
            epoch(2026, 3, 6, 12),
            [epoch(2026, 3, 7, 7, 30), epoch(2026, 3, 8, 7), epoch(2026, 3, 9, 6, 30)],
        ),
        (
            "America/New_York",
            epoch(2026, 10, 31, 12),
            [epoch(2026, 11, 1, 7, 30), epoch(2026, 11, 2, 7, 30)],
        ),
    ],
)
def test_schedules_fire_at_the_right_instants_across_dst(
    tmp_path, store, plugins, zone, start, fires
):
    path = write_config(
        tmp_path, {"night": {"job": "nightly", "cron": "30 2 * * *", "timezone": zone}}
    )
    running = Running(path, store, plugins, start)
    try:
        for moment in fires:
            # one second early: nothing; on time: exactly one run, at that instant. A
            # spurious instant in between would show as a run at the "early" step.
            assert running.at(moment - 1) == []
            assert running.at(moment) == [moment]
        assert running.at(fires[-1] + 3600 * 20) == []
    finally:
        running.stop()
    runs = store.list_runs()
    assert len(runs) == len(fires)
    assert {run.schedule_id for run in runs} == {"night"}


def test_a_timezone_set_on_the_job_settings_is_used(tmp_path, store, plugins):
    path = write_config(
        tmp_path,
        {"night": {"job": "nightly", "cron": "0 3 * * *"}},
        settings={"timezone": "Asia/Tokyo"},
    )
    running = Running(path, store, plugins, epoch(2026, 5, 1, 12))
    try:
        assert running.daemon.next_runs() == {"night": epoch(2026, 5, 1, 18)}  # 03:00 JST
    finally:
        running.stop()


def test_disabled_schedules_never_fire(tmp_path, store, plugins):
    path = write_config(
        tmp_path,
        {
            "off": {"job": "nightly", "cron": "* * * * *", "enabled": False},
            "on": {"job": "weekly", "cron": "0 * * * *"},
        },
    )
    running = Running(path, store, plugins, epoch(2026, 5, 1, 12, 0, 30))
    try:
        assert running.at(epoch(2026, 5, 1, 12, 59)) == []
        assert running.at(epoch(2026, 5, 1, 13)) == [epoch(2026, 5, 1, 13)]
    finally:
        running.stop()
    assert [fired.job for fired in running.factory.fired] == ["weekly"]


def test_a_job_never_runs_twice_at_once(tmp_path, store, plugins):
    path = write_config(tmp_path, {"often": {"job": "nightly", "cron": "*/5 * * * *"}})
    running = Running(path, store, plugins, epoch(2026, 5, 1, 12, 1))
    running.factory.release.clear()  # runs last until released
    try:
        running.clock.set(epoch(2026, 5, 1, 12, 5))
        assert running.clock.wait_until_idle()
        wait_until(lambda: len(running.factory.fired) == 1, what="the first run")
        first = running.factory.fired[0].run_id
        running.clock.set(epoch(2026, 5, 1, 12, 10))  # fires while the first still runs
        assert running.clock.wait_until_idle()
        wait_until(lambda: len(store.list_runs()) == 2, what="the skipped run")
        assert len(running.factory.fired) == 1
        skipped = store.list_runs()[0]
        assert skipped.status is Status.SKIPPED
        assert skipped.result == {"message": f"the job is already running (run {first})"}
        assert skipped.schedule_id == "often"
        running.factory.release.set()
        wait_until(lambda: not running.daemon.running_jobs, what="the first run to end")
        assert running.at(epoch(2026, 5, 1, 12, 15)) == [epoch(2026, 5, 1, 12, 15)]
    finally:
        running.stop()
    statuses = [run.status for run in store.list_runs()]
    assert statuses == [Status.SUCCESS, Status.SKIPPED, Status.SUCCESS]


def test_a_run_of_another_process_blocks_but_a_dead_one_does_not(tmp_path, store, plugins):
    path = write_config(tmp_path, {"often": {"job": "nightly", "cron": "*/5 * * * *"}})
    config = load(path)
    job_id = config.job_id("nightly")
    # a pending run left by a process that died (kill -9): a ghost that must not block
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os, sys; from xobackup_core.logs.store import LogStore; "
            "s = LogStore(sys.argv[1]); s.start_run(sys.argv[2], 'nightly',"
            " heartbeat_interval=None); os._exit(0)",
            str(tmp_path / "logs.sqlite"),
            job_id,
        ],
        check=True,
    )
    assert child.returncode == 0
    # a live one: this test process's own pending run, as a manual `xobackup run` would be
    live = store.start_run(job_id, "nightly", heartbeat_interval=None)
    reports = Reports()
    plugins.register(reports, "reports-for-tests")
    running = Running(path, store, plugins, epoch(2026, 5, 1, 12, 1))
    try:
        assert running.at(epoch(2026, 5, 1, 12, 5)) == []
        live.finish()
        assert running.at(epoch(2026, 5, 1, 12, 10)) == [epoch(2026, 5, 1, 12, 10)]
    finally:
        running.stop()
    runs = store.list_runs()
    # newest first: the daemon's run, its skipped attempt, the live run (nothing in it: a
    # skip), the dead process's run swept as interrupted at start-up
    assert [run.status for run in runs] == [
        Status.SUCCESS,
        Status.SKIPPED,
        Status.SKIPPED,
        Status.INTERRUPTED,
    ]
    assert runs[1].result == {"message": f"the job is already running (run {live.run_id})"}
    assert runs[2].run_id == live.run_id
    # reporters heard the swept run (at start-up) and the skipped one
    assert [(r["runId"], r["status"]) for r in reports.runs] == [
        (runs[3].run_id, "interrupted"),
        (runs[1].run_id, "skipped"),
    ]


def test_sighup_style_reload_keeps_the_old_config_when_the_new_one_is_bad(
    tmp_path, store, plugins, caplog
):
    caplog.set_level(logging.INFO, logger="xobackup.daemon")
    path = write_config(tmp_path, {"hourly": {"job": "nightly", "cron": "0 * * * *"}})
    running = Running(path, store, plugins, epoch(2026, 5, 1, 12, 30))
    try:
        path.write_text(path.read_text().replace('cron = "0 * * * *"', 'cron = "not a cron"'))
        running.daemon.request_reload()
        running.settle()
        wait_until(lambda: "config reload rejected" in caplog.text, what="the rejection log")
        assert running.daemon.next_runs() == {"hourly": epoch(2026, 5, 1, 13)}
        assert running.at(epoch(2026, 5, 1, 13)) == [epoch(2026, 5, 1, 13)]

        path.write_text(path.read_text().replace('cron = "not a cron"', 'cron = "45 * * * *"'))
        running.daemon.request_reload()
        wait_until(
            lambda: running.daemon.next_runs() == {"hourly": epoch(2026, 5, 1, 13, 45)},
            what="the reload",
        )
        running.settle()
        assert running.at(epoch(2026, 5, 1, 13, 44)) == []
        assert running.at(epoch(2026, 5, 1, 13, 45)) == [epoch(2026, 5, 1, 13, 45)]
    finally:
        running.stop()
    assert "config reloaded" in caplog.text


def test_stop_waits_for_runs_then_marks_the_rest_interrupted(tmp_path, store, plugins):
    path = write_config(tmp_path, {"often": {"job": "nightly", "cron": "*/5 * * * *"}})
    reports = Reports()
    plugins.register(reports, "reports-for-tests")
    running = Running(path, store, plugins, epoch(2026, 5, 1, 12, 1), grace=0.3)
    running.factory.release.clear()
    running.clock.set(epoch(2026, 5, 1, 12, 5))
    wait_until(lambda: len(running.factory.fired) == 1, what="the run to start")
    running.daemon.request_stop()
    running.thread.join(10)
    assert not running.thread.is_alive()
    run = store.get_run(running.factory.fired[0].run_id)
    assert run.status is Status.INTERRUPTED
    assert "grace period" in run.result["message"]
    assert [task.status for task in run.tasks] == [Status.INTERRUPTED]
    assert running.daemon.abandoned == [run.run_id]
    assert [(r["runId"], r["status"]) for r in reports.runs] == [(run.run_id, "interrupted")]
    running.factory.release.set()


def test_a_second_stop_request_ends_the_grace_period_at_once(tmp_path, store, plugins):
    path = write_config(tmp_path, {"often": {"job": "nightly", "cron": "*/5 * * * *"}})
    running = Running(path, store, plugins, epoch(2026, 5, 1, 12, 1), grace=3600)
    running.factory.release.clear()
    running.clock.set(epoch(2026, 5, 1, 12, 5))
    wait_until(lambda: len(running.factory.fired) == 1, what="the run to start")
    running.daemon.request_stop()
    running.thread.join(0.3)
    assert running.thread.is_alive()  # within its grace period
    running.daemon.request_stop()
    running.thread.join(10)
    assert not running.thread.is_alive()
    assert store.get_run(running.factory.fired[0].run_id).status is Status.INTERRUPTED
    running.factory.release.set()
