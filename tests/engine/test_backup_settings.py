"""Backup settings and tags, each checked on the remote and on the pool."""

import json
import time

import XenAPI
from xobackup_remote_local import LocalRemote

from tests.engine.test_backup_runs import chain_bytes, disk_bytes, guest_vms
from xobackup_core.engine.repository import BackupRepository

MiB = 1024 * 1024


def xapi(sim):
    session = XenAPI.Session(sim.pool(0).url)
    session.xenapi.login_with_password(sim.username, sim.password)
    return session


def add_disk(sim, vm_uuid, name, size=8 * MiB):
    session = xapi(sim)
    x = session.xenapi
    vm = x.VM.get_by_uuid(vm_uuid)
    sr = x.pool.get_default_SR(x.pool.get_all()[0])
    vdi = x.VDI.create(
        {
            "name_label": name,
            "SR": sr,
            "virtual_size": str(size),
            "type": "user",
            "sharable": False,
            "read_only": False,
            "other_config": {},
        }
    )
    x.VBD.create(
        {
            "VM": vm,
            "VDI": vdi,
            "userdevice": "1",
            "bootable": False,
            "mode": "RW",
            "type": "Disk",
            "empty": False,
            "other_config": {},
            "qos_algorithm_type": "",
            "qos_algorithm_params": {},
        }
    )
    uuid = x.VDI.get_uuid(vdi)
    session.xenapi.session.logout()
    return uuid


def job_snapshots(harness, config, vm_uuid):
    driver = harness.plugins.hypervisor(config.server_view("pool0"))
    try:
        return [v for v in driver.inventory().vms if v.snapshot_of == vm_uuid]
    finally:
        driver.close()


def run_log(harness, outcome):
    return json.dumps(harness.store.get_run(outcome.run_id).to_dict())


def test_rolling_snapshots_without_remote(harness):
    vm_uuid = next(iter(guest_vms(harness.sim)))
    config = harness.config(
        {"rolling": {"mode": "delta", "vms": [vm_uuid], "settings": {"snapshotRetention": 2}}},
        remotes={},
    )
    for _ in range(3):
        assert harness.run(config, "rolling").status == "success"
    snapshots = job_snapshots(harness, config, vm_uuid)
    assert len(snapshots) == 2
    assert all(
        s.name == f"[XO Backup rolling] {guest_vms(harness.sim)[vm_uuid]['name_label']}"
        for s in snapshots
    )
    assert all(s.other_config["xo:backup:job"] == config.job_id("rolling") for s in snapshots)
    assert not harness.remote_dir.exists()


def test_nobak_disks_are_left_out(harness):
    vm_uuid = next(iter(guest_vms(harness.sim)))
    scratch = add_disk(harness.sim, vm_uuid, "scratch [NOBAK]")
    config = harness.config({"delta": {"mode": "delta", "remotes": ["nas"], "vms": [vm_uuid]}})
    outcome = harness.run(config, "delta")
    assert outcome.status == "success"
    [backup] = BackupRepository(LocalRemote(harness.remote_dir)).list_backups(vm_uuid)
    assert len(backup.vhd_paths) == 1
    assert scratch not in json.dumps(backup.data["vhds"])
    assert "[NOBAK]" in run_log(harness, outcome)
    [snapshot] = job_snapshots(harness, config, vm_uuid)
    assert scratch not in {d.snapshot_of for d in snapshot.disks}


