"""Restoring a backup as a new VM on any SR of any pool (reference: xo-backups.md §9).

* A full backup streams its XVA from the remote into the pool's import.
* A delta backup creates each disk on the target SR and streams the disk's whole chain into
  it as one dynamic VHD (the chain is read block by block from the remote: no local copy),
  then creates the VM from the backed-up records, disks attached by their original devices,
  networks mapped by UUID, then by name and VLAN.
* A memory (RAM) backup is restored Suspended with its memory image when the target host's
  CPU can resume it (same vendor, the VM's CPU features a subset of the host's, as XAPI
  checks on resume, xo-backups.md §6); otherwise the restore is refused, or made halted when
  the user asks for it.

The restored VM is named ``<original name> (<backup date>)`` and tagged
``restored from backup``. Its network interfaces keep the MAC addresses they had when backed
up, or get fresh ones when asked (a plain XVA import makes XAPI pick new MACs, so the backed-up
ones are read from the archive's ``ova.xml`` and put back). It can then be started (a Suspended
one is resumed).
"""

from __future__ import annotations

import io
import posixpath
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from xobackup_core.engine.cpu import cpu_problem
from xobackup_core.engine.repository import BackupMetadata, BackupRepository
from xobackup_core.errors import HypervisorError, UsageError, XobackupError
from xobackup_core.formats.source import read_ahead
from xobackup_core.formats.vhd_chain import open_vhd_chain
from xobackup_core.formats.vhd_directory import remote_disk_opener
from xobackup_core.formats.vhd_writer import plan_vhd_stream, vhd_stream
from xobackup_core.formats.xva import XvaReader
from xobackup_core.hypervisor import HypervisorDriver, Pool, StorageRepository
from xobackup_core.remote import Remote, join_path

RESTORED_TAG = "restored from backup"
READ_AHEAD_BLOCKS = 4
"""Disk blocks read ahead of the upload (2 MiB each: memory stays constant)."""


def parse_backup_ref(text: str) -> tuple[str, str]:
    """``REMOTE:PATH`` (a backup's metadata path, as ``xobackup backups list`` prints it)."""
    remote, sep, path = text.partition(":")
    if not sep or not path.endswith(".json"):
        raise UsageError(
            f"{text!r} is not a backup: write REMOTE:PATH with the metadata path that "
            "'xobackup backups list' prints, e.g. nas:/xo-vm-backups/<vm>/20260801T040000Z.json"
        )
    return remote, path


class IteratorReader(io.RawIOBase):
    """A readable stream over an iterator of byte chunks (for uploads).

    ``read(n)`` returns a memoryview of the current chunk (no copy): uploads hand it straight
    to the socket, so the data is not copied on its way from the remote to the network.
    """

    def __init__(self, chunks: Iterable[bytes | memoryview]) -> None:
        super().__init__()
        self._chunks: Iterator[bytes | memoryview] = iter(chunks)
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def _fill(self) -> bool:
        while not self._pending:
            chunk = next(self._chunks, None)
            if chunk is None:
                return False
            self._pending = memoryview(chunk).cast("B")
        return True

    def read(self, size: int | None = -1) -> memoryview | bytes:  # type: ignore[override]
        if size is None or size < 0:
            return self.readall()
        if size == 0 or not self._fill():
            return b""
        data = self._pending[:size]
        self._pending = self._pending[size:]
        return data

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        if not self._fill():
            return 0
        size = min(len(buffer), len(self._pending))
        buffer[:size] = self._pending[:size]
        self._pending = self._pending[size:]
        return size


@dataclass
class RestoreResult:
    vm_uuid: str
    name: str
    suspended: bool
    """Restored Suspended, with its memory (before any start)."""
    started: bool = False
    """Started (or resumed) after the restore."""


