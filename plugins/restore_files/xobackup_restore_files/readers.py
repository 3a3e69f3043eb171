"""Readers for what lies inside a disk: partition tables, LVM volumes and filesystems.

Two kinds of reader, both returned by the ``xobackup_file_readers`` hook so another plugin can
add one (a filesystem dissect does not cover, say):

* a :class:`VolumeReader` (``kind = "volumes"``) splits a stream into volumes: the built-ins read
  MBR (with extended and logical partitions) and GPT tables, and LVM2 physical volumes;
* a :class:`FilesystemReader` (``kind = "filesystem"``) recognises a filesystem from a few magic
  bytes and opens it as a :class:`Filesystem` of :class:`Node` objects: the built-ins read
  ext2/3/4, XFS, Btrfs, NTFS, FAT12/16/32 and exFAT.

Every reader works on a read-only, seekable file object and never mounts anything: no root, no
loop device, no FUSE (xo-backups.md §9.2 lists what a mount-based restore trips over: LVM name
clashes, chain-length limits of the mount helper).
"""

from __future__ import annotations

import stat
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, BinaryIO, ClassVar, Protocol

from xobackup_core.errors import FormatError, UsageError

FILE = "file"
DIRECTORY = "dir"
SYMLINK = "symlink"
OTHER = "other"
"""Device nodes, fifos, sockets: listed, never extracted."""


class PathNotFoundError(UsageError):
    """A path asked for does not exist in the filesystem."""


class Node(ABC):
    """One entry of a filesystem: a file, a directory, a symlink or something else."""

    name: str
    kind: str
    """One of :data:`FILE`, :data:`DIRECTORY`, :data:`SYMLINK`, :data:`OTHER`."""
    size: int
    mtime: datetime | None
    """Last modification, timezone-aware when the filesystem records the zone."""
    link_target: str | None = None
    """What a symlink points to, as stored (never followed)."""

    @abstractmethod
    def children(self) -> Iterator[Node]:
        """The entries of a directory, without ``.`` and ``..``."""

    @abstractmethod
    def open(self) -> BinaryIO:
        """The content of a file, as a readable stream."""


class Filesystem(ABC):
    """An opened filesystem."""

    type_name: ClassVar[str]

    @abstractmethod
    def root(self) -> Node:
        """The root directory."""

    def get(self, path: str) -> Node:
        """The node at ``path`` (``/`` separated, relative to the root); symlinks on the way are
        not followed. Raises :class:`PathNotFoundError`."""
        node = self.root()
        walked = ""
        for part in [p for p in path.split("/") if p not in ("", ".")]:
            if node.kind != DIRECTORY:
                raise PathNotFoundError(f"{walked or '/'} is not a directory (looking for {path})")
            for child in node.children():
                if child.name == part:
                    node = child
                    break
            else:
                raise PathNotFoundError(f"no {path!r} in this filesystem ({part!r} not found)")
            walked += "/" + part
        return node


class FilesystemReader(Protocol):
    """Recognises and opens one kind of filesystem."""

    kind: str
    """Always ``"filesystem"``."""
    name: str

    def detect(self, stream: BinaryIO) -> bool:
        """True when ``stream`` starts with this filesystem (cheap: a few magic bytes)."""

    def open(self, stream: BinaryIO) -> Filesystem:
        """Open the filesystem; FormatError when it is damaged."""


@dataclass
class RawVolume:
    """A volume found by a :class:`VolumeReader`, before its content is probed."""

    id: str
    """Stable name users pass on the command line: ``1``, ``5`` (logical), ``vg0/root``."""
    description: str
    offset: int
    """Byte offset inside the stream it was found in (for LVM: of the first segment)."""
    size: int
    opener: Callable[[], BinaryIO]
    label: str = ""


