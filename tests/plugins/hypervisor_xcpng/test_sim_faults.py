"""Fault injection and in-flight counters of the simulator."""

from __future__ import annotations

import http.client
import io
import threading
import time
import xmlrpc.client
from urllib.parse import urlencode

import pytest

from tests.conftest import require_module

XenAPI = require_module("XenAPI")

MiB = 1024 * 1024


def login(sim, pool: int = 0):
    session = XenAPI.Session(sim.pool(pool).url)
    session.xenapi.login_with_password(sim.username, sim.password, "1.0", "tests")
    return session


def guest(session, suffix: str = "vm000") -> str:
    return next(
        ref
        for ref, vm in session.xenapi.VM.get_all_records().items()
        if vm["name_label"].endswith(suffix)
    )


def disk_of(session, vm: str) -> str:
    return next(
        session.xenapi.VBD.get_VDI(vbd)
        for vbd in session.xenapi.VM.get_VBDs(vm)
        if session.xenapi.VBD.get_type(vbd) == "Disk"
    )


def wait_task(session, task: str) -> dict:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        record = session.xenapi.task.get_record(task)
        if record["status"] != "pending":
            return record
        time.sleep(0.02)
    raise AssertionError("task still pending")


def download(url: str, path: str, query: dict) -> tuple[int, bytes]:
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.request("GET", f"{path}?{urlencode(query)}")
    response = connection.getresponse()
    chunks = []
    try:
        while chunk := response.read(65536):
            chunks.append(chunk)
    except (http.client.IncompleteRead, ConnectionError) as error:
        chunks.append(getattr(error, "partial", b""))
    connection.close()
    return response.status, b"".join(chunks)


def test_error_fault_fails_only_the_nth_call(xapi_sim):
    session = login(xapi_sim)
    vm = guest(session)
    xapi_sim.arm(
        "VM.snapshot", "error", code="SR_BACKEND_FAILURE_44", params=["", "full", ""], nth=2
    )
    session.xenapi.VM.snapshot(vm, "first")
    with pytest.raises(XenAPI.Failure) as caught:
        session.xenapi.VM.snapshot(vm, "second")
    assert caught.value.details == ["SR_BACKEND_FAILURE_44", "", "full", ""]
    session.xenapi.VM.snapshot(vm, "third")


def test_error_fault_on_a_method_fails_its_async_task(xapi_sim):
    session = login(xapi_sim)
    vm = guest(session)
    xapi_sim.arm(
        "VM.snapshot",
        "error",
        code="OTHER_OPERATION_IN_PROGRESS",
        params=["VM", vm, "export", "OpaqueRef:x"],
    )
    task = session.xenapi.Async.VM.snapshot(vm, "async")
    record = wait_task(session, task)
    assert record["status"] == "failure"
    assert record["error_info"] == [
        "OTHER_OPERATION_IN_PROGRESS",
        "VM",
        vm,
        "export",
        "OpaqueRef:x",
    ]
    xapi_sim.arm("Async.VM.snapshot", "error", code="TOO_MANY_PENDING_TASKS", times=2)
    for _ in range(2):
        with pytest.raises(XenAPI.Failure) as caught:
            session.xenapi.Async.VM.snapshot(vm, "refused")
        assert caught.value.details == ["TOO_MANY_PENDING_TASKS"]
    assert wait_task(session, session.xenapi.Async.VM.snapshot(vm, "ok"))["status"] == "success"


def test_delay_and_hang_faults(xapi_sim):
    session = login(xapi_sim)
    xapi_sim.arm("VM.get_all", "delay", seconds=0.4)
    started = time.monotonic()
    session.xenapi.VM.get_all()
    assert time.monotonic() - started >= 0.4
    hang = xapi_sim.arm("host.get_all", "hang")
    done = threading.Event()

    def call() -> None:
        login(xapi_sim).xenapi.host.get_all()
        done.set()

    threading.Thread(target=call, daemon=True).start()
    assert not done.wait(0.5)
    hang.release()
    assert done.wait(10)


