"""Replication to SRs of another pool: disaster recovery and continuous replication, checked
bit for bit against the source snapshots, on a two-pool simulator."""

from __future__ import annotations

import hashlib
import threading

import pytest
from xobackup_hypervisor_xcpng.sim import Simulator

from tests.engine.conftest import Harness
from xobackup_core.builtin.selector import is_excluded
from xobackup_core.engine.cpu import missing_cpu_features
from xobackup_core.engine.replication import (
    CR_TAG,
    DR_TAG,
    HA_DISABLED_TAG,
    START_BLOCKED,
    SrTarget,
    check_memory_target,
)
from xobackup_core.errors import XobackupError
from xobackup_core.hypervisor import CpuInfo, Host, Pool, StorageRepository, Vm

MiB = 1024 * 1024


@pytest.fixture
def two_pools(tmp_path):
    with Simulator(pools=2, vms=2, hosts=1, disk_size=32 * MiB, data_dir=tmp_path / "sim") as sim:
        yield Harness(tmp_path, sim)


class Pools:
    """Drivers on both pools, the VM under test and the target SR."""

    def __init__(self, harness):
        config = harness.config({})
        self.harness = harness
        self.sim = harness.sim
        self.source = harness.plugins.hypervisor(config.server_view("pool0"))
        self.target = harness.plugins.hypervisor(config.server_view("pool1"))
        self.vm = next(
            v
            for v in self.source.inventory().vms
            if not v.is_snapshot and v.power_state == "Running"
        )
        pool = self.target.inventory().pools[0]
        self.sr = next(sr for sr in pool.srs if sr.name == "Shared storage")

    def close(self):
        self.source.close()
        self.target.close()

    def content(self, vdi):
        """A digest of the VDI's content (its non-zero 2 MiB blocks and where they are):
        memory images are GiBs of mostly zeros."""
        data = self.sim.vdi_data(vdi)
        digest = hashlib.sha256(str(data.size).encode())
        for index in data.allocated():
            block = data.read_block(index)
            if block is not None and block.count(0) != len(block):
                digest.update(index.to_bytes(8, "big") + block)
        return digest.hexdigest()

    def used_blocks(self, vdi):
        data = self.sim.vdi_data(vdi)
        return [i for i in data.allocated() if (data.read_block(i) or b"\0").count(0) < 2 * MiB]

    def replicas(self, tag, job_id):
        return sorted(
            (
                v
                for v in self.target.inventory().vms
                if not v.is_snapshot
                and tag in v.tags
                and v.other_config.get("xo:backup:job") == job_id
            ),
            key=lambda v: v.other_config["xo:backup:datetime"],
        )

    def job_snapshots(self):
        return sorted(
            (
                v
                for v in self.source.inventory().vms
                if v.is_snapshot and v.snapshot_of == self.vm.uuid
            ),
            key=lambda v: v.other_config.get("xo:backup:datetime", ""),
        )


class Overlap:
    """Samples the pools' in-flight counters: did a VM export and an import run together?"""

    def __init__(self, sim):
        self.sim = sim
        self.seen = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.005):
            exporting = self.sim.pool(0).in_flight.current["vm_export"]
            importing = self.sim.pool(1).in_flight.current["vm_import"]
            self.seen = self.seen or (exporting > 0 and importing > 0)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


@pytest.fixture
def pools(two_pools):
    p = Pools(two_pools)
    yield p
    p.close()


def job_id(harness, config, key):
    return str(config.job_view(key)["id"])


def assert_protected(replica, pools, job, tag):
    assert tag in replica.tags
    assert replica.blocked_operations.get("start") == START_BLOCKED
    assert replica.blocked_operations.get("start_on") == START_BLOCKED
    oc = replica.other_config
    assert oc["xo:backup:job"] == job
    assert oc["xo:backup:vm"] == pools.vm.uuid
    assert oc["xo:backup:sr"] == pools.sr.uuid
    assert oc["xo:backup:datetime"]
    assert "xo:backup:schedule" in oc
    # the source VM has HA "restart": the replica must not restart on its own
    assert replica.ha_restart_priority == ""
    assert HA_DISABLED_TAG in replica.tags
    assert is_excluded(replica, job)


