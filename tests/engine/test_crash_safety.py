"""kill -9 at random points of real runs: nothing earlier is lost, nothing partial looks like
a backup, and the next run recovers.

A merge (retention) cut by the kill is finished from its state file before anything is
judged, as the next run does first: between a merged disk taking its child's identity and its
rename over the child, that child's chain reads only once the merge is finished."""

import hashlib
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from xobackup_hypervisor_xcpng.sim import Simulator
from xobackup_remote_local import LocalRemote

from tests.engine.conftest import Harness
from xobackup_core.config import load_config
from xobackup_core.engine.repository import BackupRepository
from xobackup_core.engine.runner import resume_all_merges
from xobackup_core.formats.vhd_chain import open_vhd_chain
from xobackup_core.formats.vhd_directory import remote_disk_opener
from xobackup_core.formats.xva import is_valid_xva

TRIALS = 20
RETENTION = 3


def chain_digest(remote, path):
    with open_vhd_chain(path, remote_disk_opener(remote)) as chain:
        digest = hashlib.sha256()
        for offset in range(0, chain.leaf.size, 4 * 1024 * 1024):
            digest.update(chain.read_at(offset, min(4 * 1024 * 1024, chain.leaf.size - offset)))
        return digest.hexdigest()


@pytest.fixture
def crash_setup(tmp_path):
    with Simulator(
        pools=1,
        vms=2,
        hosts=1,
        disk_size=16 * 1024 * 1024,
        data_dir=tmp_path / "sim",
        allocated_blocks=6,
    ) as sim:
        # Slow transfers so that kills land in the middle of exports, commits and merges.
        sim.arm("/export_raw_vdi", "throttle", rate=6 * 1024 * 1024, times=None)
        sim.arm("/export", "throttle", rate=6 * 1024 * 1024, times=None)
        (tmp_path / "pw").write_text(sim.password)
        config_path = tmp_path / "config.toml"
        config_path.write_text(
            f"""
log_db = "{tmp_path}/logs.sqlite"
[servers.pool]
url = "{sim.pool(0).url}"
password = {{ file = "{tmp_path}/pw" }}
[remotes.nas]
url = "file://{tmp_path}/remote"
[jobs.delta]
mode = "delta"
remotes = ["nas"]
smart = {{}}
settings = {{ exportRetention = {RETENTION} }}
[jobs.full]
mode = "full"
remotes = ["nas"]
smart = {{}}
settings = {{ exportRetention = {RETENTION} }}
"""
        )
        yield sim, config_path, tmp_path


def test_kill_9_at_random_points(crash_setup):
    sim, config_path, tmp_path = crash_setup
    config = load_config(config_path)
    harness = Harness(tmp_path, sim)
    remote = LocalRemote(tmp_path / "remote")
    repository = BackupRepository(remote)
    driver = harness.plugins.hypervisor(config.server_view("pool"))
    disks = {
        vm.uuid: vm.disks[0].vdi_uuid
        for vm in driver.inventory().vms
        if not vm.is_snapshot and vm.disks
    }
    driver.close()
    expected: dict[str, str] = {}  # metadata path -> digest of its disk at backup time
    rng = random.Random(2026)

    def current_digests():
        return {
            vm: hashlib.sha256(sim.read(vdi, 0, sim.vdi_data(vdi).size)).hexdigest()
            for vm, vdi in disks.items()
        }

    def finish_interrupted_merges():
        # What the next run does first: a merge cut by the kill is finished from its state file.
        for vm in disks:
            jobs = f"/xo-vm-backups/{vm}/vdis"
            for job in remote.list(jobs):
                for vdi in remote.list(f"{jobs}/{job}"):
                    resume_all_merges(remote, f"{jobs}/{job}/{vdi}")

    def check_remote(digests_now):
        for vm in disks:
            for backup in repository.list_backups(vm):
                if backup.mode == "full":
                    assert is_valid_xva(remote, backup.xva_path, expected_size=backup.size), (
                        f"{backup.path} lists an incomplete XVA"
                    )
                    continue
                [vhd] = backup.vhd_paths.values()
                digest = chain_digest(remote, vhd)  # raises if a file is partial or missing
                expected.setdefault(backup.path, digests_now[vm])
                assert digest == expected[backup.path], f"{backup.path} changed"

    kills = 0
    for trial in range(TRIALS):
        for vdi in disks.values():
            sim.randomize_blocks(vdi, 0.2, seed=trial)
        digests_now = current_digests()
        job = "full" if trial % 4 == 3 else "delta"
        before = {b.path for vm in disks for b in repository.list_backups(vm)}
        process = subprocess.Popen(
            [sys.executable, "-m", "xobackup_core.cli", "--config", str(config_path), "run", job],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        time.sleep(rng.uniform(0.3, 2.5))
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            kills += 1
        process.wait()
        finish_interrupted_merges()
        check_remote(digests_now)
        # Backups disappear only through retention: never more than the run could delete.
        after = {b.path for vm in disks for b in repository.list_backups(vm)}
        assert len(before - after) <= len(disks), (trial, before - after)
        # The next run recovers and succeeds.
        recovery = harness.run(config, job)
        assert recovery.status == "success", harness.store.get_run(recovery.run_id).to_dict()
        check_remote(digests_now)
        for vm in disks:
            mine = [b for b in repository.list_backups(vm) if b.mode == job]
            assert 1 <= len(mine) <= RETENTION
    assert kills >= TRIALS // 3, f"only {kills} runs were killed mid-way: slow the runs down"
    # Leftover snapshots of killed runs are cleaned: at most the base snapshot per VM remains.
    driver = harness.plugins.hypervisor(config.server_view("pool"))
    snapshots = [vm for vm in driver.inventory().vms if vm.is_snapshot]
    driver.close()
    assert len(snapshots) <= len(disks) * 2
    # An interrupted run is never left pending.
    runs = harness.store.list_runs()
    assert not [run for run in runs if run.status.value == "pending"]
