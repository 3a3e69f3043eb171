"""VHD reading: qemu-made fixed and dynamic disks, differencing chains, malformed files."""

from __future__ import annotations

import os
import random
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from tests.conftest import require_tool
from tests.formats.conftest import BLOCK, ChainBuilder, read_chain
from xobackup_core.errors import FormatError
from xobackup_core.formats.source import LocalFile, LocalFileSource
from xobackup_core.formats.vhd import VhdFile, verify_vhd_file
from xobackup_core.formats.vhd_chain import open_vhd_chain
from xobackup_core.formats.vhd_structs import (
    SECTOR_SIZE,
    bitmap_runs,
    bitmap_test,
    build_footer,
    build_header,
    geometry_for_size,
    parse_footer,
    parse_header,
)
from xobackup_core.formats.vhd_writer import ParentLink, write_vhd_stream


def _raw_image(path: Path, size: int, seed: int) -> bytes:
    """A raw image with random data in some places and holes elsewhere."""
    rnd = random.Random(seed)
    image = bytearray(size)
    for _ in range(6):
        start = rnd.randrange(0, size - 70000) // 512 * 512
        chunk = rnd.randbytes(rnd.randrange(512, 70000))
        image[start : start + len(chunk)] = chunk
    image[size - 1000 :] = rnd.randbytes(1000)
    del image[size:]
    path.write_bytes(bytes(image))
    return bytes(image)


def _qemu_vhd(tmp_path: Path, options: str, size: int, seed: int) -> tuple[Path, bytes]:
    qemu_img = require_tool("qemu-img")
    raw_path = tmp_path / "source.raw"
    raw = _raw_image(raw_path, size, seed)
    vhd = tmp_path / "qemu.vhd"
    subprocess.run(
        [qemu_img, "convert", "-f", "raw", "-O", "vpc", "-o", options, raw_path, vhd], check=True
    )
    return vhd, raw


@pytest.mark.parametrize(
    "options",
    ["subformat=dynamic", "subformat=dynamic,force_size=on", "subformat=fixed,force_size=on"],
)
def test_qemu_made_vhd_reads_bit_exact(tmp_path: Path, options: str) -> None:
    size = 9 * BLOCK + 3 * 512  # not a whole number of blocks
    vhd, raw = _qemu_vhd(tmp_path, options, size, seed=len(options))
    with VhdFile.open(LocalFileSource(vhd)) as disk:
        assert disk.type_name == ("fixed" if "fixed" in options else "dynamic")
        assert disk.size >= size
        if "dynamic" in options:
            assert 0 < disk.allocated_count() < disk.block_count  # holes stay unallocated
        verify_vhd_file(disk)
    data = read_chain(vhd)
    assert data[:size] == raw
    assert data[size:] == bytes(len(data) - size)


def test_random_access_reads_match(tmp_path: Path) -> None:
    vhd, raw = _qemu_vhd(tmp_path, "subformat=dynamic,force_size=on", 5 * BLOCK, seed=3)
    rnd = random.Random(4)
    with open_vhd_chain(str(vhd)) as chain:
        for _ in range(200):
            offset = rnd.randrange(0, len(raw))
            length = rnd.randrange(0, 3 * BLOCK)
            assert chain.read_at(offset, length) == raw[offset : offset + length]


def test_geometry_matches_qemu(tmp_path: Path) -> None:
    """qemu computes the same CHS as the spec's algorithm for sizes of every regime."""
    qemu_img = require_tool("qemu-img")
    for size in (20 * 1024**2, 600 * 1024**2, 5 * 1024**3, 40 * 1024**3, 200 * 1024**3):
        target = tmp_path / f"{size}.vhd"
        subprocess.run(
            [qemu_img, "create", "-q", "-f", "vpc", "-o", "force_size=on", target, str(size)],
            check=True,
        )
        with open(target, "rb") as stream:
            footer = parse_footer(stream.read(512), path=str(target))
        if footer.geometry != (65535, 16, 255):  # force_size writes the saturated CHS
            assert footer.geometry == geometry_for_size(size)
        target.unlink()
    plain = tmp_path / "plain.vhd"
    subprocess.run([qemu_img, "create", "-q", "-f", "vpc", plain, "100M"], check=True)
    footer = parse_footer(plain.read_bytes()[:512])
    cylinders, heads, spt = footer.geometry
    assert footer.current_size == cylinders * heads * spt * 512
    assert geometry_for_size(footer.current_size) == footer.geometry


