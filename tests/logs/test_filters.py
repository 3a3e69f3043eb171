"""Listing runs: every filter on its own, then combined; newest first; limit."""

from __future__ import annotations

import sqlite3
import time
from datetime import UTC, datetime, timedelta

import pytest

from tests.logs.conftest import record_backup, vm
from xobackup_core.errors import UsageError
from xobackup_core.logs import RunFilter, Status, parse_since

DAY = 86_400_000


@pytest.fixture
def runs(store, db_path):
    """Five runs of two jobs, started 10, 5, 3, 1 and 0 days ago."""
    made = {
        "old": record_backup(store, "job-a", "Nightly", [("u1", "web01")]),
        "failed": record_backup(
            store, "job-a", "Nightly", [("u1", "web01"), ("u2", "db01")], fail=("db01",)
        ),
        "skipped": record_backup(store, "job-b", "Weekly", [("u3", "mail")], skip=("mail",)),
        "warned": None,
        "new": record_backup(store, "job-b", "Weekly", [("u2", "db01")]),
    }
    recorder = store.start_run("job-a", "Nightly", heartbeat_interval=None)
    with recorder, recorder.task("backup VM", vm("u4", "files")) as task:
        task.warning("Backup fell back to a full", {"reason": "checksum_mismatch"})
    made["warned"] = recorder.record
    ages = {"old": 10, "failed": 5, "skipped": 3, "warned": 1, "new": 0}
    now = int(time.time() * 1000)
    with sqlite3.connect(db_path) as raw:
        for key, days in ages.items():
            start = now - days * DAY - 60_000
            raw.execute(
                "UPDATE runs SET start_time = ?, end_time = ? WHERE run_id = ?",
                (start, start + 30_000, made[key].run_id),
            )
    return {key: record.run_id for key, record in made.items()}


def names(store, runs, **filters):
    by_id = {run_id: key for key, run_id in runs.items()}
    return [by_id[run.run_id] for run in store.list_runs(RunFilter(**filters))]


def test_all_newest_first(store, runs):
    assert names(store, runs) == ["new", "warned", "skipped", "failed", "old"]
    assert names(store, runs, limit=2) == ["new", "warned"]
    assert names(store, runs, limit=None) == ["new", "warned", "skipped", "failed", "old"]


def test_by_job_id_or_name(store, runs):
    assert names(store, runs, job="job-b") == ["new", "skipped"]
    assert names(store, runs, job="nightly") == ["warned", "failed", "old"]
    assert names(store, runs, job="nope") == []


def test_by_status(store, runs):
    assert names(store, runs, statuses=["failure"]) == ["failed"]
    assert names(store, runs, statuses=["skipped", "FAILURE"]) == ["skipped", "failed"]
    with pytest.raises(UsageError, match="unknown status 'broken'; valid statuses: pending"):
        RunFilter(statuses=["broken"])


def test_by_vm_uuid_or_name(store, runs):
    assert names(store, runs, vm="u2") == ["new", "failed"]
    assert names(store, runs, vm="DB01") == ["new", "failed"]
    assert names(store, runs, vm="mail") == ["skipped"]
    # "nas" is a remote's id in every run, not a VM
    assert names(store, runs, vm="nas") == []


def test_since(store, runs):
    assert names(store, runs, since=parse_since("2d")) == ["new", "warned"]
    assert names(store, runs, since=parse_since("1w")) == ["new", "warned", "skipped", "failed"]
    day = (datetime.now() - timedelta(days=4)).strftime("%Y-%m-%d")
    assert names(store, runs, since=parse_since(day))[-1] == "skipped"
    assert names(store, runs, since=parse_since(datetime.now() - timedelta(hours=12))) == ["new"]


def test_free_text(store, runs):
    # a warning's message, case-insensitive
    assert names(store, runs, search="fell back") == ["warned"]
    # a warning's data
    assert names(store, runs, search="checksum_mismatch") == ["warned"]
    # an error message (in the task's result)
    assert names(store, runs, search="internal error: runtime") == ["failed"]
    # a skip reason
    assert names(store, runs, search="no disks") == ["skipped"]
    # task data (a VM name) and LIKE wildcards taken literally
    assert names(store, runs, search="web01") == ["failed", "old"]
    assert names(store, runs, search="web%") == []
    assert names(store, runs, search="snap-u3") == []
    assert names(store, runs, search="snap-u1") == ["failed", "old"]


def test_filters_combine(store, runs):
    assert names(store, runs, job="Nightly", vm="web01", statuses=["success"]) == ["old"]
    assert names(store, runs, job="Nightly", since=parse_since("7d"), search="db01") == ["failed"]


def test_parse_since():
    now = 1_800_000_000.0
    assert parse_since("2d", now=now) == int((now - 2 * 86400) * 1000)
    assert parse_since("12h", now=now) == int((now - 12 * 3600) * 1000)
    assert parse_since("90m", now=now) == int((now - 90 * 60) * 1000)
    assert parse_since("1.5w", now=now) == int((now - 1.5 * 7 * 86400) * 1000)
    eight_utc = datetime(2026, 11, 20, 8, tzinfo=UTC)
    assert parse_since("2026-11-20T08:00:00+00:00") == int(eight_utc.timestamp() * 1000)
    assert parse_since(1234) == 1234
    with pytest.raises(UsageError, match="neither an age"):
        parse_since("yesterday")
    with pytest.raises(UsageError, match="--limit"):
        RunFilter(limit=-1)


def test_statuses_of_summaries(store, runs):
    summaries = {run.run_id: run for run in store.list_runs()}
    assert summaries[runs["failed"]].status is Status.FAILURE
    assert summaries[runs["skipped"]].status is Status.SKIPPED
    assert summaries[runs["failed"]].duration == 30_000
    # the failed run moved one VM's transfer; the skipped one nothing
    assert summaries[runs["failed"]].total_size == 1000
    assert summaries[runs["skipped"]].total_size is None
