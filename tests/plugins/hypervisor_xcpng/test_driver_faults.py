"""Each fault the simulator can inject, and what the driver makes of it (docs/driver.md)."""

from __future__ import annotations

import time

import pytest
from xobackup_hypervisor_xcpng.driver import XapiDriver
from xobackup_hypervisor_xcpng.driver_http import XapiStreamError
from xobackup_hypervisor_xcpng.driver_rpc import XapiConnectionError, XapiTimeoutError
from xobackup_hypervisor_xcpng.sim import Simulator

from tests.plugins.hypervisor_xcpng.test_driver_helpers import (
    first_disk,
    halted_vm,
    make_driver,
    running_vm,
    server_config,
    sim_record,
)
from xobackup_core.config import Secret
from xobackup_core.errors import HypervisorError

MiB = 1024 * 1024


@pytest.fixture
def driver(xapi_sim: Simulator):  # type: ignore[no-untyped-def]
    driver = make_driver(xapi_sim, timeout=1.0, options={"task_timeout": 2.0})
    yield driver
    driver.close()


def _drain(stream) -> int:  # type: ignore[no-untyped-def]
    total = 0
    with stream:
        while chunk := stream.read(MiB):
            total += len(chunk)
    return total


def _pending_tasks(sim: Simulator) -> list[str]:
    return [
        r["name_label"]
        for r in sim.pool(0).xapi.db.tables["task"].values()
        if r["status"] == "pending"
    ]


# -- RPC -------------------------------------------------------------------------------------------
def test_rpc_delay_beyond_the_timeout(xapi_sim: Simulator, driver: XapiDriver) -> None:
    xapi_sim.arm("pool.get_all_records", "delay", seconds=3)
    with pytest.raises(XapiTimeoutError, match="no answer within 1 s"):
        driver.inventory()
    assert driver.inventory().pools  # the fault fired once; the session still works


def test_rpc_hang_times_out(xapi_sim: Simulator, driver: XapiDriver) -> None:
    xapi_sim.arm("VM.get_record", "hang")
    with pytest.raises(XapiTimeoutError):
        driver.vm(halted_vm(xapi_sim))


def test_task_hang_times_out_and_cancels_the_task(xapi_sim: Simulator, driver: XapiDriver) -> None:
    xapi_sim.arm("VM.snapshot", "hang")
    with pytest.raises(XapiTimeoutError, match="did not finish within 2 s"):
        driver.snapshot(running_vm(xapi_sim), "stuck")
    assert "Async.VM.snapshot" not in _pending_tasks(xapi_sim)


def test_error_code_becomes_hypervisor_error(xapi_sim: Simulator, driver: XapiDriver) -> None:
    xapi_sim.arm("VM.get_record", "error", code="RBAC_PERMISSION_DENIED", params=["vm.get", "no"])
    with pytest.raises(HypervisorError) as caught:
        driver.vm(halted_vm(xapi_sim))
    assert caught.value.code == "RBAC_PERMISSION_DENIED"
    assert caught.value.params == ["vm.get", "no"]
    assert "VM.get_record failed: RBAC_PERMISSION_DENIED" in str(caught.value)


@pytest.mark.parametrize("code", ["TOO_MANY_PENDING_TASKS", "OTHER_OPERATION_IN_PROGRESS"])
@pytest.mark.parametrize("target", ["VM.snapshot", "Async.VM.snapshot"])
def test_transient_codes_are_retried(
    xapi_sim: Simulator, driver: XapiDriver, code: str, target: str
) -> None:
    fault = xapi_sim.arm(target, "error", code=code, times=2)
    snapshot = driver.snapshot(running_vm(xapi_sim), "after retries")
    assert fault.fired == 2
    assert sim_record(xapi_sim, "VM", snapshot.uuid)["is_a_snapshot"]