def test_drop_and_http500_faults_break_the_transport(xapi_sim):
    session = login(xapi_sim)
    # xmlrpc.client retries once on a dropped keep-alive connection: drop twice
    xapi_sim.arm("VM.get_all", "drop", times=2)
    with pytest.raises((ConnectionError, http.client.RemoteDisconnected)):
        session.xenapi.VM.get_all()
    session = login(xapi_sim)
    xapi_sim.arm("VM.get_all", "drop", reset=True, times=2)
    with pytest.raises(ConnectionError):
        session.xenapi.VM.get_all()
    session = login(xapi_sim)
    xapi_sim.arm("SR.get_all", "http500")
    with pytest.raises(xmlrpc.client.ProtocolError) as caught:
        session.xenapi.SR.get_all()
    assert caught.value.errcode == 500
    assert session.xenapi.SR.get_all()  # only once


def test_session_invalid_after_a_simulated_restart(xapi_sim):
    url = xapi_sim.pool(0).url
    raw = xmlrpc.client.ServerProxy(url)
    session = raw.session.login_with_password("root", xapi_sim.password)["Value"]
    xapi_sim.restart_xapi()
    assert raw.VM.get_all(session)["ErrorDescription"] == ["SESSION_INVALID", session]
    sdk = login(xapi_sim)
    xapi_sim.restart_xapi()
    assert sdk.xenapi.VM.get_all()  # the SDK logs in again by itself


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + 20
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_in_flight_counters_prove_concurrency(xapi_sim):
    session = login(xapi_sim)
    vms = [guest(session, f"vm{i:03d}") for i in range(3)]
    counters = xapi_sim.pool(0).in_flight
    # snapshots held until all three are in flight, whatever the machine's speed
    hold = xapi_sim.arm("VM.snapshot", "hang", times=None)
    tasks = [session.xenapi.Async.VM.snapshot(vm, "parallel") for vm in vms]
    wait_until(lambda: counters.current["snapshot"] == 3, "three snapshots in flight")
    hold.release()
    assert all(wait_task(session, t)["status"] == "success" for t in tasks)
    assert counters.maximum["snapshot"] == 3 and counters.current["snapshot"] == 0
    counters.reset()
    xapi_sim.faults.clear()
    for vm in vms:
        session.xenapi.VM.snapshot(vm, "sequential")
    assert counters.maximum["snapshot"] == 1
    # two disk exports, both stalled after their first MiB until released
    stall = xapi_sim.arm("/export_raw_vdi", "stall", after_bytes=MiB, times=None)
    url = xapi_sim.pool(0).url
    disks = [disk_of(session, vm) for vm in vms[:2]]
    threads = [
        threading.Thread(
            target=download,
            args=(url, "/export_raw_vdi", {"session_id": session._session, "vdi": d}),
        )
        for d in disks
    ]
    for thread in threads:
        thread.start()
    wait_until(lambda: counters.current["disk_export"] == 2, "two exports in flight")
    stall.release()
    for thread in threads:
        thread.join(30)
    assert counters.maximum["disk_export"] == 2 and counters.current["disk_export"] == 0


