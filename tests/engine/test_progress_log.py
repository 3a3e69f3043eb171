"""Every run records its per-VM progress in the run log, for readers in other processes."""

from __future__ import annotations

import subprocess
import sys
import time

from tests.engine.test_backup_runs import guest_vms
from tests.engine.test_run_cli import write_config
from xobackup_core.engine.progress import StoredProgress
from xobackup_core.logs import LogStore, RunFilter, Status

MiB = 1024 * 1024
STAGES = ("starting", "shutdown", "snapshot", "export", "retention")


def test_another_process_sees_the_bytes_of_a_running_export_grow(tmp_path, xapi_sim):
    config = write_config(tmp_path, xapi_sim)
    prod = {u: r["name_label"] for u, r in guest_vms(xapi_sim).items() if "prod" in r["tags"]}
    assert prod, "the simulator's inventory has prod VMs"
    # slow enough that the export lasts several seconds: several throttled writes
    xapi_sim.arm("/export_raw_vdi", "throttle", rate=2 * MiB, times=None)
    process = subprocess.Popen(
        [sys.executable, "-m", "xobackup_core.cli", "--config", str(config), "run", "nightly"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    seen: dict[str, list[int]] = {uuid: [] for uuid in prod}
    try:
        with LogStore(tmp_path / "logs.sqlite") as store:
            run_id = None
            deadline = time.monotonic() + 120
            while process.poll() is None and time.monotonic() < deadline:
                if run_id is None:
                    runs = [r for r in store.list_runs(RunFilter(limit=3)) if r.pid == process.pid]
                    run_id = runs[0].run_id if runs else None
                else:
                    for uuid, vm in store.run_progress(run_id, pending_only=True).items():
                        assert vm.name == prod[uuid]
                        assert vm.stage in STAGES
                        if vm.stage == "export" and vm.status is None:
                            seen[uuid].append(vm.transferred)
                time.sleep(0.05)
            output = process.communicate(timeout=120)[0].decode()
            assert process.returncode == 0, output
            assert run_id is not None
            for uuid, values in seen.items():
                growing = sorted(set(values))
                assert len(growing) >= 3, f"{prod[uuid]}: bytes seen while exporting: {growing}"
                assert values == sorted(values), "bytes never go back"
            final = store.run_progress(run_id)
            assert store.run_progress(run_id, pending_only=True) == {}
            run = store.get_run(run_id)
            assert run.status is Status.SUCCESS
            sizes = {
                task.data["id"]: task.size for task in run.tasks if isinstance(task.data, dict)
            }
            for uuid in prod:
                vm = final[uuid]
                assert vm.status == "success", vm
                assert vm.transferred >= max(seen[uuid])
                # the last record has every data byte: the stored VHD only adds its metadata
                assert 0 <= sizes[uuid] - vm.transferred < 64 * 1024, (vm, sizes[uuid])
                assert vm.speed is not None and vm.speed > 0
                # throttled: start + stage changes + finish + about one per second of export
                seconds = (vm.updated - vm.start) / 1000
                assert vm.updates <= len(STAGES) + 2 + int(seconds) + 1, (vm, seconds)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_10_gb_per_second_export_writes_about_once_a_second(tmp_path):
    with LogStore(tmp_path / "logs.sqlite") as store:
        run = store.start_run("j", "job", heartbeat_interval=None)
        clock = FakeClock()
        progress = StoredProgress(store, run.run_id, clock=clock)
        progress.vm_started("vm-1", "web")
        progress.stage("vm-1", "snapshot")
        progress.stage("vm-1", "export")
        assert store.run_progress(run.run_id)["vm-1"].updates == 3  # each change at once
        chunk = MiB
        total = 20 * 1024 * chunk  # 20 GiB in 1 MiB chunks at 10 GiB/s: 2 s
        for _ in range(total // chunk):
            clock.now += chunk / (10 * 1024 * MiB)
            progress.transferred("vm-1", chunk)
        middle = store.run_progress(run.run_id)["vm-1"]
        assert 3 + 1 <= middle.updates <= 3 + 3, middle
        assert middle.transferred >= total - 10 * 1024 * MiB  # at most 1 s of bytes behind
        progress.stage("vm-1", "export")  # not a change: no write
        assert store.run_progress(run.run_id)["vm-1"].updates == middle.updates
        progress.vm_finished("vm-1", "success")
        progress.close()  # nothing left unwritten: no write
        last = store.run_progress(run.run_id)["vm-1"]
        assert (last.status, last.transferred, last.updates) == (
            "success",
            total,
            middle.updates + 1,
        )


def test_bytes_after_the_last_write_are_written_at_close(tmp_path):
    with LogStore(tmp_path / "logs.sqlite") as store:
        run = store.start_run("j", "job", heartbeat_interval=None)
        clock = FakeClock()
        progress = StoredProgress(store, run.run_id, clock=clock)
        progress.vm_started("vm-1", "web")
        progress.transferred("vm-1", 5)
        assert store.run_progress(run.run_id)["vm-1"].transferred == 0  # within the second
        progress.close()
        assert store.run_progress(run.run_id)["vm-1"].transferred == 5


def test_a_closed_log_never_fails_the_export(tmp_path):
    store = LogStore(tmp_path / "logs.sqlite")
    run = store.start_run("j", "job", heartbeat_interval=None)
    progress = StoredProgress(store, run.run_id, interval=0)
    store.close()
    progress.vm_started("vm-1", "web")
    progress.transferred("vm-1", 5)
    progress.vm_finished("vm-1", "success")
