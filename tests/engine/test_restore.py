"""Restores onto another pool that never saw the VM, checked bit for bit."""

import itertools
import json
import time

import pytest
from xobackup_hypervisor_xcpng.sim import Simulator
from xobackup_remote_local import LocalRemote

from tests.core.conftest import run_cli
from tests.engine.conftest import Harness
from xobackup_core.engine.repository import BackupRepository
from xobackup_core.engine.restore import RESTORED_TAG, restore_backup
from xobackup_core.errors import UsageError

MiB = 1024 * 1024


@pytest.fixture
def two_pools(tmp_path):
    with Simulator(pools=2, vms=2, hosts=1, disk_size=32 * MiB, data_dir=tmp_path / "sim") as sim:
        yield Harness(tmp_path, sim)


def source_vm(harness):
    driver = harness.plugins.hypervisor(harness.config({}).server_view("pool0"))
    try:
        vm = next(
            v for v in driver.inventory().vms if not v.is_snapshot and v.power_state == "Running"
        )
        return vm
    finally:
        driver.close()


def target(harness):
    config = harness.config({})
    driver = harness.plugins.hypervisor(config.server_view("pool1"))
    inventory = driver.inventory()
    pool = inventory.pools[0]
    sr = next(sr for sr in pool.srs if sr.name == "Shared storage")
    return driver, pool, sr


def vm_disks(driver, vm_uuid):
    return driver.inventory().vm(vm_uuid).disks


def content(sim, vdi):
    return sim.read(vdi, 0, sim.vdi_data(vdi).size)


@pytest.mark.parametrize("depth", [1, 5, pytest.param(60, marks=pytest.mark.slow)])
def test_delta_backup_restores_to_a_new_pool(two_pools, depth):
    harness = two_pools
    vm = source_vm(harness)
    vdi = vm.disks[0].vdi_uuid
    config = harness.config(
        {
            "delta": {
                "mode": "delta",
                "remotes": ["nas"],
                "vms": [vm.uuid],
                "settings": {"exportRetention": 100},
            }
        }
    )
    # A clock a minute ahead per call: backups are named by the second, so real time would
    # make each run wait for the next second.
    ticks = itertools.count(time.time(), 60)
    for run in range(depth):
        harness.sim.randomize_blocks(vdi, 0.1, seed=run)
        outcome = harness.run(config, "delta", clock=lambda: next(ticks))
        assert outcome.status == "success"
    remote_chain = BackupRepository(LocalRemote(harness.remote_dir)).list_backups(vm.uuid)
    assert len(remote_chain) == depth
    expected = content(harness.sim, vdi)
    remote = LocalRemote(harness.remote_dir)
    backup = BackupRepository(remote).list_backups(vm.uuid)[-1]
    driver, pool, sr = target(harness)
    try:
        result = restore_backup(remote, backup, driver, sr_uuid=sr.uuid, pool=pool)
        restored = driver.inventory().vm(result.vm_uuid)
        assert restored.pool_uuid == pool.uuid
        assert RESTORED_TAG in restored.tags
        assert restored.name.startswith(f"{vm.name} (")
        assert restored.power_state == "Halted"
        [disk] = restored.disks
        assert disk.sr_uuid == sr.uuid
        assert content(harness.sim, disk.vdi_uuid) == expected
    finally:
        driver.close()


def test_full_backup_restores_to_a_new_pool(two_pools):
    harness = two_pools
    vm = source_vm(harness)
    expected = content(harness.sim, vm.disks[0].vdi_uuid)
    config = harness.config({"full": {"mode": "full", "remotes": ["nas"], "vms": [vm.uuid]}})
    assert harness.run(config, "full").status == "success"
    remote = LocalRemote(harness.remote_dir)
    [backup] = BackupRepository(remote).list_backups(vm.uuid)
    driver, pool, sr = target(harness)
    try:
        result = restore_backup(remote, backup, driver, sr_uuid=sr.uuid, pool=pool)
        restored = driver.inventory().vm(result.vm_uuid)
        assert RESTORED_TAG in restored.tags
        assert content(harness.sim, restored.disks[0].vdi_uuid) == expected
    finally:
        driver.close()


def test_memory_backup_restores_suspended_or_is_refused(two_pools):
    harness = two_pools
    vm = source_vm(harness)
    config = harness.config(
        {
            "ram": {
                "mode": "delta",
                "remotes": ["nas"],
                "vms": [vm.uuid],
                "settings": {"checkpointSnapshot": True},
            }
        }
    )
    assert harness.run(config, "ram").status == "success"
    remote = LocalRemote(harness.remote_dir)
    [backup] = BackupRepository(remote).list_backups(vm.uuid)
    driver, pool, sr = target(harness)
    try:
        result = restore_backup(remote, backup, driver, sr_uuid=sr.uuid, pool=pool)
        restored = driver.inventory().vm(result.vm_uuid)
        assert result.suspended and restored.power_state == "Suspended"
        suspend_ref = backup.data["vmSnapshot"]["suspend_VDI"]
        memory = backup.data["vdis"][suspend_ref]["uuid"]
        assert content(harness.sim, restored.suspend_vdi_uuid) == content(harness.sim, memory)

        for host in pool.hosts:
            harness.sim.set_host_cpu(host.uuid, "AuthenticAMD")
        driver2, pool2, _ = target(harness)
        refusal = r"CPU vendors differ \(GenuineIntel vs AuthenticAMD\)"
        with pytest.raises(UsageError, match=refusal):
            restore_backup(remote, backup, driver2, sr_uuid=sr.uuid, pool=pool2)
        halted = restore_backup(
            remote, backup, driver2, sr_uuid=sr.uuid, pool=pool2, allow_halted=True
        )
        assert not halted.suspended
        assert driver2.inventory().vm(halted.vm_uuid).power_state == "Halted"
        driver2.close()
    finally:
        driver.close()


def test_restore_command(two_pools, tmp_path):
    harness = two_pools
    vm = source_vm(harness)
    sim = harness.sim
    (tmp_path / "pw").write_text(sim.password)
    config_path = tmp_path / "config.toml"
    config_path.write_text(
        f'log_db = "{tmp_path}/logs.sqlite"\n'
        + "".join(
            f'[servers.pool{i}]\nurl = "{p.url}"\npassword = {{ file = "{tmp_path}/pw" }}\n'
            for i, p in enumerate(sim.pools)
        )
        + f'[remotes.nas]\nurl = "file://{harness.remote_dir}"\n'
        + f'[jobs.full]\nmode = "full"\nremotes = ["nas"]\nvms = ["{vm.uuid}"]\n'
    )
    assert run_cli("--config", str(config_path), "run", "full").returncode == 0
    listing = json.loads(run_cli("--config", str(config_path), "backups", "list", "--json").stdout)
    [entry] = listing
    _, _, sr = target(harness)
    result = run_cli("--config", str(config_path), "restore", f"nas:{entry['id']}", "--sr", sr.uuid)
    assert result.returncode == 0, result.stderr
    assert "restored " in result.stdout and " on pool1" in result.stdout
    bad = run_cli("--config", str(config_path), "restore", "nas:/nope.json", "--sr", sr.uuid)
    assert bad.returncode == 2 and "no backup /nope.json" in bad.stderr
    bad = run_cli("--config", str(config_path), "restore", f"nas:{entry['id']}", "--sr", "x")
    assert bad.returncode == 2 and "no configured server has an SR x" in bad.stderr
