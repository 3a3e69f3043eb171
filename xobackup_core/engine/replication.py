"""Replication of VMs to SRs: disaster recovery (full) and continuous replication (delta).

Xen Orchestra's semantics (reference: xo-backups.md §1.3, §1.4, §6, §7):

* **Disaster recovery** (mode ``full`` with ``srs``): the XVA export that feeds the remotes also
  streams, in the same pass, into an import on each SR (no temporary file). Each run makes a
  new replica named ``<vm> - <job> - (<YYYYMMDDTHHmmssZ>)``, tagged ``Disaster Recovery``;
  ``copyRetention`` keeps the newest replicas of the (job, schedule, VM, SR).
* **Continuous replication** (mode ``delta`` with ``srs``): one replica VM per (job, VM, SR),
  tagged ``Continuous Replication``. The first run imports the full disks into new VDIs and
  creates the VM from the snapshot's records; later runs import only the delta export into the
  replica's VDIs. After every transfer the replica is snapshotted: those snapshots are the
  retention entries (``copyRetention``). A replica that was started or changed since the last
  run is left alone and a new one is made (the reason is logged).
* **RAM** (``checkpointSnapshot``): the checkpoint's memory image is replicated too and the
  replica is created Suspended (XCP-ng only), after checking that a host of the target pool
  has a CPU able to resume it (``bypassCpuCheck`` turns the refusal into a warning). Later
  runs update the Suspended replica in place: the disks by delta, the memory image whole into
  the replica's own suspend VDI (so the replica stays Suspended; XAPI cannot swap a suspend
  VDI for a different one). A new replica is made when the VM's CPU flags or memory size
  changed, or the replica was resumed since.

Every replica has ``start``/``start_on`` blocked, the ``xo:backup:*`` keys of its job in
``other_config`` (so the job never selects it), and its HA restart priority cleared (tag
``HA disabled``).
"""

from __future__ import annotations

import queue
import threading
import uuid as uuidlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from xobackup_core.engine.cpu import cpu_problem, describe_cpu, host_features
from xobackup_core.engine.restore import IteratorReader
from xobackup_core.engine.streams import Target, describe_error
from xobackup_core.errors import XobackupError
from xobackup_core.formats.vhd_stream import VhdStreamReader
from xobackup_core.formats.vhd_structs import build_footer, full_bitmap
from xobackup_core.formats.vhd_writer import ParentLink, VhdStreamLayout, plan_vhd_stream
from xobackup_core.hypervisor import (
    CpuInfo,
    Disk,
    HypervisorDriver,
    Pool,
    StorageRepository,
    Vm,
)

START_BLOCKED = "Start operation for this vm is blocked, clone it if you want to use it."
DR_TAG = "Disaster Recovery"
CR_TAG = "Continuous Replication"
HA_DISABLED_TAG = "HA disabled"
REPLICATED_KEY = "xo:backup:replicated"
"""On a CR replica: the source snapshot whose content its disks hold (the delta marker)."""
MEMORY_KEY = "xo:backup:replicatedMemory"
"""On a Suspended CR replica: the suspend VDI the job wrote (a new one means it was resumed
and suspended again since)."""

QUEUE_CHUNKS = 4
_DONE = object()
_ABORT = object()


@dataclass
class SrTarget:
    """An SR the run replicates to, with the driver of its pool."""

    sr: StorageRepository
    pool: Pool
    driver: HypervisorDriver
    error: BaseException | None = None

    @property
    def key(self) -> str:
        return self.sr.uuid

    @property
    def label(self) -> str:
        return f"SR {self.sr.name} ({self.sr.uuid})"


def replica_keys(
    job_id: str, schedule_id: str, vm_uuid: str, sr_uuid: str, datetime: str
) -> dict[str, str | None]:
    """The ``other_config`` keys a replica carries (xo-backups.md §7.4)."""
    return {
        "xo:backup:job": job_id,
        "xo:backup:schedule": schedule_id,
        "xo:backup:vm": vm_uuid,
        "xo:backup:datetime": datetime,
        "xo:backup:sr": sr_uuid,
    }


