"""Restore options: starting the VM, MAC addresses kept or renewed, networks matched on a pool
that never saw the VM."""

import pytest
from xobackup_hypervisor_xcpng.sim import Simulator
from xobackup_remote_local import LocalRemote

from tests.core.conftest import run_cli
from tests.engine.conftest import Harness
from xobackup_core.engine.repository import BackupRepository
from xobackup_core.engine.restore import restore_backup
from xobackup_core.errors import HypervisorError

MiB = 1024 * 1024
VLAN_NETWORK = "VLAN 100 (backups)"


@pytest.fixture
def pools(tmp_path):
    with Simulator(pools=2, vms=1, hosts=1, disk_size=8 * MiB, data_dir=tmp_path / "sim") as sim:
        yield Harness(tmp_path, sim)


def driver_for(harness, pool):
    return harness.plugins.hypervisor(harness.config({}).server_view(f"pool{pool}"))


def source_vm(harness):
    driver = driver_for(harness, 0)
    try:
        return next(v for v in driver.inventory().vms if v.power_state == "Running")
    finally:
        driver.close()


def backup_of(harness, vm, mode, **settings):
    job = {"mode": mode, "remotes": ["nas"], "vms": [vm.uuid], "settings": settings}
    assert harness.run(harness.config({"job": job}), "job").status == "success"
    remote = LocalRemote(harness.remote_dir)
    return remote, BackupRepository(remote).list_backups(vm.uuid)[-1]


def restore_to_pool1(harness, remote, backup, **options):
    """Restore onto pool1's shared SR; returns (VM, its VIF records, its networks by ref)."""
    driver = driver_for(harness, 1)
    try:
        pool = driver.inventory().pools[0]
        sr = next(sr for sr in pool.srs if sr.name == "Shared storage")
        result = restore_backup(remote, backup, driver, sr_uuid=sr.uuid, pool=pool, **options)
        devices = driver.vm_devices(result.vm_uuid)
        return result, driver.inventory().vm(result.vm_uuid), devices
    finally:
        driver.close()


def macs_by_device(vifs):
    return {str(v["device"]): v["MAC"] for v in vifs.values()}


def source_macs(harness, vm):
    db = harness.sim.pool(0).xapi.db
    ref = db.resolve("VM", vm.uuid)
    return {
        db.record("VIF", vif)["device"]: db.record("VIF", vif)["MAC"]
        for vif in db.record("VM", ref)["VIFs"]
    }


def add_vif(harness, vm, network_name, device, mac):
    xapi = harness.sim.pool(0).xapi
    network = next(
        ref for ref, n in xapi.db.tables["network"].items() if n["name_label"] == network_name
    )
    vm_ref = xapi.db.resolve("VM", vm.uuid)
    xapi._create_vif({"VM": vm_ref, "network": network, "device": device, "MAC": mac})


def add_network(harness, pool, name, vlan):
    """A network with a PIF tagged ``vlan`` on each host of ``pool``."""
    db = harness.sim.pool(pool).xapi.db
    network = db.create("network", {"name_label": name, "bridge": f"xapi{vlan}"})
    for host in list(db.tables["host"]):
        pif = db.create(
            "PIF", {"device": f"eth{vlan}", "network": network, "host": host, "VLAN": vlan}
        )
        db.add_to_set("network", network, "PIFs", pif)
        db.add_to_set("host", host, "PIFs", pif)
    return db.record("network", network)["uuid"]


@pytest.mark.parametrize("mode", ["delta", "full"])
def test_start_runs_the_restored_vm(pools, mode):
    vm = source_vm(pools)
    remote, backup = backup_of(pools, vm, mode)
    result, restored, _ = restore_to_pool1(pools, remote, backup, start=True)
    assert result.started and not result.suspended
    assert restored.power_state == "Running"
    _, halted, _ = restore_to_pool1(pools, remote, backup)
    assert halted.power_state == "Halted"


def test_start_resumes_a_memory_backup(pools):
    vm = source_vm(pools)
    remote, backup = backup_of(pools, vm, "delta", checkpointSnapshot=True)
    result, restored, _ = restore_to_pool1(pools, remote, backup, start=True)
    assert result.suspended and result.started
    # resumed, not booted: XAPI consumes the memory image and keeps the CPU flags it ran with
    assert restored.power_state == "Running"
    assert restored.suspend_vdi_uuid is None
    assert restored.last_boot_cpu_flags == backup.data["vmSnapshot"]["last_boot_CPU_flags"]


def test_a_vm_that_cannot_start_is_reported_and_kept(pools):
    vm = source_vm(pools)
    remote, backup = backup_of(pools, vm, "delta")
    pools.sim.arm("VM.start", code="HOST_NOT_ENOUGH_FREE_MEMORY", params=["1024", "512"], pool=1)
    with pytest.raises(HypervisorError, match=r"restored as VM .* could not be started") as info:
        restore_to_pool1(pools, remote, backup, start=True)
    assert info.value.code == "HOST_NOT_ENOUGH_FREE_MEMORY"
    restored = [v for _, v in pools.sim.vms(1) if v["name_label"].startswith(f"{vm.name} (")]
    assert [v["power_state"] for v in restored] == ["Halted"]