def test_disaster_recovery_one_pass_and_rotation(pools):
    harness, sim = pools.harness, pools.sim
    assert pools.vm.ha_restart_priority == "restart"
    config = harness.config(
        {
            "dr": {
                "mode": "full",
                "remotes": ["nas"],
                "srs": [pools.sr.uuid],
                "vms": [pools.vm.uuid],
                "compression": "zstd",
                "settings": {"copyRetention": 2, "exportRetention": 5},
            }
        }
    )
    job = job_id(harness, config, "dr")
    vdi = pools.vm.disks[0].vdi_uuid
    expected = []
    for run in range(3):
        sim.randomize_blocks(vdi, 0.2, seed=run)
        expected.append(pools.content(vdi))
        if run == 0:
            # slowed down, so that a sampler sees export and import in flight together
            sim.arm("/export", "throttle", rate=8 * MiB, times=None)
            with Overlap(sim) as overlap:
                outcome = harness.run(config, "dr")
            sim.faults.clear()
            # one pass: the import was running while the export was, the XVA was never
            # stored in between
            assert overlap.seen
        else:
            outcome = harness.run(config, "dr")
        assert outcome.status == "success"
    replicas = pools.replicas(DR_TAG, job)
    assert len(replicas) == 2  # copyRetention
    for replica, want in zip(replicas, expected[1:], strict=True):
        assert_protected(replica, pools, job, DR_TAG)
        assert replica.name.startswith(f"{pools.vm.name} - dr - (")
        assert replica.power_state == "Halted"
        [disk] = replica.disks
        assert disk.sr_uuid == pools.sr.uuid
        assert pools.content(disk.vdi_uuid) == want
    # the remote got its XVAs from the same export (3 kept by exportRetention)
    xvas = list(harness.remote_dir.rglob("*.xva"))
    assert len(xvas) == 3


def export_sizes(harness, run_id):
    """Bytes sent to SRs by each disk transfer of a run (from its task log)."""
    sizes = []

    def walk(task):
        data = task.get("data") or {}
        if task.get("name") == "export" and data.get("type") == "SR":
            sizes.append((data.get("isFull"), task.get("size")))
        for child in task.get("tasks") or []:
            walk(child)

    for task in harness.store.get_run(run_id).to_dict().get("tasks") or []:
        walk(task)
    return sizes


def test_continuous_replication_deltas_and_rotation(pools):
    harness, sim = pools.harness, pools.sim
    config = harness.config(
        {
            "cr": {
                "mode": "delta",
                "remotes": ["nas"],
                "srs": [pools.sr.uuid],
                "vms": [pools.vm.uuid],
                "settings": {"copyRetention": 2, "exportRetention": 5},
            }
        }
    )
    job = job_id(harness, config, "cr")
    vdi = pools.vm.disks[0].vdi_uuid
    first = harness.run(config, "cr")
    assert first.status == "success"
    [replica] = pools.replicas(CR_TAG, job)
    assert_protected(replica, pools, job, CR_TAG)
    assert replica.power_state == "Halted"
    [snapshot] = pools.job_snapshots()
    [disk] = replica.disks
    assert disk.sr_uuid == pools.sr.uuid
    assert pools.content(disk.vdi_uuid) == pools.content(snapshot.disks[0].vdi_uuid)
    [(is_full, full_size)] = export_sizes(harness, first.run_id)
    assert is_full and full_size > 4 * MiB

    for run in range(3):
        changed = sim.randomize_blocks(vdi, 0.1, seed=10 + run)
        outcome = harness.run(config, "cr")
        assert outcome.status == "success"
        [again] = pools.replicas(CR_TAG, job)
        assert again.uuid == replica.uuid  # updated in place
        snapshot = pools.job_snapshots()[-1]
        [disk] = again.disks
        assert pools.content(disk.vdi_uuid) == pools.content(snapshot.disks[0].vdi_uuid)
        [(is_full, size)] = export_sizes(harness, outcome.run_id)
        # only the changed 2 MiB blocks travelled (plus the VHD's own structures)
        assert not is_full
        assert len(set(changed)) * 2 * MiB <= size < (len(set(changed)) + 1) * 2 * MiB
    replica_snapshots = [
        v for v in pools.target.inventory().vms if v.is_snapshot and v.snapshot_of == replica.uuid
    ]
    assert len(replica_snapshots) == 2  # copyRetention
    # the remote of the job was fed from the same exports: one VHD per run
    assert len(list(harness.remote_dir.rglob("*.vhd"))) == 4


