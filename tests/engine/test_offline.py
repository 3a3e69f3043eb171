"""Offline backups (``offlineBackup``, ``offlineSnapshot``): the VM's power cycle, seen in the
order of the API calls the simulator received, and its state after the run."""

import json

import pytest
import XenAPI
from xobackup_remote_local import LocalRemote

from tests.engine.test_backup_runs import guest_vms
from xobackup_core.engine.repository import BackupRepository
from xobackup_core.errors import ConfigError

POWER_CALLS = (
    "Async.VM.clean_shutdown",
    "Async.VM.hard_shutdown",
    "Async.VM.start",
    "Async.VM.snapshot",
)


def vm_in_state(sim, state):
    return next(uuid for uuid, record in guest_vms(sim).items() if record["power_state"] == state)


def power_state(sim, vm_uuid):
    return guest_vms(sim)[vm_uuid]["power_state"]


def vm_ref(sim, vm_uuid):
    return next(ref for ref, record in sim.vms() if record["uuid"] == vm_uuid)


def sequence(sim, calls, vm_uuid):
    """The power operations, snapshots and exports on one VM, in the order they came."""
    ref = vm_ref(sim, vm_uuid)
    steps = []
    for _pool, method, args in calls:
        if method in POWER_CALLS and args and args[0] == ref:
            steps.append(method.split(".")[-1])
        elif method == "task.create" and args and str(args[0]).startswith("xobackup export"):
            steps.append("export")
    return steps


def backups(harness, vm_uuid):
    return BackupRepository(LocalRemote(harness.remote_dir)).list_backups(vm_uuid)


def job(vm_uuid, mode, **settings):
    return {"j": {"mode": mode, "remotes": ["nas"], "vms": [vm_uuid], "settings": settings}}


def run_log(harness, outcome):
    return json.dumps(harness.store.get_run(outcome.run_id).to_dict())


def test_offline_snapshot_restarts_the_vm_before_the_export(harness):
    sim = harness.sim
    vm_uuid = vm_in_state(sim, "Running")
    config = harness.config(job(vm_uuid, "delta", offlineSnapshot=True))
    calls = sim.record_calls()
    outcome = harness.run(config, "j")
    assert outcome.status == "success", run_log(harness, outcome)
    assert sequence(sim, calls, vm_uuid) == ["clean_shutdown", "snapshot", "start", "export"]
    assert power_state(sim, vm_uuid) == "Running"
    [backup] = backups(harness, vm_uuid)
    assert backup.mode == "delta"
    # the snapshot was taken of a halted VM: crash-free by construction
    assert backup.data["vmSnapshot"]["snapshot_info"]["power-state-at-snapshot"] == "Halted"


def test_offline_backup_exports_the_vm_itself_while_it_is_down(harness):
    sim = harness.sim
    vm_uuid = vm_in_state(sim, "Running")
    config = harness.config(job(vm_uuid, "full", offlineBackup=True))
    calls = sim.record_calls()
    outcome = harness.run(config, "j")
    assert outcome.status == "success", run_log(harness, outcome)
    assert sequence(sim, calls, vm_uuid) == ["clean_shutdown", "export", "start"]
    assert power_state(sim, vm_uuid) == "Running"
    [backup] = backups(harness, vm_uuid)
    assert backup.mode == "full" and backup.size > 0
    assert backup.data["vmSnapshot"]["uuid"] == vm_uuid  # no snapshot: the VM itself
    snapshots = [r for _, r in sim.pool(0).xapi.db.tables["VM"].items() if r["is_a_snapshot"]]
    assert not snapshots


def test_the_vm_tag_turns_offline_snapshot_on(harness):
    sim = harness.sim
    vm_uuid = vm_in_state(sim, "Running")
    session = XenAPI.Session(sim.pool(0).url)
    session.xenapi.login_with_password(sim.username, sim.password)
    session.xenapi.VM.add_tags(vm_ref(sim, vm_uuid), "xo-offline-backup")
    session.xenapi.session.logout()
    calls = sim.record_calls()
    outcome = harness.run(harness.config(job(vm_uuid, "full")), "j")
    assert outcome.status == "success", run_log(harness, outcome)
    assert sequence(sim, calls, vm_uuid) == ["clean_shutdown", "snapshot", "start", "export"]