@pytest.mark.parametrize("mode", ["delta", "full"])
def test_mac_addresses_are_kept_unless_renewed(pools, mode):
    vm = source_vm(pools)
    add_vif(pools, vm, VLAN_NETWORK, "1", "02:aa:bb:cc:dd:01")
    original = source_macs(pools, vm)
    assert set(original) == {"0", "1"}
    remote, backup = backup_of(pools, vm, mode)

    _, _, devices = restore_to_pool1(pools, remote, backup)
    assert macs_by_device(devices["vifs"]) == original

    _, _, devices = restore_to_pool1(pools, remote, backup, new_mac_addresses=True)
    renewed = macs_by_device(devices["vifs"])
    assert set(renewed) == {"0", "1"}
    assert not set(renewed.values()) & set(original.values())
    assert all(v["MAC_autogenerated"] for v in devices["vifs"].values())


def test_networks_match_by_name_and_vlan_on_a_new_pool(pools):
    vm = source_vm(pools)
    add_vif(pools, vm, VLAN_NETWORK, "1", "02:aa:bb:cc:dd:02")
    add_network(pools, 0, "Storage", 300)
    add_vif(pools, vm, "Storage", "2", "02:aa:bb:cc:dd:03")
    # decoys on the new pool: the same name on another VLAN, created last so that a match by
    # name alone would pick them
    add_network(pools, 1, VLAN_NETWORK, 200)
    storage = add_network(pools, 1, "Storage (old)", 300)
    remote, backup = backup_of(pools, vm, "delta")
    source_uuids = {
        pools.sim.pool(0).xapi.db.record("network", ref)["uuid"]
        for ref in pools.sim.pool(0).xapi.db.tables["network"]
    }

    _, _, devices = restore_to_pool1(pools, remote, backup)
    placed = {
        str(vif["device"]): devices["networks"][vif["network"]] for vif in devices["vifs"].values()
    }
    assert not {n["uuid"] for n in placed.values()} & source_uuids  # a pool that never saw it
    assert (placed["0"]["name_label"], placed["0"]["VLAN"]) == (
        "Pool-wide network associated with eth0",
        -1,
    )
    assert (placed["1"]["name_label"], placed["1"]["VLAN"]) == (VLAN_NETWORK, 100)
    # no network of that name on VLAN 300: another network of the same VLAN
    assert placed["2"]["uuid"] == storage


def test_networks_keep_their_uuid_on_the_same_pool(pools):
    vm = source_vm(pools)
    add_vif(pools, vm, VLAN_NETWORK, "1", "02:aa:bb:cc:dd:04")
    remote, backup = backup_of(pools, vm, "delta")
    driver = driver_for(pools, 0)
    try:
        pool = driver.inventory().pools[0]
        sr = next(sr for sr in pool.srs if sr.name == "Shared storage")
        # a decoy with the same name and VLAN: the source network's UUID must win
        add_network(pools, 0, VLAN_NETWORK, 100)
        result = restore_backup(remote, backup, driver, sr_uuid=sr.uuid, pool=pool)
        restored = driver.vm_devices(result.vm_uuid)
        original = driver.vm_devices(vm.uuid)
    finally:
        driver.close()

    def uuids(devices):
        return {
            str(v["device"]): devices["networks"][v["network"]]["uuid"]
            for v in devices["vifs"].values()
        }

    assert uuids(restored) == uuids(original)


def test_restore_command_options(pools, tmp_path):
    vm = source_vm(pools)
    original = source_macs(pools, vm)
    _, backup = backup_of(pools, vm, "delta")
    sim = pools.sim
    (tmp_path / "pw").write_text(sim.password)
    config = tmp_path / "config.toml"
    config.write_text(
        f'log_db = "{tmp_path}/logs.sqlite"\n'
        f'[servers.target]\nurl = "{sim.pool(1).url}"\npassword = {{ file = "{tmp_path}/pw" }}\n'
        f'[remotes.nas]\nurl = "file://{pools.remote_dir}"\n'
    )
    db = sim.pool(1).xapi.db
    sr = next(r["uuid"] for r in db.tables["SR"].values() if r["name_label"] == "Shared storage")

    def restore(*options):
        return run_cli(
            "--config", str(config), "restore", f"nas:{backup.path}", "--sr", sr, *options
        )

    def restored_vm(stdout):
        uuid = stdout.split(" as VM ")[1].split()[0]
        ref = db.resolve("VM", uuid)
        macs = {
            db.record("VIF", v)["device"]: db.record("VIF", v)["MAC"]
            for v in db.record("VM", ref)["VIFs"]
        }
        return db.record("VM", ref)["power_state"], macs

    result = restore("--start", "--new-mac-addresses")
    assert result.returncode == 0, result.stderr
    assert "(running)" in result.stdout
    state, macs = restored_vm(result.stdout)
    assert state == "Running" and set(macs) == set(original)
    assert not set(macs.values()) & set(original.values())

    result = restore()
    assert result.returncode == 0, result.stderr
    assert "(halted)" in result.stdout
    assert restored_vm(result.stdout) == ("Halted", original)

    sim.arm("VM.start", code="HOST_NOT_ENOUGH_FREE_MEMORY", params=["1024", "512"], pool=1)
    result = restore("--start")
    assert result.returncode == 1
    assert (
        "could not be started" in result.stderr and "HOST_NOT_ENOUGH_FREE_MEMORY" in result.stderr
    )
    assert "Traceback" not in result.stderr
