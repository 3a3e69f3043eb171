"""The simulator object: pools of hosts serving XAPI on loopback, and its control API.

Each pool is one XAPI with its own port; its hosts listen on that port at their own loopback
address (``127.0.0.1`` for the master, ``127.0.0.2``... for members), which is what
``host.address`` says, so ``HOST_IS_SLAVE`` and 302 redirects name a real address as XAPI's
do. The content is deterministic for a given ``seed``; refs are fresh on every start, as
XAPI's are across restarts.
"""

from __future__ import annotations

import random
import shutil
import tempfile
import threading
import uuid as uuidlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xobackup_hypervisor_xcpng.sim.codec import NULL_REF, XapiError
from xobackup_hypervisor_xcpng.sim.disks import BLOCK_SIZE, BlobStore, VdiData, derive_seed
from xobackup_hypervisor_xcpng.sim.faults import Fault, FaultTable, InFlight
from xobackup_hypervisor_xcpng.sim.server import HostListener
from xobackup_hypervisor_xcpng.sim.xapi import GUEST_SHUTDOWN_MODES, QUIESCE_MODES, PoolXapi

GiB = 1024**3

# 22-word featuresets (Xen's layout, §3.3); the AMD one lacks Intel-only bits and vice versa
INTEL_FEATURES = (
    "1fcbfbff-f7fa3223-2d93fbff-00000523-00000001-000007ab-00000000-00000000-00001000-"
    "ac000400-00000000-00000000-00000000-00000000-00000000-00000000-00000000-00000000-"
    "00000000-00000000-00000000-00000000"
)
AMD_FEATURES = (
    "178bfbff-f6f83203-2fd3fbff-75c237ff-0000000f-219c07a9-0040060c-00000000-311ed005-"
    "00000010-00000000-18000064-00000000-00000000-00000000-00000000-00000000-00000000-"
    "00000000-00000000-00000000-00000000"
)
FLAVOURS = {
    "xcp-ng": {
        "product_brand": "XCP-ng",
        "product_version": "8.2.1",
        "platform_name": "XCP",
        "platform_version": "3.2.1",
        "build_number": "release/yangtze/master/58",
        "xapi": "1.20",
        "xen": "4.13.5-9.40",
        "edition": "xcp-ng",
    },
    "citrix": {
        "product_brand": "XenServer",
        "product_version": "8.2.1",
        "platform_name": "XCP",
        "platform_version": "3.2.1",
        "build_number": "stockholm-1",
        "xapi": "1.20",
        "xen": "4.13.5",
        "edition": "enterprise-per-socket",
    },
}


def cpu_info(vendor: str = "GenuineIntel", features: str | None = None) -> dict[str, str]:
    """A host ``cpu_info`` map (all values strings) for a vendor and featureset."""
    features = features or (INTEL_FEATURES if vendor == "GenuineIntel" else AMD_FEATURES)
    intel = vendor == "GenuineIntel"
    return {
        "cpu_count": "8",
        "socket_count": "1",
        "threads_per_core": "2",
        "nr_nodes": "1",
        "vendor": vendor,
        "speed": "2999.998",
        "modelname": "Intel(R) Xeon(R) Gold 6226R CPU @ 2.90GHz"
        if intel
        else "AMD EPYC 7302P 16-Core Processor",
        "family": "6" if intel else "23",
        "model": "85" if intel else "49",
        "stepping": "7",
        "flags": "fpu de tsc msr pae mce cx8 apic sep mca cmov pat clflush acpi mmx fxsr sse sse2",
        "features_pv": features,
        "features_hvm": features,
        "features_pv_host": features,
        "features_hvm_host": features,
    }


@dataclass
class SimPool:
    """One simulated pool: its XAPI state and where its hosts listen."""

    index: int
    xapi: PoolXapi
    listeners: list[HostListener] = field(default_factory=list)

    @property
    def url(self) -> str:
        """The master's URL (what a user configures)."""
        address, port = self.listeners[0].server_address[:2]
        return f"http://{address}:{port}"

    @property
    def member_urls(self) -> list[str]:
        """URLs of the other hosts (calls there answer ``HOST_IS_SLAVE``)."""
        return [
            f"http://{lst.server_address[0]}:{lst.server_address[1]}" for lst in self.listeners[1:]
        ]

    @property
    def in_flight(self) -> InFlight:
        """Snapshots, disk exports, VM exports... running now, and their maxima."""
        return self.xapi.in_flight

    @property
    def uuid(self) -> str:
        """The pool's uuid."""
        return self.xapi.db.record("pool", self.xapi.pool_ref)["uuid"]