def test_a_started_replica_is_never_overwritten(pools):
    harness, sim = pools.harness, pools.sim
    config = harness.config(
        {"cr": {"mode": "delta", "srs": [pools.sr.uuid], "vms": [pools.vm.uuid]}}
    )
    job = job_id(harness, config, "cr")
    assert harness.run(config, "cr").status == "success"
    [replica] = pools.replicas(CR_TAG, job)
    before = pools.content(replica.disks[0].vdi_uuid)
    # someone writes into the replica's disk (as a started clone would)
    sim.write(replica.disks[0].vdi_uuid, 0, b"\xa5" * 4096)
    mine = pools.content(replica.disks[0].vdi_uuid)
    assert mine != before
    outcome = harness.run(config, "cr")
    assert outcome.status == "success"
    replicas = pools.replicas(CR_TAG, job)
    assert len(replicas) == 2
    assert pools.content(replica.disks[0].vdi_uuid) == mine  # left alone
    newest = replicas[-1]
    snapshot = pools.job_snapshots()[-1]
    assert pools.content(newest.disks[0].vdi_uuid) == pools.content(snapshot.disks[0].vdi_uuid)
    run = harness.store.get_run(outcome.run_id).to_dict()
    assert "changed since the last replication" in str(run)
    # the job's smart mode never picks its replicas (they live on pool1, a server of the job)
    smart = harness.config(
        {"cr": {"mode": "delta", "srs": [pools.sr.uuid], "smart": {"power_state": "Halted"}}}
    )
    outcome = harness.run(smart, "cr")
    selected = set(outcome.vm_status)
    assert selected
    assert not selected & {r.uuid for r in replicas}


def resume(driver, vm_uuid):
    driver.call("VM.resume", driver._ref("VM", vm_uuid), False, False)


def test_memory_replication_makes_a_resumable_suspended_replica(pools):
    harness, sim = pools.harness, pools.sim
    config = harness.config(
        {
            "ram": {
                "mode": "delta",
                "srs": [pools.sr.uuid],
                "vms": [pools.vm.uuid],
                "settings": {"checkpointSnapshot": True},
            }
        }
    )
    job = job_id(harness, config, "ram")
    assert harness.run(config, "ram").status == "success"
    [replica] = pools.replicas(CR_TAG, job)
    [checkpoint] = pools.job_snapshots()
    assert checkpoint.suspend_vdi_uuid
    assert replica.power_state == "Suspended"
    assert replica.suspend_vdi_uuid
    assert pools.content(replica.suspend_vdi_uuid) == pools.content(checkpoint.suspend_vdi_uuid)
    assert pools.content(replica.disks[0].vdi_uuid) == pools.content(checkpoint.disks[0].vdi_uuid)
    [host] = pools.target.inventory().pools[0].hosts

    # an AMD host cannot resume a VM suspended on Intel: XAPI (the simulator) refuses...
    sim.set_host_cpu(host.uuid, "AuthenticAMD")
    with pytest.raises(Exception, match="VM_INCOMPATIBLE_WITH_THIS_HOST"):
        resume(pools.target, replica.uuid)
    # ...and the engine refuses to replicate there before transferring anything
    outcome = harness.run(config, "ram")
    assert outcome.status == "failure"
    text = str(harness.store.get_run(outcome.run_id).to_dict())
    assert "GenuineIntel" in text and "AMD EPYC" in text
    assert len(pools.replicas(CR_TAG, job)) == 1

    # a host with the same vendor but fewer CPU features: refused too, naming what is missing
    sim.set_host_cpu(host.uuid, "GenuineIntel", features="00000001-00000000")
    outcome = harness.run(config, "ram")
    assert outcome.status == "failure"
    assert "lacks CPU features" in str(harness.store.get_run(outcome.run_id).to_dict())

    # back on a compatible CPU, the replica resumes
    sim.set_host_cpu(host.uuid, "GenuineIntel")
    resume(pools.target, replica.uuid)
    assert pools.target.inventory().vm(replica.uuid).power_state == "Running"


