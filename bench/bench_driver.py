"""The XAPI driver's downloads: speed against curl on the same URL, memory with 12 at once.

* ``export_disk`` of a disk full of data (4 GiB; quick: 256 MiB) from the simulator, read by
  the driver in 4 MiB reads, against ``curl -o /dev/null`` on the same ``/export_raw_vdi``
  URL in the same run (best of alternated runs). The ratio is the driver's rate over curl's:
  target >= 0.85.
* 12 disk exports at once through one driver (XO's per-pool limit for VDI exports), in one
  process: peak RSS < 200 MiB (memory must not grow with the number or size of streams).

The simulator runs in a child process (``xobackup sim serve``), as a real XAPI would.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from common import GIB, MIB, compare, print_result, result, rss_result, run_command, run_python
from xobackup_hypervisor_xcpng.driver import XapiDriver

from xobackup_core.config import Secret

SPEED_TARGET = 0.85
RSS_LIMIT_MIB = 200.0
CONCURRENT = 12
READ_SIZE = 4 * MIB
BLOCK_READ = 2 * MIB
"""The concurrent exports read one VHD block at a time, as a consumer of blocks does."""


class SimProcess:
    """``xobackup sim serve`` in a child process."""

    def __init__(self, vms: int, disk_gib: int, data: Path) -> None:
        command = [
            sys.executable, "-c", "from xobackup_core.cli.main import main; main()",
            "sim", "serve", "--vms", str(vms), "--hosts", "1",
            "--disk-size", str(disk_gib), "--data", str(data),
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        self.url = ""
        self.password = ""
        assert self.process.stdout is not None
        while not self.url:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError("the simulator exited before listening")
            if match := re.search(r"password '([^']*)'", line):
                self.password = match.group(1)
            if match := re.match(r"pool \d+: (\S+)", line):
                self.url = match.group(1)

    def control(self, action: str, body: dict[str, Any]) -> Any:
        """``POST /sim/<action>`` with HTTP Basic credentials."""
        token = base64.b64encode(f"root:{self.password}".encode()).decode()
        request = urllib.request.Request(
            f"{self.url}/sim/{action}",
            json.dumps(body).encode(),
            {"Content-Type": "application/json", "Authorization": f"Basic {token}"},
        )
        with urllib.request.urlopen(request, timeout=600) as response:
            return json.loads(response.read())

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def _server(url: str, password: str) -> dict[str, Any]:
    return {"url": url, "username": "root", "password": Secret(password), "timeout": 300.0}


def driver_download(url: str, password: str, vdi: str) -> int:
    """Child side: one ``export_disk`` read to the end; the byte count."""
    driver = XapiDriver(_server(url, password))
    buffer = bytearray(READ_SIZE)
    total = 0
    with driver.export_disk(vdi) as stream:
        while count := stream.readinto(buffer):
            total += count
    driver.close()
    return total


def driver_concurrent(url: str, password: str, vdis: list[str]) -> int:
    """Child side: one export per VDI, all at once, read 2 MiB at a time; total bytes."""
    driver = XapiDriver(_server(url, password))
    totals: list[int] = []
    errors: list[BaseException] = []

    def one(vdi: str) -> None:
        total = 0
        try:
            with driver.export_disk(vdi) as stream:
                while chunk := stream.read(BLOCK_READ):
                    total += len(chunk)
        except BaseException as error:  # reported by the parent thread
            errors.append(error)
        totals.append(total)

    threads = [threading.Thread(target=one, args=(vdi,)) for vdi in vdis]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    driver.close()
    if errors:
        raise errors[0]
    return sum(totals)


def _disks(url: str, password: str) -> tuple[list[str], str]:
    driver = XapiDriver(_server(url, password))
    try:
        vms = sorted(
            (vm for vm in driver.inventory().vms if not vm.is_snapshot), key=lambda v: v.name
        )
        return [vm.disks[0].vdi_uuid for vm in vms], driver.session.ref
    finally:
        # the session stays valid for curl (not logged out)
        driver.session._ref = None


def run(quick: bool = False) -> list[dict[str, Any]]:
    """The download speed and the concurrent-export memory results."""
    curl = shutil.which("curl")
    if curl is None:
        raise SystemExit("curl is the download reference")
    disk_gib = 1 if quick else 4
    big_fraction = 0.25 if quick else 1.0
    small_fraction = 1 / 32 if quick else 1 / 8
    runs = 2 if quick else 3
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-driver-") as folder:
        sim = SimProcess(CONCURRENT, disk_gib, Path(folder))
        try:
            vdis, session = _disks(sim.url, sim.password)
            for index, vdi in enumerate(vdis):
                fraction = big_fraction if index == 0 else small_fraction
                sim.control("randomize_blocks", {"vdi": vdi, "fraction": fraction, "seed": index})
            url = f"{sim.url}/export_raw_vdi?session_id={session}&vdi={vdis[0]}&format=vhd"
            size_mib = round(disk_gib * GIB * big_fraction / MIB)

            ours, reference = compare(
                runs,
                lambda: run_python("bench_driver:driver_download", sim.url, sim.password, vdis[0]),
                lambda: run_command([curl, "-sf", "-o", "/dev/null", url]),
            )
            rate_ratio = reference.seconds / ours.seconds
            entry = result(
                f"driver export_disk {size_mib} MiB VHD",
                ours_s=ours.seconds,
                reference_s=reference.seconds,
                reference="curl -o /dev/null, same URL",
                ratio=rate_ratio,
                min_ratio=SPEED_TARGET,
                peak_rss_mib=ours.peak_rss_mib,
                ok=ours.value is not None and ours.value >= size_mib * MIB,
                mib_per_s=round(ours.value / MIB / ours.seconds, 1),
                curl_mib_per_s=round(ours.value / MIB / reference.seconds, 1),
            )
            print_result(entry)
            results.append(entry)

            started = time.perf_counter()
            both = run_python("bench_driver:driver_concurrent", sim.url, sim.password, vdis[:12])
            elapsed = time.perf_counter() - started
            entry = rss_result(
                f"driver {CONCURRENT} concurrent export_disk",
                both.peak_rss_mib,
                RSS_LIMIT_MIB,
                ours_s=both.seconds,
                total_mib=round(both.value / MIB),
                wall_s=round(elapsed, 2),
            )
            print_result(entry)
            results.append(entry)
        finally:
            sim.stop()
    return results


if __name__ == "__main__":
    run(quick="--quick" in sys.argv)
