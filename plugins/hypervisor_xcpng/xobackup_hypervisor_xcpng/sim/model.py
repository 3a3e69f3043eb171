"""The simulated XAPI database: classes, default records, refs, events (§1.5–1.8, §2).

Each class has a default record; the Python type of each default value is the field's
datamodel type (int, float, bool, str/ref/enum, DateTime, list = set, dict = map). Generic
getters, setters and the ``event.from`` snapshots all derive from these tables.
"""

from __future__ import annotations

import threading
import time
import uuid as uuidlib
from collections import deque
from typing import Any

from xobackup_hypervisor_xcpng.sim.codec import EPOCH, NULL_REF, DateTime, XapiError, xml_value

_OPS: dict[str, Any] = {"allowed_operations": [], "current_operations": {}}


def _vm() -> dict[str, Any]:
    return {
        "uuid": "",
        **_OPS,
        "power_state": "Halted",
        "name_label": "",
        "name_description": "",
        "user_version": 1,
        "is_a_template": False,
        "is_default_template": False,
        "suspend_VDI": NULL_REF,
        "resident_on": NULL_REF,
        "scheduled_to_be_resident_on": NULL_REF,
        "affinity": NULL_REF,
        "memory_overhead": 11534336,
        "memory_target": 0,
        "memory_static_max": 1073741824,
        "memory_dynamic_max": 1073741824,
        "memory_dynamic_min": 1073741824,
        "memory_static_min": 536870912,
        "VCPUs_params": {},
        "VCPUs_max": 1,
        "VCPUs_at_startup": 1,
        "actions_after_softreboot": "soft_reboot",
        "actions_after_shutdown": "destroy",
        "actions_after_reboot": "restart",
        "actions_after_crash": "restart",
        "consoles": [],
        "VIFs": [],
        "VBDs": [],
        "VUSBs": [],
        "crash_dumps": [],
        "VTPMs": [],
        "PV_bootloader": "",
        "PV_kernel": "",
        "PV_ramdisk": "",
        "PV_args": "",
        "PV_bootloader_args": "",
        "PV_legacy_args": "",
        "HVM_boot_policy": "BIOS order",
        "HVM_boot_params": {"order": "cd"},
        "HVM_shadow_multiplier": 1.0,
        "platform": {
            "timeoffset": "0",
            "device-model": "qemu-upstream-compat",
            "nx": "true",
            "acpi": "1",
            "apic": "true",
            "pae": "true",
            "hpet": "true",
            "viridian": "false",
            "vga": "std",
            "videoram": "8",
        },
        "PCI_bus": "",
        "other_config": {},
        "domid": -1,
        "domarch": "",
        "last_boot_CPU_flags": {},
        "is_control_domain": False,
        "metrics": NULL_REF,
        "guest_metrics": NULL_REF,
        "last_booted_record": "",
        "recommendations": "",
        "xenstore_data": {},
        "ha_always_run": False,
        "ha_restart_priority": "",
        "is_a_snapshot": False,
        "snapshot_of": NULL_REF,
        "snapshots": [],
        "snapshot_time": EPOCH,
        "transportable_snapshot_id": "",
        "blobs": {},
        "tags": [],
        "blocked_operations": {},
        "snapshot_info": {},
        "snapshot_metadata": "",
        "parent": NULL_REF,
        "children": [],
        "bios_strings": {},
        "protection_policy": NULL_REF,
        "is_snapshot_from_vmpp": False,
        "snapshot_schedule": NULL_REF,
        "is_vmss_snapshot": False,
        "appliance": NULL_REF,
        "start_delay": 0,
        "shutdown_delay": 0,
        "order": 0,
        "VGPUs": [],
        "attached_PCIs": [],
        "suspend_SR": NULL_REF,
        "version": 0,
        "generation_id": "",
        "hardware_platform_version": 0,
        "has_vendor_device": False,
        "requires_reboot": False,
        "reference_label": "",
        "domain_type": "hvm",
        "NVRAM": {},
        "pending_guidances": [],
    }