def test_memory_replication_to_citrix_is_refused():
    sr = StorageRepository("sr-1", "Shared storage", "pool-1")
    host = Host("h1", "host 1", "pool-1", CpuInfo("GenuineIntel", features_hvm="ffffffff"))
    citrix = Pool("pool-1", "ch", "citrix", hosts=(host,), srs=(sr,))
    vm = Vm("vm-1", "web", "pool-0", "Running", last_boot_cpu_flags={"vendor": "GenuineIntel"})
    with pytest.raises(XobackupError, match="only XCP-ng can create a Suspended VM"):
        check_memory_target(vm, vm, SrTarget(sr, citrix, driver=None))
    xcpng = Pool("pool-1", "xcp", "xcp-ng", hosts=(host,), srs=(sr,))
    check_memory_target(vm, vm, SrTarget(sr, xcpng, driver=None))


def target_vdis(pools):
    return {
        d.vdi_uuid
        for v in pools.target.inventory().vms
        for d in v.disks
        if d.sr_uuid == pools.sr.uuid
    }


def test_a_failing_sr_never_costs_the_remotes(pools):
    harness, sim = pools.harness, pools.sim
    jobs = {
        "dr": {"mode": "full", "remotes": ["nas"], "srs": [pools.sr.uuid], "vms": [pools.vm.uuid]},
        "cr": {"mode": "delta", "remotes": ["nas"], "srs": [pools.sr.uuid], "vms": [pools.vm.uuid]},
    }
    config = harness.config(jobs)
    before = target_vdis(pools)
    sim.arm("/import", "drop", after_bytes=1024 * 1024, pool=1, times=None)
    sim.arm("/import_raw_vdi", "drop", after_bytes=1024 * 1024, pool=1, times=None)
    for key in jobs:
        outcome = harness.run(config, key)
        run = harness.store.get_run(outcome.run_id).to_dict()
        assert outcome.vm_status[pools.vm.uuid] == "success", run
        assert f"replication to SR {pools.sr.name}" in str(run)
        assert not pools.replicas(DR_TAG if key == "dr" else CR_TAG, job_id(harness, config, key))
    assert list(harness.remote_dir.rglob("*.xva"))
    assert list(harness.remote_dir.rglob("*.vhd"))
    # nothing left behind on the SR by the failed imports
    assert target_vdis(pools) == before
    sim.faults.clear()
    # the delta job's snapshot was not marked exported (the SR lacks it): the next run of the
    # delta job is full everywhere, and the replica is made
    outcome = harness.run(config, "cr")
    assert outcome.status == "success"
    assert [full for full, _ in export_sizes(harness, outcome.run_id)] == [True]
    assert pools.replicas(CR_TAG, job_id(harness, config, "cr"))


def test_delete_first_rotates_dr_replicas_before_the_import(pools):
    harness = pools.harness
    config = harness.config(
        {
            "dr": {
                "mode": "full",
                "srs": [pools.sr.uuid],
                "vms": [pools.vm.uuid],
                "settings": {"copyRetention": 1, "deleteFirst": True},
            }
        }
    )
    job = job_id(harness, config, "dr")
    assert harness.run(config, "dr").status == "success"
    [first] = pools.replicas(DR_TAG, job)
    sim = pools.sim
    # the next import fails: with deleteFirst the old replica is already gone
    sim.arm("/import", "error", code="SR_FULL", pool=1)
    assert harness.run(config, "dr").status == "failure"
    assert pools.replicas(DR_TAG, job) == []
    assert harness.run(config, "dr").status == "success"
    [second] = pools.replicas(DR_TAG, job)
    assert second.uuid != first.uuid


