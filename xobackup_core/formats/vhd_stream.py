"""Read a dynamic or differencing VHD from a forward-only stream (an export, an upload).

XAPI's ``/export_raw_vdi?format=vhd`` emits footer copy, header, BAT, then blocks in file
order (xapi-protocol.md §6.4). A consumer that stores or imports it must not seek, so this
reader walks the stream once: it parses the footer, the header and the BAT, then yields the
allocated blocks in the order their offsets appear, skipping whatever lies between (locator
data, padding, a batmap). Parsers must honour the header's offsets rather than assume XAPI's
exact layout, so any header < BAT < blocks order is accepted; an offset that points backwards
is a :class:`~xobackup_core.errors.FormatError`.

Blocks come out with their data "as the disk reads": for a dynamic disk, sectors whose bitmap
bit is clear are zeroed; for a differencing disk, a partial bitmap is refused, because the
missing sectors live in a parent this reader never sees (XAPI's deltas always carry whole
blocks with full bitmaps, §6.5).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO

from xobackup_core.errors import FormatError
from xobackup_core.formats.vhd_structs import (
    DISK_TYPE_DIFFERENCING,
    DISK_TYPE_DYNAMIC,
    FOOTER_SIZE,
    HEADER_SIZE,
    SECTOR_SIZE,
    UNUSED_BAT_ENTRY,
    DynamicHeader,
    Footer,
    bat_size,
    parse_bat,
    parse_footer,
    parse_header,
)

_MAX_SKIP_CHUNK = 1024 * 1024


class VhdStreamReader:
    """One pass over a VHD stream: ``footer``, ``header``, then :meth:`blocks`."""

    def __init__(self, stream: BinaryIO, *, name: str = "VHD stream") -> None:
        self._stream = stream
        self.name = name
        self._position = 0
        self.footer: Footer = parse_footer(self._read_exact(FOOTER_SIZE, "footer"), path=name)
        if self.footer.disk_type not in (DISK_TYPE_DYNAMIC, DISK_TYPE_DIFFERENCING):
            raise FormatError(
                f"only dynamic and differencing VHDs can be streamed, not {self.footer.type_name}",
                path=name,
                field="footer.disk_type",
            )
        self._skip_to(self.footer.data_offset, "header")
        self.header: DynamicHeader = parse_header(
            self._read_exact(HEADER_SIZE, "header"), path=name
        )
        self._skip_to(self.header.table_offset, "BAT")
        entries = self.header.max_table_entries
        raw_bat = self._read_exact(bat_size(entries), "BAT")
        self._bat = parse_bat(raw_bat, entries, path=name)
        self.allocated: list[int] = sorted(
            (index for index in range(entries) if self._bat[index] != UNUSED_BAT_ENTRY),
            key=lambda index: self._bat[index],
        )
        self._consumed = False

    @property
    def size(self) -> int:
        """The virtual disk size (footer ``current size``)."""
        return self.footer.current_size

    @property
    def is_differencing(self) -> bool:
        return self.footer.disk_type == DISK_TYPE_DIFFERENCING

    def _read_exact(self, length: int, what: str) -> bytes:
        chunks = []
        remaining = length
        while remaining:
            chunk = self._stream.read(remaining)
            if not chunk:
                raise FormatError(
                    f"stream ended {length - remaining} bytes into the {what} "
                    f"(offset {self._position}, {length} bytes expected)",
                    path=self.name,
                    field=what,
                )
            chunks.append(chunk)
            remaining -= len(chunk)
        self._position += length
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _skip_to(self, offset: int, what: str) -> None:
        if offset < self._position:
            raise FormatError(
                f"the {what} is at offset {offset}, before the current stream position "
                f"{self._position}: this VHD cannot be read as a stream",
                path=self.name,
                field=what,
            )
        while self._position < offset:
            self._read_exact(min(offset - self._position, _MAX_SKIP_CHUNK), f"gap before {what}")

    def blocks(self) -> Iterator[tuple[int, bytes]]:
        """Yield ``(block index, block data)`` for every allocated block, in stream order.

        The data is ``block_size`` bytes as the disk reads them. Can be iterated once.
        """
        if self._consumed:
            raise RuntimeError("a VHD stream can only be read once")
        self._consumed = True
        block_size = self.header.block_size
        bitmap_bytes = self.header.bitmap_size
        full = b"\xff" * (block_size // SECTOR_SIZE // 8)
        for index in self.allocated:
            self._skip_to(self._bat[index] * SECTOR_SIZE, f"block {index}")
            bitmap = self._read_exact(bitmap_bytes, f"block {index} bitmap")
            data = self._read_exact(block_size, f"block {index}")
            if bitmap[: len(full)] != full:
                data = self._apply_partial_bitmap(index, bitmap, data)
            yield index, data

    def _apply_partial_bitmap(self, index: int, bitmap: bytes, data: bytes) -> bytes:
        if self.is_differencing:
            raise FormatError(
                f"block {index} has a partial sector bitmap; a differencing VHD stream must "
                "carry whole blocks",
                path=self.name,
                field=f"block {index} bitmap",
            )
        result = bytearray(data)
        for sector in range(len(data) // SECTOR_SIZE):
            if not bitmap[sector >> 3] & (0x80 >> (sector & 7)):
                result[sector * SECTOR_SIZE : (sector + 1) * SECTOR_SIZE] = bytes(SECTOR_SIZE)
        return bytes(result)

    def finish(self) -> None:
        """Read the trailing footer and check it matches the first copy."""
        tail = b""
        while True:
            chunk = self._stream.read(_MAX_SKIP_CHUNK)
            if not chunk:
                break
            tail = (tail + chunk)[-FOOTER_SIZE:]
        if len(tail) < FOOTER_SIZE:
            raise FormatError("stream ended without its final footer", path=self.name)
        last = parse_footer(tail, path=self.name)
        if last.uuid != self.footer.uuid:
            raise FormatError(
                "the final footer does not match the first one", path=self.name, field="footer"
            )