def _vdi() -> dict[str, Any]:
    return {
        "uuid": "",
        "name_label": "",
        "name_description": "",
        **_OPS,
        "SR": NULL_REF,
        "VBDs": [],
        "crash_dumps": [],
        "virtual_size": 0,
        "physical_utilisation": 0,
        "type": "user",
        "sharable": False,
        "read_only": False,
        "other_config": {},
        "storage_lock": False,
        "location": "",
        "managed": True,
        "missing": False,
        "parent": NULL_REF,
        "xenstore_data": {},
        "sm_config": {},
        "is_a_snapshot": False,
        "snapshot_of": NULL_REF,
        "snapshots": [],
        "snapshot_time": EPOCH,
        "tags": [],
        "allow_caching": False,
        "on_boot": "persist",
        "metadata_of_pool": NULL_REF,
        "metadata_latest": False,
        "is_tools_iso": False,
        "cbt_enabled": False,
    }


def _vbd() -> dict[str, Any]:
    return {
        "uuid": "",
        **_OPS,
        "VM": NULL_REF,
        "VDI": NULL_REF,
        "device": "",
        "userdevice": "0",
        "bootable": False,
        "mode": "RW",
        "type": "Disk",
        "unpluggable": True,
        "storage_lock": False,
        "empty": False,
        "other_config": {},
        "currently_attached": False,
        "status_code": 0,
        "status_detail": "",
        "runtime_properties": {},
        "qos_algorithm_type": "",
        "qos_algorithm_params": {},
        "qos_supported_algorithms": [],
        "metrics": NULL_REF,
    }


def _vif() -> dict[str, Any]:
    return {
        "uuid": "",
        **_OPS,
        "device": "0",
        "network": NULL_REF,
        "VM": NULL_REF,
        "MAC": "",
        "MTU": 1500,
        "other_config": {},
        "currently_attached": False,
        "status_code": 0,
        "status_detail": "",
        "runtime_properties": {},
        "qos_algorithm_type": "",
        "qos_algorithm_params": {},
        "qos_supported_algorithms": [],
        "metrics": NULL_REF,
        "MAC_autogenerated": False,
        "locking_mode": "network_default",
        "ipv4_allowed": [],
        "ipv6_allowed": [],
        "ipv4_configuration_mode": "None",
        "ipv4_addresses": [],
        "ipv4_gateway": "",
        "ipv6_configuration_mode": "None",
        "ipv6_addresses": [],
        "ipv6_gateway": "",
    }


def _sr() -> dict[str, Any]:
    return {
        "uuid": "",
        "name_label": "",
        "name_description": "",
        **_OPS,
        "VDIs": [],
        "PBDs": [],
        "virtual_allocation": 0,
        "physical_utilisation": 0,
        "physical_size": 0,
        "type": "ext",
        "content_type": "user",
        "shared": False,
        "other_config": {},
        "tags": [],
        "sm_config": {},
        "blobs": {},
        "local_cache_enabled": False,
        "introduced_by": NULL_REF,
        "clustered": False,
        "is_tools_sr": False,
    }


def _pbd() -> dict[str, Any]:
    return {
        "uuid": "",
        "host": NULL_REF,
        "SR": NULL_REF,
        "device_config": {},
        "currently_attached": True,
        "other_config": {},
    }


def _pif() -> dict[str, Any]:
    return {
        "uuid": "",
        "device": "eth0",
        "network": NULL_REF,
        "host": NULL_REF,
        "MAC": "",
        "MTU": 1500,
        "VLAN": -1,
        "metrics": NULL_REF,
        "physical": True,
        "currently_attached": True,
        "ip_configuration_mode": "DHCP",
        "IP": "",
        "netmask": "",
        "gateway": "",
        "DNS": "",
        "bond_slave_of": NULL_REF,
        "bond_master_of": [],
        "VLAN_master_of": NULL_REF,
        "VLAN_slave_of": [],
        "management": False,
        "other_config": {},
        "disallow_unplug": False,
        "tunnel_access_PIF_of": [],
        "tunnel_transport_PIF_of": [],
        "ipv6_configuration_mode": "None",
        "IPv6": [],
        "ipv6_gateway": "",
        "primary_address_type": "IPv4",
        "managed": True,
        "properties": {},
        "capabilities": [],
        "igmp_snooping_status": "unknown",
    }