def protect_replica(
    driver: HypervisorDriver,
    vm_uuid: str,
    *,
    name: str | None,
    tag: str,
    other_config: Mapping[str, str | None],
    current: Vm | None = None,
) -> bool:
    """Name, tag and mark a replica, block its start, and clear its HA restart priority.

    ``current``: the replica as read earlier in the run (else it is read now); only what
    differs from it is written, as each map entry costs XAPI calls. Returns True when HA had
    to be disabled.
    """
    if current is None:
        current = _vm(driver, vm_uuid)
    if current is None:
        current = Vm(vm_uuid, "", "", "Halted")
    ha_on = bool(current.ha_restart_priority)
    tags: tuple[str, ...] = (tag, HA_DISABLED_TAG) if ha_on else (tag,)
    blocked = {"start": START_BLOCKED, "start_on": START_BLOCKED}
    driver.update_vm(
        vm_uuid,
        name=None if name == current.name else name,
        add_tags=tuple(t for t in tags if t not in current.tags),
        other_config=_changes(current.other_config, other_config),
        blocked_operations=_changes(current.blocked_operations, blocked),
        ha_restart_priority="" if ha_on else None,
    )
    return ha_on


def _changes(current: Mapping[str, str], wanted: Mapping[str, str | None]) -> dict[str, str | None]:
    """The entries of ``wanted`` that would change ``current`` (None removes a key)."""
    return {
        k: v for k, v in wanted.items() if (k in current if v is None else current.get(k) != str(v))
    }


def _vm(driver: HypervisorDriver, vm_uuid: str) -> Vm | None:
    try:
        return driver.inventory().vm(vm_uuid)
    except KeyError:
        return None


def is_protected(vm: Vm) -> bool:
    """A replica still under the job's control: its start is blocked (XO drops the others)."""
    return "start" in vm.blocked_operations


def dr_replicas(
    inventory_vms: Sequence[Vm], job_id: str, schedule_id: str, vm_uuid: str, sr_uuid: str
) -> list[Vm]:
    """DR replicas of (job, schedule, VM, SR), oldest first (by ``xo:backup:datetime``)."""
    found = [
        v
        for v in inventory_vms
        if not v.is_snapshot
        and DR_TAG in v.tags
        and is_protected(v)
        and v.other_config.get("xo:backup:job") == job_id
        and v.other_config.get("xo:backup:schedule", "") == schedule_id
        and v.other_config.get("xo:backup:vm") == vm_uuid
        and v.other_config.get("xo:backup:sr") == sr_uuid
    ]
    return sorted(found, key=lambda v: (v.other_config.get("xo:backup:datetime", ""), v.uuid))


def doomed_replicas(replicas: Sequence[Vm], keep: int, newest: str | None = None) -> list[Vm]:
    """The oldest replicas beyond the newest ``keep``; ``newest`` (this run's, by UUID) counts
    as the newest whatever its date says (two runs may share a second)."""
    ordered = sorted(replicas, key=lambda v: v.uuid == newest)  # stable: dates order the rest
    return list(ordered[: max(len(ordered) - keep, 0)])


def check_memory_target(
    vm: Vm,
    snapshot: Vm,
    target: SrTarget,
    *,
    create: bool = True,
    force: bool = False,
    source_cpu: CpuInfo | None = None,
) -> str | None:
    """Refuse RAM replication a target pool could never resume (XAPI's resume check).

    ``create``: the replica is made with ``VM.create`` (continuous replication), which only
    XCP-ng can do for a Suspended VM; an XVA import (disaster recovery) keeps the power state
    on every flavour. ``force`` (setting ``bypassCpuCheck``): an incompatible CPU does not
    raise, the message is returned for the run's log instead. ``source_cpu``: the CPU of the
    host the VM runs on, named in the message. Returns None when a host can resume it.
    """
    if create and target.pool.flavour != "xcp-ng":
        raise XobackupError(
            f"replication with memory to {target.label} is not possible: pool "
            f"{target.pool.name} is {target.pool.flavour}, and only XCP-ng can create a "
            "Suspended VM; replicate without memory (checkpointSnapshot false) or to an XCP-ng pool"
        )
    flags = snapshot.last_boot_cpu_flags or vm.last_boot_cpu_flags
    if not target.pool.hosts:
        raise XobackupError(f"pool {target.pool.name} has no host to resume the replica")
    problems = [(h, cpu_problem(flags, h.cpu)) for h in target.pool.hosts]
    if any(not problem for _, problem in problems):
        return None
    host, problem = problems[0]
    vendor = flags.get("vendor", "")
    message = (
        f"no host of pool {target.pool.name} can resume the replica of {vm.name} with its "
        f"memory: the VM's CPU is {describe_cpu(source_cpu, vendor)} (features "
        f"{flags.get('features') or 'unknown'}), host {host.name}'s CPU is "
        f"{describe_cpu(host.cpu)} (features {host_features(host.cpu) or 'unknown'}): {problem}"
    )
    if force:
        return message
    raise XobackupError(
        f"{message} (setting bypassCpuCheck replicates anyway; the replica then resumes only "
        "when forced)"
    )


