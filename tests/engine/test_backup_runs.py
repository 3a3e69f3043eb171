"""Full and delta backups end to end: simulator → driver → engine → local remote.

Each test checks what is on the remote and on the pool, and reads the backups back.
"""

import hashlib
import json

import pytest
from xobackup_remote_local import LocalRemote

from xobackup_core.engine.repository import BackupRepository
from xobackup_core.formats.vhd_chain import open_vhd_chain
from xobackup_core.formats.vhd_directory import remote_disk_opener

MiB = 1024 * 1024


def guest_vms(sim, pool=0):
    return {record["uuid"]: record for _ref, record in sim.vms(pool)}


def vm_disk_uuid(harness, vm_uuid):
    config = harness.config({"j": {"mode": "full", "remotes": ["nas"]}})
    driver = harness.plugins.hypervisor(config.server_view("pool0"))
    try:
        return driver.inventory().vm(vm_uuid).disks[0].vdi_uuid
    finally:
        driver.close()


def disk_bytes(sim, vdi_uuid):
    data = sim.vdi_data(vdi_uuid)
    return sim.read(vdi_uuid, 0, data.size)


def chain_bytes(remote, path):
    with open_vhd_chain(path, remote_disk_opener(remote)) as chain:
        return chain.read_at(0, chain.leaf.size)


def test_full_backup_writes_xva_checksum_and_metadata(harness, tmp_path):
    """Two remotes: one export and one checksum of it serve both."""
    vm_uuid = next(iter(guest_vms(harness.sim)))
    config = harness.config(
        {"full": {"mode": "full", "remotes": ["nas", "second"], "vms": [vm_uuid]}},
        remotes={
            "nas": {"url": f"file://{harness.remote_dir}"},
            "second": {"url": f"file://{tmp_path / 'second'}"},
        },
        schedules={"daily": {"job": "full", "cron": "0 3 * * *", "exportRetention": 2}},
    )
    outcome = harness.run(config, "full", "daily")
    assert outcome.status == "success", harness.store.get_run(outcome.run_id).to_dict()
    second = LocalRemote(tmp_path / "second")
    [second_backup] = BackupRepository(second).list_backups(vm_uuid)
    remote = LocalRemote(harness.remote_dir)
    [backup] = BackupRepository(remote).list_backups(vm_uuid)
    assert backup.mode == "full" and backup.schedule_id == "daily"
    assert backup.job_id == config.job_id("full")
    xva = remote.read_bytes(backup.xva_path)
    assert backup.size == len(xva) > 4 * MiB  # several chunks of the export
    assert second.read_bytes(second_backup.xva_path) == xva
    checksum = remote.read_bytes(backup.xva_path + ".checksum").decode()
    algorithm = {"1": "md5", "5": "sha256"}[checksum[1]]  # the faster one on this CPU
    assert checksum == f"${checksum[1]}$$" + hashlib.new(algorithm, xva).hexdigest()
    assert second.read_bytes(second_backup.xva_path + ".checksum").decode() == checksum
    metadata = json.loads(remote.read_bytes(backup.path))
    assert metadata["version"] == "2.0.0" and metadata["xva"].startswith("./")
    assert metadata["vm"]["uuid"] == vm_uuid
    assert any(tag.startswith("daily=") for tag in metadata["tags"])
    # snapshotRetention 0: the snapshot is gone, migration is unblocked again
    inventory = harness.plugins.hypervisor(config.server_view("pool0")).inventory()
    assert not [v for v in inventory.vms if v.snapshot_of == vm_uuid]
    assert "migrate_send" not in inventory.vm(vm_uuid).blocked_operations


