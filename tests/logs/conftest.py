from __future__ import annotations

import pytest

from xobackup_core.logs import LogStore


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "state" / "logs.sqlite"


@pytest.fixture
def store(db_path):
    with LogStore(db_path) as opened:
        yield opened


def vm(uuid: str, name: str) -> dict:
    return {"type": "VM", "id": uuid, "name_label": name}


def record_backup(store, job_id, job_name, vms, *, fail=(), skip=(), size=1000, **run_kwargs):
    """One run of a job as the engine records it: a VM task per VM, snapshot, export, transfer.

    VMs named in ``fail`` fail in their transfer; those in ``skip`` are skipped.
    """
    recorder = store.start_run(job_id, job_name, heartbeat_interval=None, **run_kwargs)
    with recorder:
        for uuid, name in vms:
            try:
                with recorder.task("backup VM", vm(uuid, name)) as vm_task:
                    if name in skip:
                        vm_task.skip("no disks found")
                        continue
                    with vm_task.task("snapshot") as snapshot:
                        snapshot.set_result(id=f"snap-{uuid}")
                    with (
                        vm_task.task("export", {"type": "remote", "id": "nas"}) as export,
                        export.task("transfer") as transfer,
                    ):
                        if name in fail:
                            raise RuntimeError("disk read error")
                        transfer.set_result(size=size)
            except RuntimeError:
                pass
    return recorder.record
