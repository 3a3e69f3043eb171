"""The built-in VM selector: an explicit list, or smart rules evaluated at each run.

Smart rules follow Xen Orchestra's smart mode (reference: xo-backups.md §5): pools and
not-pools, power state, tags and not-tags. Whatever the rules say, a VM is never taken when it
is a snapshot, carries the ``xo:no-bak`` tag (or ``xo:no-bak=<reason>``), or is a replica made
by this very job (its start is blocked and its ``xo:backup:job`` is the job's id), so a job
never backs up its own replicas.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from xobackup_core.hookspecs import hookimpl
from xobackup_core.hypervisor import Inventory, Vm
from xobackup_core.plugins import Provided

NO_BACKUP_TAG = "xo:no-bak"


def is_excluded(vm: Vm, job_id: str) -> bool:
    """True for VMs no job may take: snapshots, ``xo:no-bak`` and this job's own replicas."""
    if vm.is_snapshot:
        return True
    if any(tag == NO_BACKUP_TAG or tag.startswith(NO_BACKUP_TAG + "=") for tag in vm.tags):
        return True
    own_replica = vm.other_config.get("xo:backup:job") == job_id
    return own_replica and "start" in vm.blocked_operations


def matches_smart_rules(vm: Vm, smart: Mapping[str, Any], pool_names: Mapping[str, str]) -> bool:
    """True when ``vm`` passes the smart rules (pools by UUID or name, tags by exact value)."""

    def in_pools(pools: Sequence[str]) -> bool:
        return vm.pool_uuid in pools or pool_names.get(vm.pool_uuid) in pools

    pools = smart.get("pools") or []
    if pools and not in_pools(pools):
        return False
    if in_pools(smart.get("not_pools") or []):
        return False
    power_state = smart.get("power_state", "all")
    if power_state != "all" and vm.power_state != power_state:
        return False
    tags = smart.get("tags") or []
    if tags and not set(tags) & set(vm.tags):
        return False
    return not set(smart.get("not_tags") or []) & set(vm.tags)


def select(job: Mapping[str, Any], inventory: Inventory) -> list[Vm]:
    """The VMs of ``inventory`` that ``job`` takes, in inventory order."""
    job_id = job["id"]
    candidates = [vm for vm in inventory.vms if not is_excluded(vm, job_id)]
    explicit = job.get("vms")
    if explicit:
        wanted = set(explicit)
        return [vm for vm in candidates if vm.uuid in wanted or vm.name in wanted]
    pool_names = {pool.uuid: pool.name for pool in inventory.pools}
    smart = job.get("smart") or {}
    return [vm for vm in candidates if matches_smart_rules(vm, smart, pool_names)]


@hookimpl
def xobackup_provides() -> list[Provided]:
    return [Provided("selector", "smart", "explicit VM list or pools/power state/tags rules")]


@hookimpl(trylast=True)
def xobackup_select_vms(job: Mapping[str, Any], inventory: Inventory) -> list[Vm]:
    return select(job, inventory)
