"""Live per-VM progress in the run log: readable by every process, migrated into old files."""

from __future__ import annotations

import sqlite3

from xobackup_core.logs import SCHEMA_VERSION, LogStore, Status
from xobackup_core.logs import store as store_module


def test_a_version_2_log_gains_the_progress_table_and_keeps_its_runs(db_path):
    # a log as the previous release wrote it: schema steps 1 and 2 only
    db_path.parent.mkdir(parents=True)
    raw = sqlite3.connect(db_path)
    store_module.MIGRATIONS[1](raw)
    store_module.MIGRATIONS[2](raw)
    raw.execute(
        "INSERT INTO runs (run_id, job_id, job_name, start_time, end_time, status)"
        " VALUES ('old-run', 'j', 'job', 1, 2, 'success')"
    )
    raw.execute("PRAGMA user_version = 2")
    raw.commit()
    raw.close()
    with LogStore(db_path) as store:
        assert store.schema_version == SCHEMA_VERSION == 3
        assert [run.run_id for run in store.list_runs()] == ["old-run"]
        assert store.run_progress("old-run") == {}
        store.record_progress(
            "old-run", "vm-1", name="web", stage="export", transferred=5, start=1, at=3
        )
        assert store.run_progress("old-run")["vm-1"].transferred == 5


def test_progress_is_one_row_per_vm_overwritten(store):
    run = store.start_run("j", "job", heartbeat_interval=None)
    store.record_progress(run.run_id, "vm-a", name="a", stage="snapshot", transferred=0, start=1000)
    store.record_progress(
        run.run_id, "vm-b", name="b", stage="export", transferred=10, start=1500, at=2000
    )
    store.record_progress(
        run.run_id, "vm-a", name="a", stage="export", transferred=4000, start=1000, at=3000
    )
    progress = store.run_progress(run.run_id)
    assert list(progress) == ["vm-a", "vm-b"]
    a = progress["vm-a"]
    assert (a.name, a.stage, a.status, a.transferred, a.updates) == ("a", "export", None, 4000, 2)
    assert a.speed == 2000.0  # 4000 bytes in the 2 s since the VM started
    assert progress["vm-b"].updates == 1
    with LogStore(store.path) as other:  # another process's view of the same file
        assert other.run_progress(run.run_id, pending_only=True)["vm-a"].transferred == 4000


def test_an_ended_run_keeps_its_rows_but_is_not_live(store):
    run = store.start_run("j", "job", heartbeat_interval=None)
    store.record_progress(
        run.run_id, "vm-a", name="a", stage="export", status="success", transferred=7, start=1
    )
    run.finish()
    assert run.record.status is not Status.PENDING
    assert store.run_progress(run.run_id)["vm-a"].status == "success"
    assert store.run_progress(run.run_id, pending_only=True) == {}
    # deleting the run deletes its progress
    assert store.delete_runs(before=2**62) == 1
    assert store._query("SELECT count(*) FROM progress")[0][0] == 0
