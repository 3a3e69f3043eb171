"""Recording runs into a real SQLite file and reading them back."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading

import pytest

from tests.logs.conftest import record_backup, vm
from xobackup_core.errors import RemoteConnectionError, UsageError
from xobackup_core.logs import (
    SCHEMA_VERSION,
    LogStore,
    RunFilter,
    Status,
    TaskSkipped,
    run_status,
)


def test_nested_tree_is_read_back_in_order(store, db_path):
    recorder = store.start_run("job-1", "nightly", "sched-1", {"mode": "delta"})
    with recorder:
        recorder.info("vms", {"vms": ["u1"]})
        with recorder.task("backup VM", vm("u1", "web01")) as vm_task:
            with vm_task.task("snapshot") as snapshot:
                snapshot.set_result(id="snap-1")
            with vm_task.task("export", {"type": "remote", "id": "nas", "isFull": True}) as export:
                with export.task("transfer") as transfer:
                    transfer.set_result(size=3 * 1024**2)
                    transfer.info("Transfer data using NBD")
                with export.task("merge") as merge:
                    merge.set_result(merged=5)
            with vm_task.task("export", {"type": "SR", "id": "sr-1"}) as export_sr:
                with export_sr.task("transfer") as transfer:
                    transfer.set_result(size=1024**2)
    assert recorder.status is Status.SUCCESS

    # read back through a second connection, as another process would
    with LogStore(db_path) as reader:
        run = reader.get_run(recorder.run_id)
    assert run is not None
    assert (run.job_id, run.job_name, run.schedule_id) == ("job-1", "nightly", "sched-1")
    assert run.data == {"mode": "delta"}
    assert run.status is Status.SUCCESS and run.end is not None and run.end >= run.start
    assert [i.message for i in run.infos] == ["vms"] and run.infos[0].data == {"vms": ["u1"]}
    [vm_task] = run.tasks
    assert vm_task.name == "backup VM" and vm_task.data["name_label"] == "web01"
    assert [child.name for child in vm_task.children] == ["snapshot", "export", "export"]
    snapshot, export, export_sr = vm_task.children
    assert snapshot.result == {"id": "snap-1"}
    assert export.data["isFull"] is True
    assert [c.name for c in export.children] == ["transfer", "merge"]
    assert export.children[0].infos[0].message == "Transfer data using NBD"
    assert export.children[0].parent_id == export.id
    assert all(task.status is Status.SUCCESS for task in run.walk())
    # sizes add up the transfers: 3 MiB + 1 MiB; the merge has no size
    assert export.size == 3 * 1024**2
    assert vm_task.size == run.size == 4 * 1024**2
    assert run.to_dict()["tasks"][0]["tasks"][1]["tasks"][0]["result"] == {"size": 3 * 1024**2}
    json.dumps(run.to_dict())  # JSON-ready
    # the summary carries the same size without loading the tree
    [summary] = store.list_runs()
    assert summary.total_size == 4 * 1024**2 and summary.tasks == []


def test_failure_message_and_propagation(store):
    recorder = store.start_run("job-1", "nightly", heartbeat_interval=None)
    with recorder:
        with pytest.raises(RemoteConnectionError):
            with recorder.task("backup VM", vm("u1", "web01")) as vm_task:
                with vm_task.task("export", {"type": "remote", "id": "nas"}):
                    raise RemoteConnectionError("connection reset", remote="nas", operation="write")
        with pytest.raises(KeyError):
            with recorder.task("backup VM", vm("u2", "db01")):
                raise KeyError("password=hunter2")
        with recorder.task("backup VM", vm("u3", "mail")):
            pass
    run = store.get_run(recorder.run_id)
    first, second, third = run.tasks
    assert first.status is Status.FAILURE
    assert first.error == "remote 'nas' write: connection reset"
    assert first.children[0].status is Status.FAILURE
    assert first.children[0].result["name"] == "RemoteConnectionError"
    # a non-xobackup exception keeps only its type: its text may hold anything
    assert second.status is Status.FAILURE and second.error == "internal error: KeyError"
    assert "hunter2" not in json.dumps(run.to_dict())
    assert third.status is Status.SUCCESS
    # one VM failed: the run failed
    assert run.status is Status.FAILURE


def test_run_status_rule(store):
    ok = record_backup(store, "j", "job", [("u1", "a"), ("u2", "b")])
    assert ok.status is Status.SUCCESS
    one_failed = record_backup(store, "j", "job", [("u1", "a"), ("u2", "b")], fail=("b",))
    assert one_failed.status is Status.FAILURE
    assert [t.status for t in one_failed.tasks] == [Status.SUCCESS, Status.FAILURE]
    all_skipped = record_backup(store, "j", "job", [("u1", "a"), ("u2", "b")], skip=("a", "b"))
    assert all_skipped.status is Status.SKIPPED
    assert all_skipped.tasks[0].error == "no disks found"
    some_skipped = record_backup(store, "j", "job", [("u1", "a"), ("u2", "b")], skip=("a",))
    assert some_skipped.status is Status.SUCCESS
    nothing = record_backup(store, "j", "job", [])
    assert nothing.status is Status.SKIPPED
    # each status is what the database holds, not only what the recorder returned
    stored = {run.run_id: run.status for run in store.list_runs()}
    for record in (ok, one_failed, all_skipped, some_skipped, nothing):
        assert stored[record.run_id] is record.status


def test_a_failed_target_does_not_fail_the_vm_or_the_run(store):
    recorder = store.start_run("j", "job", heartbeat_interval=None)
    with recorder, recorder.task("backup VM", vm("u1", "a")) as vm_task:
        with vm_task.task("export", {"type": "remote", "id": "nas"}) as export:
            export.fail("remote 'nas' is full", code="ENOSPC")
        vm_task.warning("target nas dropped", {"remote": "nas"})
        with vm_task.task("export", {"type": "remote", "id": "s3"}) as export:
            export.task("transfer").finish(size=10)
    run = recorder.record
    assert run.status is Status.SUCCESS
    [vm_task] = run.tasks
    assert vm_task.status is Status.SUCCESS
    assert vm_task.children[0].status is Status.FAILURE
    assert vm_task.children[0].result == {"message": "remote 'nas' is full", "code": "ENOSPC"}
    assert [(w.message, w.data) for w in vm_task.warnings] == [
        ("target nas dropped", {"remote": "nas"})
    ]


def test_run_level_error_and_task_skipped_exception(store):
    recorder = store.start_run("j", "job", heartbeat_interval=None)
    with pytest.raises(UsageError), recorder:
        with recorder.task("backup VM", vm("u1", "a")):
            raise TaskSkipped("unhealthy VDI chain")
        recorder.warning("pool is in maintenance")
        raise UsageError("no server named 'pool1'")
    run = store.get_run(recorder.run_id)
    assert run.tasks[0].status is Status.SKIPPED
    assert run.tasks[0].error == "unhealthy VDI chain"
    assert run.status is Status.FAILURE and run.error == "no server named 'pool1'"
    assert [w.message for w in run.warnings] == ["pool is in maintenance"]


def test_finish_closes_forgotten_tasks_and_is_idempotent(store):
    recorder = store.start_run("j", "job", heartbeat_interval=None)
    vm_task = recorder.task("backup VM", vm("u1", "a"))
    recorder.task("clean", parent=vm_task)
    first = recorder.finish()
    assert recorder.finish() is first
    run = store.get_run(recorder.run_id)
    assert {t.status for t in run.walk()} == {Status.INTERRUPTED}
    assert run.status is Status.FAILURE
    # a task ended later cannot reopen anything: the first ending wins
    assert vm_task.finish(Status.SUCCESS) is False


def test_first_ending_wins(store):
    recorder = store.start_run("j", "job", heartbeat_interval=None)
    with recorder, recorder.task("backup VM", vm("u1", "a")) as task:
        task.skip("no disks found")
    assert store.get_run(recorder.run_id).tasks[0].status is Status.SKIPPED


def test_keyboard_interrupt_marks_interrupted(store):
    recorder = store.start_run("j", "job", heartbeat_interval=None)
    with pytest.raises(KeyboardInterrupt), recorder, recorder.task("backup VM", vm("u1", "a")):
        raise KeyboardInterrupt
    run = store.get_run(recorder.run_id)
    assert run.status is Status.INTERRUPTED
    assert run.tasks[0].status is Status.INTERRUPTED


def test_listener_hears_every_event_even_if_it_breaks(store):
    events = []

    class Listener:
        def run_started(self, run):
            events.append(("run_started", run["runId"], run["jobName"]))

        def task_finished(self, run_id, task):
            events.append(("task_finished", task["name"], task["status"], task["warnings"]))
            raise RuntimeError("a broken reporter")

        def run_finished(self, run):
            events.append(("run_finished", run["status"], len(run["tasks"])))

    recorder = store.start_run("j", "job", listener=Listener(), heartbeat_interval=None)
    with recorder, recorder.task("backup VM", vm("u1", "a")) as vm_task:
        vm_task.warning("slow")
    assert events == [
        ("run_started", recorder.run_id, "job"),
        ("task_finished", "backup VM", "success", [{"message": "slow"}]),
        ("run_finished", "success", 1),
    ]
    assert recorder.record.status is Status.SUCCESS


def test_plugins_facade_is_a_listener(store):
    from xobackup_core.hookspecs import hookimpl
    from xobackup_core.plugins import Plugins

    heard = []

    class Reporter:
        @hookimpl
        def xobackup_task_finished(self, run_id, task):
            heard.append((run_id, task["name"], task["status"]))

        @hookimpl
        def xobackup_run_finished(self, run):
            heard.append((run["runId"], "run", run["status"]))

    plugins = Plugins(autoload=False, extra=[("reporter", Reporter())])
    recorder = store.start_run("j", "job", listener=plugins, heartbeat_interval=None)
    with recorder, recorder.task("backup VM", vm("u1", "a")):
        pass
    run_id = recorder.run_id
    assert heard == [(run_id, "backup VM", "success"), (run_id, "run", "success")]


def test_heartbeat_thread_refreshes_the_run(store):
    recorder = store.start_run("j", "job", heartbeat_interval=0.05)
    first = store.get_run(recorder.run_id).heartbeat
    deadline = threading.Event()
    for _ in range(100):
        if store.get_run(recorder.run_id).heartbeat > first:
            break
        deadline.wait(0.02)
    assert store.get_run(recorder.run_id).heartbeat > first
    recorder.finish()
    assert not recorder._heartbeat_thread.is_alive()


def test_eight_threads_record_concurrently(store):
    recorder = store.start_run("j", "job", heartbeat_interval=0.01)
    errors = []
    barrier = threading.Barrier(8)

    def backup(index):
        try:
            barrier.wait()
            with recorder.task("backup VM", vm(f"u{index}", f"vm{index}")) as vm_task:
                for step in range(20):
                    with vm_task.task(f"transfer {step}") as transfer:
                        transfer.set_result(size=index * 100 + step)
                        transfer.warning(f"w{index}-{step}")
                if index == 3:
                    raise RuntimeError("boom")
        except Exception as error:
            errors.append(error)

    threads = [threading.Thread(target=backup, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    run = recorder.finish()
    assert [str(e) for e in errors] == ["boom"]
    assert len(run.tasks) == 8
    by_name = {task.data["name_label"]: task for task in run.tasks}
    for index in range(8):
        task = by_name[f"vm{index}"]
        assert len(task.children) == 20
        assert [c.name for c in task.children] == [f"transfer {s}" for s in range(20)]
        assert [c.warnings[0].message for c in task.children] == [
            f"w{index}-{s}" for s in range(20)
        ]
        assert task.size == sum(index * 100 + s for s in range(20))
        expected = Status.FAILURE if index == 3 else Status.SUCCESS
        assert task.status is expected
    assert run.status is Status.FAILURE


CHILD_WRITER = """
import sys
from xobackup_core.logs import LogStore
store = LogStore(sys.argv[1], timeout=60)
for n in range(int(sys.argv[2])):
    with store.start_run("job-" + sys.argv[3], "proc" + sys.argv[3], heartbeat_interval=None) as r:
        with r.task("backup VM", {"type": "VM", "id": str(n), "name_label": "vm"}) as t:
            t.warning("w")
            t.task("transfer").finish(size=1)