def test_the_vm_is_started_again_when_the_export_fails(harness):
    sim = harness.sim
    vm_uuid = vm_in_state(sim, "Running")
    config = harness.config(job(vm_uuid, "full", offlineBackup=True))
    sim.arm("/export", "drop", after_bytes=1024 * 1024)
    calls = sim.record_calls()
    outcome = harness.run(config, "j")
    assert outcome.status == "failure"
    assert sequence(sim, calls, vm_uuid) == ["clean_shutdown", "export", "start"]
    assert power_state(sim, vm_uuid) == "Running"
    assert backups(harness, vm_uuid) == []


def test_the_vm_is_started_again_when_the_snapshot_fails(harness):
    sim = harness.sim
    vm_uuid = vm_in_state(sim, "Running")
    config = harness.config(job(vm_uuid, "delta", offlineSnapshot=True))
    sim.arm("VM.snapshot", "error", code="SR_BACKEND_FAILURE_44", params=["", "no space", ""])
    calls = sim.record_calls()
    outcome = harness.run(config, "j")
    assert outcome.status == "failure"
    assert "SR_BACKEND_FAILURE_44" in run_log(harness, outcome)
    assert sequence(sim, calls, vm_uuid) == ["clean_shutdown", "snapshot", "start"]
    assert power_state(sim, vm_uuid) == "Running"


def test_a_halted_vm_is_neither_shut_down_nor_started(harness):
    sim = harness.sim
    vm_uuid = vm_in_state(sim, "Halted")
    config = harness.config(job(vm_uuid, "full", offlineBackup=True))
    calls = sim.record_calls()
    outcome = harness.run(config, "j")
    assert outcome.status == "success", run_log(harness, outcome)
    assert sequence(sim, calls, vm_uuid) == ["export"]
    assert power_state(sim, vm_uuid) == "Halted"
    assert len(backups(harness, vm_uuid)) == 1


def test_a_guest_that_ignores_the_shutdown_is_powered_off_after_the_delay(harness):
    sim = harness.sim
    vm_uuid = vm_in_state(sim, "Running")
    sim.set_guest_shutdown(vm_uuid, "ignore")
    config = harness.config(job(vm_uuid, "delta", offlineSnapshot=True, forceShutdownAfter="500ms"))
    calls = sim.record_calls()
    outcome = harness.run(config, "j")
    assert outcome.status == "success", run_log(harness, outcome)
    steps = sequence(sim, calls, vm_uuid)
    assert steps == ["clean_shutdown", "hard_shutdown", "snapshot", "start", "export"]
    assert power_state(sim, vm_uuid) == "Running"


def test_offline_backup_with_snapshot_retention_is_refused_when_the_config_loads(harness):
    vm_uuid = vm_in_state(harness.sim, "Running")
    with pytest.raises(
        ConfigError, match=r"jobs\.j\.settings: offlineBackup cannot go with snapshotRetention 1"
    ):
        harness.config(job(vm_uuid, "full", offlineBackup=True, snapshotRetention=1))
    with pytest.raises(ConfigError, match=r"schedules\.nightly: .*use offlineSnapshot instead"):
        harness.config(
            {"j": {"mode": "delta", "remotes": ["nas"], "vms": [vm_uuid]}},
            schedules={"nightly": {"job": "j", "cron": "0 3 * * *", "offlineBackup": True}},
        )


def test_offline_backup_in_vm_settings_is_refused_before_the_vm_is_touched(harness):
    sim = harness.sim
    vm_uuid = vm_in_state(sim, "Running")
    settings = {vm_uuid: {"offlineBackup": True, "snapshotRetention": 1}}
    config = harness.config({"j": {**job(vm_uuid, "full")["j"], "vm_settings": settings}})
    calls = sim.record_calls()
    outcome = harness.run(config, "j")
    assert outcome.status == "failure"
    assert "offlineBackup cannot go with snapshotRetention 1" in run_log(harness, outcome)
    assert sequence(sim, calls, vm_uuid) == []
    assert power_state(sim, vm_uuid) == "Running"


def test_offline_backup_of_a_delta_job_is_refused(harness):
    sim = harness.sim
    vm_uuid = vm_in_state(sim, "Running")
    settings = {vm_uuid: {"offlineBackup": True}}
    config = harness.config({"j": {**job(vm_uuid, "delta")["j"], "vm_settings": settings}})
    calls = sim.record_calls()
    outcome = harness.run(config, "j")
    assert outcome.status == "failure"
    assert "use offlineSnapshot instead" in run_log(harness, outcome)
    assert sequence(sim, calls, vm_uuid) == []
    assert power_state(sim, vm_uuid) == "Running"
