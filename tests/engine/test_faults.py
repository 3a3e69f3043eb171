"""Faults during runs: the earlier backups stay intact, nothing partial looks like a backup,
the next run recovers."""

import json
import subprocess

import pytest
from xobackup_remote_local import LocalRemote

from tests.conftest import require, require_tool
from tests.engine.test_backup_runs import chain_bytes, disk_bytes, guest_vms, vm_disk_uuid
from xobackup_core.engine.repository import BackupRepository

MiB = 1024 * 1024


def delta_config(harness, vm_uuid, retention=5):
    return harness.config(
        {
            "delta": {
                "mode": "delta",
                "remotes": ["nas"],
                "vms": [vm_uuid],
                "settings": {"exportRetention": retention},
            }
        }
    )


def log_text(harness, outcome):
    return json.dumps(harness.store.get_run(outcome.run_id).to_dict())


def assert_backups_read_back(remote, vm_uuid, expected):
    backups = BackupRepository(remote).list_backups(vm_uuid)
    assert [b.path for b in backups] == list(expected)
    for backup in backups:
        [vhd] = backup.vhd_paths.values()
        assert chain_bytes(remote, vhd) == expected[backup.path]


def test_export_dropped_mid_stream(harness):
    sim = harness.sim
    vm_uuid = next(iter(guest_vms(sim)))
    vdi = vm_disk_uuid(harness, vm_uuid)
    config = delta_config(harness, vm_uuid)
    remote = LocalRemote(harness.remote_dir)
    assert harness.run(config, "delta").status == "success"
    [first] = BackupRepository(remote).list_backups(vm_uuid)
    expected = {first.path: disk_bytes(sim, vdi)}

    sim.randomize_blocks(vdi, 0.3, seed=1)
    sim.arm("/export_raw_vdi", "drop", after_bytes=3 * MiB)
    failed = harness.run(config, "delta")
    assert failed.status == "failure"
    assert_backups_read_back(remote, vm_uuid, expected)
    # the failed run's snapshot is gone: it must never become a base
    driver = harness.plugins.hypervisor(config.server_view("pool0"))
    snapshots = [v for v in driver.inventory().vms if v.snapshot_of == vm_uuid]
    driver.close()
    assert len(snapshots) == 1 and snapshots[0].other_config["xo:backup:exported"] == "true"

    recovered = harness.run(config, "delta")
    assert recovered.status == "success"
    backups = BackupRepository(remote).list_backups(vm_uuid)
    assert len(backups) == 2
    expected[backups[1].path] = disk_bytes(sim, vdi)
    assert_backups_read_back(remote, vm_uuid, expected)


def test_snapshot_failure_fails_only_that_vm(harness):
    sim = harness.sim
    vms = list(guest_vms(sim))
    config = harness.config({"all": {"mode": "full", "remotes": ["nas"], "vms": vms[:2]}})
    sim.arm("VM.snapshot", "error", code="SR_BACKEND_FAILURE_44", params=["no space"], nth=1)
    outcome = harness.run(config, "all")
    assert outcome.status == "failure"
    assert sorted(outcome.vm_status.values()) == ["failure", "success"]
    assert "SR_BACKEND_FAILURE_44" in log_text(harness, outcome)
    remote = LocalRemote(harness.remote_dir)
    failed_vm = next(vm for vm, status in outcome.vm_status.items() if status == "failure")
    assert BackupRepository(remote).list_backups(failed_vm) == []


def test_unwritable_remote_keeps_earlier_backups(harness):
    chattr = require_tool("chattr")
    sim = harness.sim
    vm_uuid = next(iter(guest_vms(sim)))
    vdi = vm_disk_uuid(harness, vm_uuid)
    config = delta_config(harness, vm_uuid)
    remote = LocalRemote(harness.remote_dir)
    assert harness.run(config, "delta").status == "success"
    [first] = BackupRepository(remote).list_backups(vm_uuid)
    expected = {first.path: disk_bytes(sim, vdi)}
    locked = harness.remote_dir / "xo-vm-backups" / vm_uuid
    subprocess.run([chattr, "+i", str(locked)], check=True)
    try:
        outcome = harness.run(config, "delta")
    finally:
        subprocess.run([chattr, "-i", str(locked)], check=True)
    assert outcome.status == "failure"
    assert "Operation not permitted" in log_text(harness, outcome)
    assert_backups_read_back(remote, vm_uuid, expected)
    assert harness.run(config, "delta").status == "success"


