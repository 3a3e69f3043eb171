"""Whole backup runs against the XAPI simulator, side by side with curl on the same exports.

* delta backup of a 4 GiB disk with 5% of its blocks changed, to a local remote: bytes
  stored <= 6% of the disk, and wall time <= 1.2x ``curl`` saving the same delta export
  (``/export_raw_vdi?base=...``) to a file;
* full backup of a 4 GiB VM: <= 1.2x ``curl`` saving the same XVA export to a file;
  in both, the reference syncs the file it saved (``common.then_sync``), as our local remote
  fsyncs a backup before it publishes it, and ``ratio_without_sync`` records plain curl too;
* a 1,000-VM smart job over 5 pools with near-empty disks (one 2 MiB block each):
  orchestration time per VM <= 20 ms (best of 3 runs, each on a fresh simulator), peak RSS
  <= 300 MiB, per-pool limits never exceeded in any run;
* peak RSS of a single-VM backup does not grow with the disk (4 GiB vs 16 GiB).

Ours runs in a child process (the whole job: inventory, snapshot, export, metadata, snapshot
rotation); the simulator serves from this process. Quick mode: 256 MiB disks, 100 VMs.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import (
    GIB,
    MIB,
    ChildRun,
    best_of,
    compare,
    print_result,
    result,
    rss_result,
    run_command,
    then_sync,
)
from common import run_python as run_in_child

DELTA_TIME_TARGET = 1.2
DELTA_SIZE_TARGET = 0.06
FULL_TIME_TARGET = 1.2
OVERHEAD_TARGET_MS = 20.0
SCALE_RSS_MIB = 300.0


def run_job(config_path: str, job: str) -> dict[str, Any]:
    """Run one job from a config file (in a child process); returns its figures."""
    from xobackup_core.config import load_config
    from xobackup_core.engine.repository import BackupRepository
    from xobackup_core.engine.runner import JobRunner
    from xobackup_core.logs.store import LogStore, log_path_from_config
    from xobackup_core.plugins import Plugins

    config = load_config(config_path)
    plugins = Plugins()
    with LogStore(log_path_from_config(config)) as store:
        runner = JobRunner(config, plugins, store)
        start = time.perf_counter()
        outcome = runner.run(job)
        seconds = time.perf_counter() - start
        runner.close()
    remote_config = config.remotes["nas"]
    remote = plugins.remote(remote_config.url, {"name": "nas"})
    repository = BackupRepository(remote)
    newest = 0
    for vm in repository.list_vms():
        backups = repository.list_backups(vm)
        if backups:
            newest += backups[-1].size
    return {
        "seconds": seconds,
        "status": outcome.status,
        "vms": len(outcome.vm_status),
        "size": newest,
    }


def write_config(folder: Path, sim: Any, jobs: str) -> Path:
    (folder / "pw").write_text(sim.password)
    servers = "".join(
        f'[servers.pool{i}]\nurl = "{pool.url}"\npassword = {{ file = "{folder}/pw" }}\n'
        for i, pool in enumerate(sim.pools)
    )
    path = folder / "config.toml"
    path.write_text(
        f'log_db = "{folder}/logs.sqlite"\n{servers}'
        f'[remotes.nas]\nurl = "file://{folder}/remote"\n{jobs}'
    )
    return path


class Xapi:
    """The official SDK on the simulator, to build the URLs curl downloads."""

    def __init__(self, sim: Any, pool: int = 0) -> None:
        import XenAPI

        self.url = sim.pool(pool).url
        self.session = XenAPI.Session(self.url)
        self.session.xenapi.login_with_password(sim.username, sim.password)
        self.x = self.session.xenapi

    def vms(self) -> dict[str, dict[str, Any]]:
        """The guest VMs' records (no templates, control domain or snapshots), by ref."""
        return {
            ref: r
            for ref, r in self.x.VM.get_all_records().items()
            if not r["is_a_template"] and not r["is_control_domain"] and not r["is_a_snapshot"]
        }

    def guest(self) -> str:
        return next(iter(self.vms()))

    def disk_of(self, vm: str) -> str:
        for vbd in self.x.VM.get_VBDs(vm):
            if self.x.VBD.get_type(vbd) == "Disk":
                return self.x.VBD.get_VDI(vbd)
        raise RuntimeError("the VM has no disk")

    def create_vdi(self, sr: str, size: int, name: str) -> str:
        """A new empty VDI on ``sr`` (ref), for curl to upload into."""
        return self.x.VDI.create(
            {
                "name_label": name,
                "name_description": "",
                "SR": sr,
                "virtual_size": str(size),
                "type": "user",
                "sharable": False,
                "read_only": False,
                "other_config": {},
                "sm_config": {},
                "xenstore_data": {},
                "tags": [],
            }
        )

    def export_url(self, path: str, **query: str) -> str:
        params = "&".join(f"{k}={v}" for k, v in query.items())
        return f"{self.url}{path}?session_id={self.session._session}&{params}"

    def destroy_snapshot(self, snapshot: str) -> None:
        vdis = [self.x.VBD.get_VDI(v) for v in self.x.VM.get_VBDs(snapshot)]
        self.x.VM.destroy(snapshot)
        for vdi in vdis:
            if vdi != "OpaqueRef:NULL":
                self.x.VDI.destroy(vdi)


