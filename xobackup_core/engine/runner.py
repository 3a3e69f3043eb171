"""Running a backup job: selection, snapshots, exports to every target, retention, logs.

A run follows Xen Orchestra's semantics (reference: xo-backups.md §1–5, §7–8):

* the job's VMs are selected when the run starts (smart rules see today's VMs);
* each VM is snapshotted (``[XO Backup <job>] <vm>``, ``xo:backup:*`` keys), migration is
  blocked while it is backed up, and one export stream feeds every remote of the job;
* full mode writes ``<ts>.xva`` (+ ``.xva.checksum``), delta mode one VHD per disk under
  ``vdis/<job>/<vdi>/``, chained onto the previous backup; the metadata JSON comes last;
* a delta is only taken against a base snapshot marked ``xo:backup:exported`` that every
  remote still holds, otherwise the disk goes full and the log says why;
* a failing remote is dropped with a warning, the VM fails only when all remotes failed;
* retention then removes old backups (merging deltas into the next kept one) and rotates the
  job's snapshots.

Per-pool limits (:mod:`xobackup_core.engine.limits`) bound snapshots and exports across every
job of the process; the job's ``concurrency`` bounds VMs in flight.
"""

from __future__ import annotations

import functools
import hashlib
import posixpath
import threading
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from xobackup_core.config import Config, offline_settings_problem
from xobackup_core.engine.disk_sinks import VhdDirectorySink, VhdFileSink
from xobackup_core.engine.limits import OPERATIONS, LimitValues, PoolLimiter, shared_limiter
from xobackup_core.engine.progress import Progress, StoredProgress, TeeProgress
from xobackup_core.engine.replication import Replication, SrTarget, open_sr_targets
from xobackup_core.engine.repository import BackupMetadata, BackupRepository, format_timestamp
from xobackup_core.engine.retention import entries_to_delete, period_tags
from xobackup_core.engine.streams import (
    Fanout,
    RateLimiter,
    Target,
    describe_error,
)
from xobackup_core.errors import (
    CancelledError,
    FormatError,
    RemoteError,
    RemoteNotFoundError,
    UsageError,
    XobackupError,
)
from xobackup_core.formats.vhd_chain import open_vhd_chain
from xobackup_core.formats.vhd_directory import (
    is_alias,
    merge_chain,
    open_remote_disk,
    remote_disk_opener,
    resolve_alias,
    resume_directory_merges,
)
from xobackup_core.formats.vhd_merge import resume_merges
from xobackup_core.formats.vhd_stream import VhdStreamReader
from xobackup_core.formats.vhd_writer import ParentLink, plan_vhd_stream
from xobackup_core.formats.xva import is_valid_xva
from xobackup_core.hypervisor import Disk, HypervisorDriver, Inventory, Vm
from xobackup_core.logs.recorder import RunRecorder, TaskHandle
from xobackup_core.logs.records import Status
from xobackup_core.plugins import Plugins
from xobackup_core.remote import Remote, join_path
from xobackup_core.scheduler.guard import Deadline, RunGuard, RunTimeoutError
from xobackup_core.scheduler.locks import VmLocks

MIGRATION_BLOCKED = "VM migration is blocked during backup"
NO_BACKUP_DISK_MARK = "[NOBAK]"
XVA_CHECKSUM_IDS = {"md5": "1", "sha256": "5"}
"""``.xva.checksum`` holds ``$<id>$$<hex digest>`` (crypt-like); Xen Orchestra writes MD5 and
verifies whichever of MD5 (1), SHA-256 (5) or SHA-512 (6) the file names."""


class NamedDigest(Protocol):
    """A hashlib object or a :class:`~xobackup_core.engine.streams.BackgroundDigest`."""

    @property
    def name(self) -> str: ...

    def hexdigest(self) -> str: ...


def xva_checksum(digest: NamedDigest) -> str:
    """The ``.xva.checksum`` text of a finished XVA's digest."""
    return f"${XVA_CHECKSUM_IDS[digest.name]}$${digest.hexdigest()}"


@functools.cache
def xva_checksum_algorithm() -> str:
    """The faster of MD5 and SHA-256 on this CPU, measured once per process.

    The digest runs beside a full backup's transfer and can cap it: MD5 goes at about
    650 MB/s on one core, SHA-256 at about 1.7 GB/s where the CPU has SHA extensions (and
    slower than MD5 where it has not). Xen Orchestra verifies either.
    """
    sample = bytes(range(256)) * 8192  # 2 MiB
    timings = {}
    for name in XVA_CHECKSUM_IDS:
        digest = hashlib.new(name, usedforsecurity=False)
        start = time.perf_counter()
        for _ in range(4):
            digest.update(sample)
        timings[name] = time.perf_counter() - start
    return min(timings, key=timings.__getitem__)


OFFLINE_BACKUP_TAG = "xo-offline-backup"
"""A VM tag that turns ``offlineSnapshot`` on for that VM (XO, xo-backups.md §6)."""


def check_offline_settings(settings: Mapping[str, Any], mode: str, where: str) -> None:
    """Refuse the offline combinations Xen Orchestra refuses (config.offline_settings_problem);
    the config refuses them at load time too, except in VM-level settings."""
    problem = offline_settings_problem(settings, mode)
    if problem:
        raise UsageError(f"{where}: {problem}")


def snapshot_name(job_name: str, vm_name: str) -> str:
    return f"[XO Backup {job_name}] {vm_name}"


def other_config_datetime(timestamp_ms: int) -> str:
    """``xo:backup:datetime``: UTC with colons (``20260801T04:00:00Z``), as XO writes it."""
    compact = format_timestamp(timestamp_ms)
    return f"{compact[:11]}:{compact[11:13]}:{compact[13:15]}Z"


@dataclass
class RunOutcome:
    run_id: str
    status: str
    vm_status: dict[str, str] = field(default_factory=dict)


@dataclass
class RemoteTarget:
    """A remote the run writes to."""

    key: str
    remote: Remote
    repository: BackupRepository


