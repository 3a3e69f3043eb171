"""``xobackup sim serve`` from the command line, and CBT on simulated disks."""

from __future__ import annotations

import base64
import re
import signal
import subprocess
import sys

from tests.conftest import require_module

XenAPI = require_module("XenAPI")


def test_sim_serve_prints_urls_serves_and_stops_on_sigterm(tmp_path):
    command = [
        sys.executable,
        "-c",
        "from xobackup_core.cli.main import main; main()",
        "sim",
        "serve",
        "--pools",
        "2",
        "--vms",
        "3",
        "--disk-size",
        "1",
        "--data",
        str(tmp_path / "data"),
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        credentials = process.stdout.readline()
        password = re.search(r"password '([^']+)'", credentials).group(1)
        urls = [re.match(r"pool \d: (\S+)", process.stdout.readline()).group(1) for _ in range(2)]
        assert urls[0] != urls[1]
        for url in urls:
            session = XenAPI.Session(url)
            session.xenapi.login_with_password("root", password)
            names = [v["name_label"] for v in session.xenapi.VM.get_all_records().values()]
            assert sum(name.startswith("pool") and "-vm" in name for name in names) == 3
        assert (tmp_path / "data" / "blocks.bin").exists()
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=20)
    assert process.returncode == 0 and "stopped" in err


def test_sim_serve_refuses_a_busy_port_without_a_traceback(xapi_sim):
    busy = int(xapi_sim.pool(0).url.rsplit(":", 1)[1])
    command = [
        sys.executable,
        "-c",
        "from xobackup_core.cli.main import main; main()",
        "sim",
        "serve",
        "--port",
        str(busy),
        "--vms",
        "1",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "cannot listen" in done.stderr and "Traceback" not in done.stderr


def test_cbt_changed_blocks_follow_guest_writes(xapi_sim):
    session = XenAPI.Session(xapi_sim.pool(0).url)
    session.xenapi.login_with_password("root", xapi_sim.password)
    api = session.xenapi
    vm = next(r for r, v in api.VM.get_all_records().items() if v["name_label"].endswith("vm000"))
    disk = next(api.VBD.get_VDI(b) for b in api.VM.get_VBDs(vm) if api.VBD.get_type(b) == "Disk")
    api.VDI.enable_cbt(disk)
    first = next(
        api.VBD.get_VDI(b)
        for b in api.VM.get_VBDs(api.VM.snapshot(vm, "one"))
        if api.VBD.get_type(b) == "Disk"
    )
    written = xapi_sim.randomize_blocks(disk, 0.1, seed=3)
    second = next(
        api.VBD.get_VDI(b)
        for b in api.VM.get_VBDs(api.VM.snapshot(vm, "two"))
        if api.VBD.get_type(b) == "Disk"
    )
    bitmap = base64.b64decode(api.VDI.list_changed_blocks(first, second))
    size = int(api.VDI.get_virtual_size(disk))
    assert len(bitmap) == -(-size // 65536 // 8)
    # one 32-bit word per 2 MiB block, as XO reads it
    changed = [i for i in range(len(bitmap) // 4) if bitmap[4 * i : 4 * i + 4] != bytes(4)]
    assert changed == written
    api.VDI.data_destroy(first)
    assert api.VDI.get_type(first) == "cbt_metadata"
    api.VDI.disable_cbt(disk)
    try:
        api.VDI.list_changed_blocks(second, disk)
    except XenAPI.Failure as failure:
        assert failure.details == ["VDI_NO_CBT_METADATA", disk]
    else:
        raise AssertionError("CBT disabled, yet changed blocks were listed")


def test_control_endpoint_drives_another_process_simulator(xapi_sim):
    import json
    import urllib.error
    import urllib.request

    url = xapi_sim.pool(0).url
    session = XenAPI.Session(url)
    session.xenapi.login_with_password("root", xapi_sim.password)

    def control(action: str, **body):
        request = urllib.request.Request(
            f"{url}/sim/{action}?session_id={session._session}", json.dumps(body).encode()
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    vm = next(
        r
        for r, v in session.xenapi.VM.get_all_records().items()
        if v["name_label"].endswith("vm000")
    )
    control("fault", target="VM.snapshot", kind="error", code="SR_FULL", params=["1", "2"])
    try:
        session.xenapi.VM.snapshot(vm, "x")
    except XenAPI.Failure as failure:
        assert failure.details == ["SR_FULL", "1", "2"]
    else:
        raise AssertionError("the fault armed over HTTP did not fire")
    session.xenapi.VM.snapshot(vm, "y")
    assert control("counters")["maximum"]["snapshot"] == 1
    disk = next(
        session.xenapi.VBD.get_VDI(b)
        for b in session.xenapi.VM.get_VBDs(vm)
        if session.xenapi.VBD.get_type(b) == "Disk"
    )
    control("write", vdi=disk, offset=4096, data=base64.b64encode(b"hello").decode())
    assert xapi_sim.read(disk, 4096, 5) == b"hello"
    assert control("randomize_blocks", vdi=disk, fraction=0.1, seed=1)["blocks"]
    anonymous = urllib.request.Request(f"{url}/sim/counters", b"{}")
    try:
        urllib.request.urlopen(anonymous, timeout=10)
    except urllib.error.HTTPError as error:
        assert error.code == 401
    else:
        raise AssertionError("the control endpoint answered without credentials")
