"""A real site for the web tests: a simulated pool, real runs in the log, a real server.

One session-wide scenario (building it runs real backups, so it is shared): the ``nightly``
delta job succeeded (with a warning: its second remote cannot be reached), ``weekly-full``
failed (the pool refused snapshots), and a ``weekly-full`` run in a ``xobackup run`` process was
killed -9 mid-export (interrupted: unfinished). ``xobackup serve`` then runs as a child
process on a free loopback port.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from xobackup_hypervisor_xcpng.sim import Simulator

from xobackup_core.config import load_config
from xobackup_core.engine.runner import JobRunner
from xobackup_core.logs import LogStore, RunFilter
from xobackup_core.plugins import Plugins

SERVER_SECRET = "pool-Pa55word-3f9c1d7e"
REMOTE_SECRET = "smb-Pa55word-8b2e6a40"
WEB_TOKEN = "web-token-5d0c7f1e9a2b4c6d"
SECRETS = (SERVER_SECRET, REMOTE_SECRET, WEB_TOKEN)
MiB = 1024 * 1024

CONFIG = """\
log_db = "{folder}/logs.sqlite"

[servers.lab]
url = "{url}"
username = "root"
password = "{server_secret}"

[remotes.nas]
url = "file://{folder}/remote"

[remotes.offsite]
url = "smb://backup:{remote_secret}@127.0.0.1:1/share"

[jobs.nightly]
mode = "delta"
remotes = ["nas", "offsite"]
smart = {{ power_state = "all" }}

[jobs.weekly-full]
name = "weekly full"
mode = "full"
remotes = ["nas"]
vms = ["{first_vm}"]

[schedules.nightly-3am]
job = "nightly"
cron = "0 3 * * *"
timezone = "Europe/Paris"

[schedules.sundays]
job = "weekly-full"
cron = "30 4 * * 0"
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(
    config: Path, port: int, env: dict[str, str] | None = None, listen: str | None = None
) -> subprocess.Popen[bytes]:
    """``xobackup serve`` in a child process; returns once it answers."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "xobackup_core.cli",
            "--config",
            str(config),
            "serve",
            "--listen",
            listen or f"127.0.0.1:{port}",
        ],
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output = process.stdout.read().decode() if process.stdout else ""
            raise AssertionError(f"xobackup serve exited {process.returncode}: {output}")
        try:
            httpx.get(f"http://127.0.0.1:{port}/static/style.css", timeout=1)
            return process
        except httpx.TransportError:
            time.sleep(0.1)
    process.kill()
    raise AssertionError("xobackup serve did not answer within 30 s")


def stop_server(process: subprocess.Popen[bytes]) -> str:
    """Stop the server by its pid; its output."""
    process.send_signal(signal.SIGINT)
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    return process.stdout.read().decode() if process.stdout else ""


@dataclass
class Site:
    """The scenario: simulator, config, log, run ids by outcome, the server's URL."""

    sim: Simulator
    folder: Path
    config_path: Path
    vms: dict[str, str]
    """VM uuid → name."""
    runs: dict[str, str] = field(default_factory=dict)
    """success / failure / interrupted → run id."""
    url: str = ""

    def client(self, **options: object) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **options)

    def store(self) -> LogStore:
        return LogStore(self.folder / "logs.sqlite")


def _kill_mid_export(site: Site) -> str:
    """A `xobackup run weekly-full` process killed -9 while it exports: its run id."""
    site.sim.arm("/export", "throttle", rate=MiB // 4, times=None)
    command = [sys.executable, "-m", "xobackup_core.cli", "--config", str(site.config_path)]
    process = subprocess.Popen(
        [*command, "run", "weekly-full"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        with site.store() as store:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                mine = [r for r in store.list_runs(RunFilter(limit=5)) if r.pid == process.pid]
                run = store.get_run(mine[0].run_id) if mine else None
                if run and any(t.name == "export" and t.end is None for t in run.walk()):
                    break
                if process.poll() is not None:
                    break
                time.sleep(0.1)
            else:
                raise AssertionError("the run never reached its export in 60 s")
            if process.poll() is not None:
                output = process.stdout.read().decode() if process.stdout else ""
                raise AssertionError(f"the run ended before its export was cut: {output}")
    finally:
        process.kill()
        process.wait()
        site.sim.faults.clear()
    with site.store() as store:
        store.mark_interrupted()
    return run.run_id


@pytest.fixture(scope="session")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    folder = tmp_path_factory.mktemp("web-site")
    with Simulator(
        pools=1,
        vms=3,
        hosts=1,
        disk_size=16 * MiB,
        allocated_blocks=2,
        password=SERVER_SECRET,
        data_dir=folder / "sim",
    ) as sim:
        vms = {record["uuid"]: record["name_label"] for _ref, record in sim.vms(0)}
        config_path = folder / "config.toml"
        config_path.write_text(
            CONFIG.format(
                folder=folder,
                url=sim.pool(0).url,
                server_secret=SERVER_SECRET,
                remote_secret=REMOTE_SECRET,
                first_vm=next(iter(vms)),
            )
        )
        site = Site(sim, folder, config_path, vms)
        config = load_config(config_path)
        with site.store() as store:
            runner = JobRunner(config, Plugins(), store)
            try:
                site.runs["success"] = runner.run("nightly").run_id
                sim.arm("VM.snapshot", "error", code="SR_BACKEND_FAILURE_44", times=None)
                site.runs["failure"] = runner.run("weekly-full").run_id
                sim.faults.clear()
            finally:
                runner.close()
        site.runs["interrupted"] = _kill_mid_export(site)
        port = free_port()
        server = start_server(config_path, port)
        site.url = f"http://127.0.0.1:{port}"
        try:
            yield site
        finally:
            output = stop_server(server)
            for secret in SECRETS:
                assert secret not in output, "the server printed a secret"
