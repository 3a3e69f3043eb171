"""The simulator's RPC side, checked with the official XenAPI SDK and raw HTTP."""

from __future__ import annotations

import http.client
import json
import threading
import time
import xmlrpc.client

import pytest
from xobackup_hypervisor_xcpng.sim import Simulator
from xobackup_hypervisor_xcpng.sim.codec import parse_value_fragment

from tests.conftest import require_module

XenAPI = require_module("XenAPI")


def login(url: str, sim: Simulator):
    session = XenAPI.Session(url)
    session.xenapi.login_with_password(sim.username, sim.password, "1.0", "tests")
    return session


def wait_task(session, task: str, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = session.xenapi.task.get_record(task)
        if record["status"] != "pending":
            return record
        time.sleep(0.02)
    raise AssertionError(f"task {task} still pending")


def guest(session) -> tuple[str, dict]:
    records = session.xenapi.VM.get_all_records()
    return next(
        (ref, vm)
        for ref, vm in sorted(records.items(), key=lambda item: item[1]["name_label"])
        if not (vm["is_a_template"] or vm["is_control_domain"] or vm["is_a_snapshot"])
    )


def failure(call, *args) -> list[str]:
    with pytest.raises(XenAPI.Failure) as caught:
        call(*args)
    return caught.value.details


def post(url: str, path: str, body: bytes, content_type: str) -> tuple[int, str, bytes]:
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    connection.request("POST", path, body, {"Content-Type": content_type})
    response = connection.getresponse()
    data = response.read()
    connection.close()
    return response.status, response.getheader("Content-Type", ""), data


def jsonrpc(url: str, method: str, params: list, version: str | None = "2.0") -> dict:
    request = {"method": method, "params": params, "id": 7}
    if version:
        request["jsonrpc"] = version
    status, content_type, body = post(url, "/jsonrpc", json.dumps(request).encode(), "json")
    assert status == 200 and content_type == "application/json"
    return json.loads(body)


def test_sdk_logs_in_lists_vms_and_snapshots_through_a_task(xapi_sim):
    session = login(xapi_sim.pool(0).url, xapi_sim)
    records = session.xenapi.VM.get_all_records()
    guests = [vm for vm in records.values() if not (vm["is_a_template"] or vm["is_control_domain"])]
    assert len(guests) == 4
    assert any(vm["is_control_domain"] for vm in records.values())
    vm_ref, vm = guest(session)
    # XAPI's quirk: every int arrives as a string over XML-RPC
    assert vm["memory_static_max"] == str(2 * 1024**3)
    task = session.xenapi.Async.VM.snapshot(vm_ref, "backup")
    record = wait_task(session, task)
    assert record["status"] == "success", record["error_info"]
    snapshot_ref = parse_value_fragment(record["result"])
    assert record["result"] == f"<value>{snapshot_ref}</value>"
    snapshot = session.xenapi.VM.get_record(snapshot_ref)
    assert snapshot["is_a_snapshot"] and snapshot["is_a_template"]
    assert snapshot["snapshot_of"] == vm_ref
    assert snapshot["name_label"] == "backup"
    assert snapshot["other_config"]["mac_seed"] == vm["other_config"]["mac_seed"]
    assert snapshot["snapshot_info"]["disk-snapshot-type"] == "crash_consistent"
    assert snapshot_ref in session.xenapi.VM.get_snapshots(vm_ref)
    disks = [
        session.xenapi.VBD.get_record(vbd)
        for vbd in snapshot["VBDs"]
        if session.xenapi.VBD.get_type(vbd) == "Disk"
    ]
    assert len(disks) == 1
    vdi = session.xenapi.VDI.get_record(disks[0]["VDI"])
    assert vdi["is_a_snapshot"] and vdi["snapshot_of"] != "OpaqueRef:NULL"
    assert snapshot["VIFs"] and session.xenapi.VIF.get_MAC(snapshot["VIFs"][0]) == (
        session.xenapi.VIF.get_MAC(vm["VIFs"][0])
    )
    session.xenapi.session.logout()


def test_xmlrpc_wire_encoding_is_xapis(xapi_sim):
    url = xapi_sim.pool(0).url
    login_call = xmlrpc.client.dumps(("root", xapi_sim.password), "session.login_with_password")
    status, content_type, body = post(url, "/xmlrpc", login_call.encode(), "text/xml")
    assert status == 200 and content_type == "text/xml"
    assert b"<name>Status</name><value>Success</value>" in body
    session = xmlrpc.client.loads(body)[0][0]["Value"]
    assert session.startswith("OpaqueRef:")
    call = xmlrpc.client.dumps((session,), "pool.get_all_records")
    _, _, body = post(url, "/RPC2", call.encode(), "text/xml")
    assert b"<i4>" not in body and b"<int>" not in body
    call = xmlrpc.client.dumps((session,), "VM.get_all_records")
    _, _, body = post(url, "/", call.encode(), "text/xml")
    assert f"<value>{2 * 1024**3}</value>".encode() in body
    assert b"<dateTime.iso8601>19700101T00:00:00Z</dateTime.iso8601>" in body
    assert b"<boolean>0</boolean>" in body
    call = xmlrpc.client.dumps(("OpaqueRef:nope",), "VM.get_all")
    _, _, body = post(url, "/", call.encode(), "text/xml")
    value = xmlrpc.client.loads(body)[0][0]
    assert value == {"Status": "Failure", "ErrorDescription": ["SESSION_INVALID", "OpaqueRef:nope"]}
    status, content_type, body = post(url, "/", b"<methodCall><oops", "text/xml")
    assert status == 500 and content_type == "text/html" and b"Parse_error" in body


def test_jsonrpc_v1_and_v2_share_sessions_with_xmlrpc(xapi_sim):
    url = xapi_sim.pool(0).url
    reply = jsonrpc(url, "session.login_with_password", ["root", xapi_sim.password])
    assert reply["jsonrpc"] == "2.0" and reply["id"] == 7
    session = reply["result"]
    records = jsonrpc(url, "VM.get_all_records", [session])["result"]
    vm = next(v for v in records.values() if v["name_label"].endswith("vm000"))
    assert vm["memory_static_max"] == 2 * 1024**3  # a real JSON integer here
    error = jsonrpc(url, "VM.get_record", [session, "OpaqueRef:gone"])["error"]
    assert error == {"code": 1, "message": "HANDLE_INVALID", "data": ["VM", "OpaqueRef:gone"]}
    v1 = jsonrpc(url, "VM.get_record", [session, "OpaqueRef:gone"], version=None)
    assert v1 == {"result": None, "error": ["HANDLE_INVALID", "VM", "OpaqueRef:gone"], "id": 7}
    assert "jsonrpc" not in v1
    sdk = XenAPI.Session(url)
    sdk._session = session  # the same session works over XML-RPC
    assert len(sdk.xenapi.VM.get_all()) == len(records)
    status, _, _ = post(url, "/jsonrpc", b'{"method": "VM.get_all", "params": []}', "json")
    assert status == 500  # notifications (no id) are refused


def test_member_answers_host_is_slave_with_master_address(xapi_sim):
    pool = xapi_sim.pool(0)
    assert pool.member_urls
    member = XenAPI.Session(pool.member_urls[0])
    details = failure(member.xenapi.login_with_password, "root", xapi_sim.password)
    assert details == ["HOST_IS_SLAVE", "127.0.0.1"]
    master = login(pool.url, xapi_sim)
    hosts = master.xenapi.host.get_all_records()
    addresses = sorted(h["address"] for h in hosts.values())
    assert addresses[0] == "127.0.0.1" and len(addresses) == 2
    pool_record = next(iter(master.xenapi.pool.get_all_records().values()))
    assert hosts[pool_record["master"]]["address"] == "127.0.0.1"
    # each host has a management PIF on the pool network and a VLAN PIF
    pifs = master.xenapi.PIF.get_all_records().values()
    assert sorted((p["device"], p["VLAN"]) for p in pifs) == [
        ("eth0", "-1"),
        ("eth0", "-1"),
        ("eth1", "100"),
        ("eth1", "100"),
    ]


def test_logout_invalidates_the_session_and_bad_password_fails(xapi_sim):
    url = xapi_sim.pool(0).url
    raw = xmlrpc.client.ServerProxy(url)
    session = raw.session.login_with_password("root", xapi_sim.password)["Value"]
    assert raw.VM.get_all(session)["Status"] == "Success"
    raw.session.logout(session)
    assert raw.VM.get_all(session)["ErrorDescription"] == ["SESSION_INVALID", session]
    reply = raw.session.login_with_password("root", "wrong")
    assert reply["ErrorDescription"][:2] == ["SESSION_AUTHENTICATION_FAILED", "root"]


def test_power_state_rules_and_blocked_operations(xapi_sim):
    session = login(xapi_sim.pool(0).url, xapi_sim)
    api = session.xenapi
    vm, record = guest(session)
    assert record["power_state"] == "Running"
    details = failure(api.VM.start, vm, False, False)
    assert details == ["VM_BAD_POWER_STATE", vm, "halted", "running"]
    assert failure(api.VM.destroy, vm)[0] == "VM_BAD_POWER_STATE"
    assert "clean_shutdown" in record["allowed_operations"]
    assert "start" not in record["allowed_operations"]
    api.VM.clean_shutdown(vm)
    assert api.VM.get_power_state(vm) == "Halted"
    assert "start" in api.VM.get_allowed_operations(vm)
    details = failure(api.VM.clean_shutdown, vm)
    assert details == ["VM_BAD_POWER_STATE", vm, "running", "halted"]
    assert failure(api.VM.checkpoint, vm, "mem")[:1] == ["VM_BAD_POWER_STATE"]
    api.VM.add_to_blocked_operations(vm, "start", "replica")
    assert failure(api.VM.start, vm, False, False) == ["OPERATION_BLOCKED", vm, "replica"]
    api.VM.remove_from_blocked_operations(vm, "start")
    api.VM.start(vm, False, False)
    assert api.VM.get_power_state(vm) == "Running"
    assert api.VM.get_last_boot_CPU_flags(vm)["vendor"] == "GenuineIntel"
    template = next(r for r, v in api.VM.get_all_records().items() if v["is_default_template"])
    assert failure(api.VM.start, template, False, False)[0] == "VM_IS_TEMPLATE"
    # snapshots are taken in any state; ignore_vdis leaves disks out
    disk = next(api.VBD.get_VDI(b) for b in api.VM.get_VBDs(vm) if api.VBD.get_type(b) == "Disk")
    snapshot = api.VM.snapshot(vm, "no disks", [disk])
    kinds = [api.VBD.get_type(b) for b in api.VM.get_VBDs(snapshot)]
    assert "Disk" not in kinds and "CD" in kinds
    assert failure(api.VDI.destroy, disk) == ["VDI_IN_USE", disk, "destroy"]


def test_parameter_count_unknown_method_and_map_rules(xapi_sim):
    session = login(xapi_sim.pool(0).url, xapi_sim)
    api = session.xenapi
    vm, _ = guest(session)
    details = failure(api.VM.snapshot, vm)
    assert details[0] == "MESSAGE_PARAMETER_COUNT_MISMATCH" and details[1] == "VM.snapshot"
    assert failure(api.VM.frobnicate, vm) == ["MESSAGE_METHOD_UNKNOWN", "VM.frobnicate"]
    api.VM.add_to_other_config(vm, "xo:backup:job", "j1")
    uuid = api.VM.get_uuid(vm)
    assert failure(api.VM.add_to_other_config, vm, "xo:backup:job", "j2") == [
        "MAP_DUPLICATE_KEY",
        "VM",
        "other_config",
        uuid,
        "xo:backup:job",
    ]
    assert api.VM.get_by_uuid(uuid) == vm
    assert failure(api.VM.get_by_uuid, "nope") == ["UUID_INVALID", "VM", "nope"]
    api.VM.add_tags(vm, "backup-me")
    assert "backup-me" in api.VM.get_tags(vm)
    api.VM.set_ha_restart_priority(vm, "")
    assert api.VM.get_ha_restart_priority(vm) == ""
    where = api.VM.get_all_records_where(
        'field "is_a_template"="false" and field "is_control_domain"="false" '
        'and (field "name__label" = "pool0-vm001" or field "power_state" = "Halted")'
    )
    names = sorted(v["name_label"] for v in where.values())
    assert names == ["pool0-vm001", "pool0-vm003"]
    host = api.host.get_all()[0]
    assert str(api.host.get_servertime(host)).endswith("Z")
    methods = XenAPI.Session(xapi_sim.pool(0).url).system.listMethods()["Value"]
    assert "VM.get_all_records" in methods and "Async.VM.snapshot" in methods


def test_quiesce_answers_message_removed_and_can_be_legacy(xapi_sim):
    session = login(xapi_sim.pool(0).url, xapi_sim)
    vm, _ = guest(session)
    assert failure(session.xenapi.VM.snapshot_with_quiesce, vm, "q") == ["MESSAGE_REMOVED"]
    xapi_sim.set_quiesce_mode("not_supported")
    details = failure(session.xenapi.VM.snapshot_with_quiesce, vm, "q")
    assert details[:2] == ["VM_SNAPSHOT_WITH_QUIESCE_NOT_SUPPORTED", vm]
    xapi_sim.set_quiesce_mode("success")
    snapshot = session.xenapi.VM.snapshot_with_quiesce(vm, "q")
    info = session.xenapi.VM.get_snapshot_info(snapshot)
    assert info["disk-snapshot-type"] == "quiesced"


def test_checkpoint_and_suspended_creation_with_cpu_check(xapi_sim):
    session = login(xapi_sim.pool(0).url, xapi_sim)
    api = session.xenapi
    vm, _ = guest(session)
    checkpoint = api.VM.checkpoint(vm, "with RAM")
    snap = api.VM.get_record(checkpoint)
    assert snap["power_state"] == "Suspended" and snap["suspend_VDI"] != "OpaqueRef:NULL"
    assert api.VDI.get_type(snap["suspend_VDI"]) == "suspend"
    assert api.VM.get_power_state(vm) == "Running"
    flags = snap["last_boot_CPU_flags"]
    assert flags["vendor"] == "GenuineIntel" and len(flags["features"].split("-")) == 22
    # restore a memory backup: create the VM Suspended with a copy of the memory image
    memory = api.VDI.clone(snap["suspend_VDI"])
    new = api.VM.create(
        {
            "name_label": "restored",
            "power_state": "Suspended",
            "suspend_VDI": memory,
            "last_boot_CPU_flags": flags,
            "last_booted_record": "",
            "memory_static_max": str(2 * 1024**3),
        }
    )
    assert api.VM.get_power_state(new) == "Suspended"
    assert api.VM.get_suspend_VDI(new) == memory
    master = next(iter(api.pool.get_all_records().values()))["master"]
    xapi_sim.set_host_cpu(master, "AuthenticAMD")
    details = failure(api.VM.resume, new, False, False)
    assert details[:3] == ["VM_INCOMPATIBLE_WITH_THIS_HOST", new, master]
    assert "vendor" in details[3]
    # same vendor but a missing feature bit
    words = flags["features"].split("-")
    word = int(words[1], 16)
    missing_bit = word & -word
    words[1] = f"{word & ~missing_bit:08x}"
    xapi_sim.set_host_cpu(master, "GenuineIntel", "-".join(words))
    details = failure(api.VM.assert_can_boot_here, new, master)
    assert details[0] == "VM_INCOMPATIBLE_WITH_THIS_HOST"
    assert f"00000000-{missing_bit:08x}-00000000" in details[3]
    api.VM.resume(new, False, True)  # force skips the check
    assert api.VM.get_power_state(new) == "Running"
    assert failure(api.VDI.get_record, memory)[0] == "HANDLE_INVALID"  # consumed by resume


def test_citrix_flavour_creates_vms_halted(tmp_path):
    with Simulator(pools=1, vms=1, flavour="citrix", data_dir=tmp_path, disk_size=2**24) as sim:
        session = login(sim.pool(0).url, sim)
        api = session.xenapi
        sr = next(iter(api.pool.get_all_records().values()))["default_SR"]
        memory = api.VDI.create(
            {
                "name_label": "mem",
                "name_description": "",
                "SR": sr,
                "virtual_size": "4194304",
                "type": "suspend",
                "sharable": False,
                "read_only": False,
                "other_config": {},
            }
        )
        new = api.VM.create({"name_label": "x", "power_state": "Suspended", "suspend_VDI": memory})
        assert api.VM.get_power_state(new) == "Halted"
        brand = next(iter(api.host.get_all_records().values()))["software_version"]
        assert brand["product_brand"] == "XenServer"


def test_event_from_add_mod_del_and_barrier(xapi_sim):
    session = login(xapi_sim.pool(0).url, xapi_sim)
    api = session.xenapi
    first = getattr(api.event, "from")(["vm"], "", 0.1)
    assert all(e["operation"] == "add" and e["class"] == "vm" for e in first["events"])
    assert int(first["valid_ref_counts"]["vm"]) == len(first["events"])
    token = first["token"]
    assert len(token.split(",")) == 2 and all(len(p) == 20 for p in token.split(","))
    pool = next(iter(api.pool.get_all()))
    pool_token = getattr(api.event, "from")(["pool"], "", 0.1)["token"]
    api.pool.add_to_other_config(pool, "xo:barrier:abc", "123")
    batch = getattr(api.event, "from")(["pool"], pool_token, 5.1)
    assert [e["operation"] for e in batch["events"]] == ["mod"]
    assert batch["events"][0]["snapshot"]["other_config"]["xo:barrier:abc"] == "123"
    vm, _ = guest(session)
    snapshot = api.VM.snapshot(vm, "to delete")
    token = getattr(api.event, "from")(["vm"], token, 0.1)["token"]
    api.VM.destroy(snapshot)
    events = getattr(api.event, "from")(["vm"], token, 5.1)["events"]
    deleted = [e for e in events if e["ref"] == snapshot]
    assert deleted and deleted[-1]["operation"] == "del" and "snapshot" not in deleted[-1]
    event_from = getattr(api.event, "from")
    quiet = event_from(["vm"], event_from(["vm"], token, 0.1)["token"], 0.2)
    assert quiet["events"] == []
    assert failure(getattr(api.event, "from"), ["vm"], "garbage", 0.1)[0] == (
        "EVENT_FROM_TOKEN_PARSE_FAILURE"
    )


def test_event_from_blocks_until_a_change(xapi_sim):
    session = login(xapi_sim.pool(0).url, xapi_sim)
    api = session.xenapi
    token = getattr(api.event, "from")(["task"], "", 0.1)["token"]
    result = {}

    def wait() -> None:
        other = login(xapi_sim.pool(0).url, xapi_sim).xenapi
        result["batch"] = getattr(other.event, "from")(["task"], token, 30.1)

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.3)
    assert waiter.is_alive()
    task = api.task.create("upload", "")
    waiter.join(10)
    assert not waiter.is_alive()
    assert [e["ref"] for e in result["batch"]["events"]] == [task]


def test_task_cancel_and_destroy(xapi_sim):
    session = login(xapi_sim.pool(0).url, xapi_sim)
    api = session.xenapi
    task = api.task.create("export", "mine")
    assert api.task.get_status(task) == "pending"
    api.task.set_progress(task, 0.5)
    assert float(api.task.get_progress(task)) == 0.5
    api.task.cancel(task)
    assert api.task.get_status(task) == "cancelled"
    assert api.task.get_error_info(task) == ["TASK_CANCELLED", task]
    api.task.destroy(task)
    assert failure(api.task.get_record, task)[0] == "HANDLE_INVALID"


def test_a_host_without_jsonrpc_answers_text_xml(tmp_path):
    with Simulator(pools=1, vms=1, jsonrpc=False, data_dir=tmp_path, disk_size=2**24) as sim:
        request = {
            "jsonrpc": "2.0",
            "method": "session.login_with_password",
            "params": ["root", sim.password],
            "id": 1,
        }
        status, content_type, _ = post(
            sim.pool(0).url, "/jsonrpc", json.dumps(request).encode(), "application/json"
        )
        assert status == 200 and content_type == "text/xml"  # how XO detects "no JSON-RPC"
        assert login(sim.pool(0).url, sim).xenapi.VM.get_all()