def test_retries_give_up_with_the_code(xapi_sim: Simulator) -> None:
    driver = make_driver(xapi_sim, options={"retries": 2})
    try:
        fault = xapi_sim.arm("VM.snapshot", "error", code="SR_BACKEND_FAILURE_109", times=None)
        with pytest.raises(HypervisorError) as caught:
            driver.snapshot(running_vm(xapi_sim), "chain too long")
        assert caught.value.code == "SR_BACKEND_FAILURE_109"
        assert fault.fired == 3
    finally:
        driver.close()


def test_nth_call_failure_is_not_retried_when_not_transient(
    xapi_sim: Simulator, driver: XapiDriver
) -> None:
    vm = halted_vm(xapi_sim)
    fault = xapi_sim.arm("VM.add_tags", "error", code="OPERATION_NOT_ALLOWED", nth=2)
    driver.update_vm(vm, add_tags=("a",))
    with pytest.raises(HypervisorError) as caught:
        driver.update_vm(vm, add_tags=("b",))
    assert caught.value.code == "OPERATION_NOT_ALLOWED" and fault.fired == 1
    driver.update_vm(vm, add_tags=("c",))
    assert {"a", "c"} <= set(sim_record(xapi_sim, "VM", vm)["tags"])
    assert "b" not in sim_record(xapi_sim, "VM", vm)["tags"]


def test_dropped_rpc_is_retried_only_for_reads(xapi_sim: Simulator, driver: XapiDriver) -> None:
    vm = running_vm(xapi_sim)
    fault = xapi_sim.arm("VM.get_record", "drop")
    assert driver.vm(vm).uuid == vm
    assert fault.fired == 1
    xapi_sim.arm("Async.VM.snapshot", "drop", reset=True)
    with pytest.raises(XapiConnectionError, match="connection"):
        driver.snapshot(vm, "dropped")


def test_http_500_page_for_an_rpc(xapi_sim: Simulator, driver: XapiDriver) -> None:
    xapi_sim.arm("VM.get_record", "http500", times=None)
    with pytest.raises(XapiConnectionError, match="HTTP 500"):
        driver.vm(halted_vm(xapi_sim))


# -- sessions ----------------------------------------------------------------------------------
def test_session_invalid_logs_in_again(xapi_sim: Simulator, driver: XapiDriver) -> None:
    before = driver.session.ref
    xapi_sim.restart_xapi()
    assert driver.inventory().vms
    assert driver.session.ref != before
    xapi_sim.restart_xapi()
    vdi = first_disk(xapi_sim, halted_vm(xapi_sim))
    assert _drain(driver.export_disk(vdi, format="raw")) == 64 * MiB


def test_host_is_slave_leads_to_the_master(xapi_sim: Simulator) -> None:
    pool = xapi_sim.pool(0)
    member = pool.member_urls[0]
    driver = XapiDriver(server_config(xapi_sim, url=member))
    try:
        assert str(driver.session.endpoint) == pool.url
        assert driver.inventory().pools[0].uuid == pool.uuid
    finally:
        driver.close()


def test_host_is_slave_mid_session(xapi_sim: Simulator, driver: XapiDriver) -> None:
    xapi_sim.arm("VM.get_record", "error", code="HOST_IS_SLAVE", params=["127.0.0.1"])
    vm = halted_vm(xapi_sim)
    assert driver.vm(vm).uuid == vm


def test_wrong_password_is_clear_and_secret(xapi_sim: Simulator) -> None:
    config = server_config(xapi_sim, password=Secret("not-the-password-42"))
    with pytest.raises(HypervisorError, match="login as 'root' refused") as caught:
        XapiDriver(config)
    assert caught.value.code == "SESSION_AUTHENTICATION_FAILED"
    assert "not-the-password-42" not in str(caught.value)
    assert "not-the-password-42" not in repr(caught.value.params)


def test_unreachable_host(xapi_sim: Simulator) -> None:
    with pytest.raises(XapiConnectionError, match="connection failed"):
        XapiDriver(server_config(xapi_sim, url="http://127.0.0.1:9"))


