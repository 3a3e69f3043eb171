"""Snapshots, quiesce fallback, checkpoints, bookkeeping and destruction through the driver."""

from __future__ import annotations

import pytest
from xobackup_hypervisor_xcpng.driver import QUIESCE_FALLBACK_KEY, XapiDriver
from xobackup_hypervisor_xcpng.sim import Simulator

from tests.plugins.hypervisor_xcpng.test_driver_helpers import (
    first_disk,
    halted_vm,
    make_driver,
    running_vm,
    sim_exists,
    sim_record,
)
from xobackup_core.errors import HypervisorError


@pytest.fixture
def driver(xapi_sim: Simulator):  # type: ignore[no-untyped-def]
    driver = make_driver(xapi_sim)
    yield driver
    driver.close()


def test_plain_snapshot_copies_disks_and_is_not_a_template(
    xapi_sim: Simulator, driver: XapiDriver
) -> None:
    vm = running_vm(xapi_sim)
    snapshot = driver.snapshot(vm, "nightly")
    record = sim_record(xapi_sim, "VM", snapshot.uuid)
    assert record["is_a_snapshot"] and not record["is_a_template"]
    assert record["name_label"] == "nightly"
    assert snapshot.snapshot_of == vm and snapshot.is_snapshot
    assert snapshot.power_state == "Halted" and snapshot.suspend_vdi_uuid is None
    assert QUIESCE_FALLBACK_KEY not in snapshot.other_config
    source_disk = first_disk(xapi_sim, vm)
    assert [d.snapshot_of for d in snapshot.disks] == [source_disk]
    assert xapi_sim.read(snapshot.disks[0].vdi_uuid, 0, 1 << 20) == xapi_sim.read(
        source_disk, 0, 1 << 20
    )
    assert record["snapshot_info"]["disk-snapshot-type"] == "crash_consistent"


@pytest.mark.parametrize("mode", ["removed", "not_supported", "failed", "timeout"])
def test_quiesce_falls_back_to_a_plain_snapshot(
    xapi_sim: Simulator, driver: XapiDriver, mode: str
) -> None:
    xapi_sim.set_quiesce_mode(mode)
    expected = {
        "removed": "MESSAGE_REMOVED",
        "not_supported": "VM_SNAPSHOT_WITH_QUIESCE_NOT_SUPPORTED",
        "failed": "VM_SNAPSHOT_WITH_QUIESCE_FAILED",
        "timeout": "VM_SNAPSHOT_WITH_QUIESCE_TIMEOUT",
    }[mode]
    snapshot = driver.snapshot(running_vm(xapi_sim), "quiesced?", quiesce=True)
    assert snapshot.other_config[QUIESCE_FALLBACK_KEY] == expected
    record = sim_record(xapi_sim, "VM", snapshot.uuid)
    assert record["other_config"][QUIESCE_FALLBACK_KEY] == expected
    assert record["snapshot_info"]["disk-snapshot-type"] == "crash_consistent"


def test_quiesce_success_has_no_fallback_mark(xapi_sim: Simulator, driver: XapiDriver) -> None:
    xapi_sim.set_quiesce_mode("success")
    snapshot = driver.snapshot(running_vm(xapi_sim), "quiesced", quiesce=True)
    assert QUIESCE_FALLBACK_KEY not in snapshot.other_config
    assert sim_record(xapi_sim, "VM", snapshot.uuid)["snapshot_info"]["disk-snapshot-type"] == (
        "quiesced"
    )


def test_quiesce_without_fallback_is_a_clear_error(xapi_sim: Simulator) -> None:
    driver = make_driver(xapi_sim, options={"quiesce_fallback": False})
    try:
        with pytest.raises(HypervisorError, match="quiesce") as caught:
            driver.snapshot(running_vm(xapi_sim), "q", quiesce=True)
        assert caught.value.code == "MESSAGE_REMOVED"
    finally:
        driver.close()


def test_checkpoint_has_memory_and_halted_vm_falls_back(
    xapi_sim: Simulator, driver: XapiDriver
) -> None:
    vm = running_vm(xapi_sim)
    checkpoint = driver.snapshot(vm, "with RAM", memory=True)
    assert checkpoint.power_state == "Suspended"
    assert checkpoint.suspend_vdi_uuid is not None
    assert sim_record(xapi_sim, "VDI", checkpoint.suspend_vdi_uuid)["type"] == "suspend"
    assert (
        dict(checkpoint.last_boot_cpu_flags)
        == sim_record(xapi_sim, "VM", vm)["last_boot_CPU_flags"]
    )
    assert sim_record(xapi_sim, "VM", vm)["power_state"] == "Running"

    plain = driver.snapshot(halted_vm(xapi_sim), "with RAM?", memory=True)
    assert plain.is_snapshot and plain.power_state == "Halted"
    assert plain.suspend_vdi_uuid is None


