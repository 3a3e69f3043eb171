"""VHD disks: the abstract :class:`VhdDisk` interface and :class:`VhdFile`, a VHD in one file.

The interface
-------------
Everything above the byte level (chains, merges, ``xobackup vhd``, backups) works on
:class:`VhdDisk`, so a chain may mix VHD files and VhdDirectory disks (one object per block).
A disk exposes its parsed structures (:mod:`xobackup_core.formats.vhd_structs`)::

    disk.footer                  Footer (uuid, disk_type, current_size...)
    disk.header                  DynamicHeader, or None for a fixed disk
    disk.size, disk.block_size   virtual size, bytes per block (2 MiB)
    disk.block_count             number of blocks (BAT entries) of the disk
    disk.parent_uuid/parent_name from the header (None / "" when not differencing)
    disk.has_block(n)            is block n allocated
    disk.read_block_bitmap(n)    its sector bitmap (bitmap_size(block_size) bytes)
    disk.read_block(n)           VhdBlock(bitmap, data) with len(data) == block_size, or None
    disk.allocated_blocks()      indexes of allocated blocks, ascending

A writable disk (:class:`WritableVhdDisk`) adds ``write_block(n, bitmap, data)`` (allocating
the block when needed), ``footer``/``header`` assignment followed by ``write_footer()`` /
``write_header()``, ``write_bat()`` and ``flush()``. Implementations keep the BAT in memory;
``write_block`` makes the block and its BAT entry durable-ordered (data before BAT entry) so an
interrupted merge never points a BAT entry at missing data; ``write_footer`` is called last.

A VhdDirectory implements the same two classes; :func:`open_vhd_chain` in
:mod:`xobackup_core.formats.vhd_chain` takes an ``open_disk(path) -> VhdDisk`` callable, which
is where files and directories meet.

Opening a file
--------------
``VhdFile.open(source)`` reads any :class:`~xobackup_core.formats.source.RandomAccessSource`;
``VhdFile.open_update(remote_file, name)`` opens a :class:`~xobackup_core.remote.RemoteFile`
for in-place writes (merges). Both validate the footer, header and every BAT entry, raising
:class:`~xobackup_core.errors.FormatError` with the file name and field.
"""

from __future__ import annotations

import itertools
import uuid as uuidlib
from abc import ABC, abstractmethod
from array import array
from collections.abc import Iterator
from dataclasses import replace
from typing import NamedTuple

from xobackup_core.errors import FormatError
from xobackup_core.formats.source import RandomAccessSource, RemoteFileSource
from xobackup_core.formats.vhd_structs import (
    DISK_TYPE_DIFFERENCING,
    DISK_TYPE_DYNAMIC,
    DISK_TYPE_FIXED,
    DISK_TYPE_NAMES,
    FOOTER_SIZE,
    HEADER_SIZE,
    SECTOR_SIZE,
    UNUSED_BAT_ENTRY,
    DynamicHeader,
    Footer,
    bat_entry_bytes,
    bat_size,
    bitmap_size,
    build_bat,
    build_footer,
    build_header,
    full_bitmap,
    parse_bat,
    parse_footer,
    parse_header,
)
from xobackup_core.remote import RemoteFile

FIXED_BLOCK_SIZE = 2 * 1024 * 1024
"""Fixed disks have no blocks on disk; they are cut into 2 MiB virtual blocks like the others."""


class VhdBlock(NamedTuple):
    """An allocated block: its sector bitmap and its ``block_size`` bytes of data."""

    bitmap: bytes
    data: bytes | memoryview


