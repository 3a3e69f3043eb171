"""VHD on-disk structures: footer, dynamic header, parent locators, BAT and sector bitmaps.

Pure bytes in, bytes out (reference: xapi-protocol.md §6). Every ``parse_*`` function raises
:class:`~xobackup_core.errors.FormatError` naming the file (``path``) and the field on anything
malformed; every ``build_*`` function computes the checksum itself, so callers never do.

These structures are shared by the VHD file code (:mod:`xobackup_core.formats.vhd`) and the
VhdDirectory code, which stores the same footer/header bytes in separate objects.
"""

from __future__ import annotations

import struct
import uuid as uuidlib
from array import array
from dataclasses import dataclass, field, replace

from xobackup_core.errors import FormatError

SECTOR_SIZE = 512
FOOTER_SIZE = 512
HEADER_SIZE = 1024
DEFAULT_BLOCK_SIZE = 2 * 1024 * 1024
UNUSED_BAT_ENTRY = 0xFFFFFFFF
NO_DATA_OFFSET = 0xFFFFFFFFFFFFFFFF

FOOTER_COOKIE = b"conectix"
HEADER_COOKIE = b"cxsparse"
FILE_FORMAT_VERSION = 0x00010000
HEADER_VERSION = 0x00010000
FEATURES_RESERVED = 0x2

DISK_TYPE_FIXED = 2
DISK_TYPE_DYNAMIC = 3
DISK_TYPE_DIFFERENCING = 4
DISK_TYPE_NAMES = {
    DISK_TYPE_FIXED: "fixed",
    DISK_TYPE_DYNAMIC: "dynamic",
    DISK_TYPE_DIFFERENCING: "differencing",
}

CREATOR_APPLICATION = b"tap\x00"
"""What our writer puts in the footer: qemu-img takes the exact ``current size`` for this
creator (xapi-protocol.md §6.8); for XO's ``xo  `` or XAPI's ``caml`` it would use the smaller
CHS product and cut the disk's tail."""
CREATOR_VERSION = 0x00010003
CREATOR_HOST_OS = b"Wi2k"

MAX_DISK_SIZE = 2040 * 1024**3
"""XAPI and qemu both refuse VHDs above 2040 GiB (§6.7); BAT entries cannot address more."""
MIN_BLOCK_SIZE = 4096
MAX_BLOCK_SIZE = 16 * 1024 * 1024
"""Everyone writes 2 MiB blocks; larger values are refused so a crafted header cannot make a
reader allocate hundreds of MiB for one block."""

NIL_UUID = uuidlib.UUID(int=0)

VHD_EPOCH = 946684800
"""2000-01-01T00:00:00Z as a Unix timestamp: VHD timestamps count seconds from there."""

PLATFORM_NONE = 0
PLATFORM_MACX = 0x4D616358  # "MacX": file:// URL, UTF-8
PLATFORM_W2KU = 0x57326B75  # "W2ku": absolute Windows path, UTF-16LE
PLATFORM_W2RU = 0x57327275  # "W2ru": relative Windows path, UTF-16LE

_FOOTER = struct.Struct(">8sIIQI4sI4sQQHBBII16sBB")
_HEADER = struct.Struct(">8sQQIIII16sI4s512s")
_LOCATOR = struct.Struct(">IIIIQ")


def checksum(data: bytes | bytearray | memoryview, checksum_offset: int) -> int:
    """One's complement of the byte sum, the checksum field itself counted as zero (§6)."""
    total = sum(data) - sum(data[checksum_offset : checksum_offset + 4])
    return ~total & 0xFFFFFFFF