def test_snapshot_can_leave_disks_out(xapi_sim: Simulator, driver: XapiDriver) -> None:
    vm = running_vm(xapi_sim)
    snapshot = driver.snapshot(vm, "no disk", ignore_vdis=(first_disk(xapi_sim, vm),))
    assert snapshot.disks == ()


def test_snapshot_error_code_is_kept(xapi_sim: Simulator, driver: XapiDriver) -> None:
    xapi_sim.arm("VM.snapshot", "error", code="SR_BACKEND_FAILURE_44", params=["", "full", ""])
    with pytest.raises(HypervisorError) as caught:
        driver.snapshot(running_vm(xapi_sim), "x")
    assert caught.value.code == "SR_BACKEND_FAILURE_44"
    assert caught.value.params == ["", "full", ""]
    assert "SR_BACKEND_FAILURE_44" in str(caught.value)
    assert xapi_sim.password not in str(caught.value)


def test_destroy_snapshot_removes_its_disks_only(xapi_sim: Simulator, driver: XapiDriver) -> None:
    vm = running_vm(xapi_sim)
    checkpoint = driver.snapshot(vm, "to delete", memory=True)
    disks = [d.vdi_uuid for d in checkpoint.disks] + [checkpoint.suspend_vdi_uuid]
    assert all(sim_exists(xapi_sim, "VDI", d) for d in disks)
    driver.destroy_vm(checkpoint.uuid)
    assert not sim_exists(xapi_sim, "VM", checkpoint.uuid)
    assert not any(sim_exists(xapi_sim, "VDI", d) for d in disks)
    assert sim_exists(xapi_sim, "VDI", first_disk(xapi_sim, vm))
    driver.destroy_vm(checkpoint.uuid)  # already gone: nothing to do


def test_destroy_retries_vdi_in_use(xapi_sim: Simulator, driver: XapiDriver) -> None:
    snapshot = driver.snapshot(running_vm(xapi_sim), "busy disk")
    fault = xapi_sim.arm(
        "VDI.destroy", "error", code="VDI_IN_USE", params=["x", "destroy"], times=2
    )
    driver.destroy_vm(snapshot.uuid)
    assert fault.fired == 2
    assert not sim_exists(xapi_sim, "VDI", snapshot.disks[0].vdi_uuid)


def test_destroy_keeps_disks_when_asked(xapi_sim: Simulator, driver: XapiDriver) -> None:
    snapshot = driver.snapshot(running_vm(xapi_sim), "keep disks")
    driver.destroy_vm(snapshot.uuid, with_disks=False)
    assert not sim_exists(xapi_sim, "VM", snapshot.uuid)
    assert sim_exists(xapi_sim, "VDI", snapshot.disks[0].vdi_uuid)


def test_update_vm_bookkeeping(xapi_sim: Simulator, driver: XapiDriver) -> None:
    vm = halted_vm(xapi_sim)
    before = sim_record(xapi_sim, "VM", vm)
    old_tags = list(before["tags"])
    driver.update_vm(
        vm,
        name="renamed",
        add_tags=("Disaster Recovery", "HA disabled"),
        remove_tags=tuple(old_tags[:1]),
        other_config={"xo:backup:job": "job-1", "base_template_name": None},
        blocked_operations={"start": "Start operation for this vm is blocked", "start_on": "b"},
        ha_restart_priority="restart",
    )
    driver.update_vm(
        vm, other_config={"xo:backup:job": "job-2"}, blocked_operations={"start_on": None}
    )
    after = sim_record(xapi_sim, "VM", vm)
    assert after["name_label"] == "renamed"
    assert set(after["tags"]) == set(old_tags[1:]) | {"Disaster Recovery", "HA disabled"}
    assert after["other_config"]["xo:backup:job"] == "job-2"
    assert "base_template_name" not in after["other_config"]
    assert after["other_config"]["mac_seed"] == before["other_config"]["mac_seed"]
    assert after["blocked_operations"] == {"start": "Start operation for this vm is blocked"}
    assert after["ha_restart_priority"] == "restart"
    with pytest.raises(HypervisorError, match="ha_restart_priority"):
        driver.update_vm(vm, ha_restart_priority="always")


def test_task_progress_reaches_the_caller(xapi_sim: Simulator, driver: XapiDriver) -> None:
    seen: list[float] = []
    driver.snapshot(running_vm(xapi_sim), "with progress", progress=seen.append)
    assert seen and seen[-1] == 1.0
    assert seen == sorted(seen)
