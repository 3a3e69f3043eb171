"""Restoring a delta backup into the XAPI simulator, side by side with curl on the same disk.

Target: restoring a 4 GiB delta backup whose chain is 30 deep (a full with 1.5 GiB of data,
then 29 deltas of 0.5% of the disk each) takes <= 1.3x the time ``curl -T`` takes to upload
a flat VHD of the same disk to the simulator's ``/import_raw_vdi`` (what the restore itself
does, after merging the chain on the fly).

The chain is made by real delta backups of a simulated VM to a local remote. Ours runs in a
child process (``restore_backup``: inventory, disk creation, the chain streamed as one VHD,
VM creation); the simulator serves from this process. Peak RSS is the child's and must stay
under 150 MiB whatever the disk size. The CPU time ratio (ours / curl) is printed too: it is
steadier than wall time on a busy machine. Quick mode: 256 MiB disk with 64 MiB of data.
"""

from __future__ import annotations

import itertools
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import GIB, MIB, ChildRun, compare, print_result, result, run_command
from common import run_python as run_in_child

TIME_TARGET = 1.3
RSS_LIMIT_MIB = 150.0
"""Memory does not grow with the disk: a few 2 MiB blocks in flight, the BATs, the imports."""
DEPTH = 30
DELTA_FRACTION = 0.005


def restore_once(config_path: str, backup_path: str, sr_uuid: str) -> dict[str, Any]:
    """Restore the backup at ``nas:<backup_path>`` onto ``sr_uuid`` (in a child process).

    Timed from reading the backup's metadata to the VM's creation, after the plugins are
    loaded (the interpreter's imports are not the restore's cost).
    """
    from xobackup_core.config import load_config
    from xobackup_core.engine.repository import BackupRepository
    from xobackup_core.engine.restore import restore_backup
    from xobackup_core.plugins import Plugins

    config = load_config(config_path)
    plugins = Plugins()
    remote = plugins.remote(config.remotes["nas"].url, {"name": "nas"})
    start, cpu_start = time.perf_counter(), time.process_time()
    backup = BackupRepository(remote).read_metadata(backup_path)
    driver = plugins.hypervisor(config.server_view("pool0"))
    try:
        restored = restore_backup(remote, backup, driver, sr_uuid=sr_uuid)
    finally:
        driver.close()
    return {
        "vm": restored.vm_uuid,
        "seconds": time.perf_counter() - start,
        "cpu_s": time.process_time() - cpu_start,
    }


def write_config(folder: Path, sim: Any) -> Path:
    (folder / "pw").write_text(sim.password)
    path = folder / "config.toml"
    path.write_text(
        f'log_db = "{folder}/logs.sqlite"\n'
        f'[servers.pool0]\nurl = "{sim.pool(0).url}"\npassword = {{ file = "{folder}/pw" }}\n'
        f'[remotes.nas]\nurl = "file://{folder}/remote"\n'
        '[jobs.delta]\nmode = "delta"\nremotes = ["nas"]\nsmart = {}\n'
        f"settings = {{ exportRetention = {DEPTH + 1} }}\n"
    )
    return path


def build_chain(sim: Any, config_path: Path, vdi_uuid: str) -> str:
    """DEPTH delta backups of the VM (the first one full); returns the newest's metadata path."""
    from xobackup_remote_local import LocalRemote

    from xobackup_core.config import load_config
    from xobackup_core.engine.repository import BackupRepository
    from xobackup_core.engine.runner import JobRunner
    from xobackup_core.logs.store import LogStore, log_path_from_config
    from xobackup_core.plugins import Plugins

    config = load_config(str(config_path))
    # a clock a minute ahead per call: backups are named by the second
    ticks = itertools.count(time.time(), 60)
    with LogStore(log_path_from_config(config)) as store:
        for run in range(DEPTH):
            if run:
                sim.randomize_blocks(vdi_uuid, DELTA_FRACTION, seed=run)
            runner = JobRunner(config, Plugins(), store, clock=lambda: next(ticks))
            try:
                outcome = runner.run("delta")
            finally:
                runner.close()
            if outcome.status != "success":
                raise RuntimeError(f"backup {run + 1} of the chain ended {outcome.status}")
    remote = LocalRemote(config_path.parent / "remote")
    repository = BackupRepository(remote)
    [vm] = repository.list_vms()
    backups = repository.list_backups(vm)
    if len(backups) != DEPTH:
        raise RuntimeError(f"expected a chain of {DEPTH} backups, found {len(backups)}")
    return backups[-1].path