def _curl(curl: str, url: str, out: Path) -> ChildRun:
    """curl saving ``url`` to ``out``, then ``sync out`` (see the module doc)."""
    try:
        return then_sync(lambda: run_command([curl, "-sS", "-f", "-o", str(out), url]), out)
    finally:
        out.unlink(missing_ok=True)


def _without_sync(ours: ChildRun, reference: ChildRun) -> float:
    return round(ours.seconds / (reference.seconds - reference.value["sync_s"]), 3)


def _ours(config: Path, job: str) -> tuple[ChildRun, dict[str, Any]]:
    child = run_in_child("bench_engine:run_job", str(config), job)
    if child.value["status"] != "success":
        raise RuntimeError(f"the {job} run ended {child.value['status']}")
    return ChildRun(child.value["seconds"], child.peak_rss_mib), child.value


def bench_delta(curl: str, size: int, folder: Path) -> list[dict[str, Any]]:
    from xobackup_hypervisor_xcpng.sim import Simulator

    blocks = size // (2 * MIB)
    with Simulator(
        pools=1, vms=1, hosts=1, disk_size=size, allocated_blocks=blocks, data_dir=folder / "sim"
    ) as sim:
        config = write_config(
            folder,
            sim,
            '[jobs.delta]\nmode = "delta"\nremotes = ["nas"]\nsmart = {}\n'
            "settings = { exportRetention = 5 }\n",
        )
        _ours(config, "delta")  # the first, full backup: the base
        xapi = Xapi(sim)
        vm = xapi.guest()
        vdi_uuid = xapi.x.VDI.get_uuid(xapi.disk_of(vm))
        sim.randomize_blocks(vdi_uuid, 0.05, seed=1)
        base = next(
            s
            for s in xapi.x.VM.get_snapshots(vm)
            if xapi.x.VM.get_other_config(s).get("xo:backup:exported") == "true"
        )
        snapshot = xapi.x.VM.snapshot(vm, "bench reference")
        url = xapi.export_url(
            "/export_raw_vdi", vdi=xapi.disk_of(snapshot), base=xapi.disk_of(base), format="vhd"
        )
        reference = best_of(3, lambda: _curl(curl, url, folder / "delta.vhd"))
        xapi.destroy_snapshot(snapshot)
        ours, figures = _ours(config, "delta")
    stored = figures["size"] / size
    return [
        result(
            f"delta backup, {size // MIB} MiB disk, 5% changed: time",
            ours_s=ours.seconds,
            reference_s=reference.seconds,
            reference="curl saving the delta export + sync",
            ratio_without_sync=_without_sync(ours, reference),
            max_ratio=DELTA_TIME_TARGET,
            peak_rss_mib=ours.peak_rss_mib,
        ),
        result(
            f"delta backup, {size // MIB} MiB disk, 5% changed: bytes stored / disk",
            ours_s=ours.seconds,
            reference_s=None,
            reference="disk size",
            ratio=stored,
            max_ratio=DELTA_SIZE_TARGET,
        ),
    ]


def bench_full(
    curl: str, size: int, folder: Path, check_rss_against: float | None = None
) -> tuple[dict[str, Any], float]:
    from xobackup_hypervisor_xcpng.sim import Simulator

    blocks = size // (2 * MIB)
    with Simulator(
        pools=1, vms=1, hosts=1, disk_size=size, allocated_blocks=blocks, data_dir=folder / "sim"
    ) as sim:
        config = write_config(
            folder, sim, '[jobs.full]\nmode = "full"\nremotes = ["nas"]\nsmart = {}\n'
        )
        xapi = Xapi(sim)
        snapshot = xapi.x.VM.snapshot(xapi.guest(), "bench reference")
        url = xapi.export_url("/export", ref=snapshot)

        def our_run() -> ChildRun:
            # each run a first full backup, removed afterwards as curl's file is (_curl): one
            # side's copy on disk at a time (16 GiB each in the RSS step)
            run = _ours(config, "full")[0]
            shutil.rmtree(folder / "remote", ignore_errors=True)
            return run

        # alternated, best of 3 each, each run starting on settled memory: how fast this VM
        # gets fresh page-cache pages varies a lot, and both sides write 4 GiB
        ours, reference = compare(
            3, our_run, lambda: _curl(curl, url, folder / "vm.xva"), settle=True
        )
        xapi.destroy_snapshot(snapshot)
    entry = result(
        f"full backup, {size // MIB} MiB VM: time",
        ours_s=ours.seconds,
        reference_s=reference.seconds,
        reference="curl saving the XVA export + sync",
        ratio_without_sync=_without_sync(ours, reference),
        max_ratio=FULL_TIME_TARGET,
        peak_rss_mib=ours.peak_rss_mib,
    )
    return entry, ours.peak_rss_mib