def test_delta_backups_chain_and_read_back_bit_exact(harness):
    sim = harness.sim
    vm_uuid = next(iter(guest_vms(sim)))
    vdi = vm_disk_uuid(harness, vm_uuid)
    config = harness.config(
        {"delta": {"mode": "delta", "remotes": ["nas"], "vms": [vm_uuid]}},
        settings={"exportRetention": 5},
    )
    remote = LocalRemote(harness.remote_dir)
    repository = BackupRepository(remote)

    first_content = disk_bytes(sim, vdi)
    assert harness.run(config, "delta").status == "success"
    changed = sim.randomize_blocks(vdi, 0.1, seed=5)
    second_content = disk_bytes(sim, vdi)
    assert second_content != first_content
    assert harness.run(config, "delta").status == "success"

    first, second = repository.list_backups(vm_uuid)
    [first_vhd] = first.vhd_paths.values()
    [second_vhd] = second.vhd_paths.values()
    assert chain_bytes(remote, first_vhd) == first_content
    assert chain_bytes(remote, second_vhd) == second_content
    assert list(second.data["isVhdDifferencing"].values()) == [True]
    assert list(first.data["isVhdDifferencing"].values()) == [False]
    # the delta carries exactly the changed 2 MiB blocks (+ bitmaps and VHD metadata)
    block = 2 * MiB + 512
    assert len(changed) * block < second.size < len(changed) * block + 64 * 1024
    # the newest snapshot stays as the next base, marked exported
    inventory = harness.plugins.hypervisor(config.server_view("pool0")).inventory()
    snapshots = [v for v in inventory.vms if v.snapshot_of == vm_uuid]
    assert len(snapshots) == 1
    assert snapshots[0].other_config["xo:backup:exported"] == "true"
    assert snapshots[0].other_config["xo:backup:deltaChainLength"] == "1"


@pytest.mark.parametrize("directories", [False, True], ids=["vhd-files", "vhd-directories"])
def test_retention_merges_deltas_into_the_next_kept_backup(harness, directories):
    sim = harness.sim
    vm_uuid = next(iter(guest_vms(sim)))
    vdi = vm_disk_uuid(harness, vm_uuid)
    config = harness.config(
        {
            "delta": {
                "mode": "delta",
                "remotes": ["nas"],
                "vms": [vm_uuid],
                "settings": {"exportRetention": 2, "useVhdDirectory": directories},
            }
        }
    )
    remote = LocalRemote(harness.remote_dir)
    contents = []
    for run in range(4):
        sim.randomize_blocks(vdi, 0.05, seed=100 + run)
        contents.append(disk_bytes(sim, vdi))
        assert harness.run(config, "delta").status == "success"
    backups = BackupRepository(remote).list_backups(vm_uuid)
    assert len(backups) == 2
    for backup, content in zip(backups, contents[2:], strict=True):
        [vhd] = backup.vhd_paths.values()
        assert chain_bytes(remote, vhd) == content
    folder = remote.list(f"/xo-vm-backups/{vm_uuid}/vdis/{config.job_id('delta')}/{vdi}")
    disks = [name for name in folder if name.endswith(".vhd")]
    assert len(disks) == 2
    assert all(name.endswith(".alias.vhd") == directories for name in disks)
    if directories:
        data = remote.list(f"/xo-vm-backups/{vm_uuid}/vdis/{config.job_id('delta')}/{vdi}/data")
        assert len(data) == 2, "merged-away directories are removed"


def test_smart_selection_and_skip(harness):
    config = harness.config(
        {
            "tagged": {"mode": "full", "remotes": ["nas"], "smart": {"tags": ["db"]}},
            "nothing": {"mode": "full", "remotes": ["nas"], "smart": {"tags": ["no-such-tag"]}},
        }
    )
    tagged = {u for u, r in guest_vms(harness.sim).items() if "db" in r["tags"]}
    outcome = harness.run(config, "tagged")
    assert outcome.status == "success" and set(outcome.vm_status) == tagged
    skipped = harness.run(config, "nothing")
    assert skipped.status == "skipped"
    log = json.dumps(harness.store.get_run(skipped.run_id).to_dict())
    assert "no VMs match this pattern" in log


def test_failing_remote_is_dropped_and_the_other_finishes(harness, tmp_path):
    vm_uuid = next(iter(guest_vms(harness.sim)))
    broken = tmp_path / "not-a-folder"
    broken.write_text("a file where a folder should be")
    config = harness.config(
        {"full": {"mode": "full", "remotes": ["nas", "broken"], "vms": [vm_uuid]}},
        remotes={
            "nas": {"url": f"file://{harness.remote_dir}"},
            "broken": {"url": f"file://{broken}/sub"},
        },
    )
    outcome = harness.run(config, "full")
    assert outcome.status == "success"
    assert len(BackupRepository(LocalRemote(harness.remote_dir)).list_backups(vm_uuid)) == 1
    run = json.dumps(harness.store.get_run(outcome.run_id).to_dict())
    assert "broken" in run and "cannot be used" in run