class Simulator:
    """An XAPI simulator: ``pools`` pools of ``hosts`` hosts and ``vms`` VMs each.

    Use as a context manager, or :meth:`start` / :meth:`stop`. ``port`` 0 picks free ports;
    otherwise pool *i* listens on ``port + i``. Each VM has one disk of ``disk_size`` bytes
    with ``allocated_blocks`` 2 MiB blocks of generated data (plus block 0). ``data_dir``
    holds stored blocks (default: a temporary folder removed by :meth:`stop`).
    """

    def __init__(
        self,
        *,
        pools: int = 1,
        vms: int = 4,
        hosts: int = 2,
        flavour: str = "xcp-ng",
        port: int = 0,
        data_dir: str | Path | None = None,
        seed: int = 0,
        username: str = "root",
        password: str = "xobackup-sim",
        disk_size: int = 4 * GiB,
        allocated_blocks: int = 4,
        jsonrpc: bool = True,
    ) -> None:
        if flavour not in FLAVOURS:
            raise ValueError(f"unknown flavour {flavour!r}; known: {', '.join(FLAVOURS)}")
        self.flavour = flavour
        self.jsonrpc = jsonrpc
        """False: ``/jsonrpc`` answers ``text/xml`` like a host older than JSON-RPC."""
        self.username = username
        self.password = password
        self.faults = FaultTable()
        """Armed faults; see :mod:`xobackup_hypervisor_xcpng.sim.faults`."""
        self.stopping = threading.Event()
        self.calls: list[tuple[int, str, tuple[Any, ...]]] | None = None
        """While recording (:meth:`record_calls`): (pool index, method, arguments without the
        session) of every API call received, in order."""
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="xobackup-sim-"))
        self.store = BlobStore(self.data_dir)
        self.seed = seed
        self._base_port = port
        self._started = False
        self.pools = [
            self._build_pool(i, vms, hosts, disk_size, allocated_blocks) for i in range(pools)
        ]

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> Simulator:
        """Open the listeners of every host of every pool."""
        if self._started:
            return self
        for pool in self.pools:
            self._listen(pool)
        self._started = True
        return self

    def stop(self) -> None:
        """Close every listener, release hung calls and delete a temporary data folder."""
        self.stopping.set()
        self.faults.clear()
        # in parallel: each listener notices the stop at its next poll
        stopping = [
            threading.Thread(target=listener.stop)
            for pool in self.pools
            for listener in pool.listeners
        ]
        for thread in stopping:
            thread.start()
        for thread in stopping:
            thread.join()
        for pool in self.pools:
            pool.listeners.clear()
        self.store.close()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)
        self._started = False

    def __enter__(self) -> Simulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _listen(self, pool: SimPool) -> None:
        xapi = pool.xapi
        hosts = list(xapi.db.tables["host"])
        port = self._base_port + pool.index if self._base_port else 0
        for position, host in enumerate(hosts):
            address = xapi.db.record("host", host)["address"]
            try:
                listener = HostListener((address, port), xapi, host)
            except OSError:
                if position == 0:
                    raise
                # no 127.0.0.x alias here: the member gets its own port on 127.0.0.1
                listener = HostListener(("127.0.0.1", 0), xapi, host)
                xapi.db.update("host", host, address="127.0.0.1")
            port = listener.server_address[1] if position == 0 else port
            xapi.host_ports[host] = (listener.server_address[0], listener.server_address[1])
            listener.start()
            pool.listeners.append(listener)

    # -- building ------------------------------------------------------------------------------
    def _uuid(self, rng: random.Random) -> str:
        return str(uuidlib.UUID(int=rng.getrandbits(128), version=4))

    def _build_pool(
        self, index: int, vm_count: int, host_count: int, disk_size: int, allocated: int
    ) -> SimPool:
        rng = random.Random(derive_seed("pool", self.seed, index))
        xapi = PoolXapi(self, index, self.flavour)
        db = xapi.db
        software = FLAVOURS[self.flavour]
        pool_ref = db.create(
            "pool",
            {
                "uuid": self._uuid(rng),
                "name_label": f"pool-{index}",
                "name_description": f"simulated {software['product_brand']} pool",
                "cpu_info": {
                    "vendor": "GenuineIntel",
                    "cpu_count": str(8 * host_count),
                    "socket_count": str(host_count),
                    "features_pv_host": INTEL_FEATURES,
                    "features_hvm_host": INTEL_FEATURES,
                },
            },
        )
        network = db.create(
            "network",
            {
                "uuid": self._uuid(rng),
                "name_label": "Pool-wide network associated with eth0",
                "bridge": "xenbr0",
                "purpose": [],
            },
        )
        hosts = []
        for h in range(host_count):
            host = db.create(
                "host",
                {
                    "uuid": self._uuid(rng),
                    "name_label": f"pool{index}-host{h}",
                    "hostname": f"pool{index}-host{h}",
                    "address": f"127.0.0.{h + 1}",
                    "cpu_info": cpu_info(),
                    "edition": software["edition"],
                    "software_version": {
                        k: software[k]
                        for k in (
                            "product_brand",
                            "product_version",
                            "platform_name",
                            "platform_version",
                            "build_number",
                            "xapi",
                            "xen",
                        )
                    },
                },
            )
            hosts.append(host)
            dom0 = db.create(
                "VM",
                {
                    "uuid": self._uuid(rng),
                    "name_label": f"Control domain on host: pool{index}-h{h}",
                    "is_control_domain": True,
                    "power_state": "Running",
                    "resident_on": host,
                    "domid": 0,
                },
            )
            db.update("host", host, control_domain=dom0, resident_VMs=[dom0])
        vlan_network = db.create(
            "network",
            {"uuid": self._uuid(rng), "name_label": "VLAN 100 (backups)", "bridge": "xapi1"},
        )
        for h, host in enumerate(hosts):
            for device, net, vlan in (("eth0", network, -1), ("eth1", vlan_network, 100)):
                pif = db.create(
                    "PIF",
                    {
                        "uuid": self._uuid(rng),
                        "device": device,
                        "network": net,
                        "host": host,
                        "VLAN": vlan,
                        "physical": vlan == -1,
                        "management": device == "eth0",
                        "IP": f"127.0.0.{h + 1}" if device == "eth0" else "",
                        "MAC": f"02:00:00:00:{index:02x}:{h:02x}",
                    },
                )
                db.add_to_set("network", net, "PIFs", pif)
                db.add_to_set("host", host, "PIFs", pif)
        db.update("pool", pool_ref, master=hosts[0])
        shared = self._sr(db, rng, "Shared storage", "nfs", hosts, shared=True)
        self._sr(db, rng, "ISOs", "iso", hosts, shared=True, content_type="iso")
        for host in hosts:
            sr = self._sr(db, rng, "Local storage", "ext", [host], shared=False)
            db.update("host", host, suspend_image_sr=sr, crash_dump_sr=sr)
        db.update(
            "pool", pool_ref, default_SR=shared, suspend_image_SR=shared, crash_dump_SR=shared
        )
        db.create(
            "VM",
            {
                "uuid": self._uuid(rng),
                "name_label": "Debian Bullseye 11",
                "is_a_template": True,
                "is_default_template": True,
            },
        )
        tag_cycle = (["prod"], ["prod", "db"], ["test"], [])
        for v in range(vm_count):
            vm = self._create_guest(
                xapi,
                rng,
                f"pool{index}-vm{v:03d}",
                disks=[disk_size],
                tags=tag_cycle[v % len(tag_cycle)],
                ha_restart_priority="restart" if v % 5 == 0 else "",
                allocated_blocks=allocated,
                seed=derive_seed("disk", self.seed, index, v),
                sr=shared,
                network=network,
            )
            if v % 2 == 0:
                xapi._boot(vm, hosts[v % len(hosts)], False)
        return SimPool(index, xapi)

    def _create_guest(
        self,
        xapi: PoolXapi,
        rng: random.Random,
        name: str,
        *,
        disks: Sequence[int],
        tags: Sequence[str],
        ha_restart_priority: str,
        allocated_blocks: int,
        seed: int,
        sr: str,
        network: str,
    ) -> str:
        """A Halted guest with its disks (``allocated_blocks`` generated blocks plus block 0
        each, or empty when 0), an empty CD drive and a VIF; returns its ref."""
        db = xapi.db
        vm = db.create(
            "VM",
            {
                "uuid": self._uuid(rng),
                "metrics": db.create("VM_metrics", {}),
                "name_label": name,
                "name_description": "simulated guest",
                "tags": list(tags),
                "other_config": {
                    "mac_seed": self._uuid(rng),
                    "base_template_name": "Debian Bullseye 11",
                },
                "ha_restart_priority": ha_restart_priority,
                "memory_static_max": 2 * GiB,
                "memory_dynamic_max": 2 * GiB,
                "memory_dynamic_min": GiB,
                "memory_static_min": GiB // 2,
                "VCPUs_max": 2,
                "VCPUs_at_startup": 2,
            },
        )
        for position, size in enumerate(disks):
            vdi = xapi.create_vdi(sr, f"{name} disk {position}", size, uuid=self._uuid(rng))
            data = xapi.disks[vdi]
            disk_seed = derive_seed(seed, position)
            if allocated_blocks:
                picked = random.Random(disk_seed).sample(
                    range(data.block_count), min(allocated_blocks, data.block_count)
                )
                for index in sorted({0, *picked}):
                    data.set_generated(index, derive_seed(disk_seed, index))
            db.update("VDI", vdi, physical_utilisation=len(data.blocks) * BLOCK_SIZE)
            xapi._create_vbd(
                {
                    "VM": vm,
                    "VDI": vdi,
                    "userdevice": str(position if position < 3 else position + 1),
                    "device": f"xvd{chr(ord('a') + (position if position < 3 else position + 1))}",
                    "bootable": position == 0,
                    "type": "Disk",
                    "mode": "RW",
                }
            )
        xapi._create_vbd(
            {
                "VM": vm,
                "VDI": NULL_REF,
                "userdevice": "3",
                "device": "xvdd",
                "type": "CD",
                "mode": "RO",
                "empty": True,
            }
        )
        mac = "02:" + ":".join(f"{rng.getrandbits(8):02x}" for _ in range(5))
        xapi._create_vif({"VM": vm, "network": network, "device": "0", "MAC": mac})
        return vm

    def add_vm(
        self,
        name: str,
        *,
        pool: int = 0,
        disks: Sequence[int] = (GiB,),
        running: bool = False,
        tags: Sequence[str] = (),
        allocated_blocks: int = 0,
    ) -> str:
        """Add a guest to a pool, its disks on the default SR (empty unless
        ``allocated_blocks``); returns its uuid. Fill disks with :meth:`load_image`."""
        xapi = self.pools[pool].xapi
        db = xapi.db
        with db.lock:
            pool_record = db.record("pool", xapi.pool_ref)
            network = next(
                ref for ref, net in db.tables["network"].items() if net["bridge"] == "xenbr0"
            )
            vm = self._create_guest(
                xapi,
                random.Random(),
                name,
                disks=disks,
                tags=tags,
                ha_restart_priority="",
                allocated_blocks=allocated_blocks,
                seed=derive_seed("added", self.seed, pool, name),
                sr=pool_record["default_SR"],
                network=network,
            )
            if running:
                xapi._boot(vm, xapi.master, False)
            return db.record("VM", vm)["uuid"]

    def _sr(
        self,
        db: Any,
        rng: random.Random,
        label: str,
        sr_type: str,
        hosts: list[str],
        *,
        shared: bool,
        content_type: str = "user",
    ) -> str:
        sr = db.create(
            "SR",
            {
                "uuid": self._uuid(rng),
                "name_label": label,
                "type": sr_type,
                "shared": shared,
                "content_type": content_type,
                "physical_size": 2 * 1024 * GiB,
            },
        )
        for host in hosts:
            pbd = db.create("PBD", {"uuid": self._uuid(rng), "host": host, "SR": sr})
            db.add_to_set("SR", sr, "PBDs", pbd)
            db.add_to_set("host", host, "PBDs", pbd)
        return sr

    # -- control API ---------------------------------------------------------------------------
    def pool(self, index: int = 0) -> SimPool:
        """Pool number ``index``."""
        return self.pools[index]

    def _locate_vdi(self, vdi: str) -> tuple[PoolXapi, str]:
        for pool in self.pools:
            db = pool.xapi.db
            try:
                return pool.xapi, db.resolve("VDI", vdi)
            except XapiError:
                continue
        raise KeyError(f"no VDI {vdi!r} in any pool")

    def vdi_data(self, vdi: str) -> VdiData:
        """The content of a VDI, by ref or uuid."""
        xapi, ref = self._locate_vdi(vdi)
        return xapi.disks[ref]

    def _changed(self, vdi: str) -> None:
        xapi, ref = self._locate_vdi(vdi)
        xapi.db.update("VDI", ref, physical_utilisation=len(xapi.disks[ref].blocks) * BLOCK_SIZE)

    def write(self, vdi: str, offset: int, data: bytes) -> None:
        """A guest write of ``data`` at ``offset`` into a VDI (ref or uuid)."""
        self.vdi_data(vdi).write(offset, data)
        self._changed(vdi)

    def read(self, vdi: str, offset: int, length: int) -> bytes:
        """Read a VDI's content."""
        return self.vdi_data(vdi).read(offset, length)

    def randomize_blocks(self, vdi: str, fraction: float, seed: int) -> list[int]:
        """Overwrite ``fraction`` of the VDI's 2 MiB blocks with new generated data.

        Deterministic for a given seed; returns the indexes written (what a delta must carry).
        """
        data = self.vdi_data(vdi)
        count = max(1, round(fraction * data.block_count))
        picked = sorted(random.Random(seed).sample(range(data.block_count), count))
        for index in picked:
            data.set_generated(index, derive_seed("guest-write", vdi, seed, index))
        self._changed(vdi)
        return picked

    def load_image(self, vdi: str, path: str | Path) -> None:
        """Copy a raw disk image into a VDI (growing it when the image is larger)."""
        xapi, ref = self._locate_vdi(vdi)
        data = xapi.disks[ref]
        size = Path(path).stat().st_size
        if size > data.size:
            new_size = -(-size // (1024 * 1024)) * 1024 * 1024
            data.resize(new_size)
            xapi.db.update("VDI", ref, virtual_size=new_size)
        with open(path, "rb") as image:
            index = 0
            while block := image.read(BLOCK_SIZE):
                data.set_block(index, block)
                index += 1
        self._changed(vdi)

    def arm(self, target: str, kind: str = "error", **options: Any) -> Fault:
        """Arm a fault (shortcut for ``faults.add``)."""
        return self.faults.add(target, kind, **options)

    def set_quiesce_mode(self, mode: str, pool: int | None = None) -> None:
        """How ``VM.snapshot_with_quiesce`` answers (``removed`` is XCP-ng 8 / CH 8)."""
        if mode not in QUIESCE_MODES:
            raise ValueError(f"unknown quiesce mode {mode!r}; known: {', '.join(QUIESCE_MODES)}")
        for p in self.pools if pool is None else [self.pools[pool]]:
            p.xapi.quiesce_mode = mode

    def fail_next_checkpoint(self, stage: str, pool: int = 0) -> None:
        """Make the next ``VM.checkpoint`` fail at ``suspend`` (the VM keeps running) or at
        ``resume`` (the VM is left Suspended), as XAPI's checkpoints can."""
        if stage not in ("suspend", "resume"):
            raise ValueError(f"unknown checkpoint stage {stage!r}: suspend or resume")
        self.pools[pool].xapi.checkpoint_failure = stage

    def record_calls(self) -> list[tuple[int, str, tuple[Any, ...]]]:
        """Start recording every API call (a fresh list, also kept in :attr:`calls`)."""
        self.calls = []
        return self.calls

    def set_guest_shutdown(self, vm: str, mode: str) -> None:
        """How the guest of ``vm`` (ref or uuid) answers ``VM.clean_shutdown``: ``normal``,
        ``ignore`` (never halts by itself) or ``no_pv_drivers`` (``VM_MISSING_PV_DRIVERS``)."""
        if mode not in GUEST_SHUTDOWN_MODES:
            raise ValueError(
                f"unknown guest shutdown mode {mode!r}; known: {', '.join(GUEST_SHUTDOWN_MODES)}"
            )
        for pool in self.pools:
            db = pool.xapi.db
            for ref, record in db.tables["VM"].items():
                if vm in (ref, record["uuid"]):
                    pool.xapi.guest_shutdown[ref] = mode
                    return
        raise KeyError(f"no VM {vm!r}")

    def set_host_cpu(self, host: str, vendor: str, features: str | None = None) -> None:
        """Give a host (ref, uuid or name) another CPU, to provoke CPU incompatibilities."""
        for pool in self.pools:
            db = pool.xapi.db
            for ref, record in db.tables["host"].items():
                if host in (ref, record["uuid"], record["name_label"]):
                    db.update("host", ref, cpu_info=cpu_info(vendor, features))
                    return
        raise KeyError(f"no host {host!r}")

    def restart_xapi(self, pool: int | None = None) -> None:
        """Restart XAPI: sessions (``SESSION_INVALID`` next) and tasks are gone, every ref
        (the pool's too) is renumbered; uuids and content stay."""
        for p in self.pools if pool is None else [self.pools[pool]]:
            mapping = p.xapi.restart()
            for listener in p.listeners:
                listener.host_ref = mapping[listener.host_ref]

    def vms(self, pool: int = 0) -> Iterator[tuple[str, dict[str, Any]]]:
        """(ref, record) of the guest VMs of a pool (no templates, snapshots, dom0)."""
        for ref, record in list(self.pools[pool].xapi.db.tables["VM"].items()):
            if not (
                record["is_a_template"] or record["is_control_domain"] or record["is_a_snapshot"]
            ):
                yield ref, record

    def credentials(self) -> dict[str, str]:
        """The login of every pool."""
        return {"username": self.username, "password": self.password}