def run(quick: bool = False) -> list[dict[str, Any]]:
    from bench_engine import Xapi
    from xobackup_hypervisor_xcpng.sim import Simulator

    curl = shutil.which("curl")
    if curl is None:
        raise RuntimeError("curl is needed (Debian package curl)")
    size = 256 * MIB if quick else 4 * GIB
    data = size // 4 if quick else 3 * GIB // 2
    with tempfile.TemporaryDirectory(prefix="bench-restore-") as tmp:
        folder = Path(tmp)
        with Simulator(
            pools=1,
            vms=1,
            hosts=1,
            disk_size=size,
            allocated_blocks=data // (2 * MIB),
            data_dir=folder / "sim",
        ) as sim:
            config = write_config(folder, sim)
            xapi = Xapi(sim)
            vm = xapi.guest()
            vdi_uuid = xapi.x.VDI.get_uuid(xapi.disk_of(vm))
            backup_path = build_chain(sim, config, vdi_uuid)
            sr = xapi.x.VDI.get_SR(xapi.disk_of(vm))
            sr_uuid = xapi.x.SR.get_uuid(sr)

            # the reference uploads the same disk as one flat VHD, exported by the simulator
            flat = folder / "flat.vhd"
            snapshot = xapi.x.VM.snapshot(vm, "bench reference")
            run_command(
                [
                    curl,
                    "-sS",
                    "-f",
                    "-o",
                    str(flat),
                    xapi.export_url("/export_raw_vdi", vdi=xapi.disk_of(snapshot), format="vhd"),
                ]
            )
            xapi.destroy_snapshot(snapshot)

            def reference() -> ChildRun:
                vdi = xapi.create_vdi(sr, size, "bench upload")
                url = xapi.export_url("/import_raw_vdi", vdi=vdi, format="vhd")
                try:
                    # no "Expect: 100-continue" wait: the body goes at once, as ours does
                    return run_command([curl, "-sS", "-f", "-H", "Expect:", "-T", str(flat), url])
                finally:
                    xapi.x.VDI.destroy(vdi)

            def ours() -> ChildRun:
                child = run_in_child("bench_restore:restore_once", config, backup_path, sr_uuid)
                restored = xapi.x.VM.get_by_uuid(child.value["vm"])
                if xapi.x.VDI.get_uuid(xapi.disk_of(restored)) == vdi_uuid:
                    raise RuntimeError("the restore reused the source disk")
                xapi.destroy_snapshot(restored)  # the VM and its disks
                return ChildRun(
                    child.value["seconds"], child.peak_rss_mib, cpu_s=child.value["cpu_s"]
                )

            ours_run, reference_run = compare(1 if quick else 2, ours, reference)
    entry = result(
        f"restore {size // MIB} MiB delta backup, {DEPTH}-deep chain: time",
        ours_s=ours_run.seconds,
        reference_s=reference_run.seconds,
        reference="curl -T of a flat VHD to /import_raw_vdi",
        max_ratio=TIME_TARGET,
        peak_rss_mib=ours_run.peak_rss_mib,
        max_rss_mib=RSS_LIMIT_MIB,
        cpu_ratio=round(ours_run.cpu_s / reference_run.cpu_s, 3)
        if ours_run.cpu_s and reference_run.cpu_s
        else None,
    )
    print_result(entry)
    return [entry]


if __name__ == "__main__":
    outcome = run(quick="--quick" in sys.argv[1:])
    sys.exit(0 if all(entry["passed"] for entry in outcome) else 1)