def test_stream_faults(xapi_sim):
    session = login(xapi_sim)
    api = session.xenapi
    vdi = disk_of(session, guest(session))
    url = xapi_sim.pool(0).url
    size = int(api.VDI.get_virtual_size(vdi))
    expected = xapi_sim.read(vdi, 0, size)

    def export(**query) -> tuple[int, bytes, dict]:
        task = api.task.create("export", "")
        status, body = download(
            url,
            "/export_raw_vdi",
            {"session_id": session._session, "vdi": vdi, "task_id": task, **query},
        )
        return status, body, wait_task(session, task)

    xapi_sim.arm("/export_raw_vdi", "drop", after_bytes=3 * MiB + 5)
    status, body, task = export()
    assert status == 200 and body == expected[: 3 * MiB + 5]
    assert task["status"] == "failure" and task["error_info"][0] == "VDI_IO_ERROR"
    xapi_sim.arm("/export_raw_vdi", "truncate", after_bytes=MiB)
    _, body, task = export()
    assert len(body) == MiB and task["status"] == "success"  # the payload must be checked
    xapi_sim.arm("/export_raw_vdi", "task_failure")
    _, body, task = export()
    assert body == expected and task["error_info"] == ["VDI_IO_ERROR", "Device I/O errors"]
    xapi_sim.arm("/export_raw_vdi", "embedded500")
    status, body, task = export(format="vhd")
    assert status == 200 and body.startswith(b"HTTP/1.1 500")
    assert task["error_info"][0] == "SR_BACKEND_FAILURE_46"
    xapi_sim.arm("/export_raw_vdi", "error", code="SR_BACKEND_FAILURE_47", params=["", "x", ""])
    status, body, task = export()
    assert status == 500 and b"SR_BACKEND_FAILURE_47" in body
    assert task["error_info"][0] == "SR_BACKEND_FAILURE_47"
    stall = xapi_sim.arm("/export_raw_vdi", "stall", after_bytes=MiB)
    result = {}
    thread = threading.Thread(target=lambda: result.update(out=export()))
    thread.start()
    time.sleep(0.5)
    assert thread.is_alive()  # stalled mid-stream
    stall.release()
    thread.join(30)
    assert result["out"][1] == expected and result["out"][2]["status"] == "success"


def test_upload_drop_fails_the_import_task(xapi_sim):
    session = login(xapi_sim)
    api = session.xenapi
    sr = next(iter(api.pool.get_all_records().values()))["default_SR"]
    vdi = api.VDI.create(
        {
            "name_label": "r",
            "name_description": "",
            "SR": sr,
            "virtual_size": str(8 * MiB),
            "type": "user",
            "sharable": False,
            "read_only": False,
            "other_config": {},
        }
    )
    xapi_sim.arm("/import_raw_vdi", "drop", after_bytes=MiB)
    task = api.task.create("import", "")
    host, port = xapi_sim.pool(0).url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    query = urlencode({"session_id": session._session, "vdi": vdi, "task_id": task})
    with pytest.raises(OSError):
        connection.request(
            "PUT", f"/import_raw_vdi?{query}", b"\x07" * (8 * MiB), {"Content-Length": str(8 * MiB)}
        )
        connection.getresponse().read()
        raise ConnectionResetError("the server read everything")
    connection.close()
    record = wait_task(session, task)
    assert record["status"] == "failure" and record["error_info"][0] == "VDI_IO_ERROR"


