"""From a backup to its files: backup → disk → volume → filesystem.

A backup is named ``REMOTE:PATH``: the remote's config name (or its URL) and the path of the
backup's metadata JSON on it (``/xo-vm-backups/<vm>/<timestamp>.json``), or the short form
``REMOTE:<vm uuid>/<timestamp>``. Only delta backups can be browsed: a full backup is an XVA
(a tar of the VM's disks) that cannot be read at random (xo-backups.md §9.2).

Each disk's chain is opened straight from the remote with range reads
(:func:`~xobackup_core.formats.vhd_directory.remote_disk_opener`: VHD files, VhdDirectory
disks and alias files alike), whatever its length: nothing is downloaded whole, mounted, or
handed to a helper with a chain limit.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

from xobackup_core.engine.repository import BACKUP_ROOT, BackupMetadata, BackupRepository
from xobackup_core.errors import FormatError, RemoteNotFoundError, UsageError, XobackupError
from xobackup_core.formats.vhd_chain import VhdChain, open_vhd_chain
from xobackup_core.formats.vhd_directory import remote_disk_opener
from xobackup_core.remote import Remote, join_path
from xobackup_restore_files.readers import (
    Filesystem,
    FilesystemReader,
    RawVolume,
    VolumeReader,
    split_readers,
)
from xobackup_restore_files.stream import DiskStream

_SHORT_FORM = re.compile(r"^/?(?P<vm>[0-9a-fA-F-]{36})/(?P<stamp>\d{8}T\d{6}Z|latest)$")


@dataclass(frozen=True)
class BackupRef:
    """A backup as the user named it: which remote, which metadata file."""

    remote: str
    path: str


def parse_backup_ref(text: str) -> BackupRef:
    """Split ``REMOTE:PATH``; the path is what follows the last ``:`` (remote URLs keep theirs).

    Raises UsageError when there is no ``:`` or either side is empty.
    """
    remote, sep, path = text.rpartition(":")
    if not sep or not remote or not path or path.startswith("//"):
        raise UsageError(
            f"backup {text!r} is not REMOTE:PATH (e.g. nas:/xo-vm-backups/<vm>/"
            "<timestamp>.json or nas:<vm uuid>/<timestamp>)"
        )
    return BackupRef(remote, path)


def find_backup(remote: Remote, path: str) -> BackupMetadata:
    """The metadata of the backup at ``path`` (full path or ``<vm>/<timestamp|latest>``)."""
    repository = BackupRepository(remote)
    short = _SHORT_FORM.match(path)
    if short:
        vm_uuid, stamp = short["vm"], short["stamp"]
        if stamp == "latest":
            backups = [b for b in repository.list_backups(vm_uuid) if b.mode == "delta"]
            if not backups:
                raise UsageError(f"VM {vm_uuid} has no delta backup on this remote")
            return backups[-1]
        path = join_path(BACKUP_ROOT, vm_uuid, f"{stamp}.json")
    try:
        return repository.read_metadata(path)
    except RemoteNotFoundError:
        raise UsageError(f"no backup metadata at {path} on remote {remote.name!r}") from None


@dataclass(frozen=True)
class DiskInfo:
    """One disk of a delta backup."""

    key: str
    """The key in the metadata's ``vhds`` (XO: the snapshot VDI's reference or uuid)."""
    path: str
    """Remote path of the chain's newest disk."""
    name: str
    device: str
    """``userdevice`` (0 for the first disk, like ``xvda``)."""
    vdi_uuid: str
    virtual_size: int