def geometry_for_size(size: int) -> tuple[int, int, int]:
    """(cylinders, heads, sectors per track) of the VHD spec's CHS algorithm (§6.1)."""
    total = min(size // SECTOR_SIZE, 65535 * 16 * 255)
    if total >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cyl_heads = total // spt
    else:
        spt = 17
        cyl_heads = total // spt
        heads = max(4, (cyl_heads + 1023) // 1024)
        if cyl_heads >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cyl_heads = total // spt
        if cyl_heads >= heads * 1024:
            spt, heads = 63, 16
            cyl_heads = total // spt
    return cyl_heads // heads, heads, spt


def vhd_timestamp(unix_time: float) -> int:
    """A Unix time as a VHD timestamp (clamped to the field's 32 bits)."""
    return max(0, min(int(unix_time) - VHD_EPOCH, 0xFFFFFFFF))


# -- footer ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Footer:
    """The 512-byte VHD footer (§6.1). ``uuid`` identifies this VHD file in its chain."""

    disk_type: int
    current_size: int
    uuid: uuidlib.UUID
    original_size: int = -1
    data_offset: int = SECTOR_SIZE
    timestamp: int = 0
    creator_application: bytes = CREATOR_APPLICATION
    creator_version: int = CREATOR_VERSION
    creator_host_os: bytes = CREATOR_HOST_OS
    geometry: tuple[int, int, int] | None = None
    features: int = FEATURES_RESERVED
    file_format_version: int = FILE_FORMAT_VERSION
    saved_state: int = 0
    hidden: int = 0
    checksum: int = 0
    """As read; :func:`build_footer` always writes the correct one."""

    def __post_init__(self) -> None:
        if self.original_size < 0:
            object.__setattr__(self, "original_size", self.current_size)
        if self.geometry is None:
            object.__setattr__(self, "geometry", geometry_for_size(self.current_size))

    @property
    def type_name(self) -> str:
        return DISK_TYPE_NAMES.get(self.disk_type, str(self.disk_type))

    def replace(self, **changes: object) -> Footer:
        """A copy with ``changes`` (a dataclass ``replace``)."""
        return replace(self, **changes)  # type: ignore[arg-type]


def build_footer(footer: Footer) -> bytes:
    """The 512 bytes of ``footer``, with its checksum."""
    assert footer.geometry is not None
    cylinders, heads, spt = footer.geometry
    body = _FOOTER.pack(
        FOOTER_COOKIE,
        footer.features,
        footer.file_format_version,
        footer.data_offset,
        footer.timestamp,
        footer.creator_application,
        footer.creator_version,
        footer.creator_host_os,
        footer.original_size,
        footer.current_size,
        cylinders,
        heads,
        spt,
        footer.disk_type,
        0,
        footer.uuid.bytes,
        footer.saved_state,
        footer.hidden,
    ).ljust(FOOTER_SIZE, b"\x00")
    return body[:64] + struct.pack(">I", checksum(body, 64)) + body[68:]


def parse_footer(data: bytes, *, path: str | None = None) -> Footer:
    """Parse and validate a footer: cookie, checksum, disk type, sizes, data offset."""
    if len(data) != FOOTER_SIZE:
        raise FormatError(
            f"footer is {len(data)} bytes, expected {FOOTER_SIZE} (file truncated?)",
            path=path,
            field="footer",
        )
    (
        cookie,
        features,
        version,
        data_offset,
        timestamp,
        creator_app,
        creator_version,
        creator_os,
        original_size,
        current_size,
        cylinders,
        heads,
        spt,
        disk_type,
        stored_checksum,
        uid,
        saved_state,
        hidden,
    ) = _FOOTER.unpack_from(data)
    if cookie != FOOTER_COOKIE:
        raise FormatError(
            f"bad cookie {cookie!r}, expected {FOOTER_COOKIE!r} (not a VHD?)",
            path=path,
            field="footer.cookie",
        )
    expected = checksum(data, 64)
    if stored_checksum != expected:
        raise FormatError(
            f"checksum is {stored_checksum:#010x}, computed {expected:#010x}",
            path=path,
            field="footer.checksum",
        )
    if disk_type not in DISK_TYPE_NAMES:
        raise FormatError(
            f"unknown disk type {disk_type} (2 fixed, 3 dynamic, 4 differencing)",
            path=path,
            field="footer.disk_type",
        )
    if current_size % SECTOR_SIZE or current_size > MAX_DISK_SIZE:
        raise FormatError(
            f"current size {current_size} is not a multiple of 512 at most 2040 GiB",
            path=path,
            field="footer.current_size",
        )
    if disk_type == DISK_TYPE_FIXED:
        if data_offset != NO_DATA_OFFSET:
            raise FormatError(
                f"a fixed disk must have data offset {NO_DATA_OFFSET:#x}, not {data_offset:#x}",
                path=path,
                field="footer.data_offset",
            )
    elif data_offset == NO_DATA_OFFSET or data_offset % SECTOR_SIZE:
        raise FormatError(
            f"data offset {data_offset:#x} is not a sector offset of a dynamic header",
            path=path,
            field="footer.data_offset",
        )
    return Footer(
        disk_type=disk_type,
        current_size=current_size,
        uuid=uuidlib.UUID(bytes=uid),
        original_size=original_size,
        data_offset=data_offset,
        timestamp=timestamp,
        creator_application=creator_app,
        creator_version=creator_version,
        creator_host_os=creator_os,
        geometry=(cylinders, heads, spt),
        features=features,
        file_format_version=version,
        saved_state=saved_state,
        hidden=hidden,
        checksum=stored_checksum,
    )


# -- dynamic header --------------------------------------------------------------------------


@dataclass(frozen=True)
class ParentLocator:
    """One of the 8 parent locator entries of a dynamic header (§6.2)."""

    platform_code: int = PLATFORM_NONE
    data_space: int = 0
    """As stored: sectors per the spec, but some tools write bytes (values >= 512)."""
    data_length: int = 0
    data_offset: int = 0

    @property
    def data_space_bytes(self) -> int:
        return self.data_space if self.data_space >= SECTOR_SIZE else self.data_space * SECTOR_SIZE


EMPTY_LOCATORS = (ParentLocator(),) * 8


@dataclass(frozen=True)
class DynamicHeader:
    """The 1024-byte dynamic disk header (§6.2) of dynamic and differencing disks."""

    table_offset: int
    max_table_entries: int
    block_size: int = DEFAULT_BLOCK_SIZE
    parent_uuid: uuidlib.UUID = NIL_UUID
    parent_timestamp: int = 0
    parent_unicode_name: str = ""
    """The parent's path relative to this file's folder (XO), UTF-16BE on disk."""
    parent_locators: tuple[ParentLocator, ...] = field(default=EMPTY_LOCATORS)
    data_offset: int = NO_DATA_OFFSET
    header_version: int = HEADER_VERSION
    checksum: int = 0

    @property
    def sectors_per_block(self) -> int:
        return self.block_size // SECTOR_SIZE

    @property
    def bitmap_size(self) -> int:
        return bitmap_size(self.block_size)

    def replace(self, **changes: object) -> DynamicHeader:
        """A copy with ``changes`` (a dataclass ``replace``)."""
        return replace(self, **changes)  # type: ignore[arg-type]


def build_header(header: DynamicHeader) -> bytes:
    """The 1024 bytes of ``header``, with its checksum."""
    name = header.parent_unicode_name.encode("utf-16-be")
    if len(name) > 512:
        raise ValueError(f"parent name {header.parent_unicode_name!r} is over 256 UTF-16 units")
    locators = list(header.parent_locators) + [ParentLocator()] * (8 - len(header.parent_locators))
    body = _HEADER.pack(
        HEADER_COOKIE,
        header.data_offset,
        header.table_offset,
        header.header_version,
        header.max_table_entries,
        header.block_size,
        0,
        header.parent_uuid.bytes,
        header.parent_timestamp,
        b"\x00" * 4,
        name.ljust(512, b"\x00"),
    ) + b"".join(
        _LOCATOR.pack(loc.platform_code, loc.data_space, loc.data_length, 0, loc.data_offset)
        for loc in locators[:8]
    )
    body = body.ljust(HEADER_SIZE, b"\x00")
    return body[:36] + struct.pack(">I", checksum(body, 36)) + body[40:]


def parse_header(data: bytes, *, path: str | None = None) -> DynamicHeader:
    """Parse and validate a dynamic header: cookie, checksum, block size, parent name."""
    if len(data) != HEADER_SIZE:
        raise FormatError(
            f"dynamic header is {len(data)} bytes, expected {HEADER_SIZE} (file truncated?)",
            path=path,
            field="header",
        )
    (
        cookie,
        data_offset,
        table_offset,
        version,
        max_entries,
        block_size,
        stored_checksum,
        parent_uid,
        parent_timestamp,
        _reserved,
        raw_name,
    ) = _HEADER.unpack_from(data)
    if cookie != HEADER_COOKIE:
        raise FormatError(
            f"bad cookie {cookie!r}, expected {HEADER_COOKIE!r}", path=path, field="header.cookie"
        )
    expected = checksum(data, 36)
    if stored_checksum != expected:
        raise FormatError(
            f"checksum is {stored_checksum:#010x}, computed {expected:#010x}",
            path=path,
            field="header.checksum",
        )
    if block_size < MIN_BLOCK_SIZE or block_size > MAX_BLOCK_SIZE or block_size & (block_size - 1):
        raise FormatError(
            f"block size {block_size} is not a power of two between {MIN_BLOCK_SIZE} and "
            f"{MAX_BLOCK_SIZE}",
            path=path,
            field="header.block_size",
        )
    if table_offset % SECTOR_SIZE or table_offset < SECTOR_SIZE:
        raise FormatError(
            f"BAT offset {table_offset} is not a sector offset after the footer copy",
            path=path,
            field="header.table_offset",
        )
    try:
        name = raw_name.decode("utf-16-be").split("\x00", 1)[0]
    except UnicodeDecodeError as error:
        raise FormatError(
            f"parent name is not valid UTF-16BE ({error.reason})",
            path=path,
            field="header.parent_unicode_name",
        ) from None
    locators = tuple(
        ParentLocator(code, space, length, offset)
        for code, space, length, _r, offset in (
            _LOCATOR.unpack_from(data, 576 + 24 * i) for i in range(8)
        )
    )
    return DynamicHeader(
        table_offset=table_offset,
        max_table_entries=max_entries,
        block_size=block_size,
        parent_uuid=uuidlib.UUID(bytes=parent_uid),
        parent_timestamp=parent_timestamp,
        parent_unicode_name=name,
        parent_locators=locators,
        data_offset=data_offset,
        header_version=version,
        checksum=stored_checksum,
    )


def relative_parent_locators(parent_name: str, data_offset: int) -> tuple[ParentLocator, bytes]:
    """A ``W2ru`` locator for a relative parent name placed at ``data_offset``, and its bytes.

    Readers that ignore ``parent unicode name`` (libvhdi, vhd-util) follow locators instead, so
    a written differencing VHD carries one that says the same thing.
    """
    data = parent_name.replace("/", "\\")
    if not data.startswith(".\\") and not data.startswith("..\\"):
        data = ".\\" + data
    encoded = data.encode("utf-16-le")
    space = -(-len(encoded) // SECTOR_SIZE) * SECTOR_SIZE or SECTOR_SIZE
    locator = ParentLocator(PLATFORM_W2RU, space // SECTOR_SIZE, len(encoded), data_offset)
    return locator, encoded.ljust(space, b"\x00")


# -- BAT -------------------------------------------------------------------------------------


def bat_size(entries: int) -> int:
    """Bytes of a BAT with ``entries`` entries, rounded up to a sector."""
    return -(-entries * 4 // SECTOR_SIZE) * SECTOR_SIZE


def parse_bat(data: bytes, entries: int, *, path: str | None = None) -> array:
    """The BAT as an ``array('I')`` of sector numbers (``UNUSED_BAT_ENTRY`` when unallocated)."""
    if len(data) < entries * 4:
        raise FormatError(
            f"BAT is {len(data)} bytes, {entries} entries need {entries * 4} (file truncated?)",
            path=path,
            field="bat",
        )
    bat = array("I")
    bat.frombytes(data[: entries * 4])
    if bat.itemsize != 4:  # pragma: no cover - every CPython platform has 4-byte unsigned int
        raise RuntimeError("array('I') is not 32-bit on this platform")
    if struct.pack("=I", 1) != struct.pack(">I", 1):
        bat.byteswap()
    return bat


def build_bat(bat: array | list[int]) -> bytes:
    """The on-disk BAT of ``bat`` (big-endian), padded to a sector with unused entries."""
    out = array("I", bat)
    if struct.pack("=I", 1) != struct.pack(">I", 1):
        out.byteswap()
    raw = out.tobytes()
    return raw + b"\xff" * (bat_size(len(bat)) - len(raw))


def bat_entry_bytes(sector: int) -> bytes:
    """One BAT entry as stored (for in-place updates of a single entry)."""
    return struct.pack(">I", sector)


# -- sector bitmaps --------------------------------------------------------------------------


def bitmap_size(block_size: int) -> int:
    """Bytes of the sector bitmap preceding each block: 1 bit per sector, padded to a sector."""
    return -(-(block_size // SECTOR_SIZE // 8) // SECTOR_SIZE) * SECTOR_SIZE


def full_bitmap(block_size: int) -> bytes:
    """A bitmap with every sector of the block present (what XAPI and our writer emit)."""
    return b"\xff" * bitmap_size(block_size)


def bitmap_is_full(bitmap: bytes, block_size: int) -> bool:
    """True when every sector of the block is present."""
    used = block_size // SECTOR_SIZE // 8
    return bitmap[:used].count(0xFF) == used


def bitmap_is_empty(bitmap: bytes, block_size: int) -> bool:
    """True when no sector of the block is present."""
    used = block_size // SECTOR_SIZE // 8
    return bitmap[:used].count(0) == used


def bitmap_test(bitmap: bytes, sector: int) -> bool:
    """Whether ``sector`` (index inside the block) is present: MSB-first bit order (§6.3)."""
    return bool(bitmap[sector >> 3] & (0x80 >> (sector & 7)))


def bitmap_or(first: bytes, second: bytes) -> bytes:
    """Sectors present in either bitmap."""
    length = max(len(first), len(second))
    value = int.from_bytes(first.ljust(length, b"\x00"), "big") | int.from_bytes(
        second.ljust(length, b"\x00"), "big"
    )
    return value.to_bytes(length, "big")


def bitmap_runs(bitmap: bytes, block_size: int) -> list[tuple[int, int]]:
    """Runs of present sectors as (first sector, count), in order.

    Whole 0x00/0xFF bytes are skipped or taken 8 sectors at a time, so the loop is per byte of
    the bitmap (512 for a 2 MiB block), not per sector.
    """
    runs: list[tuple[int, int]] = []
    start = -1
    sectors = block_size // SECTOR_SIZE
    for index, byte in enumerate(bitmap[: sectors // 8]):
        base = index * 8
        if byte == 0xFF:
            if start < 0:
                start = base
            continue
        if byte == 0:
            if start >= 0:
                runs.append((start, base - start))
                start = -1
            continue
        for bit in range(8):
            if byte & (0x80 >> bit):
                if start < 0:
                    start = base + bit
            elif start >= 0:
                runs.append((start, base + bit - start))
                start = -1
    if start >= 0:
        runs.append((start, sectors - start))
    return runs
