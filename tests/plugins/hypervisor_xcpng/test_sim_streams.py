"""The simulator's HTTP handlers: exports and imports checked with independent readers."""

from __future__ import annotations

import base64
import hashlib
import http.client
import io
import socket
import subprocess
import time
import uuid as uuidlib
from urllib.parse import urlencode

import pytest
from xobackup_hypervisor_xcpng.sim import Simulator
from xobackup_hypervisor_xcpng.sim.codec import parse_value_fragment
from xobackup_hypervisor_xcpng.sim.disks import BLOCK_SIZE

from tests.conftest import require_module, require_tool
from xobackup_core.formats.vhd_structs import bat_size, parse_footer, parse_header
from xobackup_core.formats.vhd_writer import write_vhd_stream
from xobackup_core.formats.xva import XvaReader, detect_compression

XenAPI = require_module("XenAPI")

MiB = 1024 * 1024


def login(sim: Simulator, pool: int = 0):
    session = XenAPI.Session(sim.pool(pool).url)
    session.xenapi.login_with_password(sim.username, sim.password, "1.0", "tests")
    return session


def request(url: str, method: str, path: str, query: dict, body: bytes | None = None, **headers):
    """One HTTP request; returns (status, headers, body read until the server closes)."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.request(method, f"{path}?{urlencode(query)}", body, headers)
    response = connection.getresponse()
    data = response.read()
    connection.close()
    return response.status, response, data


def wait_task(session, task: str) -> dict:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        record = session.xenapi.task.get_record(task)
        if record["status"] != "pending":
            return record
        time.sleep(0.02)
    raise AssertionError("task still pending")


def first_guest(session) -> str:
    records = session.xenapi.VM.get_all_records()
    return min(
        (r for r, v in records.items() if v["name_label"].endswith("vm001")),
        key=str,
    )


def disk_of(session, vm: str) -> str:
    return next(
        session.xenapi.VBD.get_VDI(vbd)
        for vbd in session.xenapi.VM.get_VBDs(vm)
        if session.xenapi.VBD.get_type(vbd) == "Disk"
    )


def content(sim: Simulator, vdi: str) -> bytes:
    data = sim.vdi_data(vdi)
    return data.read(0, data.size)


def test_raw_export_is_the_vdi_content_with_xapis_framing(xapi_sim):
    session = login(xapi_sim)
    vdi = disk_of(session, first_guest(session))
    xapi_sim.write(vdi, 5 * MiB + 17, b"guest wrote this")
    task = session.xenapi.task.create("export", "")
    query = {"session_id": session._session, "vdi": vdi, "format": "raw", "task_id": task}
    status, response, body = request(xapi_sim.pool(0).url, "GET", "/export_raw_vdi", query)
    assert status == 200
    assert response.getheader("Content-Length") is None
    assert response.getheader("task-id") == task
    assert response.getheader("Connection") == "close"
    assert body == content(xapi_sim, vdi)
    assert body[5 * MiB + 17 : 5 * MiB + 33] == b"guest wrote this"
    record = wait_task(session, task)
    assert record["status"] == "success" and float(record["progress"]) == 1.0


def test_vhd_export_converts_bit_exact_with_qemu_img(xapi_sim, tmp_path):
    qemu_img = require_tool("qemu-img")
    session = login(xapi_sim)
    vdi = disk_of(session, first_guest(session))
    xapi_sim.write(vdi, 7 * MiB + 3, b"stored, not generated")  # sent with sendfile
    query = {"session_id": session._session, "vdi": vdi, "format": "vhd"}
    status, response, body = request(xapi_sim.pool(0).url, "GET", "/export_raw_vdi", query)
    assert status == 200 and response.getheader("content-type") == "application/vhd"
    allocated = xapi_sim.vdi_data(vdi).allocated()
    entries = -(-xapi_sim.vdi_data(vdi).size // BLOCK_SIZE)
    assert len(body) == 512 + 1024 + bat_size(entries) + len(allocated) * (512 + BLOCK_SIZE) + 512
    (tmp_path / "disk.vhd").write_bytes(body)
    subprocess.run(
        [
            qemu_img,
            "convert",
            "--image-opts",
            f"driver=vpc,force_size_calc=current_size,file.filename={tmp_path / 'disk.vhd'}",
            "-O",
            "raw",
            str(tmp_path / "disk.raw"),
        ],
        check=True,
    )
    raw = (tmp_path / "disk.raw").read_bytes()
    assert hashlib.sha256(raw).digest() == hashlib.sha256(content(xapi_sim, vdi)).digest()
    footer = parse_footer(body[-512:])
    assert footer.disk_type == 3 and footer.current_size == xapi_sim.vdi_data(vdi).size


def test_delta_vhd_export_reads_as_the_new_snapshot_on_its_base(xapi_sim, tmp_path):
    pyvhdi = require_module("pyvhdi")
    session = login(xapi_sim)
    api = session.xenapi
    vm = first_guest(session)
    live = disk_of(session, vm)
    base_vm = api.VM.snapshot(vm, "base")
    base = disk_of(session, base_vm)
    written = xapi_sim.randomize_blocks(live, 0.25, seed=42)
    new_vm = api.VM.snapshot(vm, "new")
    new = disk_of(session, new_vm)
    url = xapi_sim.pool(0).url
    sid = session._session
    _, _, full = request(
        url, "GET", "/export_raw_vdi", {"session_id": sid, "vdi": base, "format": "vhd"}
    )
    _, _, delta = request(
        url,
        "GET",
        "/export_raw_vdi",
        {"session_id": sid, "vdi": new, "format": "vhd", "base": base},
    )
    header = parse_header(delta[512:1536])
    assert parse_footer(delta[:512]).disk_type == 4
    bat = [
        int.from_bytes(delta[header.table_offset + 4 * i : header.table_offset + 4 * i + 4], "big")
        for i in range(header.max_table_entries)
    ]
    assert [i for i, e in enumerate(bat) if e != 0xFFFFFFFF] == written
    # a client rebuilds the parent link (XAPI's points at the SR's file), then reads the chain
    base_uuid = parse_footer(full[:512]).uuid
    patched = bytearray(delta)
    patched[512 + 40 : 512 + 56] = base_uuid.bytes
    patched[512 + 36 : 512 + 40] = bytes(4)
    checksum = ~sum(patched[512:1536]) & 0xFFFFFFFF
    patched[512 + 36 : 512 + 40] = checksum.to_bytes(4, "big")
    (tmp_path / "base.vhd").write_bytes(full)
    (tmp_path / "delta.vhd").write_bytes(bytes(patched))
    parent = pyvhdi.file()
    parent.open(str(tmp_path / "base.vhd"))
    child = pyvhdi.file()
    child.open(str(tmp_path / "delta.vhd"))
    child.set_parent(parent)
    expected = content(xapi_sim, new)
    assert expected != content(xapi_sim, base)
    got = child.read_buffer_at_offset(len(expected), 0)
    assert hashlib.sha256(got).digest() == hashlib.sha256(expected).digest()
    child.close()
    parent.close()


@pytest.mark.parametrize("compression", ["zstd", "gzip", ""])
def test_xva_export_round_trips_through_the_xva_reader_and_import(xapi_sim, compression):
    session = login(xapi_sim)
    api = session.xenapi
    vm = first_guest(session)
    live = disk_of(session, vm)
    xapi_sim.write(live, 3 * MiB, b"x" * 5000)
    snapshot = api.VM.snapshot(vm, "export me")
    api.VM.set_is_a_template(snapshot, False)
    url = xapi_sim.pool(0).url
    query = {"session_id": session._session, "ref": snapshot, "use_compression": compression}
    status, response, body = request(url, "GET", "/export", query)
    assert status == 200 and response.version == 10  # XAPI answers /export in HTTP/1.0
    assert detect_compression(body[:4]) == (compression or None)
    reader = XvaReader(io.BytesIO(body))
    assert reader.metadata.vm().snapshot["name_label"] == "export me"
    assert reader.metadata.vm().snapshot["is_a_snapshot"] is False
    disks = {}
    for disk in reader.disks():
        disks[disk.info.vdi_uuid] = b"".join(disk.iter_data())
    snap_vdi = disk_of(session, snapshot)
    assert disks == {api.VDI.get_uuid(snap_vdi): content(xapi_sim, snap_vdi)}
    # and back in through /import
    task = api.task.create("import", "")
    sr = api.VDI.get_SR(snap_vdi)
    status, _, _ = request(
        url,
        "PUT",
        "/import",
        {"session_id": session._session, "sr_id": sr, "task_id": task},
        body,
        **{"Content-Length": str(len(body))},
    )
    assert status == 200
    record = wait_task(session, task)
    assert record["status"] == "success", record["error_info"]
    [imported] = parse_value_fragment(record["result"])
    assert api.VM.get_name_label(imported) == "export me"
    assert api.VM.get_other_config(imported)["import_task"] == task
    assert content(xapi_sim, disk_of(session, imported)) == content(xapi_sim, snap_vdi)


def test_citrix_flavour_has_no_host_side_zstd(tmp_path):
    with Simulator(pools=1, vms=2, flavour="citrix", disk_size=8 * MiB, data_dir=tmp_path) as sim:
        session = login(sim)
        vm = first_guest(session)
        assert session.xenapi.VM.get_power_state(vm) == "Halted"
        query = {"session_id": session._session, "ref": vm, "use_compression": "zstd"}
        status, _, body = request(sim.pool(0).url, "GET", "/export", query)
        assert status == 200 and detect_compression(body[:4]) is None
        query["use_compression"] = "true"
        _, _, body = request(sim.pool(0).url, "GET", "/export", query)
        assert detect_compression(body[:4]) == "gzip"


def test_export_of_a_running_vm_fails_before_any_byte(xapi_sim):
    session = login(xapi_sim)
    vm = first_guest(session)
    session.xenapi.VM.start(vm, False, False)
    assert session.xenapi.VM.get_power_state(vm) == "Running"
    task = session.xenapi.task.create("export", "")
    query = {"session_id": session._session, "ref": vm, "task_id": task}
    status, response, body = request(xapi_sim.pool(0).url, "GET", "/export", query)
    assert status == 500 and b"VM_BAD_POWER_STATE" in body
    assert response.getheader("content-type") == "text/html"
    record = wait_task(session, task)
    assert record["error_info"][0] == "VM_BAD_POWER_STATE"


def test_import_raw_vdi_raw_and_vhd(xapi_sim, tmp_path):
    session = login(xapi_sim)
    api = session.xenapi
    sr = next(iter(api.pool.get_all_records().values()))["default_SR"]
    size = 10 * MiB

    def new_vdi() -> str:
        return api.VDI.create(
            {
                "name_label": "restore",
                "name_description": "",
                "SR": sr,
                "virtual_size": str(size),
                "type": "user",
                "sharable": False,
                "read_only": False,
                "other_config": {},
            }
        )

    image = bytearray(size)
    image[0:4096] = b"\x01" * 4096
    image[6 * MiB : 6 * MiB + 700] = b"\x02" * 700
    raw_target = new_vdi()
    url = xapi_sim.pool(0).url
    sid = session._session
    task = api.task.create("raw", "")
    status, _, _ = request(
        url,
        "PUT",
        "/import_raw_vdi",
        {"session_id": sid, "vdi": raw_target, "task_id": task},
        bytes(image),
        **{"Content-Length": str(size)},
    )
    assert status == 200
    record = wait_task(session, task)
    assert record["status"] == "success"
    assert parse_value_fragment(record["result"]) == raw_target
    assert content(xapi_sim, raw_target) == bytes(image)
    # a VHD made by the project's writer
    vhd = io.BytesIO()
    blocks = [0, 3]
    write_vhd_stream(
        vhd.write,
        size,
        ((i, bytes(image[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE])) for i in blocks),
        blocks,
    )
    vhd_target = new_vdi()
    task = api.task.create("vhd", "")
    body = vhd.getvalue()
    status, _, _ = request(
        url,
        "PUT",
        "/import_raw_vdi",
        {"session_id": sid, "vdi": vhd_target, "format": "vhd", "task_id": task},
        body,
        **{"Content-Length": str(len(body))},
    )
    assert status == 200 and wait_task(session, task)["status"] == "success"
    assert content(xapi_sim, vhd_target) == bytes(image)
    # chunked uploads are refused as XAPI does
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    connection.putrequest("PUT", f"/import_raw_vdi?session_id={sid}&vdi={vhd_target}")
    connection.putheader("Transfer-Encoding", "chunked")
    connection.endheaders()  # XAPI answers before any body is sent
    assert connection.getresponse().status == 404
    connection.close()


def test_http_auth_and_redirect_to_the_host_that_sees_the_sr(xapi_sim):
    session = login(xapi_sim)
    api = session.xenapi
    url = xapi_sim.pool(0).url
    vdi = disk_of(session, first_guest(session))
    status, response, _ = request(url, "GET", "/export_raw_vdi", {"vdi": vdi})
    assert status == 401 and "Basic" in response.getheader("WWW-Authenticate")
    status, _, _ = request(url, "GET", "/export_raw_vdi", {"vdi": vdi, "session_id": "bad"})
    assert status == 401
    basic = base64.b64encode(f"root:{xapi_sim.password}".encode()).decode()
    status, _, body = request(
        url, "GET", "/export_raw_vdi", {"vdi": vdi}, Authorization=f"Basic {basic}"
    )
    assert status == 200 and len(body) == int(api.VDI.get_virtual_size(vdi))
    # a VDI on the member's local SR is served by the member: 302 there
    member = next(h for h, r in api.host.get_all_records().items() if r["address"] != "127.0.0.1")
    local = next(
        sr
        for sr, r in api.SR.get_all_records().items()
        if r["name_label"] == "Local storage" and api.PBD.get_host(r["PBDs"][0]) == member
    )
    on_member = api.VDI.create(
        {
            "name_label": "local",
            "name_description": "",
            "SR": local,
            "virtual_size": str(MiB),
            "type": "user",
            "sharable": False,
            "read_only": False,
            "other_config": {},
        }
    )
    query = {"session_id": session._session, "vdi": on_member, "format": "raw"}
    status, response, _ = request(url, "GET", "/export_raw_vdi", query)
    assert status == 302
    location = response.getheader("Location")
    assert location.startswith("http://127.0.0.2:") and "vdi=" in location
    status, _, body = request(location.split("/export")[0], "GET", "/export_raw_vdi", query)
    assert status == 200 and body == bytes(MiB)


def test_guest_content_is_sparse_deterministic_and_changeable(tmp_path):
    def build(folder):
        return Simulator(pools=1, vms=2, disk_size=16 * 1024**3, data_dir=folder)

    first, second = build(tmp_path / "a"), build(tmp_path / "b")
    vdi_uuid = next(iter(first.pool(0).xapi.db.tables["VDI"].values()))["uuid"]
    data = first.vdi_data(vdi_uuid)
    assert data.size == 16 * 1024**3 and len(data.blocks) <= 5
    assert second.vdi_data(vdi_uuid).read(0, BLOCK_SIZE) == data.read(0, BLOCK_SIZE)
    assert data.read(0, BLOCK_SIZE) != bytes(BLOCK_SIZE)
    before = dict(data.blocks)
    written = first.randomize_blocks(vdi_uuid, 0.001, seed=7)
    assert written and all(data.blocks[i] != before.get(i) for i in written)
    image = tmp_path / "fs.img"
    image.write_bytes(b"\x00" * MiB + b"FAT" + b"\x00" * (3 * MiB - 3))
    first.load_image(vdi_uuid, image)
    assert first.read(vdi_uuid, MiB, 3) == b"FAT"
    assert (tmp_path / "a" / "blocks.bin").stat().st_blocks * 512 < 64 * MiB
    first.stop()
    second.stop()
    assert uuidlib.UUID(vdi_uuid)


def test_raw_upload_announcing_too_much_keeps_its_data_and_fails(xapi_sim):
    session = login(xapi_sim)
    api = session.xenapi
    sr = next(iter(api.pool.get_all_records().values()))["default_SR"]
    vdi = api.VDI.create(
        {
            "name_label": "r",
            "name_description": "",
            "SR": sr,
            "virtual_size": str(4 * MiB),
            "type": "user",
            "sharable": False,
            "read_only": False,
            "other_config": {},
        }
    )
    task = api.task.create("upload", "")
    host, port = xapi_sim.pool(0).url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    query = urlencode({"session_id": session._session, "vdi": vdi, "task_id": task})
    connection.putrequest("PUT", f"/import_raw_vdi?{query}")
    connection.putheader("Content-Length", str(2**50))  # XO's "unknown size"
    connection.endheaders()
    connection.send(b"\x05" * (3 * MiB))
    sock = connection.sock
    response = connection.getresponse()  # XAPI answers 200 before reading the body
    assert response.status == 200
    sock.shutdown(socket.SHUT_WR)  # then the client stops sending
    response.read()
    connection.close()
    record = wait_task(session, task)
    assert record["status"] == "failure" and record["error_info"][0] == "VDI_IO_ERROR"
    assert xapi_sim.read(vdi, 0, 3 * MiB) == b"\x05" * (3 * MiB)


def test_metadata_export_and_import_onto_existing_disks(xapi_sim):
    session = login(xapi_sim)
    api = session.xenapi
    url = xapi_sim.pool(0).url
    sid = session._session
    vm = next(r for r, v in api.VM.get_all_records().items() if v["name_label"].endswith("vm000"))
    checkpoint = api.VM.checkpoint(vm, "memory")
    api.VM.set_is_a_template(checkpoint, False)
    disk = disk_of(session, checkpoint)
    memory = api.VM.get_suspend_VDI(checkpoint)
    status, response, archive = request(
        url, "GET", "/export_metadata", {"session_id": sid, "ref": checkpoint}
    )
    assert status == 200 and int(response.getheader("Content-Length")) == len(archive)
    api.VM.destroy(checkpoint)  # the disks stay: a metadata restore puts a VM back on them

    def put(**query):
        task = api.task.create("import", "")
        status, _, _ = request(
            url,
            "PUT",
            "/import_metadata",
            {"session_id": sid, "task_id": task, **query},
            archive,
            **{"Content-Length": str(len(archive))},
        )
        assert status == 200
        return wait_task(session, task)

    master = next(iter(api.pool.get_all_records().values()))["master"]
    xapi_sim.set_host_cpu(master, "AuthenticAMD")
    record = put(check_cpu="true")
    assert record["error_info"][:2] == ["VM_INCOMPATIBLE_WITH_THIS_HOST", "OpaqueRef:NULL"]
    xapi_sim.set_host_cpu(master, "GenuineIntel")
    record = put(check_cpu="true")
    assert record["status"] == "success", record["error_info"]
    [restored] = parse_value_fragment(record["result"])
    assert api.VM.get_power_state(restored) == "Suspended"
    assert api.VM.get_suspend_VDI(restored) == memory
    assert disk_of(session, restored) == disk


def test_added_vm_holds_a_loaded_image(xapi_sim, tmp_path):
    image = tmp_path / "fs.img"
    image.write_bytes(b"\x00" * 4096 + b"EXT4-ish superblock" + bytes(3 * MiB))
    vm_uuid = xapi_sim.add_vm("web", disks=[4 * MiB, 8 * MiB], running=True, tags=["demo"])
    session = login(xapi_sim)
    api = session.xenapi
    vm = api.VM.get_by_uuid(vm_uuid)
    assert api.VM.get_power_state(vm) == "Running" and api.VM.get_tags(vm) == ["demo"]
    disks = sorted(
        (api.VBD.get_userdevice(b), api.VBD.get_VDI(b))
        for b in api.VM.get_VBDs(vm)
        if api.VBD.get_type(b) == "Disk"
    )
    assert [d for d, _ in disks] == ["0", "1"]
    second = disks[1][1]
    assert content(xapi_sim, second) == bytes(8 * MiB)  # empty until written
    xapi_sim.load_image(second, image)
    query = {"session_id": session._session, "vdi": second}
    _, _, body = request(xapi_sim.pool(0).url, "GET", "/export_raw_vdi", query)
    assert body == image.read_bytes() + bytes(8 * MiB - image.stat().st_size)