def test_disaster_recovery_with_memory_checks_the_target_cpu(pools):
    harness, sim = pools.harness, pools.sim
    config = harness.config(
        {
            "dr": {
                "mode": "full",
                "srs": [pools.sr.uuid],
                "vms": [pools.vm.uuid],
                "settings": {"checkpointSnapshot": True, "copyRetention": 3},
            }
        }
    )
    job = job_id(harness, config, "dr")
    assert harness.run(config, "dr").status == "success"
    [replica] = pools.replicas(DR_TAG, job)
    assert replica.power_state == "Suspended" and replica.suspend_vdi_uuid
    [host] = pools.target.inventory().pools[0].hosts
    sim.set_host_cpu(host.uuid, "AuthenticAMD")
    outcome = harness.run(config, "dr")
    assert outcome.status == "failure"
    assert "AMD EPYC" in str(harness.store.get_run(outcome.run_id).to_dict())
    assert len(pools.replicas(DR_TAG, job)) == 1
    # forced: the replica is made, and the run says which CPUs do not match
    forced = harness.config(
        {
            "dr": {
                "mode": "full",
                "srs": [pools.sr.uuid],
                "vms": [pools.vm.uuid],
                "settings": {"checkpointSnapshot": True, "copyRetention": 3},
                "vm_settings": {pools.vm.uuid: {"bypassCpuCheck": True}},
            }
        }
    )
    outcome = harness.run(forced, "dr")
    assert outcome.status == "success"
    warnings = _warnings(harness.store.get_run(outcome.run_id).to_dict())
    assert any("bypassCpuCheck" in w and "AMD EPYC" in w for w in warnings)
    newest = pools.replicas(DR_TAG, job)[-1]
    assert len(pools.replicas(DR_TAG, job)) == 2 and newest.power_state == "Suspended"


def test_copy_retention_zero_skips_replication_for_that_schedule(pools):
    harness = pools.harness
    config = harness.config(
        {
            "dr": {
                "mode": "full",
                "remotes": ["nas"],
                "srs": [pools.sr.uuid],
                "vms": [pools.vm.uuid],
                "settings": {"copyRetention": 0},
            }
        }
    )
    assert harness.run(config, "dr").status == "success"
    assert not pools.replicas(DR_TAG, job_id(harness, config, "dr"))
    assert list(harness.remote_dir.rglob("*.xva"))


def sr_transfers(harness, run_id):
    """{disk name: (isFull, bytes)} of the transfers to SRs of a run (from its task log)."""
    found = {}

    def walk(task):
        data = task.get("data") or {}
        if task.get("name") == "export" and data.get("type") == "SR":
            assert data.get("disk") not in found
            found[data.get("disk")] = (data.get("isFull"), task.get("size"))
        for child in task.get("tasks") or []:
            walk(child)

    for task in harness.store.get_run(run_id).to_dict().get("tasks") or []:
        walk(task)
    return found


def test_memory_replication_is_incremental(pools):
    harness, sim = pools.harness, pools.sim
    config = harness.config(
        {
            "ram": {
                "mode": "delta",
                "remotes": ["nas"],
                "srs": [pools.sr.uuid],
                "vms": [pools.vm.uuid],
                "settings": {"checkpointSnapshot": True, "copyRetention": 2, "exportRetention": 5},
            }
        }
    )
    job = job_id(harness, config, "ram")
    vdi = pools.vm.disks[0].vdi_uuid
    first = harness.run(config, "ram")
    assert first.status == "success"
    [replica] = pools.replicas(CR_TAG, job)
    assert replica.power_state == "Suspended"
    memories = {pools.content(replica.suspend_vdi_uuid)}
    transfers = sr_transfers(harness, first.run_id)
    assert [full for full, _ in transfers.values()] == [True, True]

    for run in range(3):
        changed = set(sim.randomize_blocks(vdi, 0.1, seed=20 + run))
        if run == 1:
            # stale data where the new memory image has none: it must not survive the update
            sim.write(replica.suspend_vdi_uuid, 2 * MiB + 512, b"\x5a" * 4096)
        outcome = harness.run(config, "ram")
        assert outcome.status == "success"
        [again] = pools.replicas(CR_TAG, job)
        assert again.uuid == replica.uuid  # updated in place, not made anew
        assert again.power_state == "Suspended"
        checkpoint = pools.job_snapshots()[-1]
        assert checkpoint.suspend_vdi_uuid
        memory = pools.content(again.suspend_vdi_uuid)
        used = pools.used_blocks(checkpoint.suspend_vdi_uuid)
        assert memory == pools.content(checkpoint.suspend_vdi_uuid)
        assert memory not in memories  # this run's memory image, not an old one
        memories.add(memory)
        assert pools.content(again.disks[0].vdi_uuid) == pools.content(checkpoint.disks[0].vdi_uuid)
        transfers = sr_transfers(harness, outcome.run_id)
        disk_full, disk_size = transfers.pop(pools.vm.disks[0].name)
        # only the changed 2 MiB blocks of the disk travelled (plus the VHD's structures)...
        assert not disk_full
        assert len(changed) * 2 * MiB <= disk_size < (len(changed) + 1) * 2 * MiB
        # ...and the whole memory image
        [(memory_full, memory_size)] = transfers.values()
        assert memory_full and memory_size >= len(used) * 2 * MiB
    replica_snapshots = [
        v for v in pools.target.inventory().vms if v.is_snapshot and v.snapshot_of == replica.uuid
    ]
    assert len(replica_snapshots) == 2  # copyRetention
    # the remote got the same exports: one disk VHD and one memory VHD per run
    assert len(list(harness.remote_dir.rglob("*.vhd"))) == 8
    # the updated replica resumes where the VM was at the last checkpoint
    resume(pools.target, replica.uuid)
    assert pools.target.inventory().vm(replica.uuid).power_state == "Running"


