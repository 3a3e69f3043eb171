"""Shutting VMs down for offline backups: clean first, hard after the delay, XAPI's errors."""

from __future__ import annotations

import pytest
from xobackup_hypervisor_xcpng.sim import Simulator

from tests.plugins.hypervisor_xcpng.test_driver_helpers import (
    halted_vm,
    make_driver,
    running_vm,
    sim_record,
)
from xobackup_core.errors import HypervisorError


def power_calls(sim: Simulator) -> list[str]:
    return [
        method
        for _pool, method, _args in sim.calls or []
        if method.split(".")[-1] in ("clean_shutdown", "hard_shutdown", "cancel", "start")
    ]


def test_clean_shutdown_then_start(xapi_sim: Simulator) -> None:
    vm = running_vm(xapi_sim)
    driver = make_driver(xapi_sim)
    try:
        xapi_sim.record_calls()
        driver.shutdown_vm(vm, force_after=5.0)
        assert sim_record(xapi_sim, "VM", vm)["power_state"] == "Halted"
        driver.start_vm(vm)
        assert sim_record(xapi_sim, "VM", vm)["power_state"] == "Running"
    finally:
        driver.close()
    assert power_calls(xapi_sim) == ["Async.VM.clean_shutdown", "Async.VM.start"]


def test_a_halted_vm_is_left_alone(xapi_sim: Simulator) -> None:
    vm = halted_vm(xapi_sim)
    driver = make_driver(xapi_sim)
    try:
        xapi_sim.record_calls()
        driver.shutdown_vm(vm)
    finally:
        driver.close()
    assert power_calls(xapi_sim) == []
    assert sim_record(xapi_sim, "VM", vm)["power_state"] == "Halted"


def test_a_guest_ignoring_the_shutdown_is_powered_off_after_the_delay(xapi_sim: Simulator) -> None:
    vm = running_vm(xapi_sim)
    xapi_sim.set_guest_shutdown(vm, "ignore")
    driver = make_driver(xapi_sim)
    try:
        xapi_sim.record_calls()
        driver.shutdown_vm(vm, force_after=0.3)
    finally:
        driver.close()
    assert sim_record(xapi_sim, "VM", vm)["power_state"] == "Halted"
    # the pending clean shutdown is cancelled before XAPI is asked for a hard one
    assert power_calls(xapi_sim) == [
        "Async.VM.clean_shutdown",
        "task.cancel",
        "Async.VM.hard_shutdown",
    ]


def test_without_pv_drivers(xapi_sim: Simulator) -> None:
    vm = running_vm(xapi_sim)
    xapi_sim.set_guest_shutdown(vm, "no_pv_drivers")
    driver = make_driver(xapi_sim)
    try:
        with pytest.raises(HypervisorError) as caught:
            driver.shutdown_vm(vm)  # no delay given: never forced
        assert caught.value.code == "VM_MISSING_PV_DRIVERS"
        assert sim_record(xapi_sim, "VM", vm)["power_state"] == "Running"
        driver.shutdown_vm(vm, force_after=60.0)  # cannot be asked: forced at once
    finally:
        driver.close()
    assert sim_record(xapi_sim, "VM", vm)["power_state"] == "Halted"


def test_xapi_power_state_errors_come_through(xapi_sim: Simulator) -> None:
    vm = running_vm(xapi_sim)
    driver = make_driver(xapi_sim)
    try:
        driver.call("VM.suspend", driver._ref("VM", vm))
        with pytest.raises(HypervisorError) as caught:
            driver.shutdown_vm(vm)
        assert caught.value.code == "VM_BAD_POWER_STATE"
        driver.call("VM.add_to_blocked_operations", driver._ref("VM", vm), "start", "replica")
        driver.call("VM.hard_shutdown", driver._ref("VM", vm))
        with pytest.raises(HypervisorError) as caught:
            driver.start_vm(vm)
        assert caught.value.code == "OPERATION_BLOCKED"
    finally:
        driver.close()
