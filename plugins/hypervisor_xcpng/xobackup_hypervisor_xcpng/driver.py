"""The XAPI driver: XCP-ng and Citrix Hypervisor (XenServer) pools behind the engine's contract.

:class:`XapiDriver` implements :class:`~xobackup_core.hypervisor.HypervisorDriver` with the
calls and flows Xen Orchestra uses (xapi-protocol.md §3, xo-backups.md §1, §6, §7, §11.1):
RPC through :mod:`.driver_rpc` (login, master failover, re-login, retries, timeouts), and the
streaming HTTP handlers through :mod:`.driver_http` (bounded memory, task-checked transfers).

The contract speaks UUIDs; XAPI refs stay here. Server options (``[servers.X.options]``):

``retries`` (10) and ``retry_delay`` (5 s)
    attempts and base delay for the codes XAPI documents as transient (``VDI_IN_USE``,
    ``TOO_MANY_PENDING_TASKS``, ``OTHER_OPERATION_IN_PROGRESS``, ``SR_BACKEND_FAILURE_46``...).
``task_timeout`` (6 h)
    how long a snapshot, checkpoint, import or other XAPI task may run.
``protocol`` (``auto``)
    ``jsonrpc``, ``xmlrpc`` or ``auto`` (JSON-RPC with a fallback to XML-RPC).
``flavour``
    ``xcp-ng`` or ``citrix`` when the product brand does not say it.
``quiesce_fallback`` (true)
    take a plain snapshot when a quiesced one is impossible.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO

from xobackup_core.errors import HypervisorError
from xobackup_core.hypervisor import (
    CpuInfo,
    Disk,
    DiskFormat,
    Host,
    HypervisorDriver,
    Inventory,
    Network,
    Pool,
    StorageRepository,
    Vm,
    VmCompression,
)
from xobackup_hypervisor_xcpng.driver_http import (
    RawCheck,
    VhdCheck,
    XapiDownload,
    XvaCheck,
    upload,
    vhd_length_from_head,
)
from xobackup_hypervisor_xcpng.driver_rpc import (
    NULL_REF,
    Endpoint,
    TlsPolicy,
    XapiSession,
    XapiTimeoutError,
    is_null,
)

ProgressCallback = Callable[[float], None]
"""Receives a task's progress, 0.0 to 1.0."""

QUIESCE_FALLBACK_KEY = "xo:quiesce-fallback"
"""``other_config`` key on a snapshot taken plain because quiescing was refused."""
NETWORK_RECORD_TTL = 300.0
"""Seconds a network record read by this driver is reused in backup metadata."""

QUIESCE_UNAVAILABLE = (
    "MESSAGE_REMOVED",
    "MESSAGE_METHOD_UNKNOWN",
    "VM_SNAPSHOT_WITH_QUIESCE_NOT_SUPPORTED",
    "VM_SNAPSHOT_WITH_QUIESCE_FAILED",
    "VM_SNAPSHOT_WITH_QUIESCE_TIMEOUT",
    "VM_SNAPSHOT_WITH_QUIESCE_PLUGIN_DOES_NOT_RESPOND",
)
"""Answers meaning "no quiesced snapshot here" (§3.1); ``XEN_VSS_REQ_ERROR_*`` too."""

NO_CLEAN_SHUTDOWN = ("VM_MISSING_PV_DRIVERS", "VM_LACKS_FEATURE_SHUTDOWN", "VM_LACKS_FEATURE")
"""Answers to ``VM.clean_shutdown`` meaning "this guest cannot be asked to shut down"."""

_INT_FIELDS = {
    "VM": (
        "memory_static_max",
        "memory_static_min",
        "memory_dynamic_max",
        "memory_dynamic_min",
        "memory_target",
        "memory_overhead",
        "VCPUs_max",
        "VCPUs_at_startup",
        "domid",
        "user_version",
        "start_delay",
        "shutdown_delay",
        "order",
        "version",
        "hardware_platform_version",
    ),
    "VDI": ("virtual_size", "physical_utilisation"),
    "SR": ("physical_size", "physical_utilisation", "virtual_allocation"),
}
"""int64 fields that arrive as strings over XML-RPC (§1.2) and must be numbers in metadata."""

_VM_CREATE_DROP = (
    "uuid",
    "VBDs",
    "VIFs",
    "snapshots",
    "children",
    "consoles",
    "crash_dumps",
    "VUSBs",
    "VTPMs",
    "VGPUs",
    "attached_PCIs",
    "current_operations",
    "allowed_operations",
    "resident_on",
    "scheduled_to_be_resident_on",
    "metrics",
    "guest_metrics",
    "snapshot_of",
    "parent",
    "is_a_snapshot",
    "snapshot_time",
    "snapshot_info",
    "snapshot_metadata",
    "transportable_snapshot_id",
    "domid",
    "domarch",
    "affinity",
    "appliance",
    "suspend_SR",
    "protection_policy",
    "snapshot_schedule",
    "is_snapshot_from_vmpp",
    "is_vmss_snapshot",
    "blobs",
    "groups",
    "pending_guidances",
    "requires_reboot",
    "is_control_domain",
    "is_default_template",
    "power_state",
    "suspend_VDI",
    "last_boot_CPU_flags",
    "last_booted_record",
)
"""Fields a restored VM must not copy from its backup record (runtime state, foreign refs)."""


def _int(value: Any, default: int = 0) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _coerce(cls: str, record: dict[str, Any]) -> dict[str, Any]:
    for name in _INT_FIELDS.get(cls, ()):
        if isinstance(record.get(name), str):
            record[name] = _int(record[name])
    return record


def flavour_of(software_version: Mapping[str, str]) -> str:
    """``xcp-ng`` or ``citrix`` from a host's ``software_version``."""
    brand = str(software_version.get("product_brand", "")).lower()
    return "xcp-ng" if "xcp" in brand else "citrix"