def _network() -> dict[str, Any]:
    return {
        "uuid": "",
        "name_label": "",
        "name_description": "",
        **_OPS,
        "VIFs": [],
        "PIFs": [],
        "MTU": 1500,
        "other_config": {},
        "bridge": "",
        "managed": True,
        "blobs": {},
        "tags": [],
        "default_locking_mode": "unlocked",
        "assigned_ips": {},
        "purpose": [],
    }


def _host() -> dict[str, Any]:
    return {
        "uuid": "",
        "name_label": "",
        "name_description": "",
        "memory_overhead": 0,
        **_OPS,
        "API_version_major": 2,
        "API_version_minor": 21,
        "API_version_vendor": "XenSource",
        "API_version_vendor_implementation": {},
        "enabled": True,
        "software_version": {},
        "other_config": {},
        "capabilities": [],
        "cpu_configuration": {},
        "sched_policy": "credit",
        "supported_bootloaders": ["pygrub", "eliloader"],
        "resident_VMs": [],
        "logging": {},
        "PIFs": [],
        "suspend_image_sr": NULL_REF,
        "crash_dump_sr": NULL_REF,
        "crashdumps": [],
        "patches": [],
        "updates": [],
        "PBDs": [],
        "host_CPUs": [],
        "cpu_info": {},
        "hostname": "",
        "address": "",
        "metrics": NULL_REF,
        "license_params": {},
        "ha_statefiles": [],
        "ha_network_peers": [],
        "blobs": {},
        "tags": [],
        "external_auth_type": "",
        "external_auth_service_name": "",
        "external_auth_configuration": {},
        "edition": "xcp-ng",
        "license_server": {},
        "bios_strings": {},
        "power_on_mode": "",
        "power_on_config": {},
        "local_cache_sr": NULL_REF,
        "chipset_info": {},
        "PCIs": [],
        "PGPUs": [],
        "PUSBs": [],
        "ssl_legacy": False,
        "guest_VCPUs_params": {},
        "display": "enabled",
        "virtual_hardware_platform_versions": [0, 1, 2],
        "control_domain": NULL_REF,
        "updates_requiring_reboot": [],
        "features": [],
        "iscsi_iqn": "",
        "multipathing": False,
        "uefi_certificates": "",
        "certificates": [],
        "editions": ["xcp-ng"],
        "pending_guidances": [],
        "tls_verification_enabled": False,
        "https_only": False,
    }


def _pool() -> dict[str, Any]:
    return {
        "uuid": "",
        "name_label": "",
        "name_description": "",
        "master": NULL_REF,
        "default_SR": NULL_REF,
        "suspend_image_SR": NULL_REF,
        "crash_dump_SR": NULL_REF,
        "other_config": {},
        "ha_enabled": False,
        "ha_configuration": {},
        "ha_statefiles": [],
        "ha_host_failures_to_tolerate": 0,
        "ha_plan_exists_for": 0,
        "ha_allow_overcommit": False,
        "ha_overcommitted": False,
        "blobs": {},
        "tags": [],
        "gui_config": {},
        "health_check_config": {},
        "wlb_url": "",
        "wlb_username": "",
        "wlb_enabled": False,
        "wlb_verify_cert": False,
        "redo_log_enabled": False,
        "redo_log_vdi": NULL_REF,
        "vswitch_controller": "",
        "restrictions": {},
        "metadata_VDIs": [],
        "ha_cluster_stack": "xhad",
        **_OPS,
        "guest_agent_config": {},
        "cpu_info": {},
        "policy_no_vendor_device": False,
        "live_patching_disabled": False,
        "igmp_snooping_enabled": False,
        "uefi_certificates": "",
        "is_psr_pending": False,
        "tls_verification_enabled": False,
        "repositories": [],
        "client_certificate_auth_enabled": False,
        "client_certificate_auth_name": "",
        "repository_proxy_url": "",
        "repository_proxy_username": "",
        "repository_proxy_password": NULL_REF,
        "migration_compression": False,
        "coordinator_bias": True,
    }