def test_a_memory_replica_is_made_anew_when_its_vm_no_longer_matches(pools):
    harness = pools.harness
    config = harness.config(
        {
            "ram": {
                "mode": "delta",
                "srs": [pools.sr.uuid],
                "vms": [pools.vm.uuid],
                "settings": {"checkpointSnapshot": True, "copyRetention": 1},
            }
        }
    )
    job = job_id(harness, config, "ram")
    assert harness.run(config, "ram").status == "success"
    [first] = pools.replicas(CR_TAG, job)
    # someone resumes the replica's memory and suspends it again: a new suspend VDI
    pools.target.update_vm(first.uuid, blocked_operations={"start": None, "start_on": None})
    resume(pools.target, first.uuid)
    pools.target.call("VM.suspend", pools.target._ref("VM", first.uuid))
    pools.target.update_vm(
        first.uuid, blocked_operations={"start": START_BLOCKED, "start_on": START_BLOCKED}
    )
    outcome = harness.run(config, "ram")
    assert outcome.status == "success"
    assert "resumed and suspended again" in str(harness.store.get_run(outcome.run_id).to_dict())
    replicas = pools.replicas(CR_TAG, job)
    assert len(replicas) == 2
    second = replicas[-1]
    assert second.uuid != first.uuid and second.power_state == "Suspended"
    checkpoint = pools.job_snapshots()[-1]
    assert pools.content(second.suspend_vdi_uuid) == pools.content(checkpoint.suspend_vdi_uuid)
    # a run without memory never feeds a Suspended replica: a Halted one is made
    plain = harness.config(
        {"ram": {"mode": "delta", "srs": [pools.sr.uuid], "vms": [pools.vm.uuid]}}
    )
    assert harness.run(plain, "ram").status == "success"
    newest = pools.replicas(CR_TAG, job)[-1]
    assert newest.uuid not in {first.uuid, second.uuid}
    assert newest.power_state == "Halted"
    # copyRetention 1: the superseded Suspended replica went; the resumed one is the user's
    left = {v.uuid for v in pools.target.inventory().vms}
    assert second.uuid not in left and first.uuid in left
    # with memory again, after the VM rebooted on a CPU with other features: the replica's
    # flags could not resume this memory image, so a new Suspended replica is made
    harness.run(config, "ram")
    third = pools.replicas(CR_TAG, job)[-1]
    assert third.power_state == "Suspended"
    db = pools.sim.pool(0).xapi.db
    ref = db.resolve("VM", pools.vm.uuid)
    flags = dict(db.record("VM", ref)["last_boot_CPU_flags"])
    db.update("VM", ref, last_boot_CPU_flags={**flags, "features": "00000001-00000000"})
    outcome = harness.run(config, "ram")
    assert outcome.status == "success", str(harness.store.get_run(outcome.run_id).to_dict())
    assert "booted on another CPU" in str(harness.store.get_run(outcome.run_id).to_dict())
    fourth = pools.replicas(CR_TAG, job)[-1]
    assert fourth.uuid != third.uuid and fourth.power_state == "Suspended"
    assert fourth.last_boot_cpu_flags["features"] == "00000001-00000000"