def backup_disks(backup: BackupMetadata) -> list[DiskInfo]:
    """The disks of a delta backup, in device order. UsageError for a full (XVA) backup."""
    if backup.mode != "delta":
        raise UsageError(
            f"{backup.path} is a full (XVA) backup: file restore needs a delta backup (a VHD "
            "chain can be read at random, an XVA cannot)"
        )
    vdis: dict[str, Any] = dict(backup.data.get("vdis") or {})
    # Xen Orchestra keeps the device on the VBD record (``vbds``, pointing at the VDI by its
    # key) and ``$snapshot_of$uuid`` beside the VDI record's fields, not in ``other_config``.
    devices = {
        str(vbd.get("VDI")): str(vbd.get("userdevice", ""))
        for vbd in (backup.data.get("vbds") or {}).values()
        if isinstance(vbd, dict)
    }
    disks = []
    for key, path in backup.vhd_paths.items():
        record = vdis.get(key) or {}
        other = record.get("other_config") or {}
        live = record.get("$snapshot_of$uuid") or other.get("$snapshot_of$uuid")
        disks.append(
            DiskInfo(
                key=key,
                path=path,
                name=str(record.get("name_label", "")),
                device=str(record.get("userdevice") or devices.get(key, "")),
                vdi_uuid=str(live or record.get("uuid") or ""),
                virtual_size=int(record.get("virtual_size") or 0),
            )
        )
    return sorted(disks, key=lambda d: (d.device, d.key))


def select_disk(disks: Sequence[DiskInfo], wanted: str) -> DiskInfo:
    """The disk named by ``wanted``: its metadata key, VDI uuid, device number or unique name."""
    for disk in disks:
        if wanted in (disk.key, disk.vdi_uuid, disk.device):
            return disk
    named = [disk for disk in disks if disk.name == wanted]
    if len(named) == 1:
        return named[0]
    known = ", ".join(f"{d.device or '?'} ({d.key})" for d in disks) or "none"
    raise UsageError(f"no disk {wanted!r} in this backup; its disks: {known}")


def open_disk_chain(remote: Remote, disk: DiskInfo) -> VhdChain:
    """The chain ending at ``disk`` as one virtual disk; FormatError when a link is broken."""
    try:
        return open_vhd_chain(disk.path, remote_disk_opener(remote))
    except RemoteNotFoundError:
        raise FormatError("the disk of this backup is missing", path=disk.path) from None


@dataclass
class Volume:
    """A browsable place on a disk: a partition, an LVM logical volume, or the whole disk."""

    id: str
    description: str
    offset: int
    size: int
    filesystem: str | None
    """The reader's name (``ext``, ``ntfs``...) or None when no reader recognised it."""
    label: str
    _open: Callable[[], BinaryIO]
    _reader: FilesystemReader | None

    def open_filesystem(self) -> Filesystem:
        """Open the filesystem; UsageError when there is none, FormatError when it is damaged."""
        if self._reader is None:
            raise UsageError(
                f"volume {self.id} ({self.description}) holds no filesystem this restore can "
                "read (ext2/3/4, XFS, Btrfs, NTFS, FAT, exFAT)"
            )
        stream = self._open()
        stream.seek(0)
        try:
            return self._reader.open(stream)
        except (UsageError, FormatError):
            raise
        except Exception as error:
            raise FormatError(
                f"cannot read the {self._reader.name} filesystem of volume {self.id}: {error}"
            ) from None


WHOLE_DISK = "whole"
"""The volume id of a filesystem written straight onto the disk, without a partition table."""


def _detect(stream: BinaryIO, readers: Sequence[FilesystemReader]) -> FilesystemReader | None:
    for reader in readers:
        try:
            if reader.detect(stream):
                return reader
        except Exception:
            # A short or odd volume is simply not that filesystem.
            continue
    return None


def list_volumes(stream: BinaryIO, readers: Sequence[Any]) -> list[Volume]:
    """Every volume of a disk: partitions (MBR, GPT), LVM logical volumes inside partitions
    or on the whole disk, or the whole disk when a filesystem starts at its first byte."""
    volume_readers, fs_readers = split_readers(readers)

    def whole() -> BinaryIO:
        return stream

    reader = _detect(stream, fs_readers)
    if reader is not None:
        return [
            Volume(WHOLE_DISK, "whole disk", 0, stream_size(stream), reader.name, "", whole, reader)
        ]
    found = _explore(stream, volume_readers, fs_readers, top_level=True)
    if found is None:
        return [
            Volume(
                WHOLE_DISK,
                "whole disk (no partition table)",
                0,
                stream_size(stream),
                None,
                "",
                whole,
                None,
            )
        ]
    return found