def test_two_disks_in_parallel_each_read_back(harness):
    sim = harness.sim
    vm_uuid = next(iter(guest_vms(sim)))
    second = add_disk(sim, vm_uuid, "data", size=16 * MiB)
    sim.randomize_blocks(second, 0.5, seed=3)
    config = harness.config({"delta": {"mode": "delta", "remotes": ["nas"], "vms": [vm_uuid]}})
    assert harness.run(config, "delta").status == "success"
    remote = LocalRemote(harness.remote_dir)
    [backup] = BackupRepository(remote).list_backups(vm_uuid)
    by_disk = {record["$snapshot_of$uuid"]: key for key, record in backup.data["vdis"].items()}
    assert set(by_disk) == {second, *[d for d in by_disk if d != second]}
    assert chain_bytes(remote, backup.vhd_paths[by_disk[second]]) == disk_bytes(sim, second)
    # XO's shape: vdis, vhds and isVhdDifferencing keyed by the snapshot's VDI refs
    assert all(key.startswith("OpaqueRef:") for key in backup.data["vhds"])
    assert backup.data["vbds"] and all(
        vbd["VDI"] in backup.data["vdis"]
        for vbd in backup.data["vbds"].values()
        if vbd.get("type") == "Disk"
    )


def test_memory_backup_exports_the_suspend_vdi(harness):
    vm_uuid = next(u for u, r in guest_vms(harness.sim).items() if r["power_state"] == "Running")
    config = harness.config(
        {
            "ram": {
                "mode": "delta",
                "remotes": ["nas"],
                "vms": [vm_uuid],
                "settings": {"checkpointSnapshot": True},
            }
        }
    )
    assert harness.run(config, "ram").status == "success"
    remote = LocalRemote(harness.remote_dir)
    [backup] = BackupRepository(remote).list_backups(vm_uuid)
    suspend_ref = backup.data["vmSnapshot"]["suspend_VDI"]
    assert suspend_ref in backup.vhd_paths, "the memory image is stored as a disk"
    assert backup.data["isVhdDifferencing"][suspend_ref] is False
    memory = chain_bytes(remote, backup.vhd_paths[suspend_ref])
    suspend_uuid = backup.data["vdis"][suspend_ref]["uuid"]
    assert memory == disk_bytes(harness.sim, suspend_uuid)


def test_delete_first_removes_old_backups_before_the_transfer(harness):
    vm_uuid = next(iter(guest_vms(harness.sim)))
    config = harness.config(
        {
            "full": {
                "mode": "full",
                "remotes": ["nas"],
                "vms": [vm_uuid],
                "settings": {"exportRetention": 1, "deleteFirst": True},
            }
        }
    )
    assert harness.run(config, "full").status == "success"
    outcome = harness.run(config, "full")
    assert outcome.status == "success"
    [backup] = BackupRepository(LocalRemote(harness.remote_dir)).list_backups(vm_uuid)
    run = harness.store.get_run(outcome.run_id)
    [vm_task] = run.tasks
    names = [task.name for task in vm_task.children]
    assert names.index("retention") < names.index("export")
    assert backup.timestamp >= run.start


def test_quiesce_falls_back_with_a_warning(harness):
    vm_uuid = next(u for u, r in guest_vms(harness.sim).items() if r["power_state"] == "Running")
    harness.sim.set_quiesce_mode("removed")
    config = harness.config(
        {"q": {"mode": "full", "remotes": ["nas"], "vms": [vm_uuid], "settings": {"quiesce": True}}}
    )
    outcome = harness.run(config, "q")
    assert outcome.status == "success"
    assert "quiesced snapshot refused" in run_log(harness, outcome)


def test_max_export_rate_throttles_the_run(harness):
    vm_uuid = next(iter(guest_vms(harness.sim)))
    config = harness.config(
        {
            "slow": {
                "mode": "delta",
                "remotes": ["nas"],
                "vms": [vm_uuid],
                "settings": {"maxExportRate": 4 * MiB},
            }
        }
    )
    started = time.monotonic()
    outcome = harness.run(config, "slow")
    elapsed = time.monotonic() - started
    assert outcome.status == "success"
    [backup] = BackupRepository(LocalRemote(harness.remote_dir)).list_backups(vm_uuid)
    # A lower bound only: the limiter cannot let the data through faster than the rate.
    assert elapsed >= (backup.size - 2 * MiB) / (4 * MiB)
