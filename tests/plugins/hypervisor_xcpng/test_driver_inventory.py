"""The driver's inventory against the simulator's model, over JSON-RPC and XML-RPC."""

from __future__ import annotations

import pytest
from xobackup_hypervisor_xcpng.sim import Simulator

from tests.plugins.hypervisor_xcpng.test_driver_helpers import make_driver, running_vm
from xobackup_core.hypervisor import Inventory


def _check_inventory(sim: Simulator, inventory: Inventory) -> None:
    db = sim.pool(0).xapi.db
    tables = db.tables
    (pool,) = inventory.pools
    _, pool_record = next(iter(tables["pool"].items()))
    assert pool.uuid == pool_record["uuid"]
    assert pool.name == pool_record["name_label"]
    assert pool.flavour == "xcp-ng"
    assert pool.default_sr_uuid == tables["SR"][pool_record["default_SR"]]["uuid"]

    hosts = {h.uuid: h for h in pool.hosts}
    assert set(hosts) == {r["uuid"] for r in tables["host"].values()}
    for ref, record in tables["host"].items():
        host = hosts[record["uuid"]]
        assert host.name == record["name_label"]
        assert host.is_master == (ref == pool_record["master"])
        assert host.cpu.vendor == record["cpu_info"]["vendor"]
        assert host.cpu.features_hvm == record["cpu_info"]["features_hvm"]
        assert host.cpu.features_pv == record["cpu_info"]["features_pv"]
        assert len(host.cpu.features_hvm.split("-")) == 22
        assert host.pool_uuid == pool.uuid

    srs = {s.uuid: s for s in pool.srs}
    assert set(srs) == {r["uuid"] for r in tables["SR"].values()}
    for record in tables["SR"].values():
        sr = srs[record["uuid"]]
        assert (sr.name, sr.type) == (record["name_label"], record["type"])
        assert sr.free_bytes == record["physical_size"] - record["physical_utilisation"]
    assert {n.uuid for n in pool.networks} == {r["uuid"] for r in tables["network"].values()}

    expected = {
        r["uuid"]: (ref, r)
        for ref, r in tables["VM"].items()
        if not r["is_control_domain"] and (r["is_a_snapshot"] or not r["is_a_template"])
    }
    assert {vm.uuid for vm in inventory.vms} == set(expected)
    for vm in inventory.vms:
        ref, record = expected[vm.uuid]
        assert vm.name == record["name_label"]
        assert vm.power_state == record["power_state"]
        assert vm.tags == tuple(record["tags"])
        assert dict(vm.other_config) == record["other_config"]
        assert dict(vm.blocked_operations) == record["blocked_operations"]
        assert vm.ha_restart_priority == record["ha_restart_priority"]
        assert vm.is_snapshot == record["is_a_snapshot"]
        assert vm.record["memory_static_max"] == record["memory_static_max"]
        assert isinstance(vm.record["memory_static_max"], int)
        resident = record["resident_on"]
        assert vm.resident_on == (
            tables["host"][resident]["uuid"] if resident in tables["host"] else None
        )
        disks = []
        for vbd in record["VBDs"]:
            vbd_record = tables["VBD"][vbd]
            if vbd_record["type"] != "Disk":
                continue
            vdi = tables["VDI"][vbd_record["VDI"]]
            disks.append(
                (
                    vdi["uuid"],
                    vdi["virtual_size"],
                    tables["SR"][vdi["SR"]]["uuid"],
                    vbd_record["userdevice"],
                )
            )
        assert [(d.vdi_uuid, d.virtual_size, d.sr_uuid, d.device) for d in vm.disks] == disks
        assert vm.disks, "every simulated VM has a disk"


@pytest.mark.parametrize("protocol", ["jsonrpc", "xmlrpc"])
def test_inventory_matches_the_simulator(xapi_sim: Simulator, protocol: str) -> None:
    driver = make_driver(xapi_sim, options={"protocol": protocol})
    try:
        vm = running_vm(xapi_sim)
        driver.update_vm(vm, add_tags=("xo-memory-backup",), blocked_operations={"start": "no"})
        snapshot = driver.snapshot(vm, "inventory snapshot")
        inventory = driver.inventory()
        assert driver.session.protocol == protocol
        _check_inventory(xapi_sim, inventory)
        taken = inventory.vm(snapshot.uuid)
        assert taken.is_snapshot and taken.snapshot_of == vm
        assert taken.disks[0].snapshot_of == inventory.vm(vm).disks[0].vdi_uuid
        assert "xo-memory-backup" in inventory.vm(vm).tags
        assert dict(inventory.vm(vm).blocked_operations) == {"start": "no"}
    finally:
        driver.close()


def test_auto_protocol_picks_jsonrpc_and_single_vm_read_agrees(xapi_sim: Simulator) -> None:
    driver = make_driver(xapi_sim)
    try:
        inventory = driver.inventory()
        assert driver.session.protocol == "jsonrpc"
        for vm in inventory.vms:
            single = driver.vm(vm.uuid)
            assert (single.name, single.power_state, single.disks, single.resident_on) == (
                vm.name,
                vm.power_state,
                vm.disks,
                vm.resident_on,
            )
    finally:
        driver.close()


def test_citrix_flavour_is_reported(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with Simulator(vms=1, hosts=1, flavour="citrix", disk_size=8 << 20, data_dir=tmp_path) as sim:
        driver = make_driver(sim)
        try:
            assert driver.inventory().pools[0].flavour == "citrix"
        finally:
            driver.close()
