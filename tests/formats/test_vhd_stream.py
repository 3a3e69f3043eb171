"""Forward-only VHD stream reading: what the engine does with a disk export."""

import io
import os
import random
import subprocess
import uuid

import pytest

from tests.conftest import require_tool
from xobackup_core.errors import FormatError
from xobackup_core.formats.vhd_stream import VhdStreamReader
from xobackup_core.formats.vhd_writer import ParentLink, write_vhd_stream

BLOCK = 2 * 1024 * 1024


class OneByteAtATime(io.RawIOBase):
    """A stream that returns short reads, like a socket."""

    def __init__(self, data):
        self._data = memoryview(data)
        self._position = 0

    def readable(self):
        return True

    def readinto(self, buffer):
        size = min(len(buffer), 7777, len(self._data) - self._position)
        buffer[:size] = self._data[self._position : self._position + size]
        self._position += size
        return size


def make_blocks(indexes, seed=1):
    rng = random.Random(seed)
    return {index: rng.randbytes(BLOCK) for index in indexes}


def test_our_stream_reads_back_through_short_reads():
    blocks = make_blocks([0, 3, 7])
    out = io.BytesIO()
    parent = ParentLink(uuid=uuid.uuid4(), name="20260801T040000Z.vhd")
    write_vhd_stream(out.write, 8 * BLOCK, sorted(blocks.items()), sorted(blocks), parent=parent)
    reader = VhdStreamReader(io.BufferedReader(OneByteAtATime(out.getvalue())), name="export")
    assert reader.is_differencing and reader.size == 8 * BLOCK
    assert reader.header.parent_uuid == parent.uuid
    assert dict(reader.blocks()) == blocks
    reader.finish()


def test_qemu_made_dynamic_vhd_streams_bit_exact(tmp_path):
    qemu_img = require_tool("qemu-img")
    raw = tmp_path / "disk.raw"
    size = 6 * BLOCK
    with open(raw, "wb") as stream:
        stream.truncate(size)
        for index, data in make_blocks([1, 4], seed=2).items():
            stream.seek(index * BLOCK + 4096)
            stream.write(data[:100_000])
    vhd = tmp_path / "disk.vhd"
    subprocess.run(
        [qemu_img, "convert", "-f", "raw", "-O", "vpc", "-o", "subformat=dynamic", raw, vhd],
        check=True,
    )
    with open(vhd, "rb") as stream:
        reader = VhdStreamReader(stream, name=str(vhd))
        image = bytearray(reader.size)
        for index, data in reader.blocks():
            image[index * BLOCK : index * BLOCK + len(data)] = data[: reader.size - index * BLOCK]
    expected = raw.read_bytes()
    assert bytes(image[: len(expected)]) == expected


def test_truncated_stream_names_the_place():
    blocks = make_blocks([2])
    out = io.BytesIO()
    write_vhd_stream(out.write, 4 * BLOCK, sorted(blocks.items()), [2])
    data = out.getvalue()[: -(BLOCK // 2)]
    reader = VhdStreamReader(io.BytesIO(data), name="cut.vhd")
    with pytest.raises(FormatError, match=r"cut\.vhd: block 2: stream ended"):
        list(reader.blocks())


def test_garbage_is_a_format_error():
    with pytest.raises(FormatError):
        VhdStreamReader(io.BytesIO(os.urandom(4096)), name="noise")
    with pytest.raises(FormatError):
        VhdStreamReader(io.BytesIO(b""), name="empty")
