"""Runs whose process died become interrupted, never pending forever (kill -9 for real)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys

import pytest

from xobackup_core.logs import LogStore, Status
from xobackup_core.logs.process import process_alive, process_identity

# A backup caught mid-transfer: a finished snapshot, a transfer still running.
CHILD = """
import sys, time
from xobackup_core.logs import LogStore
store = LogStore(sys.argv[1])
run = store.start_run("job-1", "nightly", heartbeat_interval=0.05)
with run.task("backup VM", {"type": "VM", "id": "u1", "name_label": "web01"}) as vm:
    with vm.task("snapshot") as snapshot:
        snapshot.set_result(id="snap-1")
    transfer = vm.task("export", {"type": "remote", "id": "nas"}).task("transfer")
    transfer.warning("slow remote")
    print(run.run_id, flush=True)
    time.sleep(120)
"""


def start_child(db_path):
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(db_path)], stdout=subprocess.PIPE, text=True
    )
    run_id = child.stdout.readline().strip()
    assert run_id, "the child process did not start its run"
    return child, run_id


def test_kill_9_leaves_an_interrupted_run(store, db_path):
    child, run_id = start_child(db_path)
    try:
        # alive: the start-up sweep leaves it alone, and it blocks a second run of the job
        assert store.mark_interrupted() == []
        assert store.get_run(run_id).status is Status.PENDING
        assert [run.run_id for run in store.running_runs("job-1")] == [run_id]
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    child.stdout.close()
    assert child.returncode == -signal.SIGKILL

    assert store.get_run(run_id).status is Status.PENDING  # nothing changes by itself...
    assert store.mark_interrupted() == [run_id]  # ...until the next start-up
    run = store.get_run(run_id)
    assert run.status is Status.INTERRUPTED
    assert f"pid {child.pid}" in run.error and "stopped before the run ended" in run.error
    statuses = {task.name: task.status for task in run.walk()}
    assert statuses == {
        "backup VM": Status.INTERRUPTED,
        "snapshot": Status.SUCCESS,
        "export": Status.INTERRUPTED,
        "transfer": Status.INTERRUPTED,
    }
    # ended at the last sign of life, not at the time of the sweep
    tasks = list(run.walk())
    signs = [run.heartbeat, *(t.start for t in tasks)]
    signs += [t.end for t in tasks if t.status is Status.SUCCESS]
    signs += [w.time for t in tasks for w in t.warnings]
    assert run.end == max(signs)
    assert all(task.end is not None for task in run.walk())
    # no ghost: the job is free again, and a second sweep has nothing to do
    assert store.running_runs("job-1") == []
    assert store.mark_interrupted() == []


def test_a_reused_pid_is_not_the_run_process(store):
    recorder = store.start_run("job-1", "nightly", heartbeat_interval=None)
    # the run's pid now names another process (started later): as after a reboot
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        identity = process_identity(os.getpid())
        if identity is None:
            pytest.skip("this system does not expose process start times (/proc)")
        store._execute("UPDATE runs SET pid = ? WHERE run_id = ?", (other.pid, recorder.run_id))
        assert process_alive(other.pid)
        assert not process_alive(other.pid, identity)
        assert store.mark_interrupted() == [recorder.run_id]
    finally:
        other.kill()
        other.wait()
    assert store.get_run(recorder.run_id).status is Status.INTERRUPTED
    # the recorder's own late ending cannot turn the run back to success
    assert recorder.finish().status is Status.INTERRUPTED
    assert store.get_run(recorder.run_id).status is Status.INTERRUPTED


def test_another_host_is_judged_by_its_heartbeat(store, db_path):
    fresh = store.start_run("job-1", "nightly", heartbeat_interval=None)
    stale = store.start_run("job-2", "weekly", heartbeat_interval=None)
    with sqlite3.connect(db_path) as raw:
        raw.execute("UPDATE runs SET hostname = 'proxy-2', pid = 1")
        now = raw.execute("SELECT max(heartbeat) FROM runs").fetchone()[0]
        raw.execute(
            "UPDATE runs SET heartbeat = ? WHERE run_id = ?", (now - 3_600_000, stale.run_id)
        )
    assert store.mark_interrupted(stale_after=600, now=now + 1000) == [stale.run_id]
    assert store.get_run(fresh.run_id).status is Status.PENDING
    run = store.get_run(stale.run_id)
    assert run.status is Status.INTERRUPTED and "proxy-2" in run.error
    assert run.end == now - 3_600_000
    # the fresh one goes too once its heartbeat is old enough
    assert store.mark_interrupted(stale_after=600, now=now + 601_000) == [fresh.run_id]


def test_process_alive_for_a_zombie():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped: a zombie
    try:
        assert not process_alive(child.pid)
    finally:
        child.wait()
    assert not process_alive(child.pid)
    assert process_alive(os.getpid(), process_identity(os.getpid()))


def test_a_second_process_sweeps_at_start_up(db_path):
    child, run_id = start_child(db_path)
    child.kill()
    child.wait(timeout=10)
    child.stdout.close()
    sweep = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from xobackup_core.logs import LogStore;"
            "print(LogStore(sys.argv[1]).mark_interrupted())",
            str(db_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert sweep.returncode == 0, sweep.stderr
    assert run_id in sweep.stdout
    with LogStore(db_path) as store:
        assert store.get_run(run_id).status is Status.INTERRUPTED
