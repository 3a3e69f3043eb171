"""After a retention merge, the merged backup's JSON says what its disk now is (as XO does)."""

from __future__ import annotations

import gzip
import json

import pytest
from xobackup_remote_local import LocalRemote

from tests.engine.test_backup_runs import chain_bytes, disk_bytes, guest_vms, vm_disk_uuid
from xobackup_core.engine.repository import CACHE_NAME, BackupRepository
from xobackup_core.formats.vhd_directory import open_remote_disk


@pytest.mark.parametrize("directories", [False, True], ids=["vhd-files", "vhd-directories"])
def test_merge_into_the_full_rewrites_the_kept_backup_metadata(harness, directories):
    sim = harness.sim
    vm_uuid = next(iter(guest_vms(sim)))
    vdi = vm_disk_uuid(harness, vm_uuid)
    settings = {"exportRetention": 2, "useVhdDirectory": directories}
    config = harness.config(
        {"delta": {"mode": "delta", "remotes": ["nas"], "vms": [vm_uuid], "settings": settings}}
    )
    remote = LocalRemote(harness.remote_dir)
    repository = BackupRepository(remote)
    contents = []
    for run in range(3):
        sim.randomize_blocks(vdi, 0.05, seed=200 + run)
        contents.append(disk_bytes(sim, vdi))
        assert harness.run(config, "delta").status == "success"
        if run == 1:
            written = repository.list_backups(vm_uuid)[1]
    merged, newest = repository.list_backups(vm_uuid)
    assert merged.path == written.path and written.data["isVhdDifferencing"] == {
        key: True for key in written.vhd_paths
    }
    [path] = merged.vhd_paths.values()
    assert chain_bytes(remote, path) == contents[1]
    # the full was merged into the second backup's delta: that disk is a base now, and the
    # size is the disk's as one VHD file (footer copy, header, BAT, blocks, footer)
    assert merged.data["isVhdDifferencing"] == {key: False for key in merged.vhd_paths}
    with open_remote_disk(remote, path) as disk:
        assert not disk.is_differencing
        span = disk.header.bitmap_size + disk.header.block_size
        bat = -(-disk.header.max_table_entries * 4 // 512) * 512
        assert merged.size == 512 + 1024 + bat + disk.allocated_count() * span + 512
    assert merged.size > written.size
    assert newest.data["isVhdDifferencing"] == {key: True for key in newest.vhd_paths}
    # everything else of the JSON is as it was written; the cache lists the new JSON
    unchanged = {k: v for k, v in written.data.items() if k not in ("size", "isVhdDifferencing")}
    assert {k: v for k, v in merged.data.items() if k in unchanged} == unchanged
    cache_path = harness.remote_dir / "xo-vm-backups" / vm_uuid / CACHE_NAME
    cache = json.loads(gzip.decompress(cache_path.read_bytes()))
    assert {k: v for k, v in cache[merged.path].items() if k not in ("_filename", "id")} == (
        merged.data
    )