class VolumeReader(Protocol):
    """Splits a stream into volumes (a partition table, an LVM physical volume...)."""

    kind: str
    """Always ``"volumes"``."""
    name: str
    top_level_only: bool
    """True for partition tables: only looked for on the whole disk, never inside a volume."""

    def volumes(self, stream: BinaryIO) -> list[RawVolume] | None:
        """The volumes in ``stream``, or None when the format is not there."""


def _peek(stream: BinaryIO, offset: int, length: int) -> bytes:
    stream.seek(offset)
    return stream.read(length)


# -- ext2/3/4 and XFS (the same inode API in dissect) ------------------------------------------
_UNIX_KINDS = {stat.S_IFREG: FILE, stat.S_IFDIR: DIRECTORY, stat.S_IFLNK: SYMLINK}


class _UnixNode(Node):
    """An inode of ext or XFS (``filetype``, ``listdir``, ``link``, ``open``)."""

    def __init__(self, name: str, inode: Any) -> None:
        self.name = name
        self._inode = inode
        self.kind = _UNIX_KINDS.get(inode.filetype, OTHER)
        self.size = int(inode.size)
        self.mtime = inode.mtime
        self.link_target = inode.link if self.kind == SYMLINK else None

    def children(self) -> Iterator[Node]:
        for name, inode in self._inode.listdir().items():
            if name in (".", ".."):
                continue
            yield _UnixNode(name, inode)

    def open(self) -> BinaryIO:
        return self._inode.open()


class _NativeGetFilesystem(Filesystem):
    """A filesystem whose library looks paths up itself (faster than walking directories)."""

    def __init__(self, fs: Any, node_type: Callable[[str, Any], Node]) -> None:
        self._fs = fs
        self._node_type = node_type

    def root(self) -> Node:
        return self._node_type("/", self._fs.get("/"))

    def get(self, path: str) -> Node:
        clean = "/" + "/".join(p for p in path.split("/") if p not in ("", "."))
        if clean == "/":
            return self.root()
        try:
            inode = self._fs.get(clean)
        except (FileNotFoundError, NotADirectoryError) as error:
            raise PathNotFoundError(f"no {path!r} in this filesystem ({error})") from None
        return self._node_type(clean.rsplit("/", 1)[1], inode)


class ExtReader:
    """ext2, ext3 and ext4 (dissect.extfs)."""

    kind = "filesystem"
    name = "ext"

    def detect(self, stream: BinaryIO) -> bool:
        return _peek(stream, 1024 + 56, 2) == b"\x53\xef"

    def open(self, stream: BinaryIO) -> Filesystem:
        from dissect.extfs import ExtFS

        class ExtFilesystem(_NativeGetFilesystem):
            type_name = "ext"

        return ExtFilesystem(ExtFS(stream), _UnixNode)


class XfsReader:
    """XFS (dissect.xfs)."""

    kind = "filesystem"
    name = "xfs"

    def detect(self, stream: BinaryIO) -> bool:
        return _peek(stream, 0, 4) == b"XFSB"

    def open(self, stream: BinaryIO) -> Filesystem:
        from dissect.xfs import XFS

        class XfsFilesystem(_NativeGetFilesystem):
            type_name = "xfs"

        return XfsFilesystem(XFS(stream), _UnixNode)


# -- Btrfs -------------------------------------------------------------------------------------
class _BtrfsNode(Node):
    def __init__(self, name: str, inode: Any) -> None:
        self.name = name
        self._inode = inode
        if inode.is_dir():
            self.kind = DIRECTORY
        elif inode.is_symlink():
            self.kind = SYMLINK
        elif inode.is_file():
            self.kind = FILE
        else:
            self.kind = OTHER
        self.size = int(inode.size)
        self.mtime = inode.mtime
        self.link_target = inode.link if self.kind == SYMLINK else None

    def children(self) -> Iterator[Node]:
        for name, inode in self._inode.listdir().items():
            if name in (".", ".."):
                continue
            yield _BtrfsNode(name, inode)

    def open(self) -> BinaryIO:
        return self._inode.open()


