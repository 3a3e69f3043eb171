"""The ``xo:backup:*`` keys of a backup snapshot, on the snapshot VM and on each of its VDIs,
read with the official XenAPI SDK as Xen Orchestra would read them (xo-backups.md §7.4)."""

import re

import XenAPI

from tests.engine.test_backup_runs import guest_vms
from tests.engine.test_backup_settings import add_disk

JOB_KEYS = ("xo:backup:job", "xo:backup:schedule", "xo:backup:vm", "xo:backup:datetime")


def sdk(sim):
    session = XenAPI.Session(sim.pool(0).url)
    session.xenapi.login_with_password(sim.username, sim.password)
    return session


def snapshot_disks(x, snapshot):
    """other_config of each disk VDI of a snapshot."""
    found = []
    for vbd in x.VM.get_VBDs(snapshot):
        if x.VBD.get_type(vbd) == "Disk":
            found.append(x.VDI.get_other_config(x.VBD.get_VDI(vbd)))
    return found


def job_snapshots(x, vm_uuid, job_id):
    vm = x.VM.get_by_uuid(vm_uuid)
    snapshots = [
        (ref, x.VM.get_other_config(ref))
        for ref in x.VM.get_snapshots(vm)
        if x.VM.get_other_config(ref).get("xo:backup:job") == job_id
    ]
    return sorted(snapshots, key=lambda item: item[1]["xo:backup:datetime"])


def test_snapshot_vdis_carry_the_backup_keys(harness):
    sim = harness.sim
    vm_uuid = next(iter(guest_vms(sim)))
    add_disk(sim, vm_uuid, "data disk")
    config = harness.config(
        {"j": {"mode": "delta", "remotes": ["nas"], "vms": [vm_uuid]}},
        schedules={"nightly": {"job": "j", "cron": "0 3 * * *", "exportRetention": 3}},
    )
    job_id = config.job_id("j")
    session = sdk(sim)
    x = session.xenapi
    try:
        for run in range(2):
            assert harness.run(config, "j", "nightly").status == "success"
            [(snapshot, vm_keys)] = job_snapshots(x, vm_uuid, job_id)[-1:]
            assert vm_keys["xo:backup:job"] == job_id
            assert vm_keys["xo:backup:schedule"] == "nightly"
            assert vm_keys["xo:backup:vm"] == vm_uuid
            assert re.fullmatch(r"\d{8}T\d\d:\d\d:\d\dZ", vm_keys["xo:backup:datetime"])
            disks = snapshot_disks(x, snapshot)
            assert len(disks) == 2
            for disk_keys in disks:
                # the same job keys as the snapshot VM, so a base is found per disk
                assert {k: disk_keys.get(k) for k in JOB_KEYS} == {k: vm_keys[k] for k in JOB_KEYS}
                assert disk_keys["xo:backup:exported"] == "true"
                assert disk_keys["xo:backup:deltaChainLength"] == str(run)
    finally:
        session.xenapi.session.logout()


def test_a_failed_export_leaves_no_exported_disk(harness):
    sim = harness.sim
    vm_uuid = next(iter(guest_vms(sim)))
    config = harness.config({"j": {"mode": "delta", "remotes": ["nas"], "vms": [vm_uuid]}})
    job_id = config.job_id("j")
    assert harness.run(config, "j").status == "success"
    sim.arm("/export_raw_vdi", "drop", after_bytes=600, times=None)
    assert harness.run(config, "j").status == "failure"
    session = sdk(sim)
    x = session.xenapi
    try:
        # only the first run's snapshot remains, and only it is marked as a base on its disks
        [(_snapshot, vm_keys)] = job_snapshots(x, vm_uuid, job_id)
        assert vm_keys["xo:backup:exported"] == "true"
        exported = [
            x.VDI.get_other_config(vdi).get("xo:backup:exported")
            for vdi in x.VDI.get_all()
            if x.VDI.get_other_config(vdi).get("xo:backup:job") == job_id
        ]
        assert exported == ["true"]
    finally:
        session.xenapi.session.logout()