def restore_backup(
    remote: Remote,
    backup: BackupMetadata,
    driver: HypervisorDriver,
    *,
    sr_uuid: str,
    pool: Pool | None = None,
    allow_halted: bool = False,
    new_mac_addresses: bool = False,
    start: bool = False,
) -> RestoreResult:
    """Restore ``backup`` onto SR ``sr_uuid`` of the pool ``driver`` manages.

    ``new_mac_addresses`` gives the VM's interfaces fresh MACs instead of the backed-up ones;
    ``start`` starts the VM afterwards (resumes it when restored Suspended).
    """
    inventory = driver.inventory()
    srs = {sr.uuid: sr for p in inventory.pools for sr in p.srs}
    if sr_uuid not in srs:
        known = ", ".join(f"{sr.uuid} ({sr.name})" for sr in srs.values()) or "none"
        raise UsageError(f"no SR {sr_uuid!r} in the target pool; its SRs: {known}")
    pool = pool or next(p for p in inventory.pools if any(s.uuid == sr_uuid for s in p.srs))
    when = datetime.fromtimestamp(backup.timestamp / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M")
    name = f"{backup.vm_name or backup.vm_uuid} ({when})"
    if backup.mode == "full":
        vm_uuid = _restore_xva(
            remote, backup, driver, srs[sr_uuid], new_mac_addresses=new_mac_addresses
        )
        suspended = False
    else:
        vm_uuid, suspended = _restore_delta(
            remote,
            backup,
            driver,
            srs[sr_uuid],
            pool,
            allow_halted=allow_halted,
            new_mac_addresses=new_mac_addresses,
        )
    driver.update_vm(vm_uuid, name=name, add_tags=(RESTORED_TAG,))
    result = RestoreResult(vm_uuid, name, suspended)
    if start:
        try:
            driver.start_vm(vm_uuid)
        except HypervisorError as error:
            verb = "resumed" if suspended else "started"
            raise HypervisorError(
                f"the backup was restored as VM {vm_uuid} ({name}), but it could not be "
                f"{verb}: {error}",
                code=error.code,
                params=error.params,
            ) from error
        result.started = True
    return result


def _restore_xva(
    remote: Remote,
    backup: BackupMetadata,
    driver: HypervisorDriver,
    sr: StorageRepository,
    *,
    new_mac_addresses: bool,
) -> str:
    path = backup.xva_path
    if path is None:
        raise XobackupError(f"{backup.path}: a full backup without an XVA")
    macs = _xva_macs(remote, path)
    size = remote.stat(path).size
    with remote.open_read(path) as stream:
        vm_uuid = driver.import_vm(stream, sr_uuid=sr.uuid, size=size)
    if not macs:
        return vm_uuid
    try:
        if new_mac_addresses:
            # XAPI already picks new MACs on a plain import; make sure no backed-up one stays
            current = driver.vm_devices(vm_uuid).get("vifs", {}).values()
            kept = {str(v.get("device")) for v in current if v.get("MAC") in macs.values()}
            if kept:
                driver.set_vif_macs(vm_uuid, dict.fromkeys(kept, ""))
        else:
            driver.set_vif_macs(vm_uuid, macs)
    except BaseException:
        try:
            driver.destroy_vm(vm_uuid)
        except XobackupError:
            pass  # the first error is the one to report
        raise
    return vm_uuid


def _xva_macs(remote: Remote, path: str) -> dict[str, str]:
    """The backed-up VM's MAC addresses by VIF device, from the XVA's ``ova.xml`` (the first
    member: only the archive's head is read)."""
    with remote.open_read(path) as stream:
        metadata = XvaReader(stream, name=path, verify=False).metadata
    vm = metadata.vm()
    macs: dict[str, str] = {}
    for ref in vm.snapshot.get("VIFs") or []:
        vif = metadata.find(str(ref))
        if vif is not None and vif.cls == "VIF" and vif.snapshot.get("MAC"):
            macs[str(vif.snapshot.get("device", ""))] = str(vif.snapshot["MAC"])
    return macs


def _chain_stream(remote: Remote, path: str) -> tuple[int, int, Iterator[bytes | memoryview]]:
    """(virtual size, stream size, chunks) of the chain ending at ``path`` as one VHD."""
    chain = open_vhd_chain(path, remote_disk_opener(remote))
    allocated = list(chain.allocated_blocks())
    layout = plan_vhd_stream(chain.leaf.size, allocated, uuid=None)

    def chunks() -> Iterator[bytes | memoryview]:
        # blocks are read in a thread a few ahead, so reading the remote overlaps the upload
        blocks = read_ahead(chain.read_block, allocated, depth=READ_AHEAD_BLOCKS)
        try:
            yield from vhd_stream(layout, blocks)
        finally:
            blocks.close()
            chain.close()

    return chain.leaf.size, layout.stream_size, chunks()


def _restore_delta(
    remote: Remote,
    backup: BackupMetadata,
    driver: HypervisorDriver,
    sr: StorageRepository,
    pool: Pool,
    *,
    allow_halted: bool,
    new_mac_addresses: bool,
) -> tuple[str, bool]:
    data = backup.data
    if new_mac_addresses:
        # an empty MAC makes the hypervisor generate one (XAPI's VIF.create)
        vifs = {ref: {**vif, "MAC": ""} for ref, vif in (data.get("vifs") or {}).items()}
        data = {**data, "vifs": vifs}
    snapshot = dict(data.get("vmSnapshot") or data.get("vm") or {})
    vdis: Mapping[str, Any] = data.get("vdis", {})
    suspend_ref = snapshot.get("suspend_VDI")
    vm_folder = BackupRepository.vm_folder(backup.vm_uuid)
    suspended = bool(suspend_ref and suspend_ref in backup.vhd_paths)
    if suspended:
        flags = snapshot.get("last_boot_CPU_flags") or {}
        problems = [cpu_problem(flags, host.cpu) for host in pool.hosts]
        if all(problems):
            reason = problems[0] if problems else "the pool has no host"
            if not allow_halted:
                raise UsageError(
                    f"this backup holds the VM's memory, but no host of pool {pool.name} can "
                    f"resume it: {reason}. Restore it halted (without its memory) with "
                    "--halted, or onto a pool with a compatible CPU"
                )
            suspended = False
        if pool.flavour != "xcp-ng" and not allow_halted:
            raise UsageError(
                f"pool {pool.name} ({pool.flavour}) cannot create a Suspended VM; restore it "
                "halted with --halted, or onto an XCP-ng pool"
            )
        suspended = suspended and pool.flavour == "xcp-ng"
    created: dict[str, str] = {}
    suspend_vdi: str | None = None
    try:
        for ref, relative in backup.vhd_paths.items():
            record = vdis.get(ref, {})
            is_memory = ref == suspend_ref
            if is_memory and not suspended:
                continue
            path = relative if relative.startswith("/") else join_path(vm_folder, relative)
            size, stream_size, chunks = _chain_stream(remote, path)
            new_vdi = driver.create_disk(
                sr_uuid=sr.uuid,
                name=str(record.get("name_label") or posixpath.basename(path)),
                virtual_size=size,
                vdi_type="suspend" if is_memory else "user",
            )
            created[str(record.get("uuid", ref))] = new_vdi
            driver.import_disk(
                new_vdi,
                IteratorReader(chunks),  # type: ignore[arg-type]
                format="vhd",
                size=stream_size,
            )
            if is_memory:
                suspend_vdi = new_vdi
        disks = {k: v for k, v in created.items() if v != suspend_vdi}
        vm_uuid = driver.create_vm(data, sr_uuid=sr.uuid, disks=disks, suspend_vdi_uuid=suspend_vdi)
    except BaseException:
        for vdi in created.values():
            try:
                driver.destroy_disk(vdi)
            except XobackupError:
                pass  # the first error is the one to report
        raise
    return vm_uuid, suspend_vdi is not None
