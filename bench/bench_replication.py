"""Continuous replication against the XAPI simulator, side by side with curl on the same delta.

* CR of a 4 GiB disk with 5% of its blocks changed, to an SR of a second pool: bytes
  transferred to the SR <= 6% of the disk, and wall time <= 1.2x ``curl`` streaming the same
  delta export (``/export_raw_vdi?format=vhd&base=...``) into ``curl -T -`` uploading it to
  ``/import_raw_vdi`` of the replica's VDI.

The first run (full) is not timed; then the guest rewrites 5% of its blocks and the next run
is timed, five times over (each time on new writes); best of each side. Ours runs in a child
process (the whole job: inventory, replica checks, snapshot, delta export and import, replica
snapshot, rotation); the simulator serves from this process. After each timed run, curl
streams the same delta (same base and snapshot) into a VDI of the same size on the replica's
SR (so that the runs alternate under the same load); the runs over, the same deltas go into
the replica's own VDI too (reported as ``reference_replica_s``). Quick mode: 256 MiB.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from itertools import pairwise
from pathlib import Path
from typing import Any

from bench_engine import Xapi
from bench_engine import write_config as engine_config
from common import GIB, MIB, ChildRun, print_result, result, run_command
from common import run_python as run_in_child

TIME_TARGET = 1.2
SIZE_TARGET = 0.06
CHANGED = 0.05
ROUNDS = 5
CR_TAG = "Continuous Replication"


def run_job(config_path: str, job: str) -> dict[str, Any]:
    """Run one job from a config file (in a child process); returns its figures, with the
    bytes its run sent to SRs (from the run's task log)."""
    # The XAPI driver is imported before the clock starts, like the core modules: with
    # bytecode caching off (PYTHONDONTWRITEBYTECODE) compiling it would otherwise be timed.
    import xobackup_hypervisor_xcpng.driver  # noqa: F401

    from xobackup_core.config import load_config
    from xobackup_core.engine.runner import JobRunner
    from xobackup_core.logs.store import LogStore, log_path_from_config
    from xobackup_core.plugins import Plugins

    config = load_config(config_path)
    with LogStore(log_path_from_config(config)) as store:
        runner = JobRunner(config, Plugins(), store)
        start = time.perf_counter()
        outcome = runner.run(job)
        seconds = time.perf_counter() - start
        runner.close()
        tasks = store.get_run(outcome.run_id).to_dict().get("tasks") or []
    sent = []
    transfer_ms = 0

    def walk(task: dict[str, Any]) -> None:
        nonlocal transfer_ms
        data = task.get("data") or {}
        if task.get("name") == "export" and data.get("type") == "SR":
            sent.append((bool(data.get("isFull")), int(task.get("size") or 0)))
            transfer_ms = max(transfer_ms, int(task.get("end") or 0) - int(task.get("start") or 0))
        for child in task.get("tasks") or []:
            walk(child)

    for task in tasks:
        walk(task)
    return {
        "seconds": seconds,
        "status": outcome.status,
        "sent": sent,
        "transfer_s": transfer_ms / 1000,
    }


def write_config(folder: Path, sim: Any, sr_uuid: str, vm_uuid: str) -> Path:
    """bench_engine's config (servers, an unused local remote) with the CR job."""
    return engine_config(
        folder,
        sim,
        f'[jobs.cr]\nmode = "delta"\nsrs = ["{sr_uuid}"]\nvms = ["{vm_uuid}"]\n'
        # every job snapshot stays, so that curl can replay each timed delta afterwards
        f"settings = {{ copyRetention = 3, snapshotRetention = {ROUNDS + 2} }}\n",
    )


def _ours(config: Path) -> tuple[ChildRun, dict[str, Any]]:
    child = run_in_child("bench_replication:run_job", str(config), "cr")
    if child.value["status"] != "success":
        raise RuntimeError(f"the replication run ended {child.value['status']}")
    return ChildRun(child.value["seconds"], child.peak_rss_mib, cpu_s=child.cpu_s), child.value


def _pipeline(curl: str, export_url: str, import_url: str, length: int) -> ChildRun:
    """``curl GET | curl -T - PUT``, timed as one command. XAPI wants a Content-Length on an
    import, so the second curl announces the delta's length instead of chunking stdin."""
    script = (
        "set -o pipefail; "
        f'"$0" -sS -f "$1" | "$0" -sS -f -o /dev/null -T - '
        f'-H "Content-Length: {length}" -H "Transfer-Encoding:" "$2"'
    )
    return run_command(["bash", "-c", script, curl, export_url, import_url])


def _length(curl: str, url: str) -> int:
    out = subprocess.run(
        [curl, "-sS", "-f", "-o", "/dev/null", "-w", "%{size_download}", url],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(float(out.stdout))


def bench_cr(curl: str, size: int, folder: Path) -> list[dict[str, Any]]:
    from xobackup_hypervisor_xcpng.sim import Simulator

    blocks = size // (2 * MIB)
    with Simulator(
        pools=2, vms=1, hosts=1, disk_size=size, allocated_blocks=blocks, data_dir=folder / "sim"
    ) as sim:
        source, target = Xapi(sim, 0), Xapi(sim, 1)
        vm = next(iter(source.vms()))
        vm_uuid = source.x.VM.get_uuid(vm)
        vdi_uuid = source.x.VDI.get_uuid(source.disk_of(vm))
        sr = next(
            ref
            for ref, r in target.x.SR.get_all_records().items()
            if r["name_label"] == "Shared storage"
        )
        config = write_config(folder, sim, target.x.SR.get_uuid(sr), vm_uuid)
        _ours(config)  # the first, full replication: the replica and the base
        [replica] = [
            ref
            for ref, r in target.vms().items()
            if CR_TAG in r["tags"] and r["other_config"].get("xo:backup:vm") == vm_uuid
        ]
        # Between two timed runs curl writes into a VDI of the same size on the same SR: a
        # write into the replica's own VDI would make the next run see a changed replica.
        scratch = target.create_vdi(sr, size, "bench reference")

        def reference(into: str, base: str, snapshot: str) -> ChildRun:
            export_url = source.export_url(
                "/export_raw_vdi",
                vdi=source.disk_of(snapshot),
                base=source.disk_of(base),
                format="vhd",
            )
            import_url = target.export_url("/import_raw_vdi", vdi=into, format="vhd")
            return _pipeline(curl, export_url, import_url, _length(curl, export_url))

        def job_snapshots() -> list[str]:
            return sorted(
                source.x.VM.get_snapshots(vm),
                key=lambda s: source.x.VM.get_other_config(s).get("xo:backup:datetime", ""),
            )

        ours_runs, reference_runs, replays, sent, transfers = [], [], [], [], []
        for round_ in range(ROUNDS):
            sim.randomize_blocks(vdi_uuid, CHANGED, seed=round_ + 1)
            run, figures = _ours(config)
            if [full for full, _ in figures["sent"]] != [False]:
                raise RuntimeError(f"the timed run was not one delta transfer: {figures['sent']}")
            ours_runs.append(run)
            sent.append(sum(s for _, s in figures["sent"]))
            transfers.append(figures["transfer_s"])
            # the same delta as this run's: between the job's two newest snapshots
            base, snapshot = job_snapshots()[-2:]
            reference_runs.append(reference(scratch, base, snapshot))
        # and, the runs over, the same deltas into the replica's own VDI
        for base, snapshot in pairwise(job_snapshots()[-(ROUNDS + 1) :]):
            replays.append(reference(target.disk_of(replica), base, snapshot))
    ours = min(ours_runs, key=lambda r: r.seconds)
    reference = min(reference_runs, key=lambda r: r.seconds)
    peak = max(r.peak_rss_mib for r in ours_runs)
    label = f"CR, {size // MIB} MiB disk, {CHANGED:.0%} changed"
    return [
        result(
            f"{label}: time",
            ours_s=ours.seconds,
            reference_s=reference.seconds,
            reference="curl export_raw_vdi (delta) | curl -T - import_raw_vdi",
            max_ratio=TIME_TARGET,
            peak_rss_mib=peak,
            # the simulator's side (export and import) is in this process for both
            cpu_ratio=round(ours.cpu_s / reference.cpu_s, 3)
            if ours.cpu_s and reference.cpu_s
            else None,
            load_average=round(os.getloadavg()[0], 2),
            # ours without the run's set-up and bookkeeping: the disk transfer task alone
            transfer_s=round(min(transfers), 3),
            # the reference again, into the replica's own VDI (after the runs)
            reference_replica_s=round(min(r.seconds for r in replays), 3),
        ),
        result(
            f"{label}: bytes sent to the SR / disk",
            ours_s=ours.seconds,
            reference_s=None,
            reference="disk size",
            ratio=max(sent) / size,
            max_ratio=SIZE_TARGET,
            peak_rss_mib=peak,
        ),
    ]


def run(quick: bool = False) -> list[dict[str, Any]]:
    curl = shutil.which("curl")
    if curl is None:
        raise RuntimeError("curl is needed (Debian package curl)")
    size = 256 * MIB if quick else 4 * GIB
    with tempfile.TemporaryDirectory(prefix="bench-replication-") as tmp:
        results = bench_cr(curl, size, Path(tmp))
    for entry in results:
        print_result(entry)
    return results


if __name__ == "__main__":
    outcome = run(quick="--quick" in sys.argv[1:])
    sys.exit(0 if all(entry["passed"] for entry in outcome) else 1)
