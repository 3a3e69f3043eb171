"""Helpers of the XAPI driver tests: a driver on a simulator, reading simulator state."""

from __future__ import annotations

from typing import Any

from xobackup_hypervisor_xcpng.driver import XapiDriver
from xobackup_hypervisor_xcpng.sim import Simulator

from xobackup_core.config import Secret


def server_config(sim: Simulator, pool: int = 0, **changes: Any) -> dict[str, Any]:
    """What ``Config.server_view()`` would give for a server pointing at a simulated pool."""
    options = {"retry_delay": 0.02, "task_timeout": 30.0}
    options.update(changes.pop("options", {}))
    config: dict[str, Any] = {
        "name": f"sim-{pool}",
        "type": "xcpng",
        "url": sim.pool(pool).url,
        "username": sim.username,
        "password": Secret(sim.password),
        "allow_unauthorized": False,
        "ca_file": None,
        "fingerprint": None,
        "timeout": 10.0,
        "options": options,
    }
    config.update(changes)
    return config


def make_driver(sim: Simulator, pool: int = 0, **changes: Any) -> XapiDriver:
    """A logged-in driver on a simulated pool."""
    return XapiDriver(server_config(sim, pool, **changes))


def sim_record(sim: Simulator, cls: str, uuid: str, pool: int = 0) -> dict[str, Any]:
    """An object's record in the simulator's database, by uuid."""
    db = sim.pool(pool).xapi.db
    return db.record(cls, db.by_uuid(cls, uuid))


def sim_exists(sim: Simulator, cls: str, uuid: str, pool: int = 0) -> bool:
    """Whether the simulator has an object of that class and uuid."""
    return uuid in sim.pool(pool).xapi.db._by_uuid[cls]


def running_vm(sim: Simulator, pool: int = 0) -> str:
    """The uuid of a Running guest VM."""
    return next(r["uuid"] for _, r in sim.vms(pool) if r["power_state"] == "Running")


def halted_vm(sim: Simulator, pool: int = 0) -> str:
    """The uuid of a Halted guest VM."""
    return next(r["uuid"] for _, r in sim.vms(pool) if r["power_state"] == "Halted")


def first_disk(sim: Simulator, vm_uuid: str, pool: int = 0) -> str:
    """The uuid of a VM's first disk."""
    db = sim.pool(pool).xapi.db
    for vbd in sim_record(sim, "VM", vm_uuid, pool)["VBDs"]:
        record = db.record("VBD", vbd)
        if record["type"] == "Disk":
            return db.record("VDI", record["VDI"])["uuid"]
    raise AssertionError(f"VM {vm_uuid} has no disk")
