"""Stopping runs (vmTimeout, `xobackup cancel`, Ctrl-C), per-VM locks and single runs per job.

Every way of stopping leaves the remote as it was before the run: no new backup, no partial
file (not even under a hidden temporary name), no snapshot of the run left behind.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from xobackup_remote_local import LocalRemote

from tests.core.conftest import run_cli
from tests.engine.test_backup_runs import guest_vms
from tests.engine.test_run_cli import write_config
from xobackup_core.config import Secret
from xobackup_core.engine.repository import BackupRepository
from xobackup_core.plugins import Plugins
from xobackup_core.scheduler.locks import VmLock

MiB = 1024 * 1024
CLI = [sys.executable, "-m", "xobackup_core.cli"]


def all_files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def change_every_disk(sim, fraction=0.5):
    """Guest writes on every VM, so the next delta has blocks to transfer."""
    driver = Plugins().hypervisor(
        {
            "type": "xcpng",
            "url": sim.pool(0).url,
            "username": sim.username,
            "password": Secret(sim.password),
        }
    )
    try:
        for vm in driver.inventory().vms:
            if not vm.is_snapshot:
                for disk in vm.disks:
                    sim.randomize_blocks(disk.vdi_uuid, fraction, seed=7)
    finally:
        driver.close()


def wait_for_running_run(config, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = run_cli("--config", str(config), "logs", "--json", "--status", "pending")
        runs = json.loads(result.stdout or "[]")
        if runs:
            return runs[0]["runId"]
        time.sleep(0.3)
    raise AssertionError("the run never showed up as pending")


def wait_for_export(sim, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sim.pool(0).in_flight.current["disk_export"]:
            return
        time.sleep(0.05)
    raise AssertionError("no export started")


def test_vm_timeout_is_enforced(harness):
    sim = harness.sim
    vm_uuid = next(iter(guest_vms(sim)))
    sim.arm("/export_raw_vdi", "throttle", rate=1 * MiB, times=None)
    config = harness.config(
        {
            "slow": {
                "mode": "delta",
                "remotes": ["nas"],
                "vms": [vm_uuid],
                "settings": {"vmTimeout": "1s"},
            }
        }
    )
    started = time.monotonic()
    outcome = harness.run(config, "slow")
    assert time.monotonic() - started < 20, "the timeout stopped the transfer"
    assert outcome.status == "failure"
    log = json.dumps(harness.store.get_run(outcome.run_id).to_dict())
    assert "exceeded its timeout of 1 s (setting 'vmTimeout')" in log
    assert BackupRepository(LocalRemote(harness.remote_dir)).list_backups(vm_uuid) == []
    driver = harness.plugins.hypervisor(config.server_view("pool0"))
    assert not [v for v in driver.inventory().vms if v.snapshot_of == vm_uuid]
    driver.close()


def test_cancel_stops_a_run_and_leaves_the_remote_as_it_was(tmp_path, xapi_sim):
    config = write_config(tmp_path, xapi_sim)
    assert run_cli("--config", str(config), "run", "nightly").returncode == 0
    before = all_files(tmp_path / "remote")
    change_every_disk(xapi_sim)
    xapi_sim.arm("/export_raw_vdi", "throttle", rate=512 * 1024, times=None)
    process = subprocess.Popen(
        [*CLI, "--config", str(config), "run", "nightly"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    run_id = wait_for_running_run(config)
    wait_for_export(xapi_sim)
    cancelled_at = time.monotonic()
    result = run_cli("--config", str(config), "cancel", run_id)
    assert result.returncode == 0, result.stderr
    process.wait(timeout=60)
    assert time.monotonic() - cancelled_at < 15, "transfers stop within seconds"
    assert process.returncode != 0
    shown = json.loads(run_cli("--config", str(config), "logs", "show", run_id, "--json").stdout)
    assert shown["status"] == "cancelled"
    assert all_files(tmp_path / "remote") == before


def test_ctrl_c_cancels_the_run(tmp_path, xapi_sim):
    config = write_config(tmp_path, xapi_sim)
    xapi_sim.arm("/export_raw_vdi", "throttle", rate=512 * 1024, times=None)
    process = subprocess.Popen(
        [*CLI, "--config", str(config), "run", "nightly"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    run_id = wait_for_running_run(config)
    wait_for_export(xapi_sim)
    os.kill(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    shown = json.loads(run_cli("--config", str(config), "logs", "show", run_id, "--json").stdout)
    assert shown["status"] == "cancelled"
    assert not (tmp_path / "remote").exists() or not list(
        (tmp_path / "remote" / "xo-vm-backups").rglob("*.json")
    )


def test_a_vm_locked_by_another_holder_is_not_backed_up(harness):
    vm_uuid = next(iter(guest_vms(harness.sim)))
    config = harness.config({"job": {"mode": "delta", "remotes": ["nas"], "vms": [vm_uuid]}})
    remote = LocalRemote(harness.remote_dir)
    with VmLock(remote, vm_uuid, "another backup tool", ttl=60):
        outcome = harness.run(config, "job")
    assert outcome.status == "failure"
    assert "another backup tool" in json.dumps(harness.store.get_run(outcome.run_id).to_dict())
    assert BackupRepository(remote).list_backups(vm_uuid) == []
    assert harness.run(config, "job").status == "success"
    assert not remote.exists(f"/xo-vm-backups/{vm_uuid}.lock"), "the lock is released"


def test_a_job_never_runs_twice_at_once(tmp_path, xapi_sim):
    config = write_config(tmp_path, xapi_sim)
    xapi_sim.arm("/export_raw_vdi", "throttle", rate=1 * MiB, times=None)
    first = subprocess.Popen(
        [*CLI, "--config", str(config), "run", "nightly"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    running = wait_for_running_run(config)
    second = run_cli("--config", str(config), "run", "nightly")
    assert second.returncode == 1
    assert f"already running (run {running})" in second.stdout
    first.terminate()
    first.wait(timeout=60)
    skipped = json.loads(
        run_cli("--config", str(config), "logs", "--json", "--status", "skipped").stdout
    )
    assert skipped and "already running" in json.dumps(skipped)


def test_a_lock_left_by_a_killed_run_does_not_block_the_next(tmp_path):
    remote_dir = tmp_path / "remote"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from xobackup_remote_local import LocalRemote\n"
            "from xobackup_core.scheduler.locks import VmLock\n"
            f"lock = VmLock(LocalRemote({str(remote_dir)!r}), 'vm-1', 'killed run', ttl=600)\n"
            "lock.acquire(); print('locked', flush=True); time.sleep(600)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    remote = LocalRemote(remote_dir)
    lock = VmLock(remote, "vm-1", "next run", ttl=60)
    with pytest.raises(Exception, match="killed run"):
        lock.acquire()
    holder.kill()
    holder.wait()
    lock.acquire()  # the holder is gone: no need to wait ten minutes for its expiry
    assert lock.read().owner == "next run"
    lock.release()


def test_a_job_locked_on_its_remote_by_another_process_is_skipped(harness):
    vm_uuid = next(iter(guest_vms(harness.sim)))
    config = harness.config({"job": {"mode": "delta", "remotes": ["nas"], "vms": [vm_uuid]}})
    remote = LocalRemote(harness.remote_dir)
    other_host = f"job-{config.job_id('job')}"
    with VmLock(remote, other_host, "the same job on another host", ttl=60):
        outcome = harness.run(config, "job")
    assert outcome.status == "skipped"
    log = json.dumps(harness.store.get_run(outcome.run_id).to_dict())
    assert "already running" in log and "the same job on another host" in log
    assert BackupRepository(remote).list_backups(vm_uuid) == []
    assert harness.run(config, "job").status == "success"