def _task() -> dict[str, Any]:
    return {
        "uuid": "",
        "name_label": "",
        "name_description": "",
        **_OPS,
        "created": EPOCH,
        "finished": EPOCH,
        "status": "pending",
        "resident_on": NULL_REF,
        "progress": 0.0,
        "type": "",
        "result": "",
        "error_info": [],
        "other_config": {},
        "subtask_of": NULL_REF,
        "subtasks": [],
        "backtrace": "()",
    }


def _vm_metrics() -> dict[str, Any]:
    return {
        "uuid": "",
        "memory_actual": 0,
        "VCPUs_number": 1,
        "VCPUs_utilisation": {},
        "VCPUs_CPU": {},
        "VCPUs_params": {},
        "VCPUs_flags": {},
        "state": [],
        "start_time": EPOCH,
        "install_time": EPOCH,
        "last_updated": EPOCH,
        "other_config": {},
        "hvm": True,
        "nested_virt": False,
        "nomigrate": False,
        "current_domain_type": "unspecified",
    }


DEFAULTS = {
    "pool": _pool,
    "host": _host,
    "SR": _sr,
    "PBD": _pbd,
    "network": _network,
    "PIF": _pif,
    "VM": _vm,
    "VBD": _vbd,
    "VDI": _vdi,
    "VIF": _vif,
    "task": _task,
    "VM_metrics": _vm_metrics,
}
"""Default record factory of each class the simulator knows."""

CLASSES = tuple(DEFAULTS)
FIELD_TYPES: dict[str, dict[str, type]] = {
    cls: {name: type(value) for name, value in factory().items()}
    for cls, factory in DEFAULTS.items()
}

_COMMON_WRITABLE = {"name_label", "name_description", "other_config", "tags"}
WRITABLE: dict[str, set[str]] = {
    "pool": _COMMON_WRITABLE
    | {"default_SR", "suspend_image_SR", "crash_dump_SR", "migration_compression"},
    "host": _COMMON_WRITABLE | {"enabled"},
    "SR": _COMMON_WRITABLE | {"sm_config", "shared", "physical_size"},
    "PBD": {"other_config"},
    "PIF": {"other_config"},
    "network": _COMMON_WRITABLE | {"MTU", "purpose"},
    "VM": _COMMON_WRITABLE
    | {
        "blocked_operations",
        "is_a_template",
        "ha_restart_priority",
        "ha_always_run",
        "affinity",
        "suspend_VDI",
        "memory_static_max",
        "memory_static_min",
        "memory_dynamic_max",
        "memory_dynamic_min",
        "VCPUs_max",
        "VCPUs_at_startup",
        "platform",
        "xenstore_data",
        "HVM_boot_params",
        "HVM_boot_policy",
        "PV_args",
        "start_delay",
        "shutdown_delay",
        "order",
        "NVRAM",
        "bios_strings",
        "domain_type",
        "suspend_SR",
        "VCPUs_params",
        "user_version",
        "actions_after_crash",
        "actions_after_shutdown",
        "actions_after_reboot",
    },
    "VBD": {"other_config", "userdevice", "bootable", "mode", "type", "unpluggable"},
    "VDI": _COMMON_WRITABLE
    | {
        "sm_config",
        "xenstore_data",
        "on_boot",
        "allow_caching",
        "read_only",
        "sharable",
        "managed",
    },
    "VIF": {"other_config", "locking_mode", "ipv4_allowed", "ipv6_allowed"},
    "task": {"other_config", "progress", "status", "result", "error_info"},
    "VM_metrics": {"other_config"},
}