# -- streams -----------------------------------------------------------------------------------
@pytest.fixture
def vdi(xapi_sim: Simulator) -> str:
    return first_disk(xapi_sim, halted_vm(xapi_sim))


def test_export_delay_before_the_first_byte(
    xapi_sim: Simulator, driver: XapiDriver, vdi: str
) -> None:
    xapi_sim.arm("/export_raw_vdi", "delay", seconds=3)
    with pytest.raises(XapiTimeoutError):
        driver.export_disk(vdi)


def test_export_stall_mid_stream(xapi_sim: Simulator, driver: XapiDriver, vdi: str) -> None:
    xapi_sim.arm("/export_raw_vdi", "stall", seconds=3, after_bytes=4 * MiB)
    stream = driver.export_disk(vdi, format="raw")
    with pytest.raises(XapiTimeoutError, match="no data for 1 s"):
        _drain(stream)
    with pytest.raises(XapiTimeoutError):
        stream.read(1)  # the error stays


def test_export_hang_mid_stream(xapi_sim: Simulator, driver: XapiDriver, vdi: str) -> None:
    xapi_sim.arm("/export_raw_vdi", "stall", seconds=0, after_bytes=MiB)  # 0: until released
    with pytest.raises(XapiTimeoutError):
        _drain(driver.export_disk(vdi))


@pytest.mark.parametrize("reset", [False, True])
@pytest.mark.parametrize("fmt", ["vhd", "raw"])
def test_export_connection_dropped_mid_stream(
    xapi_sim: Simulator, driver: XapiDriver, vdi: str, reset: bool, fmt: str
) -> None:
    xapi_sim.arm("/export_raw_vdi", "drop", after_bytes=3 * MiB, reset=reset)
    with pytest.raises(HypervisorError) as caught:
        _drain(driver.export_disk(vdi, format=fmt))  # type: ignore[arg-type]
    assert caught.value.code == "VDI_IO_ERROR"
    assert "VDI " + vdi in str(caught.value)


@pytest.mark.parametrize("fmt", ["vhd", "raw"])
def test_truncated_export_with_task_success_is_caught(
    xapi_sim: Simulator, driver: XapiDriver, vdi: str, fmt: str
) -> None:
    xapi_sim.arm("/export_raw_vdi", "truncate", after_bytes=3 * MiB)
    with pytest.raises(XapiStreamError, match="incomplete transfer"):
        _drain(driver.export_disk(vdi, format=fmt))  # type: ignore[arg-type]


def test_truncated_xva_with_task_success_is_caught(xapi_sim: Simulator, driver: XapiDriver) -> None:
    xapi_sim.arm("/export", "truncate", after_bytes=2 * MiB)
    with pytest.raises(XapiStreamError, match="tar end blocks"):
        _drain(driver.export_vm(halted_vm(xapi_sim)))


def test_truncated_zstd_xva_is_caught(xapi_sim: Simulator, driver: XapiDriver) -> None:
    xapi_sim.arm("/export", "truncate", after_bytes=MiB)
    with pytest.raises(XapiStreamError, match="zstd stream ended early"):
        _drain(driver.export_vm(halted_vm(xapi_sim), compression="zstd"))


def test_full_stream_but_failed_task(xapi_sim: Simulator, driver: XapiDriver, vdi: str) -> None:
    xapi_sim.arm("/export_raw_vdi", "task_failure")
    with pytest.raises(HypervisorError) as caught:
        _drain(driver.export_disk(vdi))
    assert caught.value.code == "VDI_IO_ERROR"


def test_embedded_500_in_the_body(xapi_sim: Simulator, driver: XapiDriver, vdi: str) -> None:
    xapi_sim.arm("/export_raw_vdi", "embedded500")
    with pytest.raises(HypervisorError) as caught:
        driver.export_disk(vdi)
    assert caught.value.code == "SR_BACKEND_FAILURE_46"


