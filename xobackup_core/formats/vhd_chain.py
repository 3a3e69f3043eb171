"""A VHD chain (leaf → … → root) opened as one virtual disk.

:func:`open_vhd_chain` follows each differencing disk to its parent the way XO does
(xo-backups.md §2.3): the parent's path is the header's ``parent unicode name`` resolved from
the child's folder, and the parent's footer ``uuid`` must equal the child's header
``parent uuid``. Disks are opened through an ``open_disk(path) -> VhdDisk`` callable, so one
chain can mix VHD files and VhdDirectory disks, local or on a remote.

Reads are per block: when the newest disk holding a block has a full bitmap (what XAPI and
our writer produce) its data is returned as is; otherwise sectors are composed from the disks
below with whole-run copies. Only the BATs stay in memory.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Iterator

from xobackup_core.errors import FormatError, RemoteNotFoundError
from xobackup_core.formats.source import LocalFileSource
from xobackup_core.formats.vhd import VhdDisk, VhdFile
from xobackup_core.formats.vhd_structs import SECTOR_SIZE, bitmap_is_full, bitmap_runs
from xobackup_core.remote import Remote

OpenDisk = Callable[[str], VhdDisk]
"""Opens the disk at a path (local path or remote path, as the chain was opened)."""

MAX_CHAIN_DEPTH = 10000
"""A guard against absurd chains; XO chains are tens of disks deep."""


def resolve_parent_path(child_path: str, parent_name: str) -> str:
    """The parent's path: ``parent_name`` taken relative to the child's folder (like XO)."""
    name = parent_name.replace("\\", "/")
    return posixpath.normpath(posixpath.join(posixpath.dirname(child_path), name))


def open_local_disk(path: str) -> VhdDisk:
    """``open_disk`` for VHD files on the local filesystem."""
    return VhdFile.open(LocalFileSource(path))


def remote_disk_opener(remote: Remote) -> OpenDisk:
    """``open_disk`` for VHD files on ``remote``."""
    from xobackup_core.formats.source import RemoteSource

    def open_disk(path: str) -> VhdDisk:
        return VhdFile.open(RemoteSource(remote, path))

    return open_disk


class VhdChain:
    """The virtual disk of a chain. ``disks[0]`` is the leaf, ``disks[-1]`` the root."""

    def __init__(self, disks: list[VhdDisk], paths: list[str] | None = None) -> None:
        if not disks:
            raise ValueError("a chain needs at least one disk")
        self.disks = disks
        self.paths = paths or [disk.path for disk in disks]
        self.block_size = disks[0].block_size
        for disk in disks[1:]:
            if disk.block_size != self.block_size:
                raise FormatError(
                    f"block size {disk.block_size} differs from the child's {self.block_size}",
                    path=disk.path,
                    field="header.block_size",
                )
        self.size = disks[0].size
        self.block_count = -(-self.size // self.block_size)
        self._sectors = self.block_size // SECTOR_SIZE
        self._zero_block = bytes(self.block_size)
        self._cached: tuple[int, bytes | memoryview] | None = None

    @property
    def leaf(self) -> VhdDisk:
        return self.disks[0]

    def has_block(self, index: int) -> bool:
        """True when some disk of the chain holds block ``index``."""
        return any(disk.has_block(index) for disk in self.disks)

    def allocated_blocks(self) -> Iterator[int]:
        """Blocks allocated anywhere in the chain, ascending (one byte per block in memory)."""
        flags = bytearray(self.block_count)
        for disk in self.disks:
            for index in disk.allocated_blocks():
                if index < self.block_count:
                    flags[index] = 1
        return (index for index, flag in enumerate(flags) if flag)

    def read_block(self, index: int) -> bytes | memoryview:
        """The ``block_size`` bytes of virtual block ``index`` as the leaf sees them."""
        if self._cached is not None and self._cached[0] == index:
            return self._cached[1]
        data = self._compose(index)
        self._cached = (index, data)
        return data

    def _compose(self, index: int) -> bytes | memoryview:
        result: bytearray | None = None
        covered = 0
        full = (1 << self._sectors) - 1
        for disk in self.disks:
            if not disk.has_block(index):
                if not disk.is_differencing:
                    break
                continue
            block = disk.read_block(index)
            assert block is not None
            if result is None and bitmap_is_full(block.bitmap, self.block_size):
                return block.data
            if result is None:
                result = bytearray(self.block_size)
            bits = int.from_bytes(block.bitmap[: self._sectors // 8], "big")
            wanted = bits & ~covered & full
            if wanted:
                mask = wanted.to_bytes(self._sectors // 8, "big")
                data = block.data
                for first, count in bitmap_runs(mask, self.block_size):
                    start = first * SECTOR_SIZE
                    end = start + count * SECTOR_SIZE
                    result[start:end] = data[start:end]
                covered |= wanted
            if covered == full or not disk.is_differencing:
                # A dynamic or fixed disk ends the chain: its clear bits read as zeros.
                break
        return self._zero_block if result is None else result

    def read_at(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes of the virtual disk from ``offset`` (fewer only at the end)."""
        end = min(offset + length, self.size)
        parts = []
        while offset < end:
            index, within = divmod(offset, self.block_size)
            take = min(self.block_size - within, end - offset)
            parts.append(bytes(memoryview(self.read_block(index))[within : within + take]))
            offset += take
        return b"".join(parts)

    def iter_blocks(self) -> Iterator[tuple[int, bytes | memoryview]]:
        """Every virtual block in order, the last one cut at the disk size."""
        for index in range(self.block_count):
            data = self.read_block(index)
            tail = self.size - index * self.block_size
            if tail < self.block_size:
                data = memoryview(data)[:tail]
            yield index, data
        self._cached = None

    def close(self) -> None:
        for disk in self.disks:
            disk.close()

    def __enter__(self) -> VhdChain:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_vhd_chain(path: str, open_disk: OpenDisk = open_local_disk) -> VhdChain:
    """Open the disk at ``path`` and all its ancestors as one :class:`VhdChain`.

    Raises :class:`FormatError` for a missing parent, a parent whose uuid does not match, a
    parent loop, or a chain whose root is differencing.
    """
    disks: list[VhdDisk] = []
    paths: list[str] = []
    try:
        disk = open_disk(path)
        disks.append(disk)
        paths.append(path)
        seen_paths = {posixpath.normpath(path)}
        seen_uuids = {disk.uuid}
        while disk.is_differencing:
            assert disk.header is not None
            name = disk.parent_name
            if not name:
                raise FormatError(
                    "differencing disk without a parent name",
                    path=disk.path,
                    field="header.parent_unicode_name",
                )
            parent_path = resolve_parent_path(paths[-1], name)
            if (
                parent_path in seen_paths
                or disk.header.parent_uuid in seen_uuids
                or len(disks) >= MAX_CHAIN_DEPTH
            ):
                raise FormatError(
                    f"parent loop: {parent_path!r} is already in the chain",
                    path=disk.path,
                    field="header.parent_unicode_name",
                )
            try:
                parent = open_disk(parent_path)
            except (FileNotFoundError, NotADirectoryError, RemoteNotFoundError):
                raise FormatError(
                    f"parent {name!r} not found (looked for {parent_path})",
                    path=disk.path,
                    field="header.parent_unicode_name",
                ) from None
            except OSError as error:
                raise FormatError(
                    f"cannot open parent {parent_path}: {error.strerror}",
                    path=disk.path,
                    field="header.parent_unicode_name",
                ) from None
            disks.append(parent)
            paths.append(parent_path)
            if parent.uuid != disk.header.parent_uuid:
                raise FormatError(
                    f"parent {parent_path} has uuid {parent.uuid}, the header expects "
                    f"{disk.header.parent_uuid}",
                    path=disk.path,
                    field="header.parent_uuid",
                )
            seen_paths.add(parent_path)
            seen_uuids.add(parent.uuid)
            disk = parent
        return VhdChain(disks, paths)
    except BaseException:
        for opened in disks:
            opened.close()
        raise