_NAMED = {"pool", "host", "SR", "network", "VM", "VDI", "task"}


def is_named(cls: str) -> bool:
    """Whether the class has ``name_label`` (and so ``get_by_name_label``)."""
    return cls in _NAMED


def new_ref() -> str:
    """A fresh opaque reference."""
    return f"OpaqueRef:{uuidlib.uuid4()}"


def coerce(cls: str, field: str, value: Any) -> Any:
    """Convert a wire value to the field's type (XML-RPC clients send int64 as strings)."""
    kind = FIELD_TYPES[cls].get(field)
    if kind is None or value is None:
        return value
    try:
        if kind is int and not isinstance(value, bool):
            return int(value)
        if kind is float:
            return float(value)
        if kind is bool and isinstance(value, str):
            raise ValueError(value)
        if kind is DateTime and isinstance(value, str):
            return DateTime(value)
        if kind is dict:
            return {str(k): v if isinstance(v, str) else str(v) for k, v in dict(value).items()}
        if kind is list:
            return list(value)
    except (TypeError, ValueError) as error:
        raise XapiError("FIELD_TYPE_ERROR", field) from error
    return value


_VM_OPERATIONS = {
    "Halted": [
        "start",
        "start_on",
        "clone",
        "copy",
        "export",
        "destroy",
        "snapshot",
        "provision",
        "changing_memory_limits",
        "changing_VCPUs",
        "metadata_export",
    ],
    "Running": [
        "clean_shutdown",
        "clean_reboot",
        "hard_shutdown",
        "hard_reboot",
        "suspend",
        "pause",
        "pool_migrate",
        "snapshot",
        "checkpoint",
        "metadata_export",
    ],
    "Suspended": [
        "resume",
        "resume_on",
        "hard_shutdown",
        "export",
        "destroy",
        "snapshot",
        "checkpoint",
        "metadata_export",
    ],
    "Paused": ["unpause", "hard_shutdown", "hard_reboot", "snapshot", "checkpoint"],
}


def vm_allowed_operations(record: dict[str, Any]) -> list[str]:
    """What XAPI lists in a VM's ``allowed_operations`` for its state (approximately)."""
    if record["is_control_domain"]:
        return []
    if record["is_a_snapshot"]:
        return ["revert", "clone", "copy", "export", "destroy", "metadata_export"]
    if record["is_a_template"]:
        return ["clone", "copy", "export", "destroy", "provision", "metadata_export"]
    blocked = record["blocked_operations"]
    return [op for op in _VM_OPERATIONS.get(record["power_state"], []) if op not in blocked]


def lower_class(cls: str) -> str:
    """The class name as ``event.from`` spells it."""
    return cls.lower()