class UploadPipe:
    """Chunks pushed by the export's thread, read by an upload running in its own thread.

    A bounded queue: memory stays at a few chunks whatever the size of the transfer.
    """

    def __init__(self, name: str, depth: int = QUEUE_CHUNKS) -> None:
        self.name = name
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._thread: threading.Thread | None = None
        self.result: Any = None
        self.error: BaseException | None = None

    def chunks(self) -> Iterator[bytes]:
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            if item is _ABORT:
                raise XobackupError(f"{self.name}: the export was aborted")
            yield item

    def reader(self) -> IteratorReader:
        return IteratorReader(self.chunks())

    def start(self, upload: Any) -> None:
        """Run ``upload()`` (which reads :meth:`reader`) in a thread."""

        def run() -> None:
            try:
                self.result = upload()
            except BaseException as error:
                self.error = error
                while True:  # unblock a producer waiting on a full queue
                    try:
                        self._queue.get_nowait()
                    except queue.Empty:
                        break

        self._thread = threading.Thread(target=run, name=f"upload-{self.name}", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> None:
        while True:
            if self.error is not None:
                raise self.error
            try:
                self._queue.put(item, timeout=0.2)
                return
            except queue.Full:
                if self._thread is not None and not self._thread.is_alive():
                    raise self.error or XobackupError(f"{self.name}: the upload stopped") from None

    def push(self, chunk: bytes | memoryview) -> None:
        # A copy: the producer may reuse its buffer once this returns.
        self._put(bytes(chunk))

    def finish(self) -> Any:
        """End the stream and wait for the upload's result."""
        self._put(_DONE)
        assert self._thread is not None
        self._thread.join()
        if self.error is not None:
            raise self.error
        return self.result

    def abort(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            return
        try:
            self._queue.put(_ABORT, timeout=5)
        except queue.Full:
            pass
        self._thread.join(timeout=120)


class VhdUploadSink:
    """A disk export written as one VHD stream into a VDI import (the CR twin of a
    :class:`~xobackup_core.engine.disk_sinks.VhdFileSink`)."""

    def __init__(
        self,
        driver: HypervisorDriver,
        vdi_uuid: str,
        layout: VhdStreamLayout,
        zero_blocks: Sequence[int] = (),
    ) -> None:
        """``zero_blocks``: blocks of ``layout`` the export does not carry, written as zeros
        (a VHD import only writes the blocks it carries: this clears what the VDI held)."""
        self.vdi_uuid = vdi_uuid
        self.layout = layout
        self.path = vdi_uuid
        self._bitmap = full_bitmap(layout.header.block_size)
        self._zeros = sorted(zero_blocks)
        self._next_zero = 0
        self._zero = bytes(layout.header.block_size) if self._zeros else b""
        self._pipe = UploadPipe(f"import into VDI {vdi_uuid}")
        reader = self._pipe.reader()
        self._pipe.start(
            lambda: driver.import_disk(
                vdi_uuid,
                reader,  # type: ignore[arg-type]
                format="vhd",
                size=layout.stream_size,
            )
        )
        self._pipe.push(layout.metadata)

    @property
    def size(self) -> int:
        return self.layout.stream_size

    def _fill(self, below: int | None) -> None:
        """Push the zero blocks that come before block ``below`` (all of them: None)."""
        while self._next_zero < len(self._zeros) and (
            below is None or self._zeros[self._next_zero] < below
        ):
            self._pipe.push(self._bitmap)
            self._pipe.push(self._zero)
            self._next_zero += 1

    def put(self, index: int, data: bytes | memoryview) -> None:
        if self._zeros:
            self._fill(index)
        self._pipe.push(self._bitmap)
        self._pipe.push(data)

    def finish(self) -> None:
        self._fill(None)
        self._pipe.push(build_footer(self.layout.footer))
        self._pipe.finish()

    def abort(self) -> None:
        self._pipe.abort()


@dataclass
class CrDisk:
    """Where one source disk goes on one SR in this run."""

    live_vdi: str
    replica_vdi: str
    created: bool
    is_memory: bool = False


@dataclass
class CrPlan:
    """What a CR run does on one SR: update ``replica`` in place, or make a new one."""

    target: SrTarget
    replica: Vm | None
    memory_vdi: str | None = None
    """The suspend VDI of a Suspended replica updated in place: the new memory image goes
    into it."""
    disks: dict[str, CrDisk] = field(default_factory=dict)
    """By live VDI UUID (the suspend VDI's own UUID for the memory image)."""
    lock: threading.Lock = field(default_factory=threading.Lock)


def open_sr_targets(
    sr_uuids: Sequence[str],
    inventories: Mapping[str, Any],
    driver_of: Any,
    warn: Any,
) -> list[SrTarget]:
    """The job's SRs found in the configured servers' inventories; unknown ones are warned
    about and skipped."""
    targets = []
    for sr_uuid in sr_uuids:
        found = None
        for server, inventory in inventories.items():
            for pool in inventory.pools:
                for sr in pool.srs:
                    if sr.uuid == sr_uuid:
                        found = SrTarget(sr, pool, driver_of(server))
        if found is None:
            warn(f"SR {sr_uuid} is in none of the configured servers: not replicated to")
            continue
        targets.append(found)
    return targets


class Replication:
    """The SR side of one VM's backup in one run (``backup`` is the engine's VM backup)."""

    def __init__(self, backup: Any, targets: Sequence[SrTarget]) -> None:
        self.backup = backup
        self.targets = list(targets)
        self.dropped: list[str] = []
        self.plans: dict[str, CrPlan] = {}
        self.made: dict[str, str] = {}
        """This run's DR replica per SR."""

    # -- common ------------------------------------------------------------------------------
    @property
    def live(self) -> list[SrTarget]:
        return [t for t in self.targets if t.error is None]

    def drop(self, target: SrTarget, error: BaseException, step: str) -> None:
        if target.error is None:
            target.error = error
        if target.key in self.dropped:
            return
        self.dropped.append(target.key)
        self.backup.task.warning(
            f"replication to {target.label} failed during {step}: {describe_error(error)}",
            {"sr": target.key},
        )

    def keys(self, target: SrTarget, datetime: str) -> dict[str, str | None]:
        b = self.backup
        return replica_keys(b.job_id, b.schedule_id, b.vm.uuid, target.key, datetime)

    def task(self, target: SrTarget, is_full: bool, **extra: Any) -> Any:
        b = self.backup
        return b.recorder.task(
            "export",
            {"type": "SR", "id": target.key, "isFull": is_full, **extra},
            parent=b.task,
        )

    @property
    def copy_retention(self) -> int:
        return int(self.backup.settings["copyRetention"] or 0)

    def source_cpu(self) -> CpuInfo | None:
        """The CPU of the host the VM runs on, when the inventory tells."""
        b = self.backup
        inventory = getattr(b, "inventory", None)
        if inventory is None or not b.vm.resident_on:
            return None
        for pool in inventory.pools:
            for host in pool.hosts:
                if host.uuid == b.vm.resident_on:
                    return host.cpu
        return None

    def check_memory(self, *, create: bool = True) -> None:
        """Before any transfer: each SR's pool must be able to resume a memory replica,
        unless the job forces it (``bypassCpuCheck``): then the run warns and goes on."""
        b = self.backup
        force = bool(b.settings.get("bypassCpuCheck"))
        for target in self.live:
            warning = check_memory_target(
                b.vm, b.vm, target, create=create, force=force, source_cpu=self.source_cpu()
            )
            if warning:
                b.task.warning(
                    f"bypassCpuCheck: replicating to {target.label} anyway, but {warning}; "
                    "the replica resumes there only when forced",
                    {"sr": target.key},
                )

    def plan_dr(self, memory: bool) -> None:
        """Before the snapshot: a checkpoint's XVA imports as a Suspended replica, which a
        host of each target pool must be able to resume."""
        if memory:
            self.check_memory(create=False)

    # -- disaster recovery -------------------------------------------------------------------
    def dr_fan_targets(self) -> list[Any]:
        """One fan-out target per SR: the XVA chunks go straight into ``import_vm``."""
        fan_targets = []
        for target in self.live:
            handle = self.task(target, True)
            pipe = UploadPipe(f"import onto {target.label}")
            reader = pipe.reader()
            try:
                pipe.start(
                    lambda t=target, r=reader: t.driver.import_vm(r, sr_uuid=t.sr.uuid, size=None)
                )
            except Exception as error:  # pragma: no cover - thread start failure
                handle.fail(describe_error(error))
                self.drop(target, error, "transfer")
                continue
            fan_targets.append(
                Target(
                    f"sr:{target.key}",
                    pipe.push,
                    lambda p=pipe: p.finish(),
                    pipe.abort,
                    data={"sr": target, "pipe": pipe, "task": handle},
                )
            )
        return fan_targets

    def finish_dr(self, fan_targets: Sequence[Any], timestamp_ms: int, stamp: str) -> int:
        """Mark each imported replica, then rotate; returns how many SRs succeeded."""
        from xobackup_core.engine.runner import other_config_datetime

        b = self.backup
        ok = 0
        for fan_target in fan_targets:
            target: SrTarget = fan_target.data["sr"]
            handle = fan_target.data["task"]
            if fan_target.error is not None:
                handle.fail(describe_error(fan_target.error))
                self.drop(target, fan_target.error, "transfer")
                continue
            replica = fan_target.data["pipe"].result
            try:
                ha = protect_replica(
                    target.driver,
                    replica,
                    name=f"{b.vm.name} - {b.job['name']} - ({stamp})",
                    tag=DR_TAG,
                    other_config=self.keys(target, other_config_datetime(timestamp_ms)),
                )
                if ha:
                    handle.info("HA restart priority cleared on the replica")
                handle.finish(size=fan_target.written, id=replica)
                self.made[target.key] = replica
                ok += 1
            except XobackupError as error:
                handle.fail(describe_error(error))
                self.drop(target, error, "marking the replica")
                try:
                    target.driver.destroy_vm(replica)
                except XobackupError:
                    pass
        return ok

    def rotate_dr(self, reserve: int = 0) -> None:
        """Destroy the oldest DR replicas beyond ``copyRetention`` (minus ``reserve``)."""
        b = self.backup
        # 0 would destroy the replica just made: at least one is kept.
        keep = max(max(self.copy_retention, 1) - reserve, 0)
        for target in self.live:
            try:
                vms = target.driver.inventory().vms
                doomed = doomed_replicas(
                    dr_replicas(vms, b.job_id, b.schedule_id, b.vm.uuid, target.key),
                    keep,
                    self.made.get(target.key),
                )
                for replica in doomed:
                    target.driver.destroy_vm(replica.uuid)
            except XobackupError as error:
                b.task.warning(f"rotating the replicas on {target.label} failed: {error}")

    # -- continuous replication --------------------------------------------------------------
    def cr_replicas(self, target: SrTarget, vms: Sequence[Vm]) -> list[Vm]:
        """This job's CR replicas of the VM on ``target`` still under its control, oldest
        first."""
        b = self.backup
        found = [
            v
            for v in vms
            if not v.is_snapshot
            and CR_TAG in v.tags
            and v.other_config.get("xo:backup:job") == b.job_id
            and v.other_config.get("xo:backup:vm") == b.vm.uuid
            and v.other_config.get("xo:backup:sr") == target.key
        ]
        return sorted(found, key=lambda v: (v.other_config.get("xo:backup:datetime", ""), v.uuid))

    def plan_cr(
        self, base: Vm | None, reason: str, disks: Sequence[Disk], memory: bool
    ) -> tuple[Vm | None, str]:
        """Before the snapshot: decide per SR whether the replica is updated in place.

        Returns the base to use: None (full for every target) when a replica cannot take a
        delta against ``base``.
        """
        if not self.live:
            return base, reason
        if memory:
            self.check_memory()
        for target in self.live:
            replica = None
            why = ""
            try:
                replica, why = self.find_cr_replica(target, base, disks, memory)
            except XobackupError as error:
                why = f"its replica could not be checked: {error}"
            plan = CrPlan(target, replica)
            if replica is not None and memory:
                plan.memory_vdi = replica.suspend_vdi_uuid
            if replica is not None:
                by_device = {d.device: d for d in replica.disks}
                for disk in disks:
                    plan.disks[disk.vdi_uuid] = CrDisk(
                        disk.vdi_uuid, by_device[disk.device].vdi_uuid, created=False
                    )
            self.plans[target.key] = plan
            if base is not None and replica is None:
                reason = f"{target.label}: {why}"
                base = None
        if base is None:
            for plan in self.plans.values():
                plan.replica = None
                plan.memory_vdi = None
                plan.disks.clear()
        return base, reason

    def find_cr_replica(
        self, target: SrTarget, base: Vm | None, disks: Sequence[Disk], memory: bool
    ) -> tuple[Vm | None, str]:
        """The replica a delta against ``base`` can update in place, or None and why."""
        vms = target.driver.inventory().vms
        replicas = self.cr_replicas(target, vms)
        if not replicas:
            return None, "no replica there yet"
        replicas = [r for r in replicas if REPLICATED_KEY in r.other_config]
        if not replicas:
            return None, "every replica there was released (started or changed)"
        replica = replicas[-1]
        if not is_protected(replica):
            self.release(target, replica)
            self.backup.task.warning(
                f"replica {replica.name} on {target.label} can be started (its start is no "
                "longer blocked): it is left alone and a new replica is made"
            )
            return None, "the replica's start was unblocked"
        if replica.power_state not in ("Halted", "Suspended"):
            self.release(target, replica)
            self.backup.task.warning(
                f"replica {replica.name} on {target.label} is {replica.power_state}: it is left "
                "alone and a new replica is made"
            )
            return None, f"the replica is {replica.power_state}"
        if memory and not replica.suspend_vdi_uuid:
            return None, "this run replicates memory and the replica has none (it is Halted)"
        if replica.suspend_vdi_uuid and not memory:
            return None, "the replica is Suspended with memory and this run has none"
        if memory:
            why = self.memory_mismatch(target, replica)
            if why:
                return None, why
        if base is None:
            return None, "no base"
        if replica.other_config.get(REPLICATED_KEY) != base.uuid:
            self.release(target, replica)
            self.backup.task.warning(
                f"replica {replica.name} on {target.label} does not hold the last replicated "
                "state: a new replica is made"
            )
            return None, "the replica does not hold the base"
        by_device = {d.device: d for d in replica.disks}
        for disk in disks:
            twin = by_device.get(disk.device)
            if twin is None or twin.virtual_size != disk.virtual_size:
                self.backup.task.warning(
                    f"replica {replica.name} on {target.label} has no disk matching "
                    f"{disk.name}: a new replica is made"
                )
                return None, f"the replica lacks disk {disk.name}"
        if self.replica_changed(target, replica, vms):
            self.release(target, replica)
            self.backup.task.warning(
                f"the disks of replica {replica.name} on {target.label} changed since the last "
                "replication: it is left alone and a new replica is made"
            )
            return None, "the replica's disks changed"
        return replica, ""

    def memory_mismatch(self, target: SrTarget, replica: Vm) -> str:
        """Why a Suspended replica cannot take this run's memory image in place ("" if it
        can): it was resumed since, or the VM's CPU or memory size are no longer those the
        replica was created with (a replica's CPU flags and memory cannot be changed)."""
        vm = self.backup.vm
        written = replica.other_config.get(MEMORY_KEY)
        if written and written != replica.suspend_vdi_uuid:
            self.release(target, replica)
            self.backup.task.warning(
                f"replica {replica.name} on {target.label} was resumed and suspended again "
                "since the last replication: it is left alone and a new replica is made"
            )
            return "the replica was resumed since the last replication"
        flags = vm.last_boot_cpu_flags
        if (
            flags
            and replica.last_boot_cpu_flags
            and dict(flags) != dict(replica.last_boot_cpu_flags)
        ):
            return "the VM booted on another CPU since the replica was made"
        size = vm.record.get("memory_static_max")
        if size is not None and replica.record.get("memory_static_max") not in (None, size):
            return "the VM's memory size changed since the replica was made"
        return ""

    def release(self, target: SrTarget, replica: Vm) -> None:
        """A replica someone started or changed leaves the job's rotation: it is never
        updated nor destroyed by the job again (its marker goes)."""
        if REPLICATED_KEY in replica.other_config:
            target.driver.update_vm(replica.uuid, other_config={REPLICATED_KEY: None})

    def replica_changed(self, target: SrTarget, replica: Vm, vms: Sequence[Vm]) -> bool:
        """Did a disk of the replica change since its last snapshot (taken right after the
        last transfer)? A delta export of each disk against its snapshot must be empty."""
        snapshots = sorted(
            (v for v in vms if v.snapshot_of == replica.uuid),
            key=lambda v: (v.other_config.get("xo:backup:datetime", ""), v.uuid),
        )
        if not snapshots:
            return True
        taken = {d.snapshot_of: d for d in snapshots[-1].disks}
        for disk in replica.disks:
            twin = taken.get(disk.vdi_uuid)
            if twin is None:
                return True
            with target.driver.export_disk(disk.vdi_uuid, base_vdi_uuid=twin.vdi_uuid) as stream:
                if VhdStreamReader(stream, name=f"changes of {disk.name}").allocated:
                    return True
        return False

    def cr_fan_targets(
        self,
        disk: Disk,
        base_disk: Disk | None,
        size: int,
        allocated: Sequence[int],
        is_memory: bool,
    ) -> list[Target]:
        """One fan-out target per SR for one disk export: the blocks go into a VDI import."""
        fan_targets = []
        for target in self.live:
            plan = self.plans.get(target.key)
            if plan is None:
                continue
            handle = self.task(target, base_disk is None, disk=disk.name)
            try:
                with plan.lock:
                    entry = plan.disks.get(disk.vdi_uuid)
                zeros: list[int] = []
                if is_memory and plan.replica is not None and plan.memory_vdi:
                    # the memory image is always whole; blocks the old image used and the new
                    # one does not are cleared
                    zeros = self.stale_blocks(target, plan.memory_vdi, size, allocated)
                    entry = CrDisk(disk.vdi_uuid, plan.memory_vdi, created=False, is_memory=True)
                    with plan.lock:
                        plan.disks[disk.vdi_uuid] = entry
                    layout = plan_vhd_stream(size, [*allocated, *zeros])
                elif entry is not None and base_disk is not None:
                    layout = plan_vhd_stream(
                        size,
                        allocated,
                        parent=ParentLink(
                            uuid=uuidlib.UUID(base_disk.vdi_uuid), name=f"{base_disk.vdi_uuid}.vhd"
                        ),
                    )
                else:
                    vdi = target.driver.create_disk(
                        sr_uuid=target.sr.uuid,
                        name=disk.name,
                        virtual_size=size,
                        vdi_type="suspend" if is_memory else "user",
                    )
                    entry = CrDisk(disk.vdi_uuid, vdi, created=True, is_memory=is_memory)
                    with plan.lock:
                        plan.disks[disk.vdi_uuid] = entry
                    layout = plan_vhd_stream(size, allocated)
                sink = VhdUploadSink(target.driver, entry.replica_vdi, layout, zeros)
            except Exception as error:
                handle.fail(describe_error(error))
                self.drop(target, error, "transfer")
                continue
            fan_targets.append(
                Target(
                    f"sr:{target.key}",
                    lambda item, s=sink: s.put(*item),
                    sink.finish,
                    sink.abort,
                    data={"sr": target, "sink": sink, "task": handle},
                )
            )
        return fan_targets

    def stale_blocks(
        self, target: SrTarget, vdi_uuid: str, size: int, allocated: Sequence[int]
    ) -> list[int]:
        """Blocks a VDI holds data in that a new image of ``size`` bytes with ``allocated``
        blocks leaves empty (read from the VDI's export header, no data)."""
        with target.driver.export_disk(vdi_uuid) as stream:
            reader = VhdStreamReader(stream, name=f"suspend VDI {vdi_uuid}")
            if reader.size != size:
                raise XobackupError(
                    f"the memory image ({size} bytes) does not fit the replica's suspend VDI "
                    f"{vdi_uuid} ({reader.size} bytes)"
                )
            held = set(reader.allocated)
        return sorted(held - set(allocated))

    def cr_transferred(self, fan_target: Target) -> None:
        """Close the task of one disk transfer to one SR."""
        target: SrTarget = fan_target.data["sr"]
        handle = fan_target.data["task"]
        if fan_target.error is None:
            handle.finish(size=fan_target.data["sink"].size)
        else:
            handle.fail(describe_error(fan_target.error))
            self.drop(target, fan_target.error, "transfer")

    def finish_cr(self, snapshot: Vm, timestamp_ms: int, stamp: str) -> None:
        """After the transfers: create or update each replica, snapshot it, rotate."""
        from xobackup_core.engine.runner import other_config_datetime

        b = self.backup
        datetime = other_config_datetime(timestamp_ms)
        for plan in list(self.plans.values()):
            target = plan.target
            if target.error is not None:
                if plan.replica is not None and plan.memory_vdi:
                    self.destroy_torn(plan, "a transfer into it failed")
                self.discard(plan)
                continue
            memory = next((e.replica_vdi for e in plan.disks.values() if e.is_memory), None)
            if plan.replica is not None and plan.memory_vdi and memory is None:
                self.drop_torn(plan)
                continue
            try:
                replica = plan.replica.uuid if plan.replica else self.create(plan, snapshot)
                keys = self.keys(target, datetime)
                ha = protect_replica(
                    target.driver,
                    replica,
                    name=f"{b.vm.name} - {b.job['name']}",
                    tag=CR_TAG,
                    other_config={**keys, REPLICATED_KEY: snapshot.uuid, MEMORY_KEY: memory},
                    current=plan.replica,
                )
                if ha:
                    b.task.info(f"HA restart priority cleared on the replica on {target.label}")
                taken = target.driver.snapshot(
                    replica, f"{b.vm.name} - {b.job['name']} / {b.schedule_id} {stamp}"
                )
                target.driver.update_vm(taken.uuid, other_config=keys)
            except XobackupError as error:
                self.drop(target, error, "creating the replica")
                self.discard(plan)
                continue
            self.rotate_cr(target, replica, taken.uuid)

    def drop_torn(self, plan: CrPlan) -> None:
        """The checkpoint fell back to a plain snapshot (the VM stopped meanwhile): the
        Suspended replica got new disks but no memory image to match."""
        assert plan.replica is not None
        error = XobackupError(
            f"the snapshot has no memory image (the VM was not running any more): Suspended "
            f"replica {plan.replica.name} got this run's disks without its memory"
        )
        self.drop(plan.target, error, "transfer")
        self.destroy_torn(plan, "it got this run's disks without their memory image")

    def destroy_torn(self, plan: CrPlan, why: str) -> None:
        """A Suspended replica whose disks and memory may no longer match must never be
        resumed: it is destroyed with its snapshots, and the next run makes a new one."""
        target, replica = plan.target, plan.replica
        assert replica is not None
        self.backup.task.warning(
            f"Suspended replica {replica.name} on {target.label} is destroyed: {why}, so its "
            "disks and memory may not match; the next run makes a new replica",
            {"sr": target.key},
        )
        try:
            for v in target.driver.inventory().vms:
                if v.is_snapshot and v.snapshot_of == replica.uuid:
                    target.driver.destroy_vm(v.uuid)
            target.driver.destroy_vm(replica.uuid)
        except XobackupError as failure:
            self.backup.task.warning(f"destroying replica {replica.name} failed: {failure}")

    def create(self, plan: CrPlan, snapshot: Vm) -> str:
        """A new replica VM from the snapshot's records, on the VDIs just written."""
        b = self.backup
        devices = b.driver.vm_devices(snapshot.uuid)
        metadata: dict[str, Any] = {
            "vmSnapshot": dict(snapshot.record) or {"name_label": snapshot.name},
            **{k: dict(v) for k, v in devices.items()},
        }
        snap_of = {d.snapshot_of: d.vdi_uuid for d in snapshot.disks}
        disks = {}
        suspend = None
        for live_vdi, entry in plan.disks.items():
            if entry.is_memory:
                suspend = entry.replica_vdi
            else:
                disks[snap_of.get(live_vdi, live_vdi)] = entry.replica_vdi
        vm = plan.target.driver.create_vm(
            metadata, sr_uuid=plan.target.sr.uuid, disks=disks, suspend_vdi_uuid=suspend
        )
        plan.replica = None
        for entry in plan.disks.values():
            entry.created = False  # the VM owns them now
        return vm

    def discard(self, plan: CrPlan) -> None:
        """Destroy the VDIs a failed run created for a new replica."""
        for entry in plan.disks.values():
            if entry.created:
                try:
                    plan.target.driver.destroy_disk(entry.replica_vdi)
                except XobackupError:
                    pass  # the first error is the one reported
                entry.created = False

    def abort_cr(self) -> None:
        for plan in self.plans.values():
            self.discard(plan)

    def rotate_cr(self, target: SrTarget, current: str, newest: str) -> None:
        """Keep the newest ``copyRetention`` replica snapshots of this schedule; replicas
        superseded by a new one go once none of their snapshots is left."""
        b = self.backup
        try:
            vms = target.driver.inventory().vms
            replicas = {
                r.uuid
                for r in self.cr_replicas(target, vms)
                if is_protected(r)
                and REPLICATED_KEY in r.other_config
                and r.power_state in ("Halted", "Suspended")
            }
            replicas.add(current)
            entries = sorted(
                (
                    v
                    for v in vms
                    if v.is_snapshot
                    and v.snapshot_of in replicas
                    and v.other_config.get("xo:backup:schedule", "") == b.schedule_id
                ),
                key=lambda v: (v.other_config.get("xo:backup:datetime", ""), v.uuid),
            )
            doomed = doomed_replicas(entries, max(self.copy_retention, 1), newest)
            for snapshot in doomed:
                target.driver.destroy_vm(snapshot.uuid)
            kept = {v.snapshot_of for v in entries if v not in doomed}
            for replica in replicas - kept - {current}:
                target.driver.destroy_vm(replica)
        except XobackupError as error:
            b.task.warning(f"rotating the replicas on {target.label} failed: {error}")
