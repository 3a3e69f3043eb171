"""``xobackup daemon`` as a real process: signals, kill -9, restart.

The job's server is a socket that accepts connections and never answers, so a run stays in
progress (waiting for the pool) for as long as the test needs.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading

import pytest

from tests.scheduler.conftest import wait_until, write_config
from xobackup_core.logs.records import Status
from xobackup_core.logs.store import LogStore


@pytest.fixture
def silent_server():
    """A TCP port that accepts and never answers (a hung pool master)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    listener.close()


class DaemonProcess:
    def __init__(self, config_path, *args: str) -> None:
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "xobackup_core.cli",
                "--config",
                str(config_path),
                "daemon",
                *args,
            ],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def wait_log(self, text: str, timeout: float = 30.0) -> None:
        wait_until(lambda: text in self.log, timeout, what=f"{text!r} in:\n{self.log}")

    def signal(self, number: int) -> None:
        self.process.send_signal(number)

    def wait(self, timeout: float = 30.0) -> int:
        code = self.process.wait(timeout)
        self._reader.join(5)
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def pending_runs(db) -> list:
    with LogStore(db) as store:
        return [run for run in store.list_runs() if run.status is Status.PENDING]


def test_sighup_reloads_good_configs_and_rejects_bad_ones(tmp_path):
    path = write_config(tmp_path, {"night": {"job": "nightly", "cron": "0 3 * * *"}})
    daemon = DaemonProcess(path)
    try:
        daemon.wait_log("daemon started")
        path.write_text(path.read_text().replace("0 3 * * *", "0 3 * *"))
        daemon.signal(signal.SIGHUP)
        daemon.wait_log("config reload rejected")
        assert "schedules.night.cron" in daemon.log
        path.write_text(
            path.read_text().replace("0 3 * *", "0 3 * * *")
            + '[schedules.sunday]\njob = "weekly"\ncron = "0 4 * * 0"\n'
        )
        daemon.signal(signal.SIGHUP)
        daemon.wait_log("config reloaded: 2 enabled schedule(s)")
        assert "schedule sunday (job weekly) next runs at" in daemon.log
        daemon.signal(signal.SIGTERM)
        assert daemon.wait() == 0
        assert "daemon stopped" in daemon.log
        assert "Traceback" not in daemon.log
    finally:
        daemon.kill()


def test_sigterm_gives_running_jobs_a_grace_period_then_marks_them_interrupted(
    tmp_path, silent_server
):
    path = write_config(
        tmp_path, {"night": {"job": "nightly", "cron": "0 3 * * *"}}, server_url=silent_server
    )
    daemon = DaemonProcess(path, "--run-now", "night", "--shutdown-grace", "0.5")
    try:
        wait_until(lambda: pending_runs(tmp_path / "logs.sqlite"), what="the run to start")
        daemon.signal(signal.SIGTERM)
        assert daemon.wait() == 130
    finally:
        daemon.kill()
    assert "waiting up to 0.5 s for 1 running job(s)" in daemon.log
    with LogStore(tmp_path / "logs.sqlite") as store:
        (run,) = store.list_runs()
        assert run.status is Status.INTERRUPTED
        assert "grace period" in run.result["message"]


def test_kill_9_mid_run_then_restart_marks_the_run_interrupted(tmp_path, silent_server):
    path = write_config(
        tmp_path, {"night": {"job": "nightly", "cron": "0 3 * * *"}}, server_url=silent_server
    )
    db = tmp_path / "logs.sqlite"
    first = DaemonProcess(path, "--run-now", "night")
    try:
        wait_until(lambda: pending_runs(db), what="the run to start")
        (run,) = pending_runs(db)
        os.kill(first.process.pid, signal.SIGKILL)
        first.wait()
    finally:
        first.kill()
    assert [r.run_id for r in pending_runs(db)] == [run.run_id]  # a ghost, until...
    second = DaemonProcess(path)
    try:
        second.wait_log("daemon started")
        assert f"run {run.run_id} was left pending by a dead process" in second.log
        second.signal(signal.SIGTERM)
        assert second.wait() == 0
    finally:
        second.kill()
    with LogStore(db) as store:
        swept = store.get_run(run.run_id)
    assert swept.status is Status.INTERRUPTED
    assert f"pid {first.process.pid}" in swept.result["message"]


def test_run_now_names_an_unknown_schedule(tmp_path):
    path = write_config(tmp_path, {"night": {"job": "nightly", "cron": "0 3 * * *"}})
    daemon = DaemonProcess(path, "--run-now", "nope")
    try:
        assert daemon.wait() == 2
    finally:
        daemon.kill()
    assert "unknown schedule 'nope'; schedules in the config: night" in daemon.log
