"""Staged limits per pool and the job's VM concurrency, proved with the simulator's counters."""

import pytest
from xobackup_hypervisor_xcpng.sim import Simulator

from tests.engine.conftest import Harness
from xobackup_core.engine.limits import LimitValues, PoolLimiter


@pytest.fixture
def busy_pool(tmp_path):
    with Simulator(
        pools=1, vms=8, hosts=1, disk_size=16 * 1024 * 1024, data_dir=tmp_path / "sim"
    ) as sim:
        # Slow snapshots and exports so that operations overlap and limits matter.
        sim.arm("VM.snapshot", "delay", seconds=0.3, times=None)
        sim.arm("/export_raw_vdi", "throttle", rate=8 * 1024 * 1024, times=None)
        sim.arm("/export", "throttle", rate=8 * 1024 * 1024, times=None)
        yield sim


def max_overlap(intervals):
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    current = best = 0
    for _, step in events:
        current += step
        best = max(best, current)
    return best


def test_delta_job_respects_snapshot_and_disk_export_limits(tmp_path, busy_pool):
    harness = Harness(tmp_path, busy_pool)
    config = harness.config(
        {"all": {"mode": "delta", "remotes": ["nas"], "smart": {}, "settings": {"concurrency": 0}}}
    )
    limiter = PoolLimiter(LimitValues(snapshots=2, disk_exports=3, vm_exports=2))
    outcome = harness.run(config, "all", limiter=limiter)
    assert outcome.status == "success" and len(outcome.vm_status) == 8
    seen = busy_pool.pool(0).in_flight.maximum
    assert seen["snapshot"] == 2, seen  # reached, never exceeded
    assert seen["disk_export"] == 3, seen


def test_full_job_respects_vm_export_limit_and_job_concurrency(tmp_path, busy_pool):
    harness = Harness(tmp_path, busy_pool)
    config = harness.config(
        {"all": {"mode": "full", "remotes": ["nas"], "smart": {}, "settings": {"concurrency": 3}}}
    )
    limiter = PoolLimiter(LimitValues(snapshots=2, disk_exports=12, vm_exports=2))
    outcome = harness.run(config, "all", limiter=limiter)
    assert outcome.status == "success"
    assert busy_pool.pool(0).in_flight.maximum["vm_export"] == 2
    assert busy_pool.pool(0).in_flight.maximum["snapshot"] <= 2
    run = harness.store.get_run(outcome.run_id)
    vm_tasks = [(t.start, t.end) for t in run.tasks if t.name == "backup VM"]
    assert len(vm_tasks) == 8
    assert max_overlap(vm_tasks) == 3  # the fourth VM starts only when one of three ends


def test_limits_are_shared_by_jobs_running_at_once(tmp_path, busy_pool):
    import threading

    harness = Harness(tmp_path, busy_pool)
    config = harness.config(
        {
            "a": {"mode": "delta", "remotes": ["nas"], "smart": {"tags": ["prod"]}},
            "b": {"mode": "delta", "remotes": ["nas"], "smart": {"not_tags": ["prod"]}},
        },
        settings={"concurrency": 0},
    )
    limiter = PoolLimiter(LimitValues(snapshots=1, disk_exports=12, vm_exports=2))
    outcomes = {}
    threads = [
        threading.Thread(
            target=lambda j=job: outcomes.__setitem__(j, harness.run(config, j, limiter=limiter))
        )
        for job in ("a", "b")
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert {o.status for o in outcomes.values()} == {"success"}
    assert busy_pool.pool(0).in_flight.maximum["snapshot"] == 1