class XapiDriver(HypervisorDriver):
    """A pool reached through its master's XAPI (thread-safe)."""

    name = "xcpng"

    def __init__(self, server: Mapping[str, Any]) -> None:
        options = dict(server.get("options") or {})
        url = server.get("url")
        if not url:
            raise HypervisorError("the server has no url (e.g. https://xcp-master.example)")
        password = server.get("password")
        secret = password.reveal() if hasattr(password, "reveal") else (password or "")
        self.label = str(server.get("name") or url)
        self.task_timeout = float(options.get("task_timeout", 6 * 3600))
        self.quiesce_fallback = bool(options.get("quiesce_fallback", True))
        self._flavour_option = options.get("flavour")
        tls = TlsPolicy(
            ca_file=server.get("ca_file"),
            fingerprint=server.get("fingerprint"),
            allow_unauthorized=bool(server.get("allow_unauthorized", False)),
        )
        self.session = XapiSession(
            Endpoint.from_url(str(url)),
            username=str(server.get("username") or "root"),
            password=secret,
            tls=tls,
            timeout=float(server.get("timeout") or 300.0),
            retries=int(options.get("retries", 10)),
            retry_delay=float(options.get("retry_delay", 5.0)),
            protocol=str(options.get("protocol", "auto")),
        )
        self._cache_lock = threading.Lock()
        self._refs: dict[tuple[str, str], str] = {}
        """(class, uuid) -> ref of objects seen in this session; refs change only when XAPI
        restarts, which makes the session log in again (a new generation)."""
        self._refs_generation = -1
        self._sr_endpoints: dict[str, Endpoint] = {}
        """SR ref -> the host serving its transfers (same lifetime as ``_refs``)."""
        self._uuids: dict[str, str] = {}
        """ref -> uuid, the other way round of ``_refs``."""
        self._sr_identity: dict[str, dict[str, Any]] = {}
        """SR ref -> the fields of its record that never change (uuid, content_type)."""
        self._taken: dict[str, tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = {}
        """Snapshots this driver took: VM ref -> (its device fields, VBD records, VDI
        records). A snapshot's devices never change, so its delta metadata needs no second
        read (the disks' ``other_config`` is the one in ``_own_maps``)."""
        self._vdi_srs: dict[str, str] = {}
        """VDI ref -> its SR's ref: fixed for a VDI's life (moving a disk makes a new VDI)."""
        self._networks: dict[str, tuple[float, dict[str, Any]]] = {}
        """network ref -> (when read, its record with the ``VLAN`` of its first PIF): a
        backup's metadata names the VM's networks, which rarely change, so a record read
        less than NETWORK_RECORD_TTL seconds ago is reused."""
        self._own_maps: dict[tuple[str, str], dict[str, str]] = {}
        """``other_config`` of those snapshots and of their disks, as this driver last wrote
        it: the backup keys are then written in one call instead of one per key."""
        self._pool: dict[str, Any] | None = None
        self._flavour: str | None = None
        self.session.login()
        # the pool's hosts, to find the master again if it goes away (§1.4)
        self.session.host_addresses = [
            self.call("host.get_address", host) for host in self.call("host.get_all")
        ]

    # -- basics ---------------------------------------------------------------------------------
    def call(self, method: str, *args: Any) -> Any:
        """A raw XAPI call with this driver's session (for what the contract does not cover)."""
        return self.session.call(method, *args)

    def call_async(self, method: str, *args: Any, progress: ProgressCallback | None = None) -> Any:
        """``Async.<method>``, waited for with the task timeout; the task's result."""
        return self.session.call_async(method, *args, timeout=self.task_timeout, progress=progress)

    def _pool_record(self) -> dict[str, Any]:
        with self._cache_lock:
            if self._pool is None:
                pools = self.call("pool.get_all_records")
                ref, record = next(iter(pools.items()))
                self._pool = {"ref": ref, **record}
            return self._pool

    @property
    def flavour(self) -> str:
        """``xcp-ng`` or ``citrix``: decides host-side zstd and Suspended VM creation."""
        if self._flavour is None:
            if self._flavour_option in ("xcp-ng", "citrix"):
                self._flavour = str(self._flavour_option)
            else:
                master = self._pool_record()["master"]
                self._flavour = flavour_of(self.call("host.get_software_version", master))
        return self._flavour

    def _ref(self, cls: str, uuid: str) -> str:
        """The ref of an object, from what this session has seen or from XAPI."""
        generation = self.session.generation
        with self._cache_lock:
            if generation != self._refs_generation:
                self._new_generation(generation)
            ref = self._refs.get((cls, uuid))
        if ref is None:
            ref = self.call(f"{cls}.get_by_uuid", uuid)
            self._remember(generation, [(cls, uuid, ref)])
        return ref

    def _remember(
        self, generation: int, refs: list[tuple[str, str, str]], *, everything: bool = False
    ) -> None:
        """Note (class, uuid, ref) read while the session was at ``generation``.

        ``everything``: ``refs`` lists every VM and VDI of the pool (an inventory), so what
        is not in it is gone and forgotten: a long-lived driver does not grow without end.
        """
        with self._cache_lock:
            if generation != self._refs_generation:
                if generation != self.session.generation:
                    return  # read before a new login: the refs may be stale
                self._new_generation(generation)
            if everything:
                live = {ref for _cls, _uuid, ref in refs}
                self._refs.clear()
                self._uuids.clear()
                self._vdi_srs.clear()
                for memo in (self._taken, self._own_maps):
                    for key in [k for k in memo if (k if isinstance(k, str) else k[1]) not in live]:
                        del memo[key]
            for cls, uuid, ref in refs:
                self._refs[(cls, uuid)] = ref
                self._uuids[ref] = uuid

    def _new_generation(self, generation: int) -> None:
        """Forget every ref (XAPI renumbers them when it restarts); call with the lock."""
        for memo in (
            self._refs,
            self._sr_endpoints,
            self._uuids,
            self._sr_identity,
            self._vdi_srs,
            self._networks,
        ):
            memo.clear()
        self._taken.clear()
        self._own_maps.clear()
        self._refs_generation = generation

    def _uuid_of(self, cls: str, ref: str) -> str:
        """The uuid of an object known by ref (from what this session has seen, or XAPI)."""
        with self._cache_lock:
            uuid = self._uuids.get(ref)
        return uuid if uuid is not None else self.call(f"{cls}.get_uuid", ref)

    def _forget(self, cls: str, refs: list[str]) -> None:
        """Objects that are gone (a uuid is never reused, a ref may come back renumbered)."""
        gone = set(refs)
        with self._cache_lock:
            for ref in gone:
                uuid = self._uuids.pop(ref, None)
                if uuid is not None:
                    self._refs.pop((cls, uuid), None)
                self._taken.pop(ref, None)
                self._own_maps.pop((cls, ref), None)
                if cls == "VDI":
                    self._vdi_srs.pop(ref, None)

    # -- inventory ------------------------------------------------------------------------------
    def inventory(self) -> Inventory:
        """Pools, hosts (with CPU info), SRs, networks and VMs, read now."""
        generation = self.session.generation
        tables = {
            cls: self.call(f"{cls}.get_all_records")
            for cls in ("pool", "host", "SR", "PBD", "network", "VM", "VBD", "VDI")
        }
        try:
            pifs = self.call("PIF.get_all_records")
        except HypervisorError as error:
            if error.code != "MESSAGE_METHOD_UNKNOWN":
                raise
            pifs = {}
        pool_ref, pool_record = next(iter(tables["pool"].items()))
        with self._cache_lock:
            self._pool = {"ref": pool_ref, **pool_record}
        pool_uuid = pool_record["uuid"]
        hosts = tables["host"]
        self.session.host_addresses = [h["address"] for h in hosts.values() if h.get("address")]
        if self._flavour is None and self._flavour_option not in ("xcp-ng", "citrix"):
            master = hosts.get(pool_record["master"], {})
            self._flavour = flavour_of(master.get("software_version", {}))
        srs = tables["SR"]
        vlans: dict[str, int] = {}
        for pif in pifs.values():
            vlans.setdefault(pif.get("network", ""), _int(pif.get("VLAN"), -1))
        pool = Pool(
            uuid=pool_uuid,
            name=pool_record.get("name_label", ""),
            flavour=self.flavour,
            hosts=tuple(
                self._host(ref, record, pool_uuid, pool_record["master"])
                for ref, record in hosts.items()
            ),
            srs=tuple(self._sr(record, pool_uuid) for record in srs.values()),
            networks=tuple(
                Network(
                    uuid=record["uuid"],
                    name=record.get("name_label", ""),
                    pool_uuid=pool_uuid,
                    vlan=vlans.get(ref, -1),
                )
                for ref, record in tables["network"].items()
            ),
            default_sr_uuid=srs[pool_record["default_SR"]]["uuid"]
            if pool_record.get("default_SR") in srs
            else None,
        )
        vms = []
        for ref, record in tables["VM"].items():
            if record.get("is_control_domain"):
                continue
            if record.get("is_a_template") and not record.get("is_a_snapshot"):
                continue
            vms.append(self._vm(ref, record, pool_uuid, tables))
        self._remember(
            generation,
            [("VM", r["uuid"], ref) for ref, r in tables["VM"].items()]
            + [("VDI", r["uuid"], ref) for ref, r in tables["VDI"].items()],
            everything=True,
        )
        read_at = time.monotonic()
        with self._cache_lock:
            if generation == self._refs_generation:
                for ref, record in tables["VDI"].items():
                    if not is_null(record.get("SR")):
                        self._vdi_srs[ref] = record["SR"]
                for ref, record in tables["network"].items():
                    # the same VLAN as the inventory's Network, for restores to match on
                    self._networks[ref] = (read_at, {**record, "VLAN": vlans.get(ref, -1)})
        return Inventory(pools=(pool,), vms=tuple(vms))

    @staticmethod
    def _host(ref: str, record: Mapping[str, Any], pool_uuid: str, master: str) -> Host:
        cpu = record.get("cpu_info") or {}
        return Host(
            uuid=record["uuid"],
            name=record.get("name_label", ""),
            pool_uuid=pool_uuid,
            cpu=CpuInfo(
                vendor=cpu.get("vendor", ""),
                features=cpu.get("features", "") or cpu.get("features_hvm_host", ""),
                features_hvm=cpu.get("features_hvm", ""),
                features_pv=cpu.get("features_pv", ""),
                model_name=cpu.get("modelname", ""),
            ),
            is_master=ref == master,
        )

    @staticmethod
    def _sr(record: Mapping[str, Any], pool_uuid: str) -> StorageRepository:
        size = _int(record.get("physical_size"))
        used = _int(record.get("physical_utilisation"))
        return StorageRepository(
            uuid=record["uuid"],
            name=record.get("name_label", ""),
            pool_uuid=pool_uuid,
            type=record.get("type", ""),
            free_bytes=max(0, size - used) if size > 0 else None,
        )

    def _vm(
        self, ref: str, record: dict[str, Any], pool_uuid: str, tables: Mapping[str, Any]
    ) -> Vm:
        vbds, vdis, srs, vms, hosts = (
            tables["VBD"],
            tables["VDI"],
            tables["SR"],
            tables["VM"],
            tables["host"],
        )
        _coerce("VM", record)
        disks = []
        for vbd_ref in record.get("VBDs") or []:
            vbd = vbds.get(vbd_ref)
            if vbd is None or vbd.get("type") != "Disk" or is_null(vbd.get("VDI")):
                continue
            vdi = vdis.get(vbd["VDI"])
            if vdi is None:
                continue
            sr = srs.get(vdi.get("SR"), {})
            if sr.get("content_type") == "iso":
                continue
            origin = vdis.get(vdi.get("snapshot_of"))
            disks.append(
                Disk(
                    vdi_uuid=vdi["uuid"],
                    name=vdi.get("name_label", ""),
                    virtual_size=_int(vdi.get("virtual_size")),
                    sr_uuid=sr.get("uuid", ""),
                    device=str(vbd.get("userdevice", "")),
                    snapshot_of=origin["uuid"] if origin else None,
                    other_config=dict(vdi.get("other_config") or {}),
                )
            )
        disks.sort(key=lambda d: (_int(d.device, 1 << 30), d.device))
        origin_vm = vms.get(record.get("snapshot_of"))
        suspend = vdis.get(record.get("suspend_VDI"))
        host = hosts.get(record.get("resident_on"))
        return Vm(
            uuid=record["uuid"],
            name=record.get("name_label", ""),
            pool_uuid=pool_uuid,
            power_state=record.get("power_state", "Halted"),
            tags=tuple(record.get("tags") or ()),
            other_config=dict(record.get("other_config") or {}),
            blocked_operations=dict(record.get("blocked_operations") or {}),
            ha_restart_priority=record.get("ha_restart_priority", ""),
            disks=tuple(disks),
            is_snapshot=bool(record.get("is_a_snapshot")),
            snapshot_of=origin_vm["uuid"] if origin_vm else None,
            snapshot_time=str(record.get("snapshot_time", ""))
            if record.get("is_a_snapshot")
            else "",
            suspend_vdi_uuid=suspend["uuid"] if suspend else None,
            last_boot_cpu_flags=dict(record.get("last_boot_CPU_flags") or {}),
            resident_on=host["uuid"] if host else None,
            record=record,
        )

    def vm(self, uuid: str) -> Vm:
        """One VM, snapshot or checkpoint, read now (cheaper than a whole inventory)."""
        ref = self._ref("VM", uuid)
        return self._load_vm(ref)

    def _load_vm(self, ref: str, *, taken: bool = False) -> Vm:
        """A VM read now; ``taken``: a snapshot this driver has just taken (remembered)."""
        generation = self.session.generation
        record = self.call("VM.get_record", ref)
        vbds: dict[str, Any] = {}
        vdis: dict[str, Any] = {}
        srs: dict[str, Any] = {}
        for vbd_ref in record.get("VBDs") or []:
            vbd = vbds[vbd_ref] = self.call("VBD.get_record", vbd_ref)
            if vbd.get("type") == "Disk" and not is_null(vbd.get("VDI")):
                self._load_vdi(vbd["VDI"], vdis, srs)
        if not is_null(record.get("suspend_VDI")):
            self._load_vdi(record["suspend_VDI"], vdis, srs)
        vms: dict[str, Any] = {}
        if not is_null(record.get("snapshot_of")):
            try:
                vms[record["snapshot_of"]] = {"uuid": self._uuid_of("VM", record["snapshot_of"])}
            except HypervisorError:
                pass
        hosts: dict[str, Any] = {}
        if not is_null(record.get("resident_on")):
            hosts[record["resident_on"]] = {
                "uuid": self.call("host.get_uuid", record["resident_on"])
            }
        tables = {"VBD": vbds, "VDI": vdis, "SR": srs, "VM": vms, "host": hosts}
        self._remember(
            generation,
            [("VM", record["uuid"], ref)]
            + [("VDI", r["uuid"], vdi) for vdi, r in vdis.items() if "SR" in r],
        )
        if taken:
            with self._cache_lock:
                if generation == self._refs_generation:
                    devices = {k: record.get(k) for k in ("VBDs", "VIFs", "suspend_VDI")}
                    full = {vdi: r for vdi, r in vdis.items() if "SR" in r}
                    self._taken[ref] = (devices, vbds, full)
                    self._own_maps[("VM", ref)] = dict(record.get("other_config") or {})
                    for vdi, vdi_record in vdis.items():
                        if "SR" in vdi_record:
                            other = dict(vdi_record.get("other_config") or {})
                            self._own_maps[("VDI", vdi)] = other
        return self._vm(ref, record, self._pool_record()["uuid"], tables)

    def _load_vdi(self, ref: str, vdis: dict[str, Any], srs: dict[str, Any]) -> None:
        try:
            vdi = vdis[ref] = self.call("VDI.get_record", ref)
        except HypervisorError as error:
            if error.code == "HANDLE_INVALID":
                return
            raise
        sr = vdi.get("SR")
        if not is_null(sr):
            with self._cache_lock:
                self._vdi_srs[ref] = sr
        if sr not in srs and not is_null(sr):
            with self._cache_lock:
                known = self._sr_identity.get(sr)
            if known is None:
                record = self.call("SR.get_record", sr)
                known = {"uuid": record["uuid"], "content_type": record.get("content_type")}
                with self._cache_lock:
                    self._sr_identity[sr] = known
            srs[sr] = known
        origin = vdi.get("snapshot_of")
        if not is_null(origin) and origin not in vdis:
            try:
                vdis.setdefault(origin, {"uuid": self._uuid_of("VDI", origin)})
            except HypervisorError:
                pass

    def vm_devices(self, vm_uuid: str) -> dict[str, dict[str, dict[str, Any]]]:
        """The records a delta backup stores next to the VM record (XO's metadata JSON).

        ``{"vbds": {ref: record}, "vdis": {ref: record}, "vifs": {ref: record},
        "networks": {ref: record}}`` — refs as XAPI gave them, so the VM record's ``VBDs`` and
        ``VIFs`` point into these maps. Network records also carry the ``VLAN`` of their PIFs.
        """
        ref = self._ref("VM", vm_uuid)
        with self._cache_lock:
            taken = self._taken.pop(ref, None)  # read once: the metadata of its backup
        record, known_vbds, known_vdis = (
            taken if taken else (self.call("VM.get_record", ref), {}, {})
        )
        out: dict[str, dict[str, dict[str, Any]]] = {
            "vbds": {},
            "vdis": {},
            "vifs": {},
            "networks": {},
        }
        for vbd_ref in record.get("VBDs") or []:
            vbd = known_vbds.get(vbd_ref) or self.call("VBD.get_record", vbd_ref)
            out["vbds"][vbd_ref] = vbd
            if not is_null(vbd.get("VDI")):
                out["vdis"][vbd["VDI"]] = self._vdi_for_metadata(vbd["VDI"], known_vdis)
        if not is_null(record.get("suspend_VDI")):
            out["vdis"][record["suspend_VDI"]] = self._vdi_for_metadata(
                record["suspend_VDI"], known_vdis
            )
        for vif_ref in record.get("VIFs") or []:
            vif = out["vifs"][vif_ref] = self.call("VIF.get_record", vif_ref)
            if not is_null(vif.get("network")) and vif["network"] not in out["networks"]:
                out["networks"][vif["network"]] = self._network_record(vif["network"])
        return out

    def _vdi_for_metadata(self, ref: str, known: Mapping[str, Any]) -> dict[str, Any]:
        """A disk's record for backup metadata: the one read when this driver took the
        snapshot, with the ``other_config`` it has written since, else read now."""
        record = known.get(ref)
        if record is None:
            return _coerce("VDI", self.call("VDI.get_record", ref))
        with self._cache_lock:
            other = self._own_maps.get(("VDI", ref))
        if other is not None:
            record = {**record, "other_config": dict(other)}
        return _coerce("VDI", dict(record))

    def _network_record(self, ref: str) -> dict[str, Any]:
        """A network's record with the ``VLAN`` of its first PIF (restores match networks by
        name and VLAN, and XAPI keeps the tag on the PIFs), reused for a few minutes."""
        generation = self.session.generation
        now = time.monotonic()
        with self._cache_lock:
            cached = self._networks.get(ref) if generation == self._refs_generation else None
        if cached is not None and now - cached[0] < NETWORK_RECORD_TTL:
            return dict(cached[1])
        network = self.call("network.get_record", ref)
        pifs = network.get("PIFs") or []
        network["VLAN"] = _int(self.call("PIF.get_VLAN", pifs[0]), -1) if pifs else -1
        with self._cache_lock:
            if generation == self._refs_generation:
                self._networks[ref] = (now, network)
        return dict(network)

    def vdi_record(self, vdi_uuid: str) -> dict[str, Any]:
        """A VDI's full record (for backup metadata)."""
        return _coerce("VDI", self.call("VDI.get_record", self._ref("VDI", vdi_uuid)))

    # -- snapshots ------------------------------------------------------------------------------
    def snapshot(
        self,
        vm_uuid: str,
        name: str,
        *,
        quiesce: bool = False,
        memory: bool = False,
        ignore_vdis: tuple[str, ...] = (),
        progress: ProgressCallback | None = None,
    ) -> Vm:
        """Snapshot a VM (see the contract); ``ignore_vdis`` leaves those disks out.

        A checkpoint of a VM that is not running falls back to a plain snapshot (XO does the
        same on ``VM_BAD_POWER_STATE``); the result then has no ``suspend_vdi_uuid``. The
        snapshot's ``is_a_template`` is cleared so that its XVA imports as a VM.
        """
        vm = self._ref("VM", vm_uuid)
        snapshot: str | None = None
        fallback: str | None = None
        if memory:
            try:
                snapshot = self.call_async("VM.checkpoint", vm, name, progress=progress)
            except HypervisorError as error:
                if error.code != "VM_BAD_POWER_STATE":
                    raise
        elif quiesce:
            try:
                snapshot = self.call_async("VM.snapshot_with_quiesce", vm, name, progress=progress)
            except HypervisorError as error:
                code = error.code or ""
                if not (code in QUIESCE_UNAVAILABLE or code.startswith("XEN_VSS_REQ_ERROR")):
                    raise
                if not self.quiesce_fallback:
                    raise HypervisorError(
                        f"{self.label}: a quiesced snapshot of VM {vm_uuid} is not possible "
                        f"({code}) and quiesce_fallback is off",
                        code=code,
                        params=error.params,
                    ) from None
                fallback = code
        if snapshot is None:
            snapshot = self._plain_snapshot(vm, name, ignore_vdis, progress)
        if fallback is not None:
            self.call("VM.remove_from_other_config", snapshot, QUIESCE_FALLBACK_KEY)
            self.call("VM.add_to_other_config", snapshot, QUIESCE_FALLBACK_KEY, fallback)
        try:
            self.call("VM.set_is_a_template", snapshot, False)
        except HypervisorError as error:
            if error.code != "LICENSE_RESTRICTION":  # old XenServer editions (§3.1)
                raise
        return self._load_vm(snapshot, taken=True)

    def _plain_snapshot(
        self,
        vm: str,
        name: str,
        ignore_vdis: tuple[str, ...],
        progress: ProgressCallback | None,
    ) -> str:
        if not ignore_vdis:
            return self.call_async("VM.snapshot", vm, name, progress=progress)
        refs = [self._ref("VDI", uuid) for uuid in ignore_vdis]
        try:
            return self.call_async("VM.snapshot", vm, name, refs, progress=progress)
        except HypervisorError as error:
            if error.code != "MESSAGE_PARAMETER_COUNT_MISMATCH":
                raise
        # hosts before 21.4.0 have no ignore_vdis (§3.1): snapshot all, drop the ignored disks
        snapshot = self.call_async("VM.snapshot", vm, name, progress=progress)
        for vbd_ref in self.call("VM.get_VBDs", snapshot):
            vbd = self.call("VBD.get_record", vbd_ref)
            if is_null(vbd.get("VDI")):
                continue
            if self.call("VDI.get_snapshot_of", vbd["VDI"]) in refs:
                self.call("VBD.destroy", vbd_ref)
                self._destroy_vdi(vbd["VDI"])
        return snapshot

    # -- exports --------------------------------------------------------------------------------
    def export_vm(
        self,
        vm_uuid: str,
        *,
        compression: VmCompression = "none",
        preserve_power_state: bool | None = None,
    ) -> XapiDownload:
        """Stream the VM (or snapshot) as an XVA, compressed by the host when asked.

        ``preserve_power_state`` (default: when the VM is Suspended) keeps the memory image
        of a checkpoint in the XVA (§4.2).
        """
        if compression not in ("none", "gzip", "zstd"):
            raise HypervisorError(f"unknown XVA compression {compression!r}: none, gzip or zstd")
        if compression == "zstd" and self.flavour != "xcp-ng":
            raise HypervisorError(
                f"{self.label}: {self.flavour} hosts cannot compress exports with zstd "
                "(XCP-ng only); use compression 'gzip' or 'none'",
                code="ZSTD_NOT_SUPPORTED",
            )
        ref = self._ref("VM", vm_uuid)
        query = {"ref": ref}
        if compression != "none":
            query["use_compression"] = "zstd" if compression == "zstd" else "true"
        if preserve_power_state is None:
            preserve_power_state = self.call("VM.get_power_state", ref) == "Suspended"
        if preserve_power_state:
            query["preserve_power_state"] = "true"
        return XapiDownload(
            self.session,
            "/export",
            query,
            what=f"export of VM {vm_uuid}",
            check=XvaCheck(compression),
        )

    def export_disk(
        self, vdi_uuid: str, *, base_vdi_uuid: str | None = None, format: DiskFormat = "vhd"
    ) -> XapiDownload:
        """Stream a disk: full, or a differencing VHD against ``base_vdi_uuid`` (§4.4, §6.5)."""
        if format not in ("vhd", "raw"):
            raise HypervisorError(f"unknown disk format {format!r}: vhd or raw")
        if base_vdi_uuid and format != "vhd":
            raise HypervisorError("a delta export (base_vdi_uuid) needs format 'vhd'")
        ref = self._ref("VDI", vdi_uuid)
        query = {"vdi": ref, "format": format}
        if base_vdi_uuid:
            query["base"] = self._ref("VDI", base_vdi_uuid)
        check = (
            VhdCheck()
            if format == "vhd"
            else RawCheck(_int(self.call("VDI.get_virtual_size", ref)))
        )
        kind = "delta export" if base_vdi_uuid else "export"
        return XapiDownload(
            self.session,
            "/export_raw_vdi",
            query,
            what=f"{kind} of VDI {vdi_uuid}",
            check=check,
            endpoint=self._endpoint_for_vdi(ref),
            detect_embedded_error=True,
        )

    def _endpoint_for_sr(self, sr: str) -> Endpoint:
        """The host that sees an SR: the master unless the SR is local to a member (§4.1).

        Remembered per SR for the session: where an SR is plugged rarely changes, and when it
        does XAPI redirects the transfer to the right host (302), which downloads follow.
        """
        generation = self.session.generation
        with self._cache_lock:
            known = self._sr_endpoints.get(sr) if generation == self._refs_generation else None
        if known is not None:
            return known
        endpoint = self._find_endpoint_for_sr(sr)
        with self._cache_lock:
            if generation == self._refs_generation:
                self._sr_endpoints[sr] = endpoint
        return endpoint

    def _find_endpoint_for_sr(self, sr: str) -> Endpoint:
        try:
            pbds = self.call("SR.get_PBDs", sr)
            hosts = [self.call("PBD.get_host", pbd) for pbd in pbds]
        except HypervisorError:
            return self.session.endpoint
        master = self._pool_record()["master"]
        if not hosts or master in hosts:
            return self.session.endpoint
        return self.session.endpoint.with_address(self.call("host.get_address", hosts[0]))

    def _endpoint_for_vdi(self, vdi: str) -> Endpoint:
        generation = self.session.generation
        with self._cache_lock:
            sr = self._vdi_srs.get(vdi) if generation == self._refs_generation else None
        return self._endpoint_for_sr(sr if sr is not None else self.call("VDI.get_SR", vdi))

    # -- imports --------------------------------------------------------------------------------
    def import_vm(
        self,
        stream: BinaryIO,
        *,
        sr_uuid: str,
        size: int | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> str:
        """Import an XVA stream onto an SR; return the new VM's UUID.

        ``size`` (or a regular file's remaining length) gives an exact Content-Length;
        otherwise the upload is framed as XO does it (§4.1).
        """
        sr = self._ref("SR", sr_uuid)
        size = size if size is not None else _remaining(stream)
        result = upload(
            self.session,
            "/import",
            {"sr_id": sr},
            stream,
            size,
            what=f"import of an XVA onto SR {sr_uuid}",
            endpoint=self._endpoint_for_sr(sr),
            task_timeout=self.task_timeout,
            progress=progress,
        )
        refs = result if isinstance(result, list) else [result]
        refs = [r for r in refs if isinstance(r, str) and not is_null(r)]
        if not refs:
            raise HypervisorError(f"{self.label}: the XVA import created no VM")
        return self.call("VM.get_uuid", refs[0])

    def import_disk(
        self,
        vdi_uuid: str,
        stream: BinaryIO,
        *,
        format: DiskFormat = "vhd",
        size: int | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Write a disk image into an existing VDI (§4.5).

        XAPI needs the exact length: ``size``, else a regular file's remaining length, else
        (VHD) the length its BAT implies, else (raw) the VDI's virtual size.
        """
        if format not in ("vhd", "raw"):
            raise HypervisorError(f"unknown disk format {format!r}: vhd or raw")
        ref = self._ref("VDI", vdi_uuid)
        size = size if size is not None else _remaining(stream)
        body: Any = stream
        if size is None:
            if format == "vhd":
                size, body = vhd_length_from_head(stream)
            else:
                size = _int(self.call("VDI.get_virtual_size", ref))
        upload(
            self.session,
            "/import_raw_vdi",
            {"vdi": ref, "format": format},
            body,
            size,
            what=f"import into VDI {vdi_uuid}",
            endpoint=self._endpoint_for_vdi(ref),
            task_timeout=self.task_timeout,
            progress=progress,
        )

    def create_disk(
        self,
        *,
        sr_uuid: str,
        name: str,
        virtual_size: int,
        description: str = "",
        vdi_type: str = "user",
        other_config: Mapping[str, str] | None = None,
    ) -> str:
        """Create an empty VDI on an SR; return its UUID (``vdi_type`` ``suspend`` for RAM)."""
        sr = self._ref("SR", sr_uuid)
        record = {
            "name_label": name,
            "name_description": description,
            "SR": sr,
            "virtual_size": int(virtual_size),
            "type": vdi_type,
            "sharable": False,
            "read_only": False,
            "other_config": dict(other_config or {}),
            "sm_config": {},
            "xenstore_data": {},
            "tags": [],
        }
        ref = self.call("VDI.create", record)
        return self.call("VDI.get_uuid", ref)

    # -- restore --------------------------------------------------------------------------------
    def create_vm(
        self,
        metadata: Mapping[str, Any],
        *,
        sr_uuid: str,
        disks: Mapping[str, str],
        suspend_vdi_uuid: str | None = None,
        networks: Mapping[str, str] | None = None,
    ) -> str:
        """Create a VM from backup metadata (see the contract).

        ``metadata`` is the VM record, or XO's delta metadata mapping with ``vm`` (or
        ``vmSnapshot``) plus ``vbds``, ``vdis``, ``vifs`` (and ``networks``) maps as
        :meth:`vm_devices` returns them. Disks are attached by the source VBDs' userdevice
        (in ``disks`` order without VBD records); VIFs join the network ``networks`` maps the
        source network's UUID to, else the same UUID, else the same name, else the first one.
        """
        record = dict(metadata.get("vmSnapshot") or metadata.get("vm") or metadata)
        if "name_label" not in record:
            raise HypervisorError("the backup metadata holds no VM record (no name_label)")
        suspended = suspend_vdi_uuid is not None
        if suspended and self.flavour != "xcp-ng":
            raise HypervisorError(
                f"{self.label}: {self.flavour} hosts cannot create a Suspended VM (only XCP-ng "
                "can): restore this memory backup without its memory, or onto an XCP-ng pool",
                code="SUSPENDED_VM_NOT_SUPPORTED",
            )
        self._ref("SR", sr_uuid)  # fail before creating anything when the SR is wrong
        fields = {k: v for k, v in record.items() if k not in _VM_CREATE_DROP}
        fields.update(
            is_a_template=False,
            affinity=NULL_REF,
            ha_always_run=False,
            other_config=dict(record.get("other_config") or {}),
        )
        fields["other_config"].pop("mac_seed", None)  # a new VM must not clash (§4.3)
        if suspended:
            fields.update(
                power_state="Suspended",
                suspend_VDI=self._ref("VDI", suspend_vdi_uuid),  # type: ignore[arg-type]
                last_boot_CPU_flags=dict(record.get("last_boot_CPU_flags") or {}),
                last_booted_record=record.get("last_booted_record", ""),
            )
        vm = self.call("VM.create", fields)
        try:
            self._attach_disks(vm, metadata, disks)
            self._attach_vifs(vm, metadata, networks or {})
        except BaseException:
            self._destroy_vm_ref(vm, with_disks=False)
            raise
        return self.call("VM.get_uuid", vm)

    def _attach_disks(self, vm: str, metadata: Mapping[str, Any], disks: Mapping[str, str]) -> None:
        vbds = dict(metadata.get("vbds") or {})
        vdis = dict(metadata.get("vdis") or {})
        used: set[str] = set()
        for vbd in vbds.values():
            if vbd.get("type", "Disk") != "Disk":
                continue
            source = vdis.get(vbd.get("VDI"), {}).get("uuid")
            if source not in disks:
                continue
            used.add(source)
            self._create_vbd(vm, disks[source], vbd)
        for position, (source, target) in enumerate(disks.items()):
            if source not in used:
                self._create_vbd(
                    vm, target, {"userdevice": str(position), "bootable": position == 0}
                )

    def _create_vbd(self, vm: str, vdi_uuid: str, source: Mapping[str, Any]) -> None:
        self.call(
            "VBD.create",
            {
                "VM": vm,
                "VDI": self._ref("VDI", vdi_uuid),
                "userdevice": str(source.get("userdevice", "autodetect")),
                "bootable": bool(source.get("bootable", False)),
                "mode": source.get("mode", "RW"),
                "type": "Disk",
                "unpluggable": bool(source.get("unpluggable", True)),
                "empty": False,
                "other_config": dict(source.get("other_config") or {}),
                "qos_algorithm_type": source.get("qos_algorithm_type", ""),
                "qos_algorithm_params": dict(source.get("qos_algorithm_params") or {}),
            },
        )

    def _attach_vifs(
        self, vm: str, metadata: Mapping[str, Any], networks: Mapping[str, str]
    ) -> None:
        vifs = dict(metadata.get("vifs") or {})
        if not vifs:
            return
        sources = dict(metadata.get("networks") or {})
        chooser = _NetworkChooser(self._networks_with_vlans(), networks)
        for vif in vifs.values():
            source = sources.get(vif.get("network"), {})
            network = chooser.choose(
                vif.get("$network$uuid") or source.get("uuid"),
                vif.get("$network$name_label", source.get("name_label")),
                _int(vif.get("$network$VLAN", source.get("VLAN")), -1),
            )
            if network is None:
                return
            self._create_vif(vm, network, vif, str(vif.get("MAC", "")))

    def _networks_with_vlans(self) -> dict[str, dict[str, Any]]:
        """The pool's network records, each with the ``VLAN`` of its PIFs (-1 untagged, None
        for a network without PIF such as a host-internal one)."""
        records = self.call("network.get_all_records")
        try:
            pifs = self.call("PIF.get_all_records")
        except HypervisorError as error:
            if error.code != "MESSAGE_METHOD_UNKNOWN":
                raise
            pifs = {}
        vlans: dict[str, int] = {}
        for pif in pifs.values():
            vlans.setdefault(pif.get("network", ""), _int(pif.get("VLAN"), -1))
        return {ref: {**rec, "VLAN": vlans.get(ref)} for ref, rec in records.items()}

    def _create_vif(self, vm: str, network: str, vif: Mapping[str, Any], mac: str) -> str:
        """``VIF.create`` with a source VIF's settings; ``mac`` "" lets XAPI pick one."""
        return self.call(
            "VIF.create",
            {
                "VM": vm,
                "network": network,
                "device": str(vif.get("device", "0")),
                "MAC": mac,
                "MTU": _int(vif.get("MTU"), 1500),
                "other_config": dict(vif.get("other_config") or {}),
                "qos_algorithm_type": vif.get("qos_algorithm_type", ""),
                "qos_algorithm_params": dict(vif.get("qos_algorithm_params") or {}),
                "locking_mode": vif.get("locking_mode", "network_default"),
                "ipv4_allowed": list(vif.get("ipv4_allowed") or []),
                "ipv6_allowed": list(vif.get("ipv6_allowed") or []),
            },
        )

    def set_vif_macs(self, vm_uuid: str, macs: Mapping[str, str]) -> None:
        """Give a Halted VM's VIFs these MACs by device ("" for a fresh one).

        XAPI has no call to change a VIF's MAC, so each VIF to change is destroyed and created
        again on the same network with the same settings and the new MAC.
        """
        vm = self._ref("VM", vm_uuid)
        for ref in self.call("VM.get_VIFs", vm):
            vif = self.call("VIF.get_record", ref)
            device = str(vif.get("device", ""))
            if device not in macs:
                continue
            mac = macs[device]
            if mac and mac.lower() == str(vif.get("MAC", "")).lower():
                continue
            self.call("VIF.destroy", ref)
            self._create_vif(vm, vif["network"], vif, mac)

    def start_vm(self, vm_uuid: str) -> None:
        """``VM.start`` a Halted VM, ``VM.resume`` a Suspended one (XAPI checks the CPU)."""
        vm = self._ref("VM", vm_uuid)
        state = self.call("VM.get_power_state", vm)
        if state == "Suspended":
            self.call_async("VM.resume", vm, False, False)
        else:
            # a Running or Paused VM gets XAPI's own VM_BAD_POWER_STATE
            self.call_async("VM.start", vm, False, False)

    # -- destroy --------------------------------------------------------------------------------
    def destroy_vm(self, vm_uuid: str, *, with_disks: bool = True) -> None:
        """Destroy a VM, snapshot or checkpoint, and the disks no other VM uses (§3.1)."""
        try:
            ref = self._ref("VM", vm_uuid)
        except HypervisorError as error:
            if error.code in ("UUID_INVALID", "HANDLE_INVALID"):
                return  # already gone
            raise
        self._destroy_vm_ref(ref, with_disks=with_disks)

    def _destroy_vm_ref(self, ref: str, *, with_disks: bool) -> None:
        vdis: list[str] = []
        if with_disks:
            record = self.call("VM.get_record", ref)
            for vbd_ref in record.get("VBDs") or []:
                try:
                    vbd = self.call("VBD.get_record", vbd_ref)
                except HypervisorError:
                    continue
                if vbd.get("type") == "Disk" and not is_null(vbd.get("VDI")):
                    vdis.append(vbd["VDI"])
            if not is_null(record.get("suspend_VDI")):
                vdis.append(record["suspend_VDI"])
        try:
            self.call("VM.destroy", ref)
        except HypervisorError as error:
            if error.code != "HANDLE_INVALID":
                raise
        self._forget("VM", [ref])
        for vdi in vdis:
            try:
                if self.call("VDI.get_VBDs", vdi):
                    continue  # still used by another VM
            except HypervisorError as error:
                if error.code == "HANDLE_INVALID":
                    continue
                raise
            self._destroy_vdi(vdi)

    def _destroy_vdi(self, vdi: str) -> None:
        try:
            self.call("VDI.destroy", vdi)  # VDI_IN_USE is retried by the session (§7)
        except HypervisorError as error:
            if error.code != "HANDLE_INVALID":  # gone already: the goal is reached
                raise
        self._forget("VDI", [vdi])

    def destroy_disk(self, vdi_uuid: str) -> None:
        """Destroy a VDI (after a failed restore, or a suspend VDI that is not needed)."""
        try:
            self._destroy_vdi(self._ref("VDI", vdi_uuid))
        except HypervisorError as error:
            if error.code != "UUID_INVALID":
                raise

    # -- power --------------------------------------------------------------------------------
    def shutdown_vm(self, vm_uuid: str, *, force_after: float | None = None) -> None:
        """``VM.clean_shutdown`` a Running VM; with ``force_after``, ``VM.hard_shutdown`` it
        when the guest has not halted in that many seconds or cannot be asked (no PV drivers).

        A clean shutdown that outlives ``force_after`` has its task cancelled first, so XAPI
        is not left with a pending operation on the VM. A Halted VM is left alone.
        """
        vm = self._ref("VM", vm_uuid)
        if self.call("VM.get_power_state", vm) == "Halted":
            return
        if force_after is None:
            self.call_async("VM.clean_shutdown", vm)
            return
        try:
            self.session.call_async("VM.clean_shutdown", vm, timeout=max(force_after, 0.0))
            return
        except XapiTimeoutError:
            pass  # the guest did not halt in time: the task was cancelled, power it off
        except HypervisorError as error:
            if error.code not in NO_CLEAN_SHUTDOWN:
                raise
        if self.call("VM.get_power_state", vm) != "Halted":
            self.call_async("VM.hard_shutdown", vm)

    # -- bookkeeping ----------------------------------------------------------------------------
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
        ref = self._ref("VM", vm_uuid)
        if name is not None:
            self.call("VM.set_name_label", ref, name)
        for tag in add_tags:
            self.call("VM.add_tags", ref, tag)
        for tag in remove_tags:
            self.call("VM.remove_tags", ref, tag)
        self._set_entries("VM", ref, "other_config", other_config)
        self._set_entries("VM", ref, "blocked_operations", blocked_operations)
        if ha_restart_priority is not None:
            if ha_restart_priority not in ("", "restart", "best-effort"):
                raise HypervisorError(
                    f"ha_restart_priority {ha_restart_priority!r} is not '', 'restart' or "
                    "'best-effort'"
                )
            self.call("VM.set_ha_restart_priority", ref, ha_restart_priority)

    def update_vdi(
        self,
        vdi_uuid: str,
        *,
        name: str | None = None,
        other_config: Mapping[str, str | None] | None = None,
    ) -> None:
        """Rename a VDI or change its ``other_config`` (XO marks snapshot VDIs, §7.4)."""
        ref = self._ref("VDI", vdi_uuid)
        if name is not None:
            self.call("VDI.set_name_label", ref, name)
        self._set_entries("VDI", ref, "other_config", other_config)

    def _set_entries(
        self, cls: str, ref: str, field: str, values: Mapping[str, str | None] | None
    ) -> None:
        """Set (or, for None, remove) entries of a map field.

        XAPI has no call to replace one entry and ``add_to_`` on an existing key fails with
        ``MAP_DUPLICATE_KEY`` (§1.6): a key is added, and only when it exists already removed
        and added again. Backup keys are mostly new, so that is one call per key, and other
        keys of the map, that someone else may change meanwhile, are never rewritten. The
        ``other_config`` of a snapshot this driver took is written whole, in one call.
        """
        if not values:
            return
        with self._cache_lock:
            own = self._own_maps.get((cls, ref)) if field == "other_config" else None
        if own is not None:
            # a snapshot this driver took: nobody else writes its map, set it whole
            merged = {k: v for k, v in {**own, **values}.items() if v is not None}
            self.call(f"{cls}.set_other_config", ref, {k: str(v) for k, v in merged.items()})
            with self._cache_lock:
                if (cls, ref) in self._own_maps:
                    self._own_maps[(cls, ref)] = merged
            return
        for key, value in values.items():
            if value is None:
                self.call(f"{cls}.remove_from_{field}", ref, key)
                continue
            try:
                self.call(f"{cls}.add_to_{field}", ref, key, str(value))
            except HypervisorError as error:
                if error.code != "MAP_DUPLICATE_KEY":
                    raise
                self.call(f"{cls}.remove_from_{field}", ref, key)
                self.call(f"{cls}.add_to_{field}", ref, key, str(value))

    def close(self) -> None:
        """Log out and release connections."""
        self.session.logout()


def _remaining(stream: Any) -> int | None:
    """Bytes left in a regular file (None for pipes, sockets and other streams)."""
    try:
        fd = stream.fileno()
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return None
        return info.st_size - stream.tell()
    except (AttributeError, OSError, ValueError):
        return None


class _NetworkChooser:
    """Where a restored VIF goes: the network the user mapped its source to, else the one
    with the source's UUID, else the one with its name on the same VLAN, else another
    network on that VLAN, else the pool's first network with a PIF (as XO does)."""

    def __init__(self, records: Mapping[str, Mapping[str, Any]], mapping: Mapping[str, str]):
        self.mapping = mapping
        self.by_uuid = {rec["uuid"]: ref for ref, rec in records.items()}
        self.by_vlan: dict[int, dict[str, str]] = {}
        for ref, rec in sorted(records.items(), key=lambda item: item[1].get("name_label", "")):
            if rec.get("VLAN") is not None:
                self.by_vlan.setdefault(rec["VLAN"], {}).setdefault(rec.get("name_label"), ref)
        untagged = self.by_vlan.get(-1) or next(iter(self.by_vlan.values()), {})
        self.default = next(iter(untagged.values()), None) or next(iter(records), None)

    def choose(self, uuid: str | None, name: str | None, vlan: int) -> str | None:
        if uuid and self.mapping.get(uuid) in self.by_uuid:
            return self.by_uuid[self.mapping[uuid]]
        if uuid and uuid in self.by_uuid:
            return self.by_uuid[uuid]
        same_vlan = self.by_vlan.get(vlan)
        if same_vlan:
            return same_vlan.get(name) or next(iter(same_vlan.values()))
        return self.default