def test_corrupt_fault_is_caught_by_the_xva_checksums(xapi_sim):
    from xobackup_core.errors import FormatError
    from xobackup_core.formats.xva import XvaReader

    session = login(xapi_sim)
    vm = guest(session, "vm001")
    assert session.xenapi.VM.get_power_state(vm) == "Halted"
    query = {"session_id": session._session, "ref": vm}
    status, body = download(xapi_sim.pool(0).url, "/export", query)
    assert status == 200
    XvaReader(io.BytesIO(body)).read_all()  # intact
    # flip a byte inside the first data chunk (after ova.xml and the chunk's tar header)
    xapi_sim.arm("/export", "corrupt", after_bytes=len(body) // 2)
    _, damaged = download(xapi_sim.pool(0).url, "/export", query)
    assert len(damaged) == len(body) and damaged != body
    with pytest.raises(FormatError):
        XvaReader(io.BytesIO(damaged)).read_all()


def test_cancelling_the_task_stops_the_download(xapi_sim):
    session = login(xapi_sim)
    api = session.xenapi
    vdi = disk_of(session, guest(session))
    size = int(api.VDI.get_virtual_size(vdi))
    xapi_sim.arm("/export_raw_vdi", "throttle", rate=8 * MiB)
    task = api.task.create("export", "")
    result = {}
    query = {"session_id": session._session, "vdi": vdi, "task_id": task}
    thread = threading.Thread(
        target=lambda: result.update(out=download(xapi_sim.pool(0).url, "/export_raw_vdi", query))
    )
    thread.start()
    deadline = time.monotonic() + 10
    while float(api.task.get_progress(task)) == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    api.task.cancel(task)
    thread.join(30)
    status, body = result["out"]
    assert status == 200 and 0 < len(body) < size
    assert api.task.get_status(task) == "cancelled"
    assert api.task.get_error_info(task) == ["TASK_CANCELLED", task]


def test_leaked_dom0_vbd_blocks_destroy_until_unplugged(xapi_sim):
    session = login(xapi_sim)
    api = session.xenapi
    snapshot = api.VM.snapshot(guest(session), "leaky")
    vdi = disk_of(session, snapshot)
    xapi_sim.arm("/export_raw_vdi", "leak_vbd")
    task = api.task.create("export", "")
    status, body = download(
        xapi_sim.pool(0).url,
        "/export_raw_vdi",
        {"session_id": session._session, "vdi": vdi, "task_id": task},
    )
    assert status == 200 and body == b""
    assert wait_task(session, task)["error_info"][0] == "VDI_IO_ERROR"
    api.VM.destroy(snapshot)
    with pytest.raises(XenAPI.Failure) as caught:
        api.VDI.destroy(vdi)
    assert caught.value.details == ["VDI_IN_USE", vdi, "destroy"]
    leaked = [b for b in api.VDI.get_VBDs(vdi) if api.VM.get_is_control_domain(api.VBD.get_VM(b))]
    assert len(leaked) == 1 and api.VBD.get_currently_attached(leaked[0])
    api.VBD.unplug(leaked[0])
    api.VBD.destroy(leaked[0])
    api.VDI.destroy(vdi)


def test_restart_renumbers_refs_and_drops_sessions(xapi_sim):
    session = login(xapi_sim)
    api = session.xenapi
    pool_before = api.pool.get_all()[0]
    vm = guest(session)
    uuid = api.VM.get_uuid(vm)
    xapi_sim.restart_xapi()
    # the SDK logs in again on SESSION_INVALID; every ref is new, uuids are not
    assert api.pool.get_all()[0] != pool_before
    assert api.VM.get_by_uuid(uuid) != vm
    with pytest.raises(XenAPI.Failure) as caught:
        api.VM.get_record(vm)
    assert caught.value.details == ["HANDLE_INVALID", "VM", vm]
    member = XenAPI.Session(xapi_sim.pool(0).member_urls[0])
    with pytest.raises(XenAPI.Failure) as caught:
        member.xenapi.login_with_password("root", xapi_sim.password)
    assert caught.value.details == ["HOST_IS_SLAVE", "127.0.0.1"]


def test_slow_snapshot_task_reports_progress(xapi_sim):
    session = login(xapi_sim)
    api = session.xenapi
    xapi_sim.arm("VM.snapshot", "delay", seconds=2.0)
    task = api.Async.VM.snapshot(guest(session), "slow")
    seen = set()
    while api.task.get_status(task) == "pending":
        seen.add(float(api.task.get_progress(task)))
        time.sleep(0.05)
    assert any(0 < p < 1 for p in seen)
    assert float(api.task.get_progress(task)) == 1.0


def test_checkpoint_failures_leave_the_vm_as_xapi_does(xapi_sim):
    session = login(xapi_sim)
    api = session.xenapi
    vm = guest(session)
    assert api.VM.get_power_state(vm) == "Running"
    xapi_sim.fail_next_checkpoint("suspend")
    with pytest.raises(XenAPI.Failure) as caught:
        api.VM.checkpoint(vm, "mem")
    assert caught.value.details == ["VM_CHECKPOINT_SUSPEND_FAILED", vm]
    assert api.VM.get_power_state(vm) == "Running"
    xapi_sim.fail_next_checkpoint("resume")
    with pytest.raises(XenAPI.Failure) as caught:
        api.VM.checkpoint(vm, "mem")
    assert caught.value.details == ["VM_CHECKPOINT_RESUME_FAILED", vm]
    assert api.VM.get_power_state(vm) == "Suspended"  # a driver must resume it
    api.VM.resume(vm, False, False)
    assert api.VM.get_power_state(vm) == "Running"
    assert api.VM.checkpoint(vm, "mem")  # one-shot
