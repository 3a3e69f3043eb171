"""The XAPI simulator at scale: RPC over 5 pools x 400 VMs, and disk download speed.

* ``VM.get_all_records`` on 5 pools of 400 VMs each: the whole sweep must take under 1 s
  (so the "reference" is that budget), over XML-RPC (the full replies received; the first
  sweep encodes every record from scratch, later ones reuse cached encodings) and over
  JSON-RPC (replies parsed). Through the official XenAPI SDK the time is mostly the
  client's own work (``xmlrpc.client`` reads 1 KiB at a time and parses in Python, ~0.15 s
  per 400 VMs), so that sweep is compared with the same SDK calls answered by a canned
  server (a bare socket loop replaying a recorded reply, in its own process): ratio <= 1.5.
* ``/export_raw_vdi`` of a 1 GiB disk of mixed data (uploaded first through
  ``/import_raw_vdi``), downloaded by ``curl -o /dev/null``, raw and VHD, against curl
  downloading the same file from a bare ``sendfile`` HTTP server (the loopback's limit):
  ratio <= 1.5.

The simulator runs in a child process (``xobackup sim serve``), as a real XAPI would, so the
client and the server do not share an interpreter.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import xmlrpc.client
from pathlib import Path
from typing import Any

from common import GIB, MIB, data_dir, data_file, print_result, result, run_command, size_label

RPC_BUDGET_S = 1.0
SDK_TARGET = 1.5
DOWNLOAD_TARGET = 1.5


class SimProcess:
    """``xobackup sim serve`` in a child process; its pool URLs."""

    def __init__(self, pools: int, vms: int, data: Path) -> None:
        command = [
            sys.executable,
            "-c",
            "from xobackup_core.cli.main import main; main()",
            "sim",
            "serve",
            "--pools",
            str(pools),
            "--vms",
            str(vms),
            "--hosts",
            "1",
            "--data",
            str(data),
        ]
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        self.urls: list[str] = []
        self.password = ""
        assert self.process.stdout is not None
        while len(self.urls) < pools:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError("the simulator exited before listening")
            if match := re.search(r"password '([^']*)'", line):
                self.password = match.group(1)
            if match := re.match(r"pool \d+: (\S+)", line):
                self.urls.append(match.group(1))

    def peak_rss_mib(self) -> float | None:
        """The simulator's peak resident set size so far (Linux ``VmHWM``)."""
        try:
            status = Path(f"/proc/{self.process.pid}/status").read_text()
        except OSError:
            return None
        match = re.search(r"VmHWM:\s+(\d+) kB", status)
        return int(match.group(1)) / 1024 if match else None

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def _jsonrpc(url: str, method: str, params: list[Any]) -> Any:
    body = json.dumps({"jsonrpc": "2.0", "method": method, "params": params, "id": 1}).encode()
    request = urllib.request.Request(f"{url}/jsonrpc", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())["result"]


def _post(url: str, path: str, body: bytes) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    connection.request("POST", path, body, {"Content-Type": "text/xml"})
    data = connection.getresponse().read()
    connection.close()
    return data


CANNED_SERVER = r"""
import socket, sys, threading
body = open(sys.argv[1], "rb").read()
head = b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nContent-Length: %d\r\n\r\n" % len(body)
listener = socket.create_server(("127.0.0.1", 0))
print(listener.getsockname()[1], flush=True)
def serve(connection):
    with connection:
        pending = b""
        while True:
            while b"\r\n\r\n" not in pending:
                data = connection.recv(65536)
                if not data:
                    return
                pending += data
            header, _, pending = pending.partition(b"\r\n\r\n")
            length = next(int(line.split(b":")[1]) for line in header.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            while len(pending) < length:
                pending += connection.recv(65536)
            pending = pending[length:]
            connection.sendall(head + body)
while True:
    threading.Thread(target=serve, args=(listener.accept()[0],), daemon=True).start()
"""


