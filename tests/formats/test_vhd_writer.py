"""The streaming VHD writer, validated by qemu-img (dynamic disks) and libvhdi (chains)."""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path

import pytest

from tests.conftest import require_module, require_tool
from tests.formats.conftest import BLOCK, ChainBuilder, read_chain
from xobackup_core.formats.source import LocalFileSource
from xobackup_core.formats.vhd import VhdFile, verify_vhd_file
from xobackup_core.formats.vhd_structs import parse_footer
from xobackup_core.formats.vhd_writer import (
    ParentLink,
    plan_vhd_stream,
    read_file_blocks,
    sparse_file_blocks,
    vhd_stream,
    write_vhd_stream,
)


class ForwardOnly:
    """A sink that refuses seeks, like a pipe or an HTTP upload."""

    def __init__(self, path: Path) -> None:
        self.stream = open(path, "wb")
        self.written = 0

    def write(self, data: bytes | memoryview) -> int:
        self.written += len(data)
        return self.stream.write(data)

    def seek(self, *args: object) -> None:
        raise AssertionError("the writer must not seek")

    def close(self) -> None:
        self.stream.close()


def _qemu_raw(vhd: Path, out: Path) -> bytes:
    qemu_img = require_tool("qemu-img")
    subprocess.run(
        [
            qemu_img,
            "convert",
            "--image-opts",
            f"driver=vpc,force_size_calc=current_size,file.filename={vhd}",
            "-O",
            "raw",
            out,
        ],
        check=True,
    )
    return out.read_bytes()


@pytest.mark.parametrize("size", [BLOCK, 7 * BLOCK + 512 * 3, 16 * BLOCK])
def test_sparse_raw_to_vhd_converts_back_exactly(tmp_path: Path, size: int) -> None:
    rnd = random.Random(size)
    raw_path = tmp_path / "source.raw"
    with open(raw_path, "wb") as stream:
        stream.truncate(size)
        for _ in range(3):
            offset = rnd.randrange(0, size - 5000) // 4096 * 4096
            stream.seek(offset)
            stream.write(rnd.randbytes(5000))
        stream.seek(size - 100)
        stream.write(rnd.randbytes(100))
    raw = raw_path.read_bytes()
    fd = os.open(raw_path, os.O_RDONLY)
    try:
        allocated = sparse_file_blocks(fd, size)
        assert len(allocated) < -(-size // BLOCK) or size <= 4 * BLOCK
        for index in range(-(-size // BLOCK)):
            if index not in allocated:
                assert raw[index * BLOCK : (index + 1) * BLOCK].count(0) == len(
                    raw[index * BLOCK : (index + 1) * BLOCK]
                )
        vhd = tmp_path / "out.vhd"
        sink = ForwardOnly(vhd)
        layout = write_vhd_stream(
            sink.write, size, read_file_blocks(fd, allocated, size), allocated
        )
        sink.close()
    finally:
        os.close(fd)
    assert sink.written == layout.stream_size == vhd.stat().st_size
    assert _qemu_raw(vhd, tmp_path / "back.raw") == raw
    # The creator field alone makes a plain `qemu-img info` report the exact size.
    info = subprocess.run(
        [require_tool("qemu-img"), "info", "--output=json", "-f", "vpc", vhd],
        check=True,
        capture_output=True,
    )
    assert json.loads(info.stdout)["virtual-size"] == size
    mapping = subprocess.run(
        [require_tool("qemu-img"), "map", "--output=json", "-f", "vpc", vhd],
        check=True,
        capture_output=True,
    )
    data_blocks = {
        index
        for extent in json.loads(mapping.stdout)
        if extent["data"]
        for index in range(
            extent["start"] // BLOCK, -(-(extent["start"] + extent["length"]) // BLOCK)
        )
    }
    assert data_blocks == set(allocated)
    with VhdFile.open(LocalFileSource(vhd)) as disk:
        verify_vhd_file(disk)
        assert list(disk.allocated_blocks()) == allocated
    assert read_chain(vhd) == raw


def test_written_chain_reads_bit_exact_in_libvhdi(
    tmp_path: Path, chain_builder: ChainBuilder
) -> None:
    pyvhdi = require_module("pyvhdi")
    size = 12 * BLOCK
    chain = chain_builder.write(size, chain_builder.random_layers(12, 5, 4))
    files = []
    for path in chain.paths:
        opened = pyvhdi.file()
        opened.open(str(path))
        files.append(opened)
    for child, parent in zip(files[1:], files, strict=False):
        child.set_parent(parent)
    leaf = files[-1]
    assert leaf.get_media_size() == size
    assert leaf.read_buffer_at_offset(size, 0) == bytes(chain.expected)
    assert read_chain(chain.leaf) == bytes(chain.expected)
    # Each delta alone is a valid VHD for qemu: its allocated blocks are the layer's.
    with VhdFile.open(LocalFileSource(chain.paths[2])) as disk:
        assert disk.is_differencing
        assert disk.parent_name == chain.paths[1].name
        assert disk.parent_uuid == parse_footer(chain.paths[1].read_bytes()[:512]).uuid


def test_stream_refuses_blocks_it_did_not_plan(tmp_path: Path) -> None:
    layout = plan_vhd_stream(4 * BLOCK, [1, 2])
    with pytest.raises(ValueError, match="not planned"):
        list(vhd_stream(layout, [(1, b"x"), (3, b"y")]))
    with pytest.raises(ValueError, match="never given"):
        list(vhd_stream(layout, [(1, b"x")]))
    with pytest.raises(ValueError, match="multiple of 512"):
        plan_vhd_stream(1000, [])


def test_parent_link_is_recorded(tmp_path: Path) -> None:
    import uuid

    parent = ParentLink(uuid.uuid4(), "20260801T040000Z.vhd", 1234)
    vhd = tmp_path / "child.vhd"
    with open(vhd, "wb") as stream:
        write_vhd_stream(stream.write, 2 * BLOCK, [(1, b"z" * BLOCK)], [1], parent=parent)
    with VhdFile.open(LocalFileSource(vhd)) as disk:
        assert disk.parent_uuid == parent.uuid
        assert disk.parent_name == parent.name
        assert disk.header.parent_timestamp == 1234
        locator = disk.header.parent_locators[0]
        relative = disk.source.read_at(locator.data_offset, locator.data_length)
        assert relative.decode("utf-16-le") == ".\\20260801T040000Z.vhd"
    vhdiinfo = require_tool("vhdiinfo")
    out = subprocess.run([vhdiinfo, vhd], check=True, capture_output=True, text=True).stdout
    assert str(parent.uuid) in out.lower()
    assert "Differential" in out