class VhdDisk(ABC):
    """One VHD disk (file or directory); see the module docstring for the contract."""

    path: str
    """Where the disk was opened from (shown in errors)."""
    footer: Footer
    header: DynamicHeader | None

    @property
    def disk_type(self) -> int:
        return self.footer.disk_type

    @property
    def type_name(self) -> str:
        return DISK_TYPE_NAMES[self.footer.disk_type]

    @property
    def size(self) -> int:
        """Virtual size in bytes (footer ``current size``)."""
        return self.footer.current_size

    @property
    def uuid(self) -> uuidlib.UUID:
        return self.footer.uuid

    @property
    def is_differencing(self) -> bool:
        return self.footer.disk_type == DISK_TYPE_DIFFERENCING

    @property
    def block_size(self) -> int:
        return self.header.block_size if self.header is not None else FIXED_BLOCK_SIZE

    @property
    def block_count(self) -> int:
        """Number of blocks the disk can address (BAT entries)."""
        if self.header is not None:
            return self.header.max_table_entries
        return -(-self.size // FIXED_BLOCK_SIZE)

    @property
    def parent_uuid(self) -> uuidlib.UUID | None:
        return self.header.parent_uuid if self.is_differencing and self.header else None

    @property
    def parent_name(self) -> str:
        """The parent's path relative to this disk's folder ('' when not differencing)."""
        return self.header.parent_unicode_name if self.is_differencing and self.header else ""

    @abstractmethod
    def has_block(self, index: int) -> bool:
        """Whether block ``index`` is allocated (False past the end of the BAT)."""

    @abstractmethod
    def read_block_bitmap(self, index: int) -> bytes:
        """The sector bitmap of an allocated block (all zero when unallocated)."""

    @abstractmethod
    def read_block(self, index: int) -> VhdBlock | None:
        """Bitmap and data of block ``index``, or None when it is not allocated."""

    def allocated_blocks(self) -> Iterator[int]:
        """Indexes of the allocated blocks, ascending."""
        return (index for index in range(self.block_count) if self.has_block(index))

    def allocated_count(self) -> int:
        return sum(1 for _ in self.allocated_blocks())

    def close(self) -> None:
        """Release the underlying file(s)."""

    def __enter__(self) -> VhdDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class WritableVhdDisk(VhdDisk):
    """A disk that can be changed in place (merge target, VhdDirectory being written)."""

    @abstractmethod
    def write_block(self, index: int, bitmap: bytes, data: bytes | memoryview) -> None:
        """Store a whole block (``data`` is ``block_size`` bytes), allocating it if needed."""

    @abstractmethod
    def write_footer(self) -> None:
        """Write ``self.footer`` (both copies for a dynamic disk). Call it last."""

    @abstractmethod
    def write_header(self) -> None:
        """Write ``self.header``."""

    @abstractmethod
    def write_bat(self) -> None:
        """Write the whole in-memory BAT."""

    @abstractmethod
    def flush(self) -> None:
        """Make every write so far durable."""


class VhdFile(WritableVhdDisk):
    """A fixed, dynamic or differencing VHD stored as one file."""

    def __init__(
        self,
        source: RandomAccessSource,
        *,
        file: RemoteFile | None = None,
        force: bool = False,
    ) -> None:
        self.source = source
        self.path = source.name
        self._file = file
        self._bat = array("I")
        self._data_end = 0
        self._load(force)

    @classmethod
    def open(cls, source: RandomAccessSource, *, force: bool = False) -> VhdFile:
        """Open ``source`` read-only. ``force`` accepts a missing trailing footer when the
        copy at offset 0 is valid (a merge that was interrupted while appending blocks)."""
        try:
            return cls(source, force=force)
        except BaseException:
            source.close()
            raise

    @classmethod
    def open_update(cls, file: RemoteFile, name: str, *, force: bool = False) -> VhdFile:
        """Open a file for in-place changes (reads go through the same file)."""
        source = RemoteFileSource(file, name)
        try:
            return cls(source, file=file, force=force)
        except BaseException:
            source.close()
            raise

    # -- parsing ---------------------------------------------------------------------------
    def _read_exact(self, offset: int, length: int, what: str) -> bytes:
        data = self.source.read_at(offset, length)
        if len(data) != length:
            raise FormatError(
                f"{length} bytes at offset {offset} are past the end of the file (truncated?)",
                path=self.path,
                field=what,
            )
        return data

    def _load(self, force: bool) -> None:
        file_size = self.source.size()
        self._file_size = file_size
        if file_size < FOOTER_SIZE:
            raise FormatError(
                f"file is {file_size} bytes, smaller than a VHD footer", path=self.path
            )
        tail = self._read_exact(file_size - FOOTER_SIZE, FOOTER_SIZE, "footer")
        self.trailing_footer_valid = True
        try:
            footer = parse_footer(tail, path=self.path)
        except FormatError:
            if not force:
                raise
            # An interrupted in-place append overwrote the trailing footer; the copy at
            # offset 0 (dynamic and differencing disks only) is authoritative then.
            footer = parse_footer(self._read_exact(0, FOOTER_SIZE, "footer copy"), path=self.path)
            if footer.disk_type == DISK_TYPE_FIXED:
                raise
            self.trailing_footer_valid = False
        self.footer = footer
        if footer.disk_type == DISK_TYPE_FIXED:
            self.header = None
            if file_size < footer.current_size + FOOTER_SIZE:
                raise FormatError(
                    f"fixed disk of {footer.current_size} bytes needs a file of "
                    f"{footer.current_size + FOOTER_SIZE} bytes, found {file_size} (truncated?)",
                    path=self.path,
                    field="footer.current_size",
                )
            self._data_end = footer.current_size
            return
        data_end = file_size - FOOTER_SIZE if self.trailing_footer_valid else file_size
        if footer.data_offset + HEADER_SIZE > data_end:
            raise FormatError(
                f"dynamic header at {footer.data_offset} is past the end of the file",
                path=self.path,
                field="footer.data_offset",
            )
        header = parse_header(
            self._read_exact(footer.data_offset, HEADER_SIZE, "header"), path=self.path
        )
        self.header = header
        needed = -(-footer.current_size // header.block_size)
        if header.max_table_entries < needed:
            raise FormatError(
                f"BAT has {header.max_table_entries} entries, the disk size needs {needed}",
                path=self.path,
                field="header.max_table_entries",
            )
        bat_bytes = bat_size(header.max_table_entries)
        if header.table_offset + bat_bytes > data_end:
            raise FormatError(
                f"BAT of {header.max_table_entries} entries at {header.table_offset} runs past "
                f"the end of the file ({file_size} bytes)",
                path=self.path,
                field="header.table_offset",
            )
        if (
            _overlaps(header.table_offset, bat_bytes, footer.data_offset, HEADER_SIZE)
            or header.table_offset < FOOTER_SIZE
        ):
            raise FormatError(
                "BAT overlaps the footer copy or the dynamic header",
                path=self.path,
                field="header.table_offset",
            )
        self._bat = parse_bat(
            self._read_exact(header.table_offset, header.max_table_entries * 4, "bat"),
            header.max_table_entries,
            path=self.path,
        )
        metadata_end = max(
            footer.data_offset + HEADER_SIZE, header.table_offset + bat_bytes, FOOTER_SIZE
        )
        for locator in header.parent_locators:
            if locator.platform_code and locator.data_offset + locator.data_space_bytes <= data_end:
                metadata_end = max(metadata_end, locator.data_offset + locator.data_space_bytes)
        self._block_span = header.bitmap_size + header.block_size
        highest = metadata_end
        bat = self._bat
        span = self._block_span
        for index, entry in enumerate(bat):
            if entry == UNUSED_BAT_ENTRY:
                continue
            start = entry * SECTOR_SIZE
            end = start + span
            if end > data_end:
                raise FormatError(
                    f"block {index} at offset {start} ends at {end}, past the end of the data "
                    f"({data_end}): the file is truncated or the BAT is corrupt",
                    path=self.path,
                    field=f"bat[{index}]",
                )
            if (
                start < FOOTER_SIZE
                or _overlaps(start, span, footer.data_offset, HEADER_SIZE)
                or _overlaps(start, span, header.table_offset, bat_bytes)
            ):
                raise FormatError(
                    f"block {index} at offset {start} overlaps the VHD metadata",
                    path=self.path,
                    field=f"bat[{index}]",
                )
            if end > highest:
                highest = end
        self._data_end = highest

    # -- reading ---------------------------------------------------------------------------
    @property
    def bat(self) -> array:
        """The BAT (sector numbers, ``UNUSED_BAT_ENTRY`` when unallocated); empty when fixed."""
        return self._bat

    @property
    def data_end(self) -> int:
        """Offset just after the last block: where the trailing footer (or a new block) goes."""
        return self._data_end

    def has_block(self, index: int) -> bool:
        if self.header is None:
            return 0 <= index < self.block_count
        return 0 <= index < len(self._bat) and self._bat[index] != UNUSED_BAT_ENTRY

    def block_offset(self, index: int) -> int | None:
        """File offset of the block's bitmap (of its data for a fixed disk), None if absent."""
        if self.header is None:
            return index * FIXED_BLOCK_SIZE if self.has_block(index) else None
        if not self.has_block(index):
            return None
        return self._bat[index] * SECTOR_SIZE

    def read_block_bitmap(self, index: int) -> bytes:
        if self.header is None:
            return full_bitmap(FIXED_BLOCK_SIZE)
        if not self.has_block(index):
            return bytes(self.header.bitmap_size)
        offset = self._bat[index] * SECTOR_SIZE
        return self._read_exact(offset, self.header.bitmap_size, f"bitmap of block {index}")

    def read_block(self, index: int) -> VhdBlock | None:
        if not self.has_block(index):
            return None
        if self.header is None:
            start = index * FIXED_BLOCK_SIZE
            length = min(FIXED_BLOCK_SIZE, self.size - start)
            data = self._read_exact(start, length, f"block {index}")
            if length < FIXED_BLOCK_SIZE:
                data += bytes(FIXED_BLOCK_SIZE - length)
            return VhdBlock(full_bitmap(FIXED_BLOCK_SIZE), data)
        offset = self._bat[index] * SECTOR_SIZE
        raw = self._read_exact(offset, self._block_span, f"block {index}")
        view = memoryview(raw)
        bitmap_bytes = self.header.bitmap_size
        return VhdBlock(bytes(view[:bitmap_bytes]), view[bitmap_bytes:])

    def allocated_blocks(self) -> Iterator[int]:
        if self.header is None:
            return iter(range(self.block_count))
        return (index for index, entry in enumerate(self._bat) if entry != UNUSED_BAT_ENTRY)

    def allocated_count(self) -> int:
        if self.header is None:
            return self.block_count
        return len(self._bat) - self._bat.count(UNUSED_BAT_ENTRY)

    # -- writing ---------------------------------------------------------------------------
    def _writable(self) -> RemoteFile:
        if self._file is None:
            raise ValueError(f"{self.path} was opened read-only")
        return self._file

    def write_block(self, index: int, bitmap: bytes, data: bytes | memoryview) -> None:
        file = self._writable()
        if not 0 <= index < self.block_count:
            raise ValueError(f"block {index} is outside the disk's {self.block_count} blocks")
        if self.header is None:
            start = index * FIXED_BLOCK_SIZE
            file.write_at(start, memoryview(data)[: min(FIXED_BLOCK_SIZE, self.size - start)])
            return
        if len(data) != self.header.block_size or len(bitmap) != self.header.bitmap_size:
            raise ValueError("write_block needs a whole block and its whole bitmap")
        offset = self.block_offset(index)
        # One write for bitmap and data: they share a page, and remotes pay per request.
        span = b"".join((bitmap, data))
        if offset is not None:
            file.write_at(offset, span)
            return
        # Append after the last block. Data first, BAT entry second: an interruption between
        # the two leaves an unreferenced tail that the next append simply overwrites.
        offset = self._data_end
        file.write_at(offset, span)
        self._bat[index] = offset // SECTOR_SIZE
        self._data_end = offset + self._block_span
        file.write_at(self.header.table_offset + 4 * index, bat_entry_bytes(self._bat[index]))

    def grow_bat(self, entries: int) -> None:
        """Let the BAT address ``entries`` blocks, for a disk that grows (a resized VM disk).

        The BAT grows in place; blocks and locator data in its way are first copied to the end
        of the file and repointed. Every step is safe to repeat after an interruption, and the
        header, which makes the new size official, is written last.
        """
        if entries <= self.block_count:
            return
        header = self.header
        if header is None:
            raise FormatError("a fixed disk cannot grow in place", path=self.path, field="footer")
        file = self._writable()
        region_end = header.table_offset + bat_size(entries)
        room = region_end - header.table_offset
        if _overlaps(header.table_offset, room, self.footer.data_offset, HEADER_SIZE):
            raise FormatError(
                "the dynamic header sits right after the BAT: it cannot grow",
                path=self.path,
                field="header.table_offset",
            )
        for index, entry in enumerate(self._bat):
            if entry != UNUSED_BAT_ENTRY and entry * SECTOR_SIZE < region_end:
                block = self.read_block(index)
                assert block is not None
                offset = self._data_end
                file.write_at(offset, b"".join((block.bitmap, block.data)))
                self._bat[index] = offset // SECTOR_SIZE
                self._data_end = offset + self._block_span
                file.write_at(header.table_offset + 4 * index, bat_entry_bytes(self._bat[index]))
        locators = []
        for locator in header.parent_locators:
            size = locator.data_space_bytes
            if locator.platform_code and _overlaps(
                locator.data_offset, size, header.table_offset, room
            ):
                data = self._read_exact(locator.data_offset, size, "parent locator")
                offset = self._data_end
                file.write_at(offset, data)
                self._data_end = offset + -(-size // SECTOR_SIZE) * SECTOR_SIZE
                locator = replace(locator, data_offset=offset)
            locators.append(locator)
        self._bat.extend([UNUSED_BAT_ENTRY] * (entries - len(self._bat)))
        file.write_at(header.table_offset, build_bat(self._bat))
        self.header = header.replace(max_table_entries=entries, parent_locators=tuple(locators))
        self.write_header()

    def write_footer(self) -> None:
        file = self._writable()
        raw = build_footer(self.footer)
        if self.header is None:
            file.write_at(self.size, raw)
            file.truncate(self.size + FOOTER_SIZE)
            return
        file.write_at(self._data_end, raw)
        file.truncate(self._data_end + FOOTER_SIZE)
        file.write_at(0, raw)
        self.trailing_footer_valid = True

    def write_header(self) -> None:
        if self.header is None:
            raise ValueError("a fixed disk has no dynamic header")
        self._writable().write_at(self.footer.data_offset, build_header(self.header))

    def write_bat(self) -> None:
        if self.header is None:
            return
        self._writable().write_at(self.header.table_offset, build_bat(self._bat))

    def flush(self) -> None:
        self._writable().flush()

    def close(self) -> None:
        self.source.close()


def verify_vhd_file(disk: VhdFile) -> None:
    """Checks beyond those done on open: footer copy, overlapping blocks, readable bitmaps.

    Raises :class:`FormatError` on the first problem.
    """
    if disk.header is None:
        return
    copy = disk.source.read_at(0, FOOTER_SIZE)
    tail = disk.source.read_at(disk.source.size() - FOOTER_SIZE, FOOTER_SIZE)
    if copy != tail:
        raise FormatError(
            "the footer copy at offset 0 differs from the footer at the end",
            path=disk.path,
            field="footer",
        )
    span = disk.header.bitmap_size + disk.header.block_size
    starts = sorted(
        (entry, index) for index, entry in enumerate(disk.bat) if entry != UNUSED_BAT_ENTRY
    )
    for (first, first_index), (second, second_index) in itertools.pairwise(starts):
        if second * SECTOR_SIZE < first * SECTOR_SIZE + span:
            raise FormatError(
                f"blocks {first_index} and {second_index} overlap",
                path=disk.path,
                field=f"bat[{second_index}]",
            )
    for index in disk.allocated_blocks():
        disk.read_block_bitmap(index)


def _overlaps(start: int, length: int, other_start: int, other_length: int) -> bool:
    return start < other_start + other_length and other_start < start + length


def describe(disk: VhdDisk) -> dict[str, object]:
    """The facts ``xobackup vhd info`` prints about one disk."""
    return {
        "path": disk.path,
        "type": disk.type_name,
        "size": disk.size,
        "uuid": str(disk.uuid),
        "block_size": disk.block_size,
        "blocks": disk.block_count,
        "allocated_blocks": disk.allocated_count(),
        "creator": disk.footer.creator_application.decode("latin-1").rstrip("\x00"),
        "parent_uuid": str(disk.parent_uuid) if disk.parent_uuid else None,
        "parent_name": disk.parent_name or None,
    }


__all__ = [
    "DISK_TYPE_DIFFERENCING",
    "DISK_TYPE_DYNAMIC",
    "DISK_TYPE_FIXED",
    "FIXED_BLOCK_SIZE",
    "VhdBlock",
    "VhdDisk",
    "VhdFile",
    "WritableVhdDisk",
    "bitmap_size",
    "describe",
    "verify_vhd_file",
]