def _explore(
    stream: BinaryIO,
    volume_readers: Sequence[VolumeReader],
    fs_readers: Sequence[FilesystemReader],
    *,
    top_level: bool,
) -> list[Volume] | None:
    for volume_reader in volume_readers:
        if volume_reader.top_level_only and not top_level:
            continue
        try:
            raw_volumes = volume_reader.volumes(stream)
        except XobackupError:
            raise
        except Exception as error:
            # Damaged tables make parsers fail in their own ways: one message, exit code 3.
            raise FormatError(f"unreadable {volume_reader.name}: {error}") from None
        if raw_volumes is None:
            continue
        result: list[Volume] = []
        for raw in raw_volumes:
            result.extend(_probe(raw, volume_readers, fs_readers))
        return result
    return None


def _probe(
    raw: RawVolume,
    volume_readers: Sequence[VolumeReader],
    fs_readers: Sequence[FilesystemReader],
) -> list[Volume]:
    inner = raw.opener()
    reader = _detect(inner, fs_readers)
    if reader is None:
        nested = _explore(inner, volume_readers, fs_readers, top_level=False)
        if nested is not None:
            return nested
    return [
        Volume(
            raw.id,
            raw.description,
            raw.offset,
            raw.size,
            reader.name if reader else None,
            raw.label,
            raw.opener,
            reader,
        )
    ]


def stream_size(stream: BinaryIO) -> int:
    """Size of a seekable stream (its ``size`` attribute when it has one)."""
    size = getattr(stream, "size", None)
    if isinstance(size, int):
        return size
    position = stream.tell()
    end = stream.seek(0, 2)
    stream.seek(position)
    return end


def select_volume(volumes: Sequence[Volume], wanted: str) -> Volume:
    """The volume whose id is ``wanted`` (``1``, ``vg0/root``, ``whole``)."""
    for volume in volumes:
        if volume.id == wanted:
            return volume
    if len(volumes) == 1 and wanted in ("0", "1") and volumes[0].id == WHOLE_DISK:
        return volumes[0]
    known = ", ".join(v.id for v in volumes) or "none"
    raise UsageError(f"no partition or volume {wanted!r} on this disk; found: {known}")


class BackupBrowser:
    """An opened backup: its disks, and per disk its chain, stream and volumes (cached)."""

    def __init__(self, remote: Remote, backup: BackupMetadata, readers: Sequence[Any]) -> None:
        self.remote = remote
        self.backup = backup
        self.readers = list(readers)
        self.disks = backup_disks(backup)
        self._chains: list[VhdChain] = []
        self._streams: list[DiskStream] = []

    def open_disk(self, wanted: str) -> tuple[DiskInfo, DiskStream]:
        """The disk named ``wanted`` and its chain as a stream (closed with the browser)."""
        disk = select_disk(self.disks, wanted)
        chain = open_disk_chain(self.remote, disk)
        self._chains.append(chain)
        stream = DiskStream(chain)
        self._streams.append(stream)
        return disk, stream

    def volumes(self, wanted_disk: str) -> list[Volume]:
        """Every volume of a disk (see :func:`list_volumes`)."""
        _, stream = self.open_disk(wanted_disk)
        return list_volumes(stream, self.readers)

    def filesystem(self, wanted_disk: str, wanted_volume: str) -> Filesystem:
        """The opened filesystem of one volume of one disk."""
        return select_volume(self.volumes(wanted_disk), wanted_volume).open_filesystem()

    def close(self) -> None:
        """Close every stream and chain this browser opened."""
        # Streams first: their read-ahead threads may still be reading from the chains.
        for stream in self._streams:
            stream.close()
        self._streams.clear()
        for chain in self._chains:
            chain.close()
        self._chains.clear()

    def __enter__(self) -> BackupBrowser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def open_backup(remote: Remote, path: str, readers: Sequence[Any]) -> Iterator[BackupBrowser]:
    """A :class:`BackupBrowser` for the backup at ``path`` on ``remote``."""
    browser = BackupBrowser(remote, find_backup(remote, path), readers)
    try:
        yield browser
    finally:
        browser.close()