class BtrfsReader:
    """Btrfs, default subvolume (dissect.btrfs)."""

    kind = "filesystem"
    name = "btrfs"

    def detect(self, stream: BinaryIO) -> bool:
        return _peek(stream, 0x10040, 8) == b"_BHRfS_M"

    def open(self, stream: BinaryIO) -> Filesystem:
        from dissect.btrfs import Btrfs

        class BtrfsFilesystem(_NativeGetFilesystem):
            type_name = "btrfs"

        return BtrfsFilesystem(Btrfs(stream), _BtrfsNode)


# -- NTFS --------------------------------------------------------------------------------------
class _NtfsNode(Node):
    def __init__(self, name: str, record: Any, *, is_root: bool = False) -> None:
        self.name = name
        self._record = record
        self._is_root = is_root
        if record.is_symlink():
            self.kind = SYMLINK
        elif record.is_dir():
            self.kind = DIRECTORY
        elif record.is_file():
            self.kind = FILE
        else:
            self.kind = OTHER
        self.size = int(record.size()) if self.kind == FILE else 0
        info = record.attributes[0x10]  # $STANDARD_INFORMATION
        self.mtime = info[0].last_modification_time if info else None
        self.link_target = None
        if self.kind == SYMLINK:
            self.link_target = str(record.reparse_point_substitute_name).replace("\\", "/")

    def children(self) -> Iterator[Node]:
        entries = self._record.listdir(dereference=True, ignore_dos=True)
        for name, record in entries.items():
            # NTFS keeps its metadata files ($MFT, $Bitmap...) in the root directory.
            if name == "." or (self._is_root and name.startswith("$")):
                continue
            yield _NtfsNode(name, record)

    def open(self) -> BinaryIO:
        return self._record.open()


class _NtfsFilesystem(Filesystem):
    type_name = "ntfs"

    def __init__(self, ntfs: Any) -> None:
        self._ntfs = ntfs

    def root(self) -> Node:
        return _NtfsNode("/", self._ntfs.mft.get(""), is_root=True)

    def get(self, path: str) -> Node:
        clean = "/".join(p for p in path.split("/") if p not in ("", "."))
        if not clean:
            return self.root()
        try:
            record = self._ntfs.mft.get(clean)
        except (FileNotFoundError, NotADirectoryError) as error:
            raise PathNotFoundError(f"no {path!r} in this filesystem ({error})") from None
        return _NtfsNode(clean.rsplit("/", 1)[-1], record)


class NtfsReader:
    """NTFS (dissect.ntfs); symlink reparse points are listed as symlinks."""

    kind = "filesystem"
    name = "ntfs"

    def detect(self, stream: BinaryIO) -> bool:
        return _peek(stream, 3, 8) == b"NTFS    "

    def open(self, stream: BinaryIO) -> Filesystem:
        from dissect.ntfs import NTFS

        return _NtfsFilesystem(NTFS(stream))


# -- FAT12/16/32 -------------------------------------------------------------------------------
class _FatNode(Node):
    def __init__(self, name: str, entry: Any) -> None:
        self.name = name
        self._entry = entry
        self.kind = DIRECTORY if entry.is_directory() else FILE
        self.size = 0 if self.kind == DIRECTORY else int(entry.size)
        # FAT stores local time without a zone: keep it naive.
        self.mtime = entry.mtime

    def children(self) -> Iterator[Node]:
        for entry in self._entry.iterdir():
            if entry.name in (".", "..") or entry.is_volume_id():
                continue
            yield _FatNode(entry.name, entry)

    def open(self) -> BinaryIO:
        return self._entry.open()


class _FatFilesystem(Filesystem):
    type_name = "fat"

    def __init__(self, fat: Any) -> None:
        self._fat = fat

    def root(self) -> Node:
        return _FatNode("/", self._fat.get("/"))