class JobRunner:
    """Runs jobs of one config. Thread-safe; share one per process (limits are per process)."""

    def __init__(
        self,
        config: Config,
        plugins: Plugins,
        log_store: Any,
        *,
        limiter: PoolLimiter | None = None,
        clock: Callable[[], float] = time.time,
        drivers: Mapping[str, HypervisorDriver] | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.config = config
        self.progress = progress or Progress()
        self.plugins = plugins
        self.log_store = log_store
        limits = config.limits
        self.limiter = limiter or shared_limiter(
            LimitValues(limits.snapshots, limits.disk_exports, limits.vm_exports)
        )
        self.clock = clock
        self._drivers: dict[str, HypervisorDriver] = dict(drivers or {})

    # -- plumbing ----------------------------------------------------------------------------
    def driver(self, server_key: str) -> HypervisorDriver:
        if server_key not in self._drivers:
            self._drivers[server_key] = self.plugins.hypervisor(self.config.server_view(server_key))
        return self._drivers[server_key]

    def close(self) -> None:
        for driver in self._drivers.values():
            driver.close()
        self._drivers.clear()

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    # -- a run -------------------------------------------------------------------------------
    def run(self, job_key: str, schedule_key: str | None = None) -> RunOutcome:
        """Run ``job_key`` once (as ``schedule_key`` for retention) and return its outcome."""
        job = self.config.jobs[job_key]
        job_view = self.config.job_view(job_key)
        settings = self.config.effective_settings(job_key, schedule_key=schedule_key)
        # Runs left pending by a process that died are closed first: never pending forever.
        self.log_store.mark_interrupted()
        recorder = self.log_store.start_run(
            job_view["id"],
            job_view["name"],
            schedule_id=schedule_key,
            data={"mode": job.mode, "reportWhen": settings["reportWhen"]},
            listener=self.plugins,
        )
        outcome = RunOutcome(run_id=recorder.run_id, status="pending")
        deadline = Deadline(
            settings["timeout"] or None, what=f"job {job_view['name']!r}", setting="timeout"
        )
        interrupted = False
        with recorder, RunGuard(self.log_store, recorder.run_id, deadline) as guard:
            try:
                skipped = self._run(
                    job_key, schedule_key, job_view, settings, recorder, outcome, guard
                )
            except KeyboardInterrupt:
                interrupted = True
                skipped = None
            if isinstance(guard.error, CancelledError):
                recorder.finish(guard.error, status=Status.CANCELLED)
            elif guard.error is not None:
                recorder.finish(guard.error)
            elif skipped:
                recorder.finish(skipped, status=Status.SKIPPED)
        outcome.status = recorder.record.status.value
        if interrupted:
            raise KeyboardInterrupt
        return outcome

    def _run(
        self,
        job_key: str,
        schedule_key: str | None,
        job_view: dict[str, Any],
        settings: dict[str, Any],
        recorder: RunRecorder,
        outcome: RunOutcome,
        guard: RunGuard,
    ) -> str | None:
        """Back up every selected VM; returns the reason when the run is skipped."""
        config = self.config
        job = config.jobs[job_key]
        servers = job.servers or list(config.servers)
        inventories: dict[str, Inventory] = {}
        for server in servers:
            inventories[server] = self.driver(server).inventory()
        pool_server = {
            pool.uuid: server for server, inv in inventories.items() for pool in inv.pools
        }
        merged = Inventory(
            pools=tuple(p for inv in inventories.values() for p in inv.pools),
            vms=tuple(v for inv in inventories.values() for v in inv.vms),
        )
        check_offline_settings(settings, job.mode, f"job {job_view['name']!r}")
        vms = self.plugins.select_vms(job_view, merged)
        recorder.info("vms", {"vms": [vm.uuid for vm in vms]})
        if not vms:
            return "no VMs match this pattern"
        remote_names = job.remotes
        if job.remotes and settings["exportRetention"] == 0:
            recorder.info("exportRetention is 0 for this schedule: no backup to remotes")
            remote_names = []
        sr_uuids = job.srs
        if job.srs and settings["copyRetention"] == 0:
            recorder.info("copyRetention is 0 for this schedule: no replication to SRs")
            sr_uuids = []
        sr_targets = open_sr_targets(sr_uuids, inventories, self.driver, recorder.warning)
        if sr_uuids and not sr_targets and not remote_names:
            raise XobackupError("no SR of the job was found in the configured servers")
        targets = self._open_remotes(remote_names, recorder)
        if remote_names and not targets:
            raise XobackupError("no remote of the job could be opened")
        if not targets and not sr_targets and settings["snapshotRetention"] <= 0:
            return "nothing to do: no remote to write to and no snapshotRetention"
        limiter = RateLimiter(int(settings["maxExportRate"] or 0))
        workers = settings["concurrency"]
        if not workers:
            # 0: the job sets no bound. Every step of a VM's backup that loads a pool holds
            # one of the pool's slots, so more VMs in flight than all their pools' slots only
            # wait on semaphores while their threads fight over the interpreter (a 1000-VM
            # job spent more time switching threads than backing up).
            pools = {vm.pool_uuid for vm in vms}
            slots = sum(getattr(self.limiter.values, op) for op in OPERATIONS)
            workers = min(len(vms), slots * len(pools))
        # the run log gets the progress too, for readers in other processes (xobackup serve)
        progress = TeeProgress(self.progress, StoredProgress(self.log_store, recorder.run_id))

        def backup_one(vm: Vm) -> None:
            vm_settings = config.effective_settings(
                job_key, schedule_key=schedule_key, vm_uuid=vm.uuid
            )
            status = "failure"
            progress.vm_started(vm.uuid, vm.name)
            try:
                with recorder.task(
                    "backup VM", {"type": "VM", "id": vm.uuid, "name_label": vm.name}
                ) as vm_task:
                    backup = _VmBackup(
                        runner=self,
                        guard=guard,
                        deadline=guard.deadline.child(
                            vm_settings["vmTimeout"] or None, what=f"VM {vm.name}"
                        ),
                        driver=self.driver(pool_server[vm.pool_uuid]),
                        inventory=merged,
                        vm=vm,
                        job_view=job_view,
                        schedule_key=schedule_key,
                        settings=vm_settings,
                        targets=targets,
                        sr_targets=sr_targets,
                        recorder=recorder,
                        task=vm_task,
                        rate=limiter,
                        progress=progress,
                    )
                    backup.run()
                status = "success"
            except Exception:  # recorded on the VM task; the other VMs go on
                status = "failure"
            outcome.vm_status[vm.uuid] = status
            progress.vm_finished(vm.uuid, status)

        # The job itself is locked on each remote, so two processes that do not share a run
        # log (two hosts, say) never run it at once against the same remotes.
        owner = f"job {job_view['name']} (run {recorder.run_id})"
        job_lock = f"job-{job_view['id']}"
        with VmLocks({t.key: t.remote for t in targets}, job_lock, owner) as refused:
            if refused:
                key, error = next(iter(refused.items()))
                return f"the job is already running (remote {key!r}: {error})"
            with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="vm") as pool:
                futures = [pool.submit(backup_one, vm) for vm in vms]
                try:
                    for future in futures:
                        future.result()
                except KeyboardInterrupt:
                    # Ctrl-C: every VM stops its transfers now; the executor waits for them.
                    guard.stop_now(CancelledError("interrupted by the user (Ctrl-C)"))
                    for future in futures:
                        future.cancel()
                    raise
        return None

    def _open_remotes(self, names: Sequence[str], recorder: RunRecorder) -> list[RemoteTarget]:
        targets = []
        for name in names:
            remote_config = self.config.remotes[name]
            if not remote_config.enabled:
                recorder.warning(f"remote {name!r} is disabled: skipped", {"remote": name})
                continue
            try:
                remote = self.plugins.remote(remote_config.url, remote_config.plugin_options(name))
            except XobackupError as error:
                recorder.warning(f"remote {name!r} cannot be used: {error}", {"remote": name})
                continue
            targets.append(RemoteTarget(name, remote, BackupRepository(remote)))
        return targets