def _canned_sweep(reply: bytes, pools: int, folder: Path) -> float:
    """Best of 3 sweeps of the SDK's ``VM.get_all_records`` against a canned server."""
    import XenAPI

    path = folder / "reply.xml"
    path.write_bytes(reply)
    server = subprocess.Popen(
        [sys.executable, "-c", CANNED_SERVER, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        url = f"http://127.0.0.1:{server.stdout.readline().strip()}"
        sessions = []
        for _ in range(pools):
            session = XenAPI.Session(url)
            session._session = "OpaqueRef:canned"  # no login: every call gets the same reply
            sessions.append(session)
        times = []
        for _ in range(3):
            started = time.perf_counter()
            for session in sessions:
                session.xenapi.VM.get_all_records()
            times.append(time.perf_counter() - started)
        return min(times)
    finally:
        server.terminate()
        server.wait(30)


def _sweeps(urls: list[str], password: str) -> dict[str, Any]:
    """Sweep times (first = records encoded from scratch, best of 3), and the client parse."""
    import XenAPI

    sessions = []
    for url in urls:
        session = XenAPI.Session(url)
        session.xenapi.login_with_password("root", password, "1.0", "bench")
        sessions.append(session)
    calls = [xmlrpc.client.dumps((s._session,), "VM.get_all_records").encode() for s in sessions]
    times: dict[str, list[float]] = {"raw": [], "json": [], "sdk": [], "parse": []}
    bodies: list[bytes] = []
    for _ in range(3):
        started = time.perf_counter()
        bodies = [_post(url, "/", call) for url, call in zip(urls, calls, strict=True)]
        times["raw"].append(time.perf_counter() - started)
        started = time.perf_counter()
        for url, session in zip(urls, sessions, strict=True):
            _jsonrpc(url, "VM.get_all_records", [session._session])
        times["json"].append(time.perf_counter() - started)
        started = time.perf_counter()
        seen = sum(len(s.xenapi.VM.get_all_records()) for s in sessions)
        times["sdk"].append(time.perf_counter() - started)
        started = time.perf_counter()
        for body in bodies:
            xmlrpc.client.loads(body)
        times["parse"].append(time.perf_counter() - started)
    return {
        "raw_first": times["raw"][0],
        "raw_best": min(times["raw"]),
        "json_best": min(times["json"]),
        "sdk_best": min(times["sdk"]),
        "parse_best": min(times["parse"]),
        "seen": seen,
        "reply": bodies[0],
    }


def _upload(url: str, password: str, source: Path) -> tuple[str, str]:
    """A VDI holding ``source`` (through /import_raw_vdi); returns (session, vdi ref)."""
    import XenAPI

    session = XenAPI.Session(url)
    session.xenapi.login_with_password("root", password, "1.0", "bench")
    pool = next(iter(session.xenapi.pool.get_all_records().values()))
    size = source.stat().st_size
    vdi = session.xenapi.VDI.create(
        {
            "name_label": "bench",
            "name_description": "",
            "SR": pool["default_SR"],
            "virtual_size": str(size),
            "type": "user",
            "sharable": False,
            "read_only": False,
            "other_config": {},
        }
    )
    sid = session._session
    curl = shutil.which("curl")
    subprocess.run(
        [curl, "-sf", "-T", str(source), f"{url}/import_raw_vdi?session_id={sid}&vdi={vdi}"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return sid, vdi


class SendfileServer:
    """The fastest plain HTTP download of a file on loopback: a bare ``sendfile`` server.

    The reference for the simulator's downloads: same data, same client (curl), same
    transport, no protocol work beyond a status line.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/file"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            with connection, open(self.path, "rb") as source:
                request = b""
                while b"\r\n\r\n" not in request:
                    piece = connection.recv(65536)
                    if not piece:
                        break
                    request += piece
                connection.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
                size = os.fstat(source.fileno()).st_size
                offset = 0
                while offset < size:
                    offset += os.sendfile(
                        connection.fileno(), source.fileno(), offset, size - offset
                    )

    def stop(self) -> None:
        self.listener.close()


def run(quick: bool = False) -> list[dict[str, Any]]:
    """RPC sweep and download results; ``quick`` uses 5 x 80 VMs and a 256 MiB disk."""
    curl = shutil.which("curl")
    if curl is None:
        raise SystemExit("curl is the download reference")
    pools, vms = (5, 80) if quick else (5, 400)
    size = 256 * MIB if quick else GIB
    results = []
    with tempfile.TemporaryDirectory(dir=data_dir()) as temp:
        sim = SimProcess(pools, vms, Path(temp) / "sim")
        try:
            sweep = _sweeps(sim.urls, sim.password)
            label = f"{pools} pools x {vms} VMs"
            enough = sweep["seen"] >= pools * vms
            for name, seconds in (
                (f"sim VM.get_all_records {label}, XML-RPC, first", sweep["raw_first"]),
                (f"sim VM.get_all_records {label}, XML-RPC, best of 3", sweep["raw_best"]),
                (f"sim VM.get_all_records {label}, JSON-RPC parsed", sweep["json_best"]),
            ):
                results.append(
                    result(
                        name,
                        ours_s=seconds,
                        reference_s=RPC_BUDGET_S,
                        reference="1 s budget",
                        max_ratio=1.0,
                        ok=enough,
                    )
                )
            # the SDK's own work dominates its time: compare with a canned server
            canned = _canned_sweep(sweep["reply"], pools, Path(temp))
            results.append(
                result(
                    f"sim VM.get_all_records {label}, XenAPI SDK",
                    ours_s=sweep["sdk_best"],
                    reference_s=canned,
                    reference="same SDK calls, canned server",
                    max_ratio=SDK_TARGET,
                    ok=enough,
                )
            )
            source = data_file("mixed", size)
            sid, vdi = _upload(sim.urls[0], sim.password, source)
            plain = SendfileServer(source)
            for fmt in ("raw", "vhd"):
                url = f"{sim.urls[0]}/export_raw_vdi?session_id={sid}&vdi={vdi}&format={fmt}"
                ours = min(
                    (run_command([curl, "-sf", "-o", "/dev/null", url]) for _ in range(2)),
                    key=lambda child: child.seconds,
                )
                reference = min(
                    (run_command([curl, "-sf", "-o", "/dev/null", plain.url]) for _ in range(2)),
                    key=lambda child: child.seconds,
                )
                results.append(
                    result(
                        f"sim /export_raw_vdi {fmt} {size_label(size)} mixed, curl",
                        ours_s=ours.seconds,
                        reference_s=reference.seconds,
                        reference="curl from a bare sendfile server",
                        max_ratio=DOWNLOAD_TARGET,
                        peak_rss_mib=sim.peak_rss_mib(),
                        mib_per_s=round(size / MIB / ours.seconds, 1),
                    )
                )
            plain.stop()
        finally:
            sim.stop()
    for entry in results:
        print_result(entry)
    return results


if __name__ == "__main__":
    outcome = run(quick="--quick" in sys.argv[1:])
    sys.exit(0 if all(entry["passed"] for entry in outcome) else 1)