class FatReader:
    """FAT12, FAT16 and FAT32 (dissect.fat), long names included."""

    kind = "filesystem"
    name = "fat"

    def detect(self, stream: BinaryIO) -> bool:
        sector = _peek(stream, 0, 512)
        return (
            len(sector) == 512
            and sector[510:512] == b"\x55\xaa"
            and (sector[0x36:0x39] == b"FAT" or sector[0x52:0x57] == b"FAT32")
        )

    def open(self, stream: BinaryIO) -> Filesystem:
        from dissect.fat import FATFS

        fs = FATFS(stream)
        _bound_cluster_chains(fs.fat)
        return _FatFilesystem(fs)


def _bound_cluster_chains(fat: Any) -> None:
    """Make a looping cluster chain (damaged FAT) an error instead of an endless walk.

    A chain can never be longer than the FAT has entries; the library follows ``next`` links
    without that check, so its ``chain`` is wrapped on this instance."""
    walk_chain = fat.chain
    limit = int(fat.entry_count)

    def chain(cluster: int) -> Iterator[int]:
        for count, value in enumerate(walk_chain(cluster)):
            if count >= limit:
                raise FormatError(f"FAT cluster chain from cluster {cluster} loops")
            yield value

    fat.chain = chain


# -- exFAT -------------------------------------------------------------------------------------
def _exfat_time(stamp: int, offset_byte: int) -> datetime | None:
    """An exFAT timestamp (DOS layout) with its UTC-offset byte (bit 7: offset valid)."""
    if not stamp:
        return None
    seconds = (stamp & 0x1F) * 2
    minute = (stamp >> 5) & 0x3F
    hour = (stamp >> 11) & 0x1F
    day = (stamp >> 16) & 0x1F
    month = (stamp >> 21) & 0x0F
    year = 1980 + ((stamp >> 25) & 0x7F)
    try:
        moment = datetime(year, month, day, hour, minute, seconds)
    except ValueError:
        return None
    if offset_byte & 0x80:
        quarters = offset_byte & 0x7F
        if quarters & 0x40:
            quarters -= 0x80
        return moment.replace(tzinfo=timezone(timedelta(minutes=15 * quarters)))
    return moment


class _ExfatNode(Node):
    def __init__(self, name: str, fs: Any, entry: Any, children: Any) -> None:
        self.name = name.rstrip("/")
        self._fs = fs
        self._entry = entry
        self._children = children
        self.kind = DIRECTORY if children is not None else FILE
        self.size = 0 if children is not None else int(entry.stream.data_length)
        metadata = entry.metadata
        self.mtime = _exfat_time(int(metadata.modified_time), int(metadata.modified_timezone))

    def children(self) -> Iterator[Node]:
        for name, (entry, children) in (self._children or {}).items():
            yield _ExfatNode(name, self._fs, entry, children)

    def open(self) -> BinaryIO:
        from dissect.util.stream import RunlistStream

        stream = self._entry.stream
        contiguous = bool(stream.flags.not_fragmented)
        size = int(stream.data_length)
        if size == 0:
            import io

            return io.BytesIO()
        runs = self._fs.runlist(
            int(stream.location), not_fragmented=contiguous, size=size if contiguous else None
        )
        return RunlistStream(self._fs.filesystem, runs, size, self._fs.sector_size)


class _ExfatFilesystem(Filesystem):
    type_name = "exfat"

    def __init__(self, exfat: Any) -> None:
        self._exfat = exfat

    def root(self) -> Node:
        entry, children = self._exfat.files["/"]
        return _ExfatNode("/", self._exfat, entry, children)


class ExfatReader:
    """exFAT (dissect.fat); the library reads the whole directory tree when it opens."""

    kind = "filesystem"
    name = "exfat"

    def detect(self, stream: BinaryIO) -> bool:
        return _peek(stream, 3, 8) == b"EXFAT   "

    def open(self, stream: BinaryIO) -> Filesystem:
        from dissect.fat import ExFAT

        return _ExfatFilesystem(ExFAT(stream))


