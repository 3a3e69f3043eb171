"""Live progress of a run another process started (``xobackup run``), as the server shows it.

Its own simulator, log and server: the shared scenario's run history stays as it is.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from xobackup_hypervisor_xcpng.sim import Simulator

from tests.plugins.web.conftest import MiB, free_port, start_server, stop_server
from xobackup_core.logs import LogStore, RunFilter

CONFIG = """\
log_db = "{folder}/logs.sqlite"

[servers.lab]
url = "{url}"
username = "root"
password = "{password}"

[remotes.nas]
url = "file://{folder}/remote"

[jobs.full]
mode = "full"
remotes = ["nas"]
vms = ["{vm}"]
"""


@dataclass
class Lab:
    sim: Simulator
    folder: Path
    config_path: Path
    vm: str
    vm_name: str
    url: str


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    folder = tmp_path_factory.mktemp("web-progress")
    with Simulator(
        pools=1, vms=1, hosts=1, disk_size=16 * MiB, password="pw-progress", data_dir=folder / "sim"
    ) as sim:
        vm, vm_name = next((r["uuid"], r["name_label"]) for _ref, r in sim.vms(0))
        config_path = folder / "config.toml"
        config_path.write_text(
            CONFIG.format(folder=folder, url=sim.pool(0).url, password="pw-progress", vm=vm)
        )
        port = free_port()
        server = start_server(config_path, port)
        try:
            yield Lab(sim, folder, config_path, vm, vm_name, f"http://127.0.0.1:{port}")
        finally:
            stop_server(server)


def test_the_server_streams_the_bytes_of_a_run_of_another_process(lab: Lab):
    lab.sim.arm("/export", "throttle", rate=2 * MiB, times=None)  # an export of a few seconds
    command = [sys.executable, "-m", "xobackup_core.cli", "--config", str(lab.config_path)]
    process = subprocess.Popen(
        [*command, "run", "full"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        with LogStore(lab.folder / "logs.sqlite") as store:
            deadline = time.monotonic() + 60
            run_id = None
            while run_id is None and process.poll() is None and time.monotonic() < deadline:
                mine = [r for r in store.list_runs(RunFilter(limit=3)) if r.pid == process.pid]
                run_id = mine[0].run_id if mine else None
                time.sleep(0.05)
        assert run_id is not None, "the run never appeared in the log"
        seen: list[int] = []
        page = ""
        with (
            httpx.Client(base_url=lab.url, timeout=30) as client,
            client.stream("GET", "/api/events") as events,
        ):
            # each `change` event: the run's JSON, as the page refreshes itself
            for line in events.iter_lines():
                if not line.startswith("data: "):
                    continue
                running = json.loads(line[6:])["running"]
                run = client.get(f"/api/runs/{run_id}").json()
                if run["status"] != "pending":
                    break
                progress = run["progress"]
                if progress and progress[lab.vm]["stage"] == "export":
                    assert run_id in running
                    vm = progress[lab.vm]
                    assert vm["name"] == lab.vm_name
                    seen.append(vm["transferred"])
                    if vm["transferred"] and not page:
                        assert vm["speed"] > 0
                        page = client.get(f"/fragments/runs/{run_id}").text
                if len({size for size in seen if size}) >= 2:
                    break
        growing = sorted({size for size in seen if size})
        assert len(growing) >= 2, f"bytes the server showed while the export went on: {seen}"
        assert seen == sorted(seen)
        # the run's page (its fragment, which the page refreshes) has the figures too
        assert 'class="progress"' in page and f'data-vm="{lab.vm}"' in page
        output = process.communicate(timeout=120)[0].decode()
        assert process.returncode == 0, output
        with httpx.Client(base_url=lab.url, timeout=30) as client:
            ended = client.get(f"/api/runs/{run_id}").json()
            page = client.get(f"/runs/{run_id}").text
        assert ended["status"] == "success"
        assert ended["progress"] is None, "an ended run shows its task tree, not live figures"
        assert 'class="progress"' not in page
    finally:
        lab.sim.faults.clear()
        if process.poll() is None:
            process.kill()
            process.wait()
