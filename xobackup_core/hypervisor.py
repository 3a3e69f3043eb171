"""The hypervisor contract: the inventory a driver reports and the operations a backup needs.

A driver is returned by the ``xobackup_hypervisor`` hook for one configured server (pool). The
engine only talks to this interface; the XAPI protocol lives in the ``hypervisor_xcpng`` plugin.
Objects are identified by UUID everywhere in this contract (XAPI's opaque refs stay inside the
driver) because UUIDs are what the backup metadata and the remote layout record.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, BinaryIO, Literal

from xobackup_core.errors import HypervisorError

PowerState = Literal["Running", "Halted", "Suspended", "Paused"]
VmCompression = Literal["none", "gzip", "zstd"]
DiskFormat = Literal["vhd", "raw"]


@dataclass(frozen=True)
class CpuInfo:
    """A host's CPU as XAPI reports it in ``host.cpu_info`` (feature masks are hex strings)."""

    vendor: str
    features: str = ""
    features_hvm: str = ""
    features_pv: str = ""
    model_name: str = ""


@dataclass(frozen=True)
class Host:
    uuid: str
    name: str
    pool_uuid: str
    cpu: CpuInfo
    is_master: bool = False


@dataclass(frozen=True)
class StorageRepository:
    uuid: str
    name: str
    pool_uuid: str
    type: str = ""
    free_bytes: int | None = None


@dataclass(frozen=True)
class Network:
    uuid: str
    name: str
    pool_uuid: str
    vlan: int = -1


@dataclass(frozen=True)
class Disk:
    """A VM disk (VDI attached through a VBD)."""

    vdi_uuid: str
    name: str
    virtual_size: int
    sr_uuid: str
    device: str = ""
    """The VBD's userdevice (``0``, ``1``...)."""
    snapshot_of: str | None = None
    """For a snapshot's disk: the live VDI it was taken from."""
    other_config: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Vm:
    """A VM, snapshot or checkpoint as the engine sees it."""

    uuid: str
    name: str
    pool_uuid: str
    power_state: PowerState
    tags: tuple[str, ...] = ()
    other_config: Mapping[str, str] = field(default_factory=dict)
    blocked_operations: Mapping[str, str] = field(default_factory=dict)
    ha_restart_priority: str = ""
    disks: tuple[Disk, ...] = ()
    is_snapshot: bool = False
    snapshot_of: str | None = None
    snapshot_time: str = ""
    suspend_vdi_uuid: str | None = None
    """Memory image of a checkpoint or Suspended VM."""
    last_boot_cpu_flags: Mapping[str, str] = field(default_factory=dict)
    resident_on: str | None = None
    record: Mapping[str, Any] = field(default_factory=dict)
    """The hypervisor's full record, stored as-is in backup metadata (``vm``/``vmSnapshot``)."""


@dataclass(frozen=True)
class Pool:
    uuid: str
    name: str
    flavour: str
    """``xcp-ng`` or ``citrix``: decides host-side zstd and Suspended VM creation."""
    hosts: tuple[Host, ...] = ()
    srs: tuple[StorageRepository, ...] = ()
    networks: tuple[Network, ...] = ()
    default_sr_uuid: str | None = None


@dataclass(frozen=True)
class Inventory:
    """Everything a selector and the engine need to know about one server, read at once."""

    pools: tuple[Pool, ...]
    vms: tuple[Vm, ...]
    """VMs, snapshots and checkpoints (templates and control domains excluded)."""

    def vm(self, uuid: str) -> Vm:
        """The VM, snapshot or checkpoint with this UUID (KeyError if absent)."""
        return self._by_uuid[uuid]

    def snapshots_of(self, vm_uuid: str) -> tuple[Vm, ...]:
        """The snapshots and checkpoints of a VM (an index: a 1,000-VM job asks per VM)."""
        return self._snapshots.get(vm_uuid, ())

    @cached_property
    def _by_uuid(self) -> dict[str, Vm]:
        return {vm.uuid: vm for vm in self.vms}

    @cached_property
    def _snapshots(self) -> dict[str, tuple[Vm, ...]]:
        index: dict[str, list[Vm]] = {}
        for vm in self.vms:
            if vm.is_snapshot and vm.snapshot_of:
                index.setdefault(vm.snapshot_of, []).append(vm)
        return {uuid: tuple(found) for uuid, found in index.items()}


