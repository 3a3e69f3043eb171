"""Write a dynamic or differencing VHD as a forward-only stream (no seeks).

The BAT comes before the blocks, so the list of allocated blocks must be known first; the
layout is then fixed: footer copy at 0, dynamic header at 512, BAT at 1536, the parent locator
data (differencing only), then every block as a full bitmap and ``block_size`` bytes, in
ascending index order, and the footer. Every block has a full bitmap: a delta carries whole
2 MiB blocks, as XAPI's do (xapi-protocol.md §6.4–6.5).

:func:`sparse_file_blocks` and :func:`read_file_blocks` feed the writer from a raw image,
skipping holes with ``SEEK_DATA``/``SEEK_HOLE`` so a mostly empty 4 GiB image costs only its
data.
"""

from __future__ import annotations

import errno
import os
import time
import uuid as uuidlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from xobackup_core.formats.source import read_ahead
from xobackup_core.formats.vhd_structs import (
    DEFAULT_BLOCK_SIZE,
    DISK_TYPE_DIFFERENCING,
    DISK_TYPE_DYNAMIC,
    EMPTY_LOCATORS,
    FOOTER_SIZE,
    HEADER_SIZE,
    MAX_DISK_SIZE,
    NIL_UUID,
    SECTOR_SIZE,
    DynamicHeader,
    Footer,
    bat_size,
    bitmap_size,
    build_bat,
    build_footer,
    build_header,
    full_bitmap,
    relative_parent_locators,
    vhd_timestamp,
)

BAT_OFFSET = FOOTER_SIZE + HEADER_SIZE


@dataclass(frozen=True)
class ParentLink:
    """What a differencing VHD records about its parent (xo-backups.md §2.3)."""

    uuid: uuidlib.UUID
    """The parent's footer uuid."""
    name: str
    """The parent's path relative to the child's folder, e.g. ``20260801T040000Z.vhd``."""
    timestamp: int = 0
    """The parent's footer timestamp (VHD epoch)."""


@dataclass(frozen=True)
class VhdStreamLayout:
    """Where everything goes in a stream: computed before the first byte is written."""

    footer: Footer
    header: DynamicHeader
    allocated: tuple[int, ...]
    first_block_offset: int
    metadata: bytes
    """Footer copy, header, BAT and locator data: the stream's first ``first_block_offset``
    bytes."""

    @property
    def block_span(self) -> int:
        return self.header.bitmap_size + self.header.block_size

    @property
    def stream_size(self) -> int:
        """Total bytes of the stream."""
        return self.first_block_offset + len(self.allocated) * self.block_span + FOOTER_SIZE