@pytest.fixture
def small_remote(tmp_path):
    mount = require_tool("mount")
    target = tmp_path / "small-remote"
    target.mkdir()
    done = subprocess.run([mount, "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(target)])
    require(done.returncode == 0, "a tmpfs mount (needs root)")
    yield target
    subprocess.run(["umount", str(target)], check=True)


def test_full_remote(harness, small_remote):
    sim = harness.sim
    vm_uuid = next(iter(guest_vms(sim)))
    vdi = vm_disk_uuid(harness, vm_uuid)
    config = harness.config(
        {
            "delta": {
                "mode": "delta",
                "remotes": ["nas"],
                "vms": [vm_uuid],
                "settings": {"exportRetention": 10},
            }
        },
        remotes={"nas": {"url": f"file://{small_remote}"}},
    )
    remote = LocalRemote(small_remote)
    expected = {}
    outcome = None
    for attempt in range(6):
        sim.randomize_blocks(vdi, 0.15, seed=attempt)
        content = disk_bytes(sim, vdi)
        before = {b.path for b in BackupRepository(remote).list_backups(vm_uuid)}
        outcome = harness.run(config, "delta")
        after = BackupRepository(remote).list_backups(vm_uuid)
        for backup in after:
            if backup.path not in before:
                expected[backup.path] = content
        if outcome.status == "failure":
            break
    assert outcome is not None and outcome.status == "failure", "the remote never filled up"
    assert "No space left" in log_text(harness, outcome)
    assert expected, "at least one backup fitted before the remote was full"
    assert_backups_read_back(remote, vm_uuid, expected)


def test_cleanup_removes_incomplete_backups_and_reports_damaged_xva(harness):
    sim = harness.sim
    vms = list(guest_vms(sim))
    remote = LocalRemote(harness.remote_dir)
    repository = BackupRepository(remote)
    delta = delta_config(harness, vms[0])
    assert harness.run(delta, "delta").status == "success"
    [backup] = repository.list_backups(vms[0])
    [vhd] = backup.vhd_paths.values()
    remote.delete(vhd)  # the data of a backup vanished: the backup is incomplete
    outcome = harness.run(delta, "delta")
    assert outcome.status == "success"
    assert "incomplete backup removed" in log_text(harness, outcome)
    for remaining in repository.list_backups(vms[0]):
        assert all(remote.exists(path) for path in remaining.vhd_paths.values())

    full = harness.config(
        {
            "full": {
                "mode": "full",
                "remotes": ["nas"],
                "vms": [vms[1]],
                "settings": {"exportRetention": 5},
            }
        }
    )
    assert harness.run(full, "full").status == "success"
    [xva_backup] = repository.list_backups(vms[1])
    data = remote.read_bytes(xva_backup.xva_path)
    remote.write_bytes(xva_backup.xva_path, data[: len(data) // 2])
    outcome = harness.run(full, "full")
    assert "looks damaged" in log_text(harness, outcome)
    assert xva_backup.path in {b.path for b in repository.list_backups(vms[1])}, (
        "a suspicious XVA is reported, never deleted silently"
    )


def test_xva_export_dropped_mid_stream(harness):
    sim = harness.sim
    vm_uuid = next(iter(guest_vms(sim)))
    config = harness.config({"full": {"mode": "full", "remotes": ["nas"], "vms": [vm_uuid]}})
    sim.arm("/export", "drop", after_bytes=3 * MiB)
    outcome = harness.run(config, "full")
    assert outcome.status == "failure"
    remote = LocalRemote(harness.remote_dir)
    assert BackupRepository(remote).list_backups(vm_uuid) == []
    leftovers = (
        [p for p in harness.remote_dir.rglob("*") if p.is_file()]
        if (harness.remote_dir.exists())
        else []
    )
    assert not [p for p in leftovers if ".xva" in p.name], leftovers
    assert harness.run(config, "full").status == "success"