class Database:
    """One pool's objects, with the event log behind ``event.from`` (thread-safe)."""

    EVENT_LOG_LIMIT = 200_000

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.tables: dict[str, dict[str, dict[str, Any]]] = {cls: {} for cls in CLASSES}
        self._by_uuid: dict[str, dict[str, str]] = {cls: {} for cls in CLASSES}
        self._xml_cache: dict[str, str] = {}
        self.generation = 0
        self.events: deque[tuple[int, str, str, str, float]] = deque(maxlen=self.EVENT_LOG_LIMIT)

    # -- objects -------------------------------------------------------------------------------
    def create(self, cls: str, fields: dict[str, Any], ref: str | None = None) -> str:
        """Insert a record built on the class defaults; return its ref."""
        record = DEFAULTS[cls]()
        record.update(fields)
        if cls == "VM":
            record["allowed_operations"] = vm_allowed_operations(record)
        if not record.get("uuid"):
            record["uuid"] = str(uuidlib.uuid4())
        ref = ref or new_ref()
        with self.lock:
            self.tables[cls][ref] = record
            self._by_uuid[cls][record["uuid"]] = ref
            self._event(cls, "add", ref)
        return ref

    def record(self, cls: str, ref: str) -> dict[str, Any]:
        """The live record (mutate only through :meth:`update`); HANDLE_INVALID if absent."""
        try:
            return self.tables[cls][ref]
        except KeyError:
            raise XapiError("HANDLE_INVALID", cls, ref) from None

    def exists(self, cls: str, ref: str) -> bool:
        """Whether ``ref`` is a live object of ``cls``."""
        return ref in self.tables[cls]

    def update(self, cls: str, ref: str, **fields: Any) -> None:
        """Set fields and publish a ``mod`` event."""
        with self.lock:
            self.record(cls, ref).update(fields)
            self.touch(cls, ref)

    def touch(self, cls: str, ref: str) -> None:
        """Publish a ``mod`` event after an in-place change of a record."""
        with self.lock:
            if cls == "VM":
                record = self.record(cls, ref)
                record["allowed_operations"] = vm_allowed_operations(record)
            self._xml_cache.pop(ref, None)
            self._event(cls, "mod", ref)

    def add_to_set(self, cls: str, ref: str, field: str, item: str) -> None:
        """Append to a set field (no duplicates)."""
        with self.lock:
            values = self.record(cls, ref)[field]
            if item not in values:
                values.append(item)
                self.touch(cls, ref)

    def remove_from_set(self, cls: str, ref: str, field: str, item: str) -> None:
        """Remove from a set field of a live object (no-op when gone)."""
        with self.lock:
            record = self.tables[cls].get(ref)
            if record is not None and item in record[field]:
                record[field].remove(item)
                self.touch(cls, ref)

    def delete(self, cls: str, ref: str) -> None:
        """Remove an object and publish a ``del`` event."""
        with self.lock:
            record = self.tables[cls].pop(ref, None)
            if record is None:
                raise XapiError("HANDLE_INVALID", cls, ref)
            self._by_uuid[cls].pop(record["uuid"], None)
            self._xml_cache.pop(ref, None)
            self._event(cls, "del", ref)

    def rebuild_index(self, cls: str) -> None:
        """Recompute the uuid index of a class after its table was replaced."""
        with self.lock:
            self._by_uuid[cls] = {record["uuid"]: ref for ref, record in self.tables[cls].items()}

    def forget_history(self) -> None:
        """Drop cached encodings and the event log (a restarted XAPI has neither)."""
        with self.lock:
            self._xml_cache.clear()
            self.events.clear()
            self.changed.notify_all()

    def by_uuid(self, cls: str, uuid: str) -> str:
        """The ref of the object with this uuid; UUID_INVALID if unknown."""
        ref = self._by_uuid[cls].get(uuid)
        if ref is None:
            raise XapiError("UUID_INVALID", cls, uuid)
        return ref

    def resolve(self, cls: str, ref_or_uuid: str) -> str:
        """A ref from a ref or a uuid (HTTP handlers accept both)."""
        if ref_or_uuid in self.tables[cls]:
            return ref_or_uuid
        ref = self._by_uuid[cls].get(ref_or_uuid)
        if ref is None:
            raise XapiError("HANDLE_INVALID", cls, ref_or_uuid)
        return ref

    def encoded_records(self, cls: str, refs: list[str] | None = None) -> str:
        """``get_all_records`` as an encoded XML-RPC struct, reusing per-record encodings."""
        with self.lock:
            table = self.tables[cls]
            parts = ["<value><struct>"]
            cache = self._xml_cache
            for ref in table if refs is None else refs:
                encoded = cache.get(ref)
                if encoded is None:
                    encoded = cache[ref] = xml_value(table[ref])
                parts.append(f"<member><name>{ref}</name>{encoded}</member>")
            parts.append("</struct></value>")
            return "".join(parts)

    # -- events --------------------------------------------------------------------------------
    def _event(self, cls: str, operation: str, ref: str) -> None:
        self.generation += 1
        self.events.append((self.generation, lower_class(cls), operation, ref, time.time()))
        self.changed.notify_all()

    def token(self) -> str:
        """The event token for "now" (two 20-digit numbers, §1.8)."""
        return f"{self.generation:020d},{0:020d}"