def plan_vhd_stream(
    size: int,
    allocated: Iterable[int],
    *,
    parent: ParentLink | None = None,
    uuid: uuidlib.UUID | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    timestamp: int | None = None,
) -> VhdStreamLayout:
    """Lay out a VHD of ``size`` bytes whose blocks ``allocated`` (indexes) will follow."""
    if size <= 0 or size % SECTOR_SIZE or size > MAX_DISK_SIZE:
        raise ValueError(f"VHD size {size} must be a positive multiple of 512 up to 2040 GiB")
    entries = -(-size // block_size)
    blocks = tuple(sorted(set(allocated)))
    if blocks and (blocks[0] < 0 or blocks[-1] >= entries):
        raise ValueError(f"block indexes must be within 0..{entries - 1}")
    bat_bytes = bat_size(entries)
    locator_offset = BAT_OFFSET + bat_bytes
    locator_data = b""
    locators = EMPTY_LOCATORS
    if parent is not None:
        locator, locator_data = relative_parent_locators(parent.name, locator_offset)
        locators = (locator, *EMPTY_LOCATORS[1:])
    first_block = locator_offset + len(locator_data)
    span = block_size + bitmap_size(block_size)
    bat = [0xFFFFFFFF] * entries
    for position, index in enumerate(blocks):
        bat[index] = (first_block + position * span) // SECTOR_SIZE
    if bat and blocks and bat[blocks[-1]] > 0xFFFFFFFE:
        raise ValueError("the disk is too large for 32-bit BAT entries")
    footer = Footer(
        disk_type=DISK_TYPE_DIFFERENCING if parent else DISK_TYPE_DYNAMIC,
        current_size=size,
        uuid=uuid or uuidlib.uuid4(),
        timestamp=vhd_timestamp(time.time()) if timestamp is None else timestamp,
    )
    header = DynamicHeader(
        table_offset=BAT_OFFSET,
        max_table_entries=entries,
        block_size=block_size,
        parent_uuid=parent.uuid if parent else NIL_UUID,
        parent_timestamp=parent.timestamp if parent else 0,
        parent_unicode_name=parent.name if parent else "",
        parent_locators=locators,
    )
    metadata = build_footer(footer) + build_header(header) + build_bat(bat) + locator_data
    return VhdStreamLayout(footer, header, blocks, first_block, metadata)


def vhd_stream(
    layout: VhdStreamLayout, blocks: Iterable[tuple[int, bytes | memoryview]]
) -> Iterator[bytes | memoryview]:
    """The stream's chunks: ``blocks`` yields (index, data) for exactly ``layout.allocated``.

    A short last block is padded with zeros. Raises ValueError when ``blocks`` does not match
    the plan (the BAT is already out, so the stream would be corrupt).
    """
    block_size = layout.header.block_size
    bitmap = full_bitmap(block_size)
    yield layout.metadata
    expected = iter(layout.allocated)
    for index, data in blocks:
        want = next(expected, None)
        if index != want:
            raise ValueError(f"block {index} was not planned (expected {want})")
        if len(data) > block_size:
            raise ValueError(f"block {index} has {len(data)} bytes, more than a block")
        yield bitmap
        yield data
        if len(data) < block_size:
            yield bytes(block_size - len(data))
    missing = next(expected, None)
    if missing is not None:
        raise ValueError(f"block {missing} was planned but never given")
    yield build_footer(layout.footer)


def write_vhd_stream(
    write: Callable[[bytes | memoryview], object],
    size: int,
    blocks: Iterable[tuple[int, bytes | memoryview]],
    allocated: Sequence[int],
    *,
    parent: ParentLink | None = None,
    uuid: uuidlib.UUID | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> VhdStreamLayout:
    """Write a whole VHD with ``write``, which must take all it is given (a buffered file's or
    a RemoteWriter's ``write``); returns the layout."""
    layout = plan_vhd_stream(size, allocated, parent=parent, uuid=uuid, block_size=block_size)
    for chunk in vhd_stream(layout, blocks):
        write(chunk)
    return layout


# -- raw sources -----------------------------------------------------------------------------


def sparse_file_blocks(fd: int, size: int, block_size: int = DEFAULT_BLOCK_SIZE) -> list[int]:
    """Indexes of the blocks of a raw image that hold data (holes skipped via SEEK_DATA).

    Falls back to every block when the filesystem cannot report holes.
    """
    count = -(-size // block_size)
    if not hasattr(os, "SEEK_DATA"):
        return list(range(count))
    found: list[int] = []
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as error:
            if error.errno == errno.ENXIO:  # no data after offset
                break
            return list(range(count))
        if start >= size:
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        first = start // block_size
        last = (end - 1) // block_size
        if found and found[-1] >= first:
            first = found[-1] + 1
        found.extend(range(first, last + 1))
        offset = (last + 1) * block_size
    return found


def read_file_blocks(
    fd: int, indexes: Iterable[int], size: int, block_size: int = DEFAULT_BLOCK_SIZE
) -> Iterator[tuple[int, bytes]]:
    """(index, data) of each listed block of a raw image, read ahead with ``pread``."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)

    def read(index: int) -> bytes:
        start = index * block_size
        length = min(block_size, size - start)
        data = os.pread(fd, length, start)
        if len(data) < length:
            data += bytes(length - len(data))
        return data

    return read_ahead(read, indexes)