"""


def test_several_processes_write_the_same_file(db_path):
    db_path.parent.mkdir(parents=True)
    children = [
        subprocess.Popen([sys.executable, "-c", CHILD_WRITER, str(db_path), "25", str(i)])
        for i in range(3)
    ]
    assert [child.wait(timeout=60) for child in children] == [0, 0, 0]
    with LogStore(db_path) as store:
        runs = store.list_runs(RunFilter(limit=None))
        assert len(runs) == 75
        assert {run.status for run in runs} == {Status.SUCCESS}
        counts = {f"job-{i}": 0 for i in range(3)}
        for run in runs:
            counts[run.job_id] += 1
            assert run.total_size == 1
        assert counts == {"job-0": 25, "job-1": 25, "job-2": 25}
        tree = store.get_run(runs[0].run_id)
        assert [w.message for w in tree.tasks[0].warnings] == ["w"]


def test_schema_version_and_reopening(db_path):
    with LogStore(db_path) as store:
        assert store.schema_version == SCHEMA_VERSION
        record_backup(store, "j", "job", [("u1", "a")])
    with sqlite3.connect(db_path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with LogStore(db_path) as store:
        assert len(store.list_runs()) == 1


def test_a_newer_schema_is_refused(db_path):
    LogStore(db_path).close()
    raw = sqlite3.connect(db_path)
    raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    raw.close()
    with pytest.raises(UsageError, match="newer than this xobackup"):
        LogStore(db_path)


def test_migration_hook_runs_missing_steps(db_path, monkeypatch):
    from xobackup_core.logs import store as store_module

    LogStore(db_path).close()

    def add_column(db):
        db.execute("ALTER TABLE runs ADD COLUMN note TEXT")

    monkeypatch.setattr(store_module, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    monkeypatch.setitem(store_module.MIGRATIONS, SCHEMA_VERSION + 1, add_column)
    with LogStore(db_path) as store:
        assert store.schema_version == SCHEMA_VERSION + 1
        columns = [row[1] for row in store._query("PRAGMA table_info(runs)")]
    assert "note" in columns


def test_not_a_database(tmp_path):
    path = tmp_path / "logs.sqlite"
    path.write_bytes(b"this is not SQLite" * 100)
    with pytest.raises(UsageError, match=r"logs\.sqlite: not a usable SQLite database"):
        LogStore(path)


def test_unwritable_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UsageError, match="cannot create its folder"):
        LogStore(blocker / "sub" / "logs.sqlite")


def test_run_status_function_counts_nested_vm_tasks():
    from xobackup_core.logs import TaskRecord

    def task(name, status, data=None, children=()):
        record = TaskRecord(name, "r", None, name, data, status, 0, 1, None)
        record.children = list(children)
        return record

    nested_vm = task("backup VM", Status.FAILURE, {"type": "VM"})
    pool = task("pool", Status.SUCCESS, children=[nested_vm])
    assert run_status([pool]) is Status.FAILURE
    ok_vm = task("backup VM", Status.SUCCESS, {"type": "VM"})
    failed_transfer = task("transfer", Status.FAILURE)
    export = task("export", Status.SUCCESS, children=[failed_transfer])
    ok_vm.children = [export]
    assert run_status([ok_vm]) is Status.SUCCESS
    assert run_status([ok_vm], failed=True) is Status.FAILURE
    assert run_status([task("x", Status.CANCELLED, {"type": "VM"}), ok_vm]) is Status.CANCELLED


def test_delete_old_runs_with_their_tasks(store, db_path):
    old = record_backup(store, "j", "job", [("u1", "a")])
    with store.start_run("j", "job", heartbeat_interval=None) as recorder:
        recorder.task("backup VM", vm("u1", "a")).warning("w")
    running = store.start_run("j", "job", heartbeat_interval=None)
    with sqlite3.connect(db_path) as raw:
        raw.execute("UPDATE runs SET start_time = 0")  # all three are very old
    assert store.delete_runs(before=1) == 2  # the pending one stays
    assert [run.run_id for run in store.list_runs()] == [running.run_id]
    with sqlite3.connect(db_path) as raw:
        assert raw.execute("SELECT count(*) FROM tasks").fetchone()[0] == 0
        assert raw.execute("SELECT count(*) FROM messages").fetchone()[0] == 0
    assert store.get_run(old.run_id) is None
    running.finish()
    with pytest.raises(RuntimeError, match="is finished"):
        running.task("late")