def _differencing_with_partial_bitmaps(builder: ChainBuilder, tmp_path: Path):
    """A base with full blocks and a child whose blocks set only some sectors."""
    size = 6 * BLOCK
    base = builder.write(size, [{0: builder.block(), 2: builder.block(), 5: builder.block()}])
    expected = base.expected
    with VhdFile.open(LocalFileSource(base.leaf)) as parent:
        link = ParentLink(parent.uuid, base.leaf.name, parent.footer.timestamp)
    child = tmp_path / "child.vhd"
    with open(child, "wb") as stream:
        write_vhd_stream(stream.write, size, [], [], parent=link)
    rnd = random.Random(7)
    with LocalFile(child) as file:
        disk = VhdFile.open_update(file, str(child))
        for index in (0, 1, 2):
            bitmap = bytearray(512)
            data = bytearray(rnd.randbytes(BLOCK))  # garbage where the bit is clear
            for sector in rnd.sample(range(BLOCK // 512), 1500) + list(range(100, 140)):
                bitmap[sector >> 3] |= 0x80 >> (sector & 7)
            for first, count in bitmap_runs(bytes(bitmap), BLOCK):
                start = index * BLOCK + first * 512
                expected[start : start + count * 512] = data[first * 512 : (first + count) * 512]
            disk.write_block(index, bytes(bitmap), bytes(data))
        disk.write_footer()
        disk.flush()
    return base.leaf, child, expected


def test_partial_bitmaps_compose_with_parent(tmp_path: Path, chain_builder: ChainBuilder) -> None:
    _base, child, expected = _differencing_with_partial_bitmaps(chain_builder, tmp_path)
    assert read_chain(child) == bytes(expected)
    with VhdFile.open(LocalFileSource(child)) as disk:
        verify_vhd_file(disk)
        bitmap = disk.read_block_bitmap(1)
        assert bitmap_test(bitmap, 100) and bitmap_test(bitmap, 139)
    # libvhdi is not used as the oracle here: with partial bitmaps it returns the child's
    # data for some sectors whose bit is clear, contrary to the MSB-first rule (§6.3).


def test_deep_chain_reads_through_150_disks(tmp_path: Path, chain_builder: ChainBuilder) -> None:
    size = 8 * BLOCK
    layers = [{depth % 8: bytes([depth % 251]) * 4096 + os.urandom(16)} for depth in range(150)]
    layers[0] = {index: os.urandom(BLOCK) for index in range(8)}
    chain = chain_builder.write(size, layers)
    with open_vhd_chain(str(chain.leaf)) as opened:
        assert len(opened.disks) == 150
        assert opened.read_at(0, size) == bytes(chain.expected)
        # Blocks of the short layers are padded with zeros, not the base's data.
        assert opened.read_at(7 * BLOCK + 4200, 100) == bytes(100)


def test_missing_parent_and_wrong_uuid_are_named(
    tmp_path: Path, chain_builder: ChainBuilder
) -> None:
    chain = chain_builder.write(2 * BLOCK, [{0: b"a" * BLOCK}, {1: b"b" * BLOCK}])
    moved = tmp_path / "elsewhere.vhd"
    shutil.move(chain.paths[0], moved)
    with pytest.raises(FormatError, match=r"parent .disk0000\.vhd. not found") as error:
        open_vhd_chain(str(chain.leaf))
    assert error.value.field == "header.parent_unicode_name"
    other = chain_builder.write(2 * BLOCK, [{0: b"c" * BLOCK}], prefix="other")
    shutil.copy(other.paths[0], chain.paths[0])
    with pytest.raises(FormatError, match="uuid") as error:
        open_vhd_chain(str(chain.leaf))
    assert error.value.field == "header.parent_uuid"
    assert str(chain.leaf) in str(error.value)


def _rewrite_header(path: Path, **changes: object) -> None:
    with LocalFile(path) as file:
        header = parse_header(file.read_at(512, 1024))
        file.write_at(512, build_header(header.replace(**changes)))


def test_parent_loop_is_refused(tmp_path: Path, chain_builder: ChainBuilder) -> None:
    chain = chain_builder.write(2 * BLOCK, [{0: b"a" * BLOCK}, {1: b"b" * BLOCK}])
    base, leaf = chain.paths
    # Turn the base into a differencing child of the leaf: leaf → base → leaf → ...
    with LocalFile(base) as file:
        footer = parse_footer(file.read_at(0, 512))
        raw = build_footer(footer.replace(disk_type=4))
        file.write_at(0, raw)
        file.write_at(file.size() - 512, raw)
    leaf_uuid = parse_footer(leaf.read_bytes()[:512]).uuid
    _rewrite_header(base, parent_uuid=leaf_uuid, parent_unicode_name=leaf.name)
    with pytest.raises(FormatError, match="parent loop"):
        open_vhd_chain(str(leaf))


def _corrupt(path: Path, offset: int, data: bytes) -> None:
    with LocalFile(path) as file:
        file.write_at(offset, data)


@pytest.mark.parametrize(
    ("damage", "field"),
    [
        ("footer_checksum", "footer.checksum"),
        ("footer_cookie", "footer.cookie"),
        ("header_checksum", "header.checksum"),
        ("bat_past_end", "bat[1]"),
        ("truncated", "bat[1]"),
        ("huge_size", "footer.current_size"),
        ("huge_entries", "header.table_offset"),
        ("block_size", "header.block_size"),
    ],
)
def test_malformed_files_name_the_field(
    tmp_path: Path, chain_builder: ChainBuilder, damage: str, field: str
) -> None:
    chain = chain_builder.write(3 * BLOCK, [{0: b"a" * BLOCK, 1: b"b" * BLOCK}])
    path = chain.leaf
    length = path.stat().st_size
    footer = parse_footer(path.read_bytes()[:512])
    if damage == "footer_checksum":
        _corrupt(path, length - 512 + 40, b"\x7f")
    elif damage == "footer_cookie":
        _corrupt(path, length - 512, b"xonectix")
    elif damage == "header_checksum":
        _corrupt(path, 512 + 28, b"\x00\x00\x00\x09")
    elif damage == "bat_past_end":
        _corrupt(path, 1536 + 4, struct.pack(">I", length // SECTOR_SIZE))
    elif damage == "truncated":
        with LocalFile(path) as file:
            file.truncate(length - 4096)
            file.write_at(length - 4096 - 512, build_footer(footer))
    elif damage == "huge_size":
        raw = bytearray(build_footer(footer))
        raw[48:56] = struct.pack(">Q", 1 << 62)
        raw[64:68] = b"\0\0\0\0"
        raw[64:68] = struct.pack(">I", ~sum(raw) & 0xFFFFFFFF)
        _corrupt(path, length - 512, bytes(raw))
    elif damage == "huge_entries":
        _rewrite_header(path, max_table_entries=0x7FFFFFFF)
    elif damage == "block_size":
        _rewrite_header(path, block_size=3 * 1024 * 1024)
    with pytest.raises(FormatError) as error:
        read_chain(path)
    assert error.value.field == field
    assert error.value.path == str(path)


def test_interrupted_append_needs_force(tmp_path: Path, chain_builder: ChainBuilder) -> None:
    """A trailing footer overwritten by an append is refused unless the reader is told."""
    chain = chain_builder.write(3 * BLOCK, [{0: b"a" * BLOCK}])
    path = chain.leaf
    _corrupt(path, path.stat().st_size - 512, b"\xff" * 512)
    with pytest.raises(FormatError, match="cookie"):
        VhdFile.open(LocalFileSource(path))
    with VhdFile.open(LocalFileSource(path), force=True) as disk:
        assert not disk.trailing_footer_valid
        assert disk.read_block(0).data == b"a" * BLOCK