# -- partition tables and LVM ------------------------------------------------------------------
_EXTENDED_TYPES = (0x05, 0x0F, 0x85)


class PartitionTableReader:
    """MBR (primary, extended and logical partitions) and GPT tables (dissect.volume).

    Partitions are numbered the way Linux numbers them: MBR primaries 1–4 by slot, logical
    partitions from 5 in chain order; GPT entries by their slot.
    """

    kind = "volumes"
    name = "partition-table"
    top_level_only = True

    def volumes(self, stream: BinaryIO) -> list[RawVolume] | None:
        from dissect.volume.disk import Disk

        stream.seek(0)
        if _peek(stream, 510, 2) != b"\x55\xaa":
            return None
        try:
            stream.seek(0)
            disk = Disk(stream)
        except Exception:
            return None
        scheme = type(disk.scheme).__name__
        found = []
        logical = 5
        for partition in disk.partitions:
            if partition.type in _EXTENDED_TYPES or partition.size <= 0:
                continue
            number = int(partition.number)
            if scheme == "MBR":
                number = partition.number if _is_primary(disk, partition) else logical
                if number == logical:
                    logical += 1
            type_text = partition.type_str or str(partition.type)
            found.append(
                RawVolume(
                    id=str(number),
                    description=f"{scheme} partition {number}, type {type_text}",
                    offset=int(partition.offset),
                    size=int(partition.size),
                    opener=partition.open,
                    label=str(partition.name or ""),
                )
            )
        return found


def _is_primary(disk: Any, partition: Any) -> bool:
    """True for an MBR partition listed in the MBR itself (not in an extended partition)."""
    primaries = {
        int(entry.sector_ofs) * disk.sector_size
        for entry in disk.scheme.mbr.part
        if int(entry.type) not in (0, *_EXTENDED_TYPES)
    }
    return int(partition.offset) in primaries


class LvmReader:
    """LVM2 physical volumes: each logical volume becomes a volume ``<vg>/<lv>``.

    No device-mapper, no ``vgimportclone``: the metadata is parsed and the LV's segments mapped
    onto the stream directly, so cloned VG names or UUIDs cannot clash with the host's.
    """

    kind = "volumes"
    name = "lvm"
    top_level_only = False

    def volumes(self, stream: BinaryIO) -> list[RawVolume] | None:
        head = _peek(stream, 0, 4 * 512)
        if b"LABELONE" not in head:
            return None
        from dissect.volume.lvm import LVM2

        stream.seek(0)
        try:
            lvm = LVM2(stream)
        except Exception as error:
            raise FormatError(f"unreadable LVM2 metadata: {error}") from None
        group = lvm.vg
        found = []
        for volume in group.lv:
            if not volume.is_visible:
                continue
            extent = int(group.extent_size) * 512
            size = sum(int(seg.extent_count) for seg in volume.segments) * extent
            found.append(
                RawVolume(
                    id=f"{group.name}/{volume.name}",
                    description=f"LVM logical volume {group.name}/{volume.name}",
                    offset=0,
                    size=size,
                    opener=volume.open,
                )
            )
        return found


def builtin_readers() -> list[VolumeReader | FilesystemReader]:
    """The readers this plugin registers through ``xobackup_file_readers``."""
    return [
        PartitionTableReader(),
        LvmReader(),
        ExtReader(),
        XfsReader(),
        BtrfsReader(),
        NtfsReader(),
        ExfatReader(),
        FatReader(),
    ]


def split_readers(
    readers: Sequence[Any],
) -> tuple[list[VolumeReader], list[FilesystemReader]]:
    """Volume readers and filesystem readers, in the order given."""
    volumes = [r for r in readers if getattr(r, "kind", None) == "volumes"]
    filesystems = [r for r in readers if getattr(r, "kind", None) == "filesystem"]
    return volumes, filesystems