def test_bypass_cpu_check_replicates_with_a_warning(pools):
    harness, sim = pools.harness, pools.sim
    jobs = {
        "ram": {
            "mode": "delta",
            "srs": [pools.sr.uuid],
            "vms": [pools.vm.uuid],
            "settings": {"checkpointSnapshot": True},
        }
    }
    [host] = pools.target.inventory().pools[0].hosts
    sim.set_host_cpu(host.uuid, "AuthenticAMD")
    refused = harness.run(harness.config(jobs), "ram")
    assert refused.status == "failure"
    text = str(harness.store.get_run(refused.run_id).to_dict())
    assert "Intel(R) Xeon(R)" in text and "AMD EPYC" in text and "bypassCpuCheck" in text
    jobs["ram"]["settings"]["bypassCpuCheck"] = True
    config = harness.config(jobs)
    job = job_id(harness, config, "ram")
    for _ in range(2):
        outcome = harness.run(config, "ram")
        assert outcome.status == "success"
        run = harness.store.get_run(outcome.run_id).to_dict()
        warnings = [w for w in _warnings(run) if "bypassCpuCheck" in w]
        assert warnings and "Intel(R) Xeon(R)" in warnings[0] and "AMD EPYC" in warnings[0]
        [replica] = pools.replicas(CR_TAG, job)
        assert replica.power_state == "Suspended"
        checkpoint = pools.job_snapshots()[-1]
        assert pools.content(replica.suspend_vdi_uuid) == pools.content(checkpoint.suspend_vdi_uuid)
    # as warned: XAPI refuses to resume it unless forced
    with pytest.raises(Exception, match="VM_INCOMPATIBLE_WITH_THIS_HOST"):
        resume(pools.target, replica.uuid)


def _warnings(run):
    found = []

    def walk(task):
        for warning in task.get("warnings") or []:
            found.append(str(warning.get("message", warning)))
        for child in task.get("tasks") or []:
            walk(child)

    walk(run)
    for task in run.get("tasks") or []:
        walk(task)
    return found


def test_cpu_check_names_both_cpus_and_the_missing_features():
    sr = StorageRepository("sr-1", "Shared storage", "pool-1")
    host_cpu = CpuInfo("GenuineIntel", features_hvm="00000001-00000000", model_name="Old Xeon")
    host = Host("h1", "host 1", "pool-1", host_cpu)
    pool = Pool("pool-1", "dr", "xcp-ng", hosts=(host,), srs=(sr,))
    flags = {"vendor": "GenuineIntel", "features": "00000011-00000100"}
    vm = Vm("vm-1", "web", "pool-0", "Running", last_boot_cpu_flags=flags)
    source = CpuInfo("GenuineIntel", model_name="New Xeon")
    with pytest.raises(XobackupError) as refused:
        check_memory_target(vm, vm, SrTarget(sr, pool, driver=None), source_cpu=source)
    message = str(refused.value)
    assert "New Xeon" in message and "Old Xeon" in message
    assert "missing CPU features 00000010-00000100" in message
    assert "word 0 bit 4, word 1 bit 8" in message
    forced = check_memory_target(
        vm, vm, SrTarget(sr, pool, driver=None), source_cpu=source, force=True
    )
    assert forced and "missing CPU features 00000010-00000100" in forced
    assert missing_cpu_features("0000000f", "0000000f-ffffffff") == ""
    # a Citrix pool cannot create a Suspended VM: forcing does not change that
    citrix = Pool("pool-1", "ch", "citrix", hosts=(host,), srs=(sr,))
    with pytest.raises(XobackupError, match="only XCP-ng"):
        check_memory_target(vm, vm, SrTarget(sr, citrix, driver=None), force=True)


def test_a_running_replica_is_left_alone(pools):
    harness = pools.harness
    config = harness.config(
        {"cr": {"mode": "delta", "srs": [pools.sr.uuid], "vms": [pools.vm.uuid]}}
    )
    job = job_id(harness, config, "cr")
    assert harness.run(config, "cr").status == "success"
    [replica] = pools.replicas(CR_TAG, job)
    # the user takes the replica over: unblocks and starts it
    pools.target.update_vm(replica.uuid, blocked_operations={"start": None, "start_on": None})
    pools.target.call("VM.start", pools.target._ref("VM", replica.uuid), False, False)
    outcome = harness.run(config, "cr")
    assert outcome.status == "success"
    assert "can be started" in str(harness.store.get_run(outcome.run_id).to_dict())
    assert harness.run(config, "cr").status == "success"
    replicas = pools.replicas(CR_TAG, job)
    assert len(replicas) == 2  # the user's one, and the job's new one updated in place
    mine = pools.target.inventory().vm(replica.uuid)
    assert mine.power_state == "Running"
    newest = replicas[-1]
    assert newest.uuid != replica.uuid and newest.power_state == "Halted"
    snapshot = pools.job_snapshots()[-1]
    assert pools.content(newest.disks[0].vdi_uuid) == pools.content(snapshot.disks[0].vdi_uuid)