def test_export_error_before_the_header(xapi_sim: Simulator, driver: XapiDriver) -> None:
    xapi_sim.arm("/export", "error", code="VDI_MISSING", params=["sr", "vdi"])
    with pytest.raises(HypervisorError) as caught:
        driver.export_vm(halted_vm(xapi_sim))
    assert caught.value.code == "VDI_MISSING"
    assert caught.value.params == ["sr", "vdi"]


def test_running_vm_export_is_refused_with_its_code(
    xapi_sim: Simulator, driver: XapiDriver
) -> None:
    with pytest.raises(HypervisorError) as caught:
        driver.export_vm(running_vm(xapi_sim))
    assert caught.value.code == "VM_BAD_POWER_STATE"


def test_throttled_export_still_completes(
    xapi_sim: Simulator, driver: XapiDriver, vdi: str
) -> None:
    xapi_sim.arm("/export_raw_vdi", "throttle", rate=64 * MiB)
    assert _drain(driver.export_disk(vdi, format="raw")) == 64 * MiB


def test_closing_early_aborts_cleanly(xapi_sim: Simulator, driver: XapiDriver, vdi: str) -> None:
    stream = driver.export_disk(vdi, format="raw")
    assert len(stream.read(MiB)) == MiB
    stream.close()
    deadline = time.monotonic() + 5
    while xapi_sim.pool(0).in_flight.current["disk_export"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert xapi_sim.pool(0).in_flight.current["disk_export"] == 0
    assert not _pending_tasks(xapi_sim)
    assert stream.closed


@pytest.mark.parametrize("reset", [False, True])
def test_upload_connection_dropped(
    xapi_sim: Simulator, driver: XapiDriver, vdi: str, reset: bool
) -> None:
    import io

    target = driver.create_disk(
        sr_uuid=sim_record(xapi_sim, "SR", _shared_sr(xapi_sim))["uuid"],
        name="target",
        virtual_size=64 * MiB,
    )
    xapi_sim.arm("/import_raw_vdi", "drop", after_bytes=8 * MiB, reset=reset)
    with pytest.raises(HypervisorError) as caught:
        driver.import_disk(target, io.BytesIO(bytes(64 * MiB)), format="raw", size=64 * MiB)
    assert caught.value.code == "VDI_IO_ERROR" or isinstance(caught.value, XapiConnectionError)


def _shared_sr(sim: Simulator) -> str:
    return next(
        r["uuid"]
        for r in sim.pool(0).xapi.db.tables["SR"].values()
        if r["name_label"] == "Shared storage"
    )


def test_master_gone_the_driver_finds_the_new_one(xapi_sim: Simulator, driver: XapiDriver) -> None:
    pool = xapi_sim.pool(0)
    db = pool.xapi.db
    old_master, new_master = list(db.tables["host"])[:2]
    pool.listeners[0].stop()  # the master's XAPI dies...
    db.update("pool", pool.xapi.pool_ref, master=new_master)  # ...and a member takes over
    vm = running_vm(xapi_sim)
    snapshot = driver.snapshot(vm, "after failover")  # not repeatable, yet never delivered
    assert sim_record(xapi_sim, "VM", snapshot.uuid)["is_a_snapshot"]
    assert driver.session.endpoint.host == db.record("host", new_master)["address"]
    assert driver.session.endpoint.host != db.record("host", old_master)["address"] or (
        driver.session.endpoint.port != int(pool.url.rsplit(":", 1)[1])
    )


def test_upload_to_a_hung_handler_times_out(xapi_sim: Simulator, driver: XapiDriver) -> None:
    import io

    target = driver.create_disk(sr_uuid=_shared_sr(xapi_sim), name="target", virtual_size=64 * MiB)
    xapi_sim.arm("/import_raw_vdi", "hang")
    with pytest.raises(XapiTimeoutError, match="upload stopped after"):
        driver.import_disk(target, io.BytesIO(bytes(64 * MiB)), format="raw", size=64 * MiB)