class HypervisorDriver(ABC):
    """Operations on one server. Blocking and thread-safe; streams are read by the caller.

    Every method raises :class:`~xobackup_core.errors.HypervisorError` carrying the
    hypervisor's error code when a call fails.
    """

    name: str = "hypervisor"

    @abstractmethod
    def inventory(self) -> Inventory:
        """Pools, hosts (with CPU info), SRs, networks and VMs, read now."""

    @abstractmethod
    def snapshot(
        self,
        vm_uuid: str,
        name: str,
        *,
        quiesce: bool = False,
        memory: bool = False,
        ignore_vdis: tuple[str, ...] = (),
    ) -> Vm:
        """Snapshot a VM and return the snapshot.

        ``quiesce`` asks for a quiesced snapshot and falls back to a plain one where the host
        refuses (the returned record's ``other_config`` then holds ``xo:quiesce-fallback``).
        ``memory`` takes a checkpoint (RAM included: the result has ``suspend_vdi_uuid``).
        ``ignore_vdis`` (live VDI UUIDs) are left out of the snapshot (``[NOBAK]`` disks).
        Each disk of the result has ``snapshot_of`` set to its live VDI.
        """

    @abstractmethod
    def export_vm(self, vm_uuid: str, *, compression: VmCompression = "none") -> BinaryIO:
        """Stream the VM (or snapshot) as an XVA, compressed by the host when asked."""

    @abstractmethod
    def export_disk(
        self, vdi_uuid: str, *, base_vdi_uuid: str | None = None, format: DiskFormat = "vhd"
    ) -> BinaryIO:
        """Stream a disk: full, or as a delta against ``base_vdi_uuid`` (whole 2 MiB blocks)."""

    @abstractmethod
    def import_vm(self, stream: BinaryIO, *, sr_uuid: str, size: int | None = None) -> str:
        """Import an XVA stream onto an SR; return the new VM's UUID.

        ``size`` is the stream's exact length when known (XAPI wants a Content-Length).
        """

    @abstractmethod
    def import_disk(
        self,
        vdi_uuid: str,
        stream: BinaryIO,
        *,
        format: DiskFormat = "vhd",
        size: int | None = None,
    ) -> None:
        """Write a disk image (full VHD, delta VHD, or raw) of ``size`` bytes into a VDI."""

    @abstractmethod
    def create_disk(
        self, *, sr_uuid: str, name: str, virtual_size: int, vdi_type: str = "user"
    ) -> str:
        """Create an empty VDI on an SR; return its UUID (``vdi_type="suspend"`` for a
        memory image)."""

    @abstractmethod
    def destroy_disk(self, vdi_uuid: str) -> None:
        """Destroy a VDI."""

    @abstractmethod
    def create_vm(
        self,
        metadata: Mapping[str, Any],
        *,
        sr_uuid: str,
        disks: Mapping[str, str],
        suspend_vdi_uuid: str | None = None,
        networks: Mapping[str, str] | None = None,
    ) -> str:
        """Create a VM from backup metadata (the ``vm``/``vmSnapshot`` record, with the
        ``vbds``/``vdis``/``vifs`` maps of a delta backup when there are some).

        ``disks`` maps the metadata's VDI UUIDs to VDIs already created on the target;
        ``networks`` maps source network UUIDs to target ones (unmapped networks are matched
        by UUID, then by name and VLAN). With
        ``suspend_vdi_uuid`` the VM is created Suspended on flavours that can; others raise a
        :class:`~xobackup_core.errors.HypervisorError` saying the flavour cannot.
        """

    @abstractmethod
    def destroy_vm(self, vm_uuid: str, *, with_disks: bool = True) -> None:
        """Destroy a VM, snapshot or checkpoint, and its disks unless told otherwise."""

    @abstractmethod
    def update_vm(
        self,
        vm_uuid: str,
        *,
        name: str | None = None,
        add_tags: tuple[str, ...] = (),
        remove_tags: tuple[str, ...] = (),
        other_config: Mapping[str, str | None] | None = None,
        blocked_operations: Mapping[str, str | None] | None = None,
        ha_restart_priority: str | None = None,
    ) -> None:
        """Change a VM's bookkeeping. A ``None`` value in a mapping removes that key."""

    def start_vm(self, vm_uuid: str) -> None:
        """Start a Halted VM, or resume a Suspended one (with the hypervisor's CPU check).

        Raises :class:`~xobackup_core.errors.HypervisorError` with the hypervisor's code when
        the VM cannot run (e.g. ``VM_BAD_POWER_STATE``, ``OPERATION_BLOCKED``,
        ``VM_INCOMPATIBLE_WITH_THIS_HOST``); drivers that cannot start VMs raise it too.
        """
        raise HypervisorError(f"the {self.name} driver cannot start VMs", code="NOT_SUPPORTED")

    def shutdown_vm(self, vm_uuid: str, *, force_after: float | None = None) -> None:
        """Shut a Running VM down cleanly (the guest's own shutdown) and return once it is
        Halted.

        With ``force_after`` (seconds), a guest still running after that long, or one that
        cannot shut down cleanly at all (no PV drivers), is powered off hard, as Xen
        Orchestra's "force shutdown delay" does; without it the clean shutdown's failure is
        raised and the VM keeps running. A VM already Halted is left alone. Raises
        :class:`~xobackup_core.errors.HypervisorError` with the hypervisor's code otherwise
        (e.g. ``VM_BAD_POWER_STATE`` for a Suspended VM, ``OPERATION_BLOCKED``); drivers
        that cannot stop VMs raise it too.
        """
        raise HypervisorError(f"the {self.name} driver cannot shut VMs down", code="NOT_SUPPORTED")

    def update_vdi(
        self,
        vdi_uuid: str,
        *,
        name: str | None = None,
        other_config: Mapping[str, str | None] | None = None,
    ) -> None:
        """Rename a VDI or change its ``other_config`` (a ``None`` value removes that key).

        The engine marks a backup snapshot's disks with the ``xo:backup:*`` keys, as Xen
        Orchestra does (xo-backups.md §7.4), so that a later run finds its base per disk.
        """
        raise HypervisorError(f"the {self.name} driver cannot change disks", code="NOT_SUPPORTED")

    def set_vif_macs(self, vm_uuid: str, macs: Mapping[str, str]) -> None:
        """Give a Halted VM's network interfaces these MAC addresses, keyed by VIF device
        (``"0"``, ``"1"``...); ``""`` asks the hypervisor for a fresh one. Interfaces whose
        device is not in ``macs``, or that already have that MAC, are left alone.
        """
        raise HypervisorError(f"the {self.name} driver cannot change MACs", code="NOT_SUPPORTED")

    def vm_devices(self, vm_uuid: str) -> Mapping[str, Mapping[str, Mapping[str, Any]]]:
        """The hypervisor's records of a VM's devices, stored in delta backup metadata.

        ``{"vbds": {ref: record}, "vdis": {ref: record}, "vifs": {ref: record},
        "networks": {ref: record}}``, keyed as the VM record refers to them. Drivers that
        cannot tell return empty maps; restores then rebuild devices from :class:`Disk`.
        """
        return {"vbds": {}, "vdis": {}, "vifs": {}, "networks": {}}

    def close(self) -> None:
        """Log out and release connections."""