def test_a_checkpoint_falling_back_never_leaves_a_torn_suspended_replica(pools, monkeypatch):
    from xobackup_hypervisor_xcpng.driver import XapiDriver

    harness = pools.harness
    config = harness.config(
        {
            "ram": {
                "mode": "delta",
                "srs": [pools.sr.uuid],
                "vms": [pools.vm.uuid],
                "settings": {"checkpointSnapshot": True},
            }
        }
    )
    job = job_id(harness, config, "ram")
    assert harness.run(config, "ram").status == "success"
    [replica] = pools.replicas(CR_TAG, job)
    assert replica.power_state == "Suspended"
    original = XapiDriver.snapshot

    def stop_first(self, vm_uuid, name, **options):
        # the VM stops between the run's plan and its checkpoint: XAPI then refuses the
        # checkpoint and a plain snapshot (no memory) is taken
        if options.get("memory"):
            self.call("VM.hard_shutdown", self._ref("VM", vm_uuid))
        return original(self, vm_uuid, name, **options)

    monkeypatch.setattr(XapiDriver, "snapshot", stop_first)
    pools.sim.randomize_blocks(pools.vm.disks[0].vdi_uuid, 0.1, seed=3)
    outcome = harness.run(config, "ram")
    monkeypatch.undo()
    assert outcome.status == "failure"
    assert "no memory image" in str(harness.store.get_run(outcome.run_id).to_dict())
    # the Suspended replica took the new disks without their memory: it is gone, with its
    # snapshots, rather than left resumable
    left = pools.target.inventory().vms
    assert replica.uuid not in {v.uuid for v in left}
    assert not [v for v in left if v.snapshot_of == replica.uuid]
    # the VM is halted now: the next run makes a Halted replica from full disks
    outcome = harness.run(config, "ram")
    assert outcome.status == "success"
    [fresh] = pools.replicas(CR_TAG, job)
    assert fresh.power_state == "Halted"
    snapshot = pools.job_snapshots()[-1]
    assert pools.content(fresh.disks[0].vdi_uuid) == pools.content(snapshot.disks[0].vdi_uuid)


def test_a_failed_memory_update_never_leaves_a_torn_suspended_replica(pools):
    harness, sim = pools.harness, pools.sim
    config = harness.config(
        {
            "ram": {
                "mode": "delta",
                "remotes": ["nas"],
                "srs": [pools.sr.uuid],
                "vms": [pools.vm.uuid],
                "settings": {"checkpointSnapshot": True},
            }
        }
    )
    job = job_id(harness, config, "ram")
    assert harness.run(config, "ram").status == "success"
    [replica] = pools.replicas(CR_TAG, job)
    sim.randomize_blocks(pools.vm.disks[0].vdi_uuid, 0.1, seed=5)
    # the memory image's import breaks midway, after the disk's delta may have gone in
    sim.arm("/import_raw_vdi", "drop", after_bytes=1024 * 1024, pool=1, times=None)
    outcome = harness.run(config, "ram")
    sim.faults.clear()
    run = str(harness.store.get_run(outcome.run_id).to_dict())
    assert outcome.vm_status[pools.vm.uuid] == "success", run  # the remote got it
    assert "is destroyed" in run
    left = pools.target.inventory().vms
    assert replica.uuid not in {v.uuid for v in left}
    assert not [v for v in left if v.snapshot_of == replica.uuid]
    assert harness.run(config, "ram").status == "success"
    [fresh] = pools.replicas(CR_TAG, job)
    checkpoint = pools.job_snapshots()[-1]
    assert fresh.power_state == "Suspended"
    assert pools.content(fresh.suspend_vdi_uuid) == pools.content(checkpoint.suspend_vdi_uuid)
    assert pools.content(fresh.disks[0].vdi_uuid) == pools.content(checkpoint.disks[0].vdi_uuid)