def resume_all_merges(remote: Remote, folder: str) -> list[str]:
    """Finish interrupted merges in a disk folder: VhdDirectory ones, then VHD-file ones.
    Returns the merged disks' paths."""
    return resume_directory_merges(remote, folder) + resume_merges(remote, folder)


def delete_disk(remote: Remote, path: str) -> None:
    """Delete a VHD file, or a VhdDirectory alias with the directory it points to."""
    if is_alias(path):
        try:
            remote.delete_tree(resolve_alias(remote, path))
        except (FormatError, RemoteError):
            pass  # a dangling alias: the data is already gone
    remote.delete(path, missing_ok=True)


class _VmBackup:
    """The backup of one VM in one run."""

    def __init__(
        self,
        *,
        runner: JobRunner,
        guard: RunGuard,
        deadline: Deadline,
        driver: HypervisorDriver,
        inventory: Inventory,
        vm: Vm,
        job_view: Mapping[str, Any],
        schedule_key: str | None,
        settings: Mapping[str, Any],
        targets: list[RemoteTarget],
        recorder: RunRecorder,
        task: TaskHandle,
        rate: RateLimiter,
        sr_targets: Sequence[SrTarget] = (),
        progress: Progress | None = None,
    ) -> None:
        self.runner = runner
        self.progress = progress or runner.progress
        self.driver = driver
        self.inventory = inventory
        self.vm = vm
        self.job = job_view
        self.job_id = str(job_view["id"])
        schedule = runner.config.schedules.get(schedule_key) if schedule_key else None
        # A schedule may carry XO's schedule id under a readable config key: backups,
        # snapshots and retention then continue that XO schedule.
        self.schedule_id = (schedule.id if schedule is not None else None) or schedule_key or ""
        self.settings = settings
        self.targets = list(targets)
        self.recorder = recorder
        self.task = task
        self.rate = rate
        self.limiter = runner.limiter
        self.dropped: list[str] = []
        self._targets_lock = threading.Lock()
        self.guard = guard
        self.deadline = deadline
        self._streams: set[Any] = set()
        offline_snapshot = bool(settings["offlineSnapshot"]) or OFFLINE_BACKUP_TAG in vm.tags
        self.start_after: str | None = None
        """``backup`` or ``snapshot``: this run shuts the (Running) VM down and starts it
        again after the export or right after the snapshot (XO's offline modes, §3.2)."""
        if vm.power_state == "Running":
            if settings["offlineBackup"]:
                self.start_after = "backup"
            elif offline_snapshot:
                self.start_after = "snapshot"
        self.stopped = False
        """This run has shut the VM down and not started it again yet."""
        self.runs_at_snapshot = vm.power_state == "Running" and self.start_after is None
        """The VM runs when it is snapshotted (so a memory backup has memory to keep)."""
        self.replication = Replication(self, [SrTarget(t.sr, t.pool, t.driver) for t in sr_targets])

    def check(self) -> None:
        """Raise when the run is cancelled or out of time, or this VM is out of time."""
        self.guard.check()
        self.deadline.check()

    def _abort_streams(self, _reason: BaseException) -> None:
        # Called from the guard's thread: closing a stream makes a read blocked in it fail,
        # so a cancel or a timeout stops transfers within seconds.
        for stream in list(self._streams):
            try:
                stream.close()
            except Exception:
                pass

    @contextmanager
    def tracked(self, stream: Any) -> Iterator[Any]:
        """Use an export stream that a cancel or a timeout can close under the reader."""
        self._streams.add(stream)
        try:
            with stream:
                yield stream
        finally:
            self._streams.discard(stream)

    # -- helpers -----------------------------------------------------------------------------
    @contextmanager
    def slot(self, operation: str) -> Iterator[None]:
        with self.limiter.slot(self.vm.pool_uuid, operation):
            yield

    def job_snapshots(self) -> list[Vm]:
        """This job's snapshots of the VM, oldest first (by ``xo:backup:datetime``)."""
        found = [
            vm
            for vm in self.inventory.snapshots_of(self.vm.uuid)
            if vm.other_config.get("xo:backup:job") == self.job_id
        ]
        return sorted(found, key=lambda s: (s.other_config.get("xo:backup:datetime", ""), s.uuid))

    def drop_target(self, target_key: str, error: BaseException, step: str) -> None:
        with self._targets_lock:
            if target_key in self.dropped:
                return
            self.dropped.append(target_key)
            self.targets = [t for t in self.targets if t.key != target_key]
        self.task.warning(
            f"remote {target_key!r} failed during {step} and was dropped: {describe_error(error)}",
            {"remote": target_key},
        )

    def new_timestamp(self) -> int:
        """Now, in ms, but in a later second than any backup of the VM on the targets.

        Backup names have one-second granularity (``20260801T040000Z``, XO's layout), so two
        runs in the same second would share names: the later one waits for the next second.
        """
        latest = max(
            (b.timestamp for t in self.targets for b in t.repository.list_backups(self.vm.uuid)),
            default=0,
        )
        now = self.runner.now_ms()
        while now // 1000 <= latest // 1000:
            time.sleep(max((latest // 1000 + 1) * 1000 - now, 1) / 1000)
            now = self.runner.now_ms()
        return now

    # -- the flow ----------------------------------------------------------------------------
    def run(self) -> None:
        unwatch = self.guard.watch(self.deadline, self._abort_streams)
        unregister = self.guard.on_stop(self._abort_streams)
        owner = f"job {self.job['name']} (run {self.recorder.run_id})"
        had_targets = bool(self.targets)
        try:
            self.check()
            with VmLocks({t.key: t.remote for t in self.targets}, self.vm.uuid, owner) as refused:
                for key, error in refused.items():
                    self.drop_target(key, error, "lock")
                if had_targets and not self.targets:
                    raise XobackupError("all targets have failed: the VM is locked on each")
                self._run_locked()
        except Exception as error:
            # A transfer stopped by a cancel or a timeout fails with whatever the closed
            # stream raised: report the real reason.
            if self.guard.error is not None and error is not self.guard.error:
                raise self.guard.error from error
            if self.deadline.expired:
                try:
                    self.deadline.check()
                except RunTimeoutError as timeout:
                    raise timeout from error
            raise
        finally:
            unwatch()
            unregister()

    def _run_locked(self) -> None:
        mode = self.job["mode"]
        check_offline_settings(self.settings, mode, f"VM {self.vm.name!r}")
        try:
            self._back_up()
        except BaseException:
            # the VM is started again whatever happened to the backup (XO does the same)
            if self.stopped:
                try:
                    self.start_vm()
                except XobackupError as restart_error:
                    self.task.warning(f"could not start the VM again: {restart_error}")
            raise
        if self.stopped:
            try:
                self.start_vm()
            except XobackupError as error:
                raise XobackupError(
                    f"the backup is done but the VM could not be started again: {error}"
                ) from error

    def stop_vm(self) -> None:
        """Offline modes: shut the VM down cleanly before its snapshot or export."""
        if self.start_after is None or self.stopped:
            return
        self.progress.stage(self.vm.uuid, "shutdown")
        with self.recorder.task("shutdown", {"mode": self.start_after}, parent=self.task):
            # 0 (Xen Orchestra's way): wait; a guest that never halts fails the VM
            force_after = float(self.settings["forceShutdownAfter"] or 0) or None
            self.driver.shutdown_vm(self.vm.uuid, force_after=force_after)
            self.stopped = True

    def start_vm(self) -> None:
        """Start the VM this run shut down."""
        self.stopped = False
        with self.recorder.task("start", parent=self.task):
            self.driver.start_vm(self.vm.uuid)

    def _back_up(self) -> None:
        mode = self.job["mode"]
        blocked_before = dict(self.vm.blocked_operations)
        self.driver.update_vm(
            self.vm.uuid,
            blocked_operations={
                op: MIGRATION_BLOCKED
                for op in ("migrate_send", "pool_migrate")
                if op not in blocked_before
            },
        )
        for target in list(self.targets):
            try:
                self.clean_vm(target)
            except XobackupError as error:
                self.task.warning(f"cleaning {target.key} before the backup failed: {error}")
        try:
            if not self.targets and not self.replication.targets:
                self.rolling_snapshot()
            elif mode == "full":
                self.full_backup()
            else:
                self.delta_backup()
        finally:
            restore = {
                op: None for op in ("migrate_send", "pool_migrate") if op not in blocked_before
            }
            try:
                self.driver.update_vm(self.vm.uuid, blocked_operations=restore)
            except XobackupError as error:
                self.task.warning(f"could not unblock migration: {error}")

    def take_snapshot(self, timestamp_ms: int, ignore: tuple[str, ...] = ()) -> Vm:
        self.stop_vm()
        snapshot = self._take_snapshot(timestamp_ms, ignore)  # failing: the run restarts it
        if self.start_after == "snapshot" and self.stopped:
            # offlineSnapshot: the downtime ends with the snapshot, not with the export
            try:
                self.start_vm()
            except XobackupError as error:
                self.stopped = True  # tried again once the export is over
                self.task.warning(f"could not start the VM after its snapshot: {error}")
        return snapshot

    def _take_snapshot(self, timestamp_ms: int, ignore: tuple[str, ...] = ()) -> Vm:
        memory = bool(self.settings["checkpointSnapshot"]) or "xo-memory-backup" in self.vm.tags
        self.progress.stage(self.vm.uuid, "snapshot")
        with self.recorder.task("snapshot", parent=self.task) as step:
            # the pool's snapshot slot covers the snapshot itself, not its bookkeeping
            with self.slot("snapshots"):
                snapshot = self.driver.snapshot(
                    self.vm.uuid,
                    snapshot_name(self.job["name"], self.vm.name),
                    quiesce=bool(self.settings["quiesce"]),
                    memory=memory,
                    ignore_vdis=ignore,
                )
            if snapshot.other_config.get("xo:quiesce-fallback"):
                step.warning("quiesced snapshot refused by the host: plain snapshot taken")
            self.mark_snapshot(
                snapshot,
                {
                    "xo:backup:job": self.job_id,
                    "xo:backup:schedule": self.schedule_id,
                    "xo:backup:vm": self.vm.uuid,
                    "xo:backup:datetime": other_config_datetime(timestamp_ms),
                },
            )
            step.set_result(id=snapshot.uuid)
        return snapshot

    def mark_snapshot(self, snapshot: Vm, keys: Mapping[str, str]) -> None:
        """Set backup keys in ``other_config`` of a snapshot and of each of its disks.

        Xen Orchestra keeps them on the VDIs too (xo-backups.md §7.4) and finds a delta's
        base per disk from them, so a snapshot this engine took serves as XO's base as well.
        """
        self.driver.update_vm(snapshot.uuid, other_config=keys)
        for disk in snapshot.disks:
            self.driver.update_vdi(disk.vdi_uuid, other_config=keys)

    def base_metadata(self, timestamp_ms: int, snapshot: Vm) -> dict[str, Any]:
        return {
            "jobId": self.job_id,
            "scheduleId": self.schedule_id,
            "timestamp": timestamp_ms,
            "vm": dict(self.vm.record) or {"uuid": self.vm.uuid, "name_label": self.vm.name},
            "vmSnapshot": dict(snapshot.record)
            or {"uuid": snapshot.uuid, "name_label": snapshot.name},
            "tags": period_tags(timestamp_ms, self.settings["timezone"]),
        }

    # -- full (XVA) --------------------------------------------------------------------------
    def full_backup(self) -> None:
        skipped = tuple(d.vdi_uuid for d in self.vm.disks if NO_BACKUP_DISK_MARK in d.name)
        timestamp_ms = self.new_timestamp()
        must_snapshot = (
            (self.vm.power_state != "Halted" and self.start_after != "backup")
            or self.settings["unconditionalSnapshot"]
            or self.settings["snapshotRetention"] > 0
            or bool(skipped)
        )
        if self.settings["deleteFirst"]:
            self.apply_retention("full", reserve=1)
        if must_snapshot:
            snapshot = self.take_snapshot(timestamp_ms, ignore=skipped)
        else:
            self.stop_vm()  # offlineBackup: the VM itself is exported while it is down
            snapshot = self.vm
        stamp = format_timestamp(timestamp_ms)
        compression = {"": "none", "native": "gzip"}.get(
            self.job["compression"], self.job["compression"]
        )
        if self.replication.targets and compression != "none":
            # An XVA import of unknown length must frame itself: only an uncompressed one does.
            self.task.warning("replication to SRs: the XVA is exported uncompressed")
            compression = "none"
        memory = bool(self.settings["checkpointSnapshot"]) or "xo-memory-backup" in self.vm.tags
        # a VM shut down for its backup has no memory to keep
        self.replication.plan_dr(memory and self.runs_at_snapshot)
        if self.settings["deleteFirst"]:
            self.replication.rotate_dr(reserve=1)
        try:
            self.export_xva(snapshot, stamp, timestamp_ms, compression)
            if not self.settings["deleteFirst"]:
                self.apply_retention("full")
                self.replication.rotate_dr()
        finally:
            if must_snapshot:
                self.rotate_snapshots(keep=self.settings["snapshotRetention"], newest=snapshot)

    def rolling_snapshot(self) -> None:
        """A job whose only target is the VM itself: snapshot, then rotate (XO §1.5)."""
        snapshot = self.take_snapshot(self.runner.now_ms())
        if self.job["mode"] == "delta":
            self.mark_snapshot(snapshot, {"xo:backup:exported": "true"})
        self.rotate_snapshots(keep=self.settings["snapshotRetention"], newest=snapshot)

    def export_xva(self, snapshot: Vm, stamp: str, timestamp_ms: int, compression: str) -> None:
        name = f"{stamp}.xva"
        self.progress.stage(self.vm.uuid, "export")
        with self.slot("vm_exports"):
            stream = self.driver.export_vm(snapshot.uuid, compression=compression)  # type: ignore[arg-type]
            fan_targets = []
            tasks = {}
            for target in self.targets:
                path = join_path(target.repository.vm_folder(self.vm.uuid), name)
                tasks[target.key] = self.recorder.task(
                    "export", {"type": "remote", "id": target.key, "isFull": True}, parent=self.task
                )
                writer = target.remote.open_write(path)
                fan_targets.append(
                    Target(
                        target.key,
                        writer.write,
                        writer.commit,
                        writer.abort,
                        data={"target": target, "path": path},
                    )
                )
            # every remote gets the same bytes: one checksum of the stream serves them all (and
            # an export only to SRs needs none)
            digest = (
                hashlib.new(xva_checksum_algorithm(), usedforsecurity=False)
                if fan_targets
                else None
            )

            def dropped(t: Target) -> None:
                if "sr" not in t.data:
                    self.drop_target(t.name, t.error or RuntimeError("failed"), "transfer")

            sr_fan_targets = self.replication.dr_fan_targets()
            fanout = Fanout(fan_targets + sr_fan_targets, dropped)

            def on_chunk(size: int) -> None:
                self.check()
                self.progress.transferred(self.vm.uuid, size)

            try:
                with self.tracked(stream):
                    fanout.copy_stream(stream, self.rate, on_chunk=on_chunk, digest=digest)
            except Exception as error:
                fanout.abort(error)
                message = f"export of {self.vm.name} failed: {describe_error(error)}"
                self._fail_tasks(tasks, message)
                self.replication.finish_dr(sr_fan_targets, timestamp_ms, stamp)
                raise XobackupError(message) from error
            fanout.finish()
        replicated = self.replication.finish_dr(sr_fan_targets, timestamp_ms, stamp)
        checksum = xva_checksum(digest) if digest is not None else ""
        for fan_target in fan_targets:
            handle = tasks[fan_target.name]
            if fan_target.error is not None:
                handle.fail(describe_error(fan_target.error))
                continue
            target = fan_target.data["target"]
            try:
                target.remote.write_bytes(
                    fan_target.data["path"] + ".checksum",
                    checksum.encode(),
                )
                metadata = self.base_metadata(timestamp_ms, snapshot)
                metadata.update({"mode": "full", "xva": f"./{name}", "size": fan_target.written})
                target.repository.write_metadata(self.vm.uuid, stamp, metadata)
                handle.finish(size=fan_target.written)
            except RemoteError as error:
                handle.fail(describe_error(error))
                self.drop_target(target.key, error, "metadata")
        if not replicated and not any(t.error is None for t in fan_targets):
            raise XobackupError("all targets have failed")

    @staticmethod
    def _fail_tasks(tasks: Mapping[str, TaskHandle], message: str) -> None:
        for handle in tasks.values():
            handle.fail(message)

    # -- delta (VHD chains) ------------------------------------------------------------------
    def select_base(self, disks: Sequence[Disk]) -> tuple[Vm | None, str]:
        """The snapshot to export deltas against, or None with the reason for a full."""
        exported = [
            s for s in self.job_snapshots() if s.other_config.get("xo:backup:exported") == "true"
        ]
        if not exported:
            return None, "no previous backup of this job"
        base = exported[-1]
        chain_length = int(base.other_config.get("xo:backup:deltaChainLength", "0") or 0)
        full_interval = int(self.settings["fullInterval"] or 0)
        if full_interval and full_interval <= chain_length + 1:
            return None, f"fullInterval {full_interval} reached"
        base_disks = {d.snapshot_of: d for d in base.disks}
        for disk in disks:
            base_disk = base_disks.get(disk.vdi_uuid)
            if base_disk is None:
                return None, f"disk {disk.name} is new since the last backup"
            for target in self.targets:
                if self.find_vhd(target, disk.vdi_uuid, base_disk.vdi_uuid) is None:
                    return None, (
                        f"the base of disk {disk.name} is missing on remote {target.key!r}"
                    )
        return base, ""

    def uses_directories(self, target: RemoteTarget) -> bool:
        """Delta disks on ``target`` are VhdDirectory: asked for, or the remote cannot modify
        files in place (object stores), so merges must move block objects instead."""
        return bool(self.settings["useVhdDirectory"]) or not target.remote.supports_update

    def find_vhd(self, target: RemoteTarget, live_vdi: str, vhd_uuid: str) -> str | None:
        """Path of the disk ``vhd_uuid`` in the disk's folder on ``target``, if any, and only
        if it is of the kind this target writes now (XO keeps chains homogeneous, §2.3)."""
        folder = target.repository.vdi_folder(self.vm.uuid, self.job_id, live_vdi)
        want_alias = self.uses_directories(target)
        for name in sorted(target.remote.list(folder), reverse=True):
            if not name.endswith(".vhd") or is_alias(name) != want_alias:
                continue
            path = join_path(folder, name)
            try:
                disk = open_remote_disk(target.remote, path)
            except (FormatError, RemoteError):
                continue
            try:
                if str(disk.uuid) == vhd_uuid:
                    return path
            finally:
                disk.close()
        return None

    def delta_backup(self) -> None:
        live_disks = [d for d in self.vm.disks if NO_BACKUP_DISK_MARK not in d.name]
        skipped = [d for d in self.vm.disks if NO_BACKUP_DISK_MARK in d.name]
        for disk in skipped:
            self.task.info(f"disk {disk.name} is marked {NO_BACKUP_DISK_MARK}: not backed up")
        base, reason = self.select_base(live_disks)
        memory = bool(self.settings["checkpointSnapshot"]) or "xo-memory-backup" in self.vm.tags
        base, reason = self.replication.plan_cr(
            base, reason, live_disks, memory and self.runs_at_snapshot
        )
        if base is None:
            self.task.info(f"full backup: {reason}")
        if self.settings["deleteFirst"]:
            self.apply_retention("delta", reserve=1)
        timestamp_ms = self.new_timestamp()
        snapshot = self.take_snapshot(timestamp_ms, ignore=tuple(d.vdi_uuid for d in skipped))
        stamp = format_timestamp(timestamp_ms)
        try:
            jobs = [(disk, base) for disk in live_disks]
            if snapshot.suspend_vdi_uuid:
                # The memory image of a checkpoint goes full, in a folder named after itself.
                memory = Disk(
                    vdi_uuid=snapshot.suspend_vdi_uuid,
                    name="memory (suspend VDI)",
                    virtual_size=0,
                    sr_uuid="",
                    snapshot_of=snapshot.suspend_vdi_uuid,
                )
                jobs.append((memory, None))
            sizes, paths = self.export_disks(snapshot, jobs, stamp)
            self.replication.finish_cr(snapshot, timestamp_ms, stamp)
            for target in list(self.targets):
                metadata = self.base_metadata(timestamp_ms, snapshot)
                metadata.update(
                    self.delta_metadata(snapshot, base, [d for d, _ in jobs], paths[target.key])
                )
                metadata["size"] = sizes.get(target.key, 0)
                try:
                    target.repository.write_metadata(self.vm.uuid, stamp, metadata)
                except RemoteError as error:
                    self.drop_target(target.key, error, "metadata")
            if not self.targets and not self.replication.live:
                raise XobackupError("all targets have failed")
            if not self.dropped and not self.replication.dropped:
                # Only a snapshot that every remote holds may be the next base (XO's rule).
                chain_length = 0
                if base is not None:
                    chain_length = int(base.other_config.get("xo:backup:deltaChainLength", "0"))
                    chain_length += 1
                self.mark_snapshot(
                    snapshot,
                    {
                        "xo:backup:exported": "true",
                        "xo:backup:deltaChainLength": str(chain_length),
                    },
                )
            if not self.settings["deleteFirst"]:
                self.apply_retention("delta")
        except BaseException:
            self.replication.abort_cr()
            # A snapshot that was not exported must never become a base.
            self.driver.destroy_vm(snapshot.uuid)
            raise
        self.rotate_snapshots(keep=self.settings["snapshotRetention"], newest=snapshot)

    def delta_metadata(
        self, snapshot: Vm, base: Vm | None, disks: Sequence[Disk], paths: Mapping[str, str]
    ) -> dict[str, Any]:
        """The delta-specific metadata fields, keyed by the snapshot's VDI refs as XO does."""
        devices = self.driver.vm_devices(snapshot.uuid)
        ref_of = {record.get("uuid"): ref for ref, record in devices["vdis"].items()}
        snapshot_disks = {d.snapshot_of: d for d in snapshot.disks}
        base_disks = {d.snapshot_of: d for d in base.disks} if base else {}
        vhds: dict[str, str] = {}
        differencing: dict[str, bool] = {}
        vdis: dict[str, Any] = {}
        for disk in disks:
            snap_disk = snapshot_disks.get(disk.vdi_uuid) or disk
            key = ref_of.get(snap_disk.vdi_uuid, snap_disk.vdi_uuid)
            vhds[key] = paths[disk.vdi_uuid]
            base_disk = base_disks.get(disk.vdi_uuid)
            differencing[key] = base_disk is not None
            record = dict(
                devices["vdis"].get(key)
                or {
                    "uuid": snap_disk.vdi_uuid,
                    "name_label": disk.name,
                    "virtual_size": disk.virtual_size,
                }
            )
            other = dict(record.get("other_config") or {})
            if base_disk is not None:
                other["xo:base_delta_vdi"] = base_disk.vdi_uuid
            record["other_config"] = other
            # Beside the record's fields, not in other_config: XO's restore (SR mapping) and
            # mirrors read them there.
            record["$snapshot_of$uuid"] = disk.vdi_uuid
            record["$SR$uuid"] = disk.sr_uuid or snap_disk.sr_uuid
            vdis[key] = record
        vifs = {}
        for ref, vif in devices["vifs"].items():
            network = devices["networks"].get(vif.get("network"), {})
            vifs[ref] = {
                **vif,
                "$network$uuid": network.get("uuid"),
                "$network$name_label": network.get("name_label"),
                "$network$VLAN": network.get("VLAN", -1),
            }
        return {
            "mode": "delta",
            "vhds": vhds,
            "isVhdDifferencing": differencing,
            "vdis": vdis,
            "vbds": dict(devices["vbds"]),
            "vifs": vifs,
        }

    def export_disks(
        self, snapshot: Vm, jobs: Sequence[tuple[Disk, Vm | None]], stamp: str
    ) -> tuple[dict[str, int], dict[str, dict[str, str]]]:
        """Export every (disk, base) to every target, ``diskPerVmConcurrency`` at a time.

        Returns the bytes written per target, and per target the path of each disk (keyed
        by live VDI UUID) relative to the VM's folder.
        """
        snapshot_disks = {d.snapshot_of: d for d in snapshot.disks}
        written: dict[str, int] = {t.key: 0 for t in self.targets}
        paths: dict[str, dict[str, str]] = {t.key: {} for t in self.targets}

        def export(job: tuple[Disk, Vm | None]) -> tuple[str, dict[str, tuple[int, str]]]:
            disk, base = job
            snap_disk = snapshot_disks.get(disk.vdi_uuid)
            if snap_disk is None and disk.vdi_uuid == snapshot.suspend_vdi_uuid:
                snap_disk = disk
            if snap_disk is None:
                raise XobackupError(f"the snapshot has no copy of disk {disk.name}")
            base_disk = None
            if base is not None:
                base_disk = next((d for d in base.disks if d.snapshot_of == disk.vdi_uuid), None)
            self.progress.stage(self.vm.uuid, "export")
            with self.slot("disk_exports"):
                stream = self.driver.export_disk(
                    snap_disk.vdi_uuid,
                    base_vdi_uuid=base_disk.vdi_uuid if base_disk else None,
                )
                with self.tracked(stream):
                    stored = self.write_vhd_to_targets(stream, disk, snap_disk, base_disk, stamp)
                    return disk.vdi_uuid, stored

        def collect(results: Iterator[tuple[str, dict[str, tuple[int, str]]]]) -> None:
            for live_vdi, stored in results:
                for key, (size, path) in stored.items():
                    written[key] = written.get(key, 0) + size
                    paths.setdefault(key, {})[live_vdi] = path

        workers = min(self.settings["diskPerVmConcurrency"] or len(jobs), len(jobs))
        if workers <= 1:
            collect(map(export, jobs))  # one at a time: no thread to start (1000-VM runs)
            return written, paths
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="disk") as pool:
            collect(pool.map(export, jobs))
        return written, paths

    def write_vhd_to_targets(
        self, stream: Any, disk: Disk, snap_disk: Disk, base_disk: Disk | None, stamp: str
    ) -> dict[str, tuple[int, str]]:
        """Store one disk export on every target; returns (bytes, path) per target."""
        reader = VhdStreamReader(stream, name=f"export of disk {disk.name}")
        if base_disk is not None and not reader.is_differencing:
            raise FormatError("a delta export came back as a full disk", path=disk.name)
        allocated = sorted(reader.allocated)
        if reader.allocated != allocated:
            raise FormatError("export blocks are not in ascending order", path=disk.name)
        fan_targets = []
        tasks = {}
        for target in list(self.targets):
            folder = target.repository.vdi_folder(self.vm.uuid, self.job_id, disk.vdi_uuid)
            parent = None
            if base_disk is not None:
                parent_path = self.find_vhd(target, disk.vdi_uuid, base_disk.vdi_uuid)
                if parent_path is None:
                    self.drop_target(target.key, FormatError("base VHD vanished"), "transfer")
                    continue
                parent = ParentLink(
                    uuid=uuidlib.UUID(base_disk.vdi_uuid), name=posixpath.basename(parent_path)
                )
            tasks[target.key] = self.recorder.task(
                "export",
                {"type": "remote", "id": target.key, "isFull": parent is None, "disk": disk.name},
                parent=self.task,
            )
            try:
                sink: VhdFileSink | VhdDirectorySink
                if self.uses_directories(target):
                    sink = VhdDirectorySink(
                        target.remote,
                        folder,
                        stamp,
                        size=reader.size,
                        uuid=uuidlib.UUID(snap_disk.vdi_uuid),
                        parent=parent,
                        compression=self.settings["vhdDirectoryCompression"],
                    )
                else:
                    layout = plan_vhd_stream(
                        reader.size, allocated, parent=parent, uuid=uuidlib.UUID(snap_disk.vdi_uuid)
                    )
                    sink = VhdFileSink(target.remote, folder, stamp, layout)
            except XobackupError as error:
                tasks.pop(target.key).fail(describe_error(error))
                self.drop_target(target.key, error, "transfer")
                continue
            fan_targets.append(
                Target(
                    target.key,
                    lambda item, s=sink: s.put(*item),
                    sink.finish,
                    sink.abort,
                    data={"sink": sink, "folder": folder},
                )
            )

        fan_targets += self.replication.cr_fan_targets(
            disk, base_disk, reader.size, allocated, disk.vdi_uuid == snap_disk.vdi_uuid
        )

        def dropped(t: Target) -> None:
            if "sr" not in t.data:
                self.drop_target(t.name, t.error or RuntimeError("failed"), "transfer")

        fanout = Fanout(fan_targets, dropped)
        try:
            for index, data in reader.blocks():
                self.check()
                self.rate.consume(len(data))
                self.progress.transferred(self.vm.uuid, len(data))
                if not fanout.write((index, data), size=len(data)):
                    break
            fanout.finish()
        except Exception as error:
            fanout.abort(error)
            self._fail_tasks(tasks, describe_error(error))
            for fan_target in fan_targets:
                if "sr" in fan_target.data:
                    self.replication.cr_transferred(fan_target)
            raise
        results: dict[str, tuple[int, str]] = {}
        vm_folder = BackupRepository.vm_folder(self.vm.uuid)
        for fan_target in fan_targets:
            if "sr" in fan_target.data:
                self.replication.cr_transferred(fan_target)
                continue
            handle = tasks[fan_target.name]
            if fan_target.error is None:
                sink = fan_target.data["sink"]
                handle.finish(size=sink.size)
                results[fan_target.name] = (sink.size, posixpath.relpath(sink.path, vm_folder))
            else:
                handle.fail(describe_error(fan_target.error))
        if not results and not self.replication.live:
            raise XobackupError("all targets have failed")
        return results

    # -- retention ---------------------------------------------------------------------------
    def apply_retention(self, mode: str, reserve: int = 0) -> None:
        """Delete this schedule's old backups on every remote beyond ``exportRetention``;
        ``reserve`` leaves room for backups not written yet (``deleteFirst``)."""
        keep = max(int(self.settings["exportRetention"] or 0) - reserve, 0)
        long_term = self.settings["longTermRetention"]
        long_term_rules = long_term.model_dump() if long_term is not None else None
        for target in self.targets:
            mine = [
                b
                for b in target.repository.list_backups(self.vm.uuid)
                if b.job_id == self.job_id and b.schedule_id == self.schedule_id and b.mode == mode
            ]
            doomed = entries_to_delete(
                mine,
                keep=keep,
                timestamp_of=lambda b: b.timestamp,
                long_term=long_term_rules,
                timezone=self.settings["timezone"],
            )
            cap = self.settings["maxMergedDeltasPerRun"]
            if cap is not None:
                doomed = doomed[:cap]
            if not doomed:
                continue
            self.progress.stage(self.vm.uuid, "retention")
            with self.recorder.task(
                "retention", {"type": "remote", "id": target.key}, parent=self.task
            ) as step:
                for backup in doomed:
                    self.delete_backup(target, backup)
                step.set_result(deleted=len(doomed))

    def delete_backup(self, target: RemoteTarget, backup: BackupMetadata) -> None:
        """Delete one backup: its JSON first (it stops existing), then its data."""
        target.repository.delete_metadata(backup)
        if backup.mode == "full":
            for path in (backup.xva_path, (backup.xva_path or "") + ".checksum"):
                if path:
                    target.remote.delete(path, missing_ok=True)
            return
        self.clean_disk_folders(target)

    def clean_vm(self, target: RemoteTarget) -> None:
        """Before a backup: remove what failed runs left (XO's cleanVm, §2.6).

        A metadata file whose data is missing or unreadable is an incomplete backup: removed,
        with a warning. An XVA that is there but looks wrong (size, tar end) is reported and
        kept: it may still hold data someone needs. Data files that no metadata references
        are merged into the next backup (deltas) or deleted.
        """
        repository = target.repository
        vm_folder = repository.vm_folder(self.vm.uuid)
        # A merge cut short leaves chains that only read right once it is finished: finish
        # every one before judging any backup, or a complete backup could look broken.
        merged = []
        for job_id in target.remote.list(join_path(vm_folder, "vdis")):
            jobs_folder = join_path(vm_folder, "vdis", job_id)
            for vdi_uuid in target.remote.list(jobs_folder):
                merged += resume_all_merges(target.remote, join_path(jobs_folder, vdi_uuid))
        repository.record_merges(self.vm.uuid, merged)
        for backup in repository.list_backups(self.vm.uuid):
            if backup.mode == "full":
                xva = backup.xva_path
                if xva is None or not target.remote.exists(xva):
                    self.task.warning(f"incomplete backup removed from {target.key}: {backup.path}")
                    repository.delete_metadata(backup)
                    target.remote.delete((xva or backup.path) + ".checksum", missing_ok=True)
                elif not is_valid_xva(target.remote, xva, expected_size=backup.size or None):
                    self.task.warning(
                        f"the XVA of {backup.path} on {target.key} looks damaged (size or "
                        "tar end); it is kept, check it with a restore"
                    )
                continue
            for path in backup.vhd_paths.values():
                try:
                    with open_vhd_chain(path, remote_disk_opener(target.remote)):
                        pass
                except (FormatError, RemoteNotFoundError) as error:
                    # Only data that is missing or malformed makes a backup incomplete: a
                    # remote that fails to answer says nothing about the backup.
                    self.task.warning(
                        f"incomplete backup removed from {target.key}: {backup.path} ({error})"
                    )
                    repository.delete_metadata(backup)
                    break
        referenced = {b.xva_path for b in repository.list_backups(self.vm.uuid)}
        for name in target.remote.list(vm_folder):
            path = join_path(vm_folder, name)
            if name.endswith(".xva") and path not in referenced:
                target.remote.delete(path, missing_ok=True)
                target.remote.delete(path + ".checksum", missing_ok=True)
        for job_id in target.remote.list(join_path(vm_folder, "vdis")):
            self.clean_disk_folders(target, job_id)

    def clean_disk_folders(self, target: RemoteTarget, job_id: str | None = None) -> None:
        """Merge or delete VHDs no backup references any more (XO's cleanVm, §2.5–2.6)."""
        referenced = set()
        for backup in target.repository.list_backups(self.vm.uuid):
            referenced.update(backup.vhd_paths.values())
        jobs_folder = join_path(
            target.repository.vm_folder(self.vm.uuid), "vdis", job_id or self.job_id
        )
        for vdi_uuid in target.remote.list(jobs_folder):
            folder = join_path(jobs_folder, vdi_uuid)
            target.repository.record_merges(self.vm.uuid, resume_all_merges(target.remote, folder))
            disks: dict[str, tuple[str, str | None]] = {}  # path -> (uuid, parent uuid)
            for name in target.remote.list(folder):
                if not name.endswith(".vhd"):
                    continue
                path = join_path(folder, name)
                try:
                    disk = open_remote_disk(target.remote, path)
                except (FormatError, RemoteError):
                    continue
                try:
                    parent = str(disk.parent_uuid) if disk.is_differencing else None
                    disks[path] = (str(disk.uuid), parent)
                finally:
                    disk.close()
            self._collect_folder(target, vdi_uuid, disks, referenced)

    def _collect_folder(
        self,
        target: RemoteTarget,
        vdi_uuid: str,
        disks: dict[str, tuple[str, str | None]],
        referenced: set[str],
    ) -> None:
        """Garbage-collect one disk folder, given each disk's (uuid, parent uuid).

        First unreferenced leaves go, repeatedly: disks of runs that never wrote their
        metadata, and tails nothing needs. Then every run of unreferenced disks with a single
        child each, ending on a referenced disk, is merged into that disk (which keeps its
        name). An unreferenced disk with several children is a shared ancestor and stays.
        """
        by_uuid = {uuid: path for path, (uuid, _) in disks.items()}
        parent_of = {
            path: by_uuid.get(parent) if parent else None for path, (_, parent) in disks.items()
        }
        children: dict[str, list[str]] = {path: [] for path in disks}
        for path, parent in parent_of.items():
            if parent is not None:
                children[parent].append(path)
        pruned = True
        while pruned:
            pruned = False
            for path in sorted(disks):
                if path not in referenced and not children[path]:
                    delete_disk(target.remote, path)
                    del disks[path]
                    parent = parent_of.pop(path)
                    if parent is not None:
                        children[parent].remove(path)
                    pruned = True
        for path in sorted(disks):
            if path in referenced or path not in disks:
                continue
            parent = parent_of[path]
            if parent is not None and parent not in referenced and len(children[parent]) == 1:
                continue  # inside a run that starts higher up
            run = [path]
            while run[-1] not in referenced and len(children[run[-1]]) == 1:
                run.append(children[run[-1]][0])
            if run[-1] not in referenced:
                continue  # a shared ancestor: several chains need it
            with self.recorder.task("merge", {"disk": vdi_uuid}, parent=self.task) as step:
                result = merge_chain(target.remote, run)
                step.set_result(size=result.merged_bytes)
            for gone in run[:-1]:
                disks.pop(gone, None)
            # The merged backup's JSON: not differencing once the merge reached the base, and
            # its new size (XO rewrites it the same way).
            target.repository.record_merges(self.vm.uuid, [result.path])

    def rotate_snapshots(self, *, keep: int, newest: Vm) -> None:
        """Rolling snapshots: this schedule's job snapshots beyond the newest ``keep`` go.

        ``newest`` (this run's) counts as the newest. In delta mode it is the next base and is
        kept whatever ``keep`` says, and snapshots of runs that did not finish (never marked
        exported) are removed: they can never be a base (XO: xo-backups.md §1.5).
        """
        delta = self.job["mode"] == "delta"
        others = [s for s in self.job_snapshots() if s.uuid != newest.uuid]
        doomed = []
        if delta:
            doomed += [s for s in others if s.other_config.get("xo:backup:exported") != "true"]
            others = [s for s in others if s not in doomed]
            keep = max(keep, 1)
        mine = [s for s in others if s.other_config.get("xo:backup:schedule") == self.schedule_id]
        mine.append(newest)
        doomed += mine[: max(len(mine) - keep, 0)]
        for snapshot in doomed:
            try:
                self.driver.destroy_vm(snapshot.uuid)
            except XobackupError as error:
                self.task.warning(f"could not delete snapshot {snapshot.name}: {error}")
