"""Runs with a given status and reportWhen, recorded for real, for reporter plugin tests."""

from __future__ import annotations

from xobackup_core.logs.records import Status
from xobackup_core.logs.store import LogStore
from xobackup_core.plugins import Plugins

EXPECTED = {
    "always": {"success", "failure", "skipped", "interrupted"},
    "failure": {"failure", "skipped", "interrupted"},
    "error": {"failure", "interrupted"},
    "never": set(),
}
"""reportWhen → the run statuses that are reported (xo-backups.md §3.2)."""


def record_run(store: LogStore, plugins: Plugins, status: str, report_when: str):
    """A run of job "nightly" ending ``status``, heard by ``plugins``; its record."""
    recorder = store.start_run(
        "job-1",
        "nightly",
        schedule_id="night",
        data={"mode": "delta", "reportWhen": report_when},
        listener=plugins,
        heartbeat_interval=None,
    )
    with recorder:
        vm = {"type": "VM", "id": "vm-uuid-1", "name_label": "web-1"}
        if status == "skipped":
            recorder.finish("no VMs match this pattern", status=Status.SKIPPED)
        elif status == "interrupted":
            recorder.task("backup VM", vm)
            recorder.finish("the daemon stopped", status=Status.INTERRUPTED)
        else:
            try:
                with recorder.task("backup VM", vm) as task:
                    with task.task("export", {"type": "remote", "id": "nas"}) as export:
                        if status == "failure":
                            from xobackup_core.errors import RemoteError

                            raise RemoteError("disk full", remote="nas")
                        export.set_result(size=3 * 1024 * 1024)
            except Exception:
                pass
    assert recorder.record.status.value == status
    return recorder.record