def _scale_run(vms_per_pool: int, folder: Path) -> tuple[ChildRun, int, list[dict[str, int]]]:
    """One run of the 1,000-VM job on a fresh simulator: (time, VMs, per-pool maxima)."""
    from xobackup_hypervisor_xcpng.sim import Simulator

    folder.mkdir()
    with Simulator(
        pools=5,
        vms=vms_per_pool,
        hosts=1,
        disk_size=4 * MIB,
        allocated_blocks=1,
        data_dir=folder / "sim",
    ) as sim:
        config = write_config(
            folder,
            sim,
            '[jobs.all]\nmode = "delta"\nremotes = ["nas"]\nsmart = {}\n'
            "settings = { concurrency = 0 }\n",
        )
        ours, figures = _ours(config, "all")
        maxima = [dict(pool.in_flight.maximum) for pool in sim.pools]
    shutil.rmtree(folder, ignore_errors=True)
    return ours, figures["vms"], maxima


def bench_scale(vms_per_pool: int, folder: Path, runs: int = 3) -> list[dict[str, Any]]:
    """Best of ``runs`` (each a first backup of every VM, so each needs a fresh pool); the
    limits must hold in every run."""
    outcomes = [_scale_run(vms_per_pool, folder / f"run-{n}") for n in range(max(runs, 1))]
    runs_made = [run for run, _, _ in outcomes]
    ours = ChildRun(
        min(run.seconds for run in runs_made), max(run.peak_rss_mib for run in runs_made)
    )
    count = min(vms for _, vms, _ in outcomes)
    maxima = [m for _, _, per_pool in outcomes for m in per_pool]
    within = all(m["snapshot"] <= 2 and m["disk_export"] <= 12 for m in maxima)
    per_vm_ms = ours.seconds * 1000 / max(count, 1)
    return [
        result(
            f"{count}-VM smart job over 5 pools: ms per VM (best of {len(outcomes)})",
            ours_s=ours.seconds,
            reference_s=None,
            reference="-",
            ratio=per_vm_ms,
            max_ratio=OVERHEAD_TARGET_MS,
            peak_rss_mib=ours.peak_rss_mib,
            max_rss_mib=SCALE_RSS_MIB,
            ok=within,
            limits=json.dumps(maxima[: len(maxima) // len(outcomes)]),
            all_runs_ms=[round(run.seconds * 1000 / max(count, 1), 2) for run, _, _ in outcomes],
        )
    ]


STEPS = ("delta", "full", "scale", "rss")


def run(quick: bool = False, only: tuple[str, ...] = STEPS) -> list[dict[str, Any]]:
    """Every step, or the ``only`` ones (``rss`` needs ``full`` for its reference)."""
    curl = shutil.which("curl")
    if curl is None:
        raise RuntimeError("curl is needed (Debian package curl)")
    size = 256 * MIB if quick else 4 * GIB
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
        root = Path(tmp)
        steps = [s for s in STEPS if s in only or (s == "full" and "rss" in only)]
        for index, step in enumerate(steps):
            folder = root / f"{index}-{step}"
            folder.mkdir()
            if step == "delta":
                entries = bench_delta(curl, size, folder)
            elif step == "full":
                entry, small_rss = bench_full(curl, size, folder)
                entries = [entry]
            elif step == "scale":
                entries = bench_scale(20 if quick else 200, folder, runs=1 if quick else 3)
            else:
                big = 4 * size
                entry, big_rss = bench_full(curl, big, folder)
                entries = [
                    rss_result(
                        f"full backup peak RSS, {big // MIB} MiB vs {size // MIB} MiB disk "
                        "(ratio = MiB more)",
                        big_rss - small_rss,
                        max_rss_mib=0.2 * small_rss + 10,
                    )
                ]
            for entry in entries:
                print_result(entry)
            results.extend(entries)
            shutil.rmtree(folder, ignore_errors=True)
    return results


if __name__ == "__main__":
    # python bench/bench_engine.py [--quick] [--only scale,delta,...]
    arguments = sys.argv[1:]
    chosen = STEPS
    if "--only" in arguments:
        chosen = tuple(arguments[arguments.index("--only") + 1].split(","))
        unknown = set(chosen) - set(STEPS)
        if unknown:
            sys.exit(f"unknown step(s) {', '.join(sorted(unknown))}; steps: {', '.join(STEPS)}")
    outcome = run(quick="--quick" in arguments, only=chosen)
    sys.exit(0 if all(entry["passed"] for entry in outcome) else 1)
