"""The zstd codec: round trips, interoperability with the zstd CLI, errors, constant memory."""

from __future__ import annotations

import io
import os
import subprocess

import pytest
from xobackup_compress_zstd import ZstdCodec
from xobackup_compress_zstd.codec import CHUNK_SIZE as CHUNK

from tests.conftest import require_tool
from xobackup_core.errors import FormatError, UsageError
from xobackup_core.testing import CodecConformance
from xobackup_core.testing.codec_conformance import mixed_data

MIB = 1 << 20


def compress(data: bytes, pieces: int = 65_537, **options: int) -> bytes:
    out = io.BytesIO()
    with ZstdCodec().open_compress(out, **options) as writer:
        for start in range(0, len(data), pieces):
            writer.write(data[start : start + pieces])
    return out.getvalue()


def decompress(blob: bytes, read_size: int = -1) -> bytes:
    reader = ZstdCodec().open_decompress(io.BytesIO(blob))
    if read_size < 0:
        return reader.read()
    parts = []
    while chunk := reader.read(read_size):
        parts.append(chunk)
    return b"".join(parts)


def test_writes_to_destination_are_large():
    sizes: list[int] = []

    class Recorder(io.RawIOBase):
        def writable(self):
            return True

        def write(self, data):
            sizes.append(len(data))
            return len(data)

    with ZstdCodec().open_compress(Recorder(), threads=0) as writer:
        for _ in range(16):
            writer.write(os.urandom(MIB))
    # 16 MiB of incompressible data: a few 1 MiB writes, not one per 128 KiB zstd block.
    assert len(sizes) <= sum(sizes) // CHUNK + 2


def test_levels_change_the_output():
    data = mixed_data(4 * MIB, seed=3)
    fast, default, strong = (len(compress(data, level=lv, threads=0)) for lv in (-5, None, 19))
    assert strong < default < fast
    assert decompress(compress(data, level=-5, threads=0)) == data


def test_we_read_several_frames_and_skippable_frames():
    first, second = mixed_data(MIB, seed=1), mixed_data(MIB, seed=2)
    skippable = (0x184D2A53).to_bytes(4, "little") + (5).to_bytes(4, "little") + b"hello"
    blob = compress(first) + skippable + compress(second)
    assert decompress(blob) == first + second


@pytest.mark.parametrize("level", [0, 23, -131_073, "3", 2.5, True])
def test_invalid_level_is_a_usage_error(level):
    with pytest.raises(UsageError, match=r"zstd: invalid compression level .*1 to 22"):
        ZstdCodec().open_compress(io.BytesIO(), level=level)


def test_corrupt_data_is_a_format_error():
    data = mixed_data(2 * MIB, seed=5)
    blob = bytearray(compress(data, threads=0))
    blob[len(blob) // 2] ^= 0x55
    with pytest.raises(FormatError, match=r"zstd: corrupt compressed data"):
        decompress(bytes(blob))
    with pytest.raises(FormatError, match=r"zstd: corrupt"):
        decompress(b"this is not zstd data at all")
    with pytest.raises(FormatError, match=r"zstd: compressed data is empty"):
        decompress(b"")


@pytest.mark.parametrize("size", [0, 200, 70_000, 300_000])
def test_every_truncation_of_cli_frames_is_a_format_error(tmp_path, size):
    # The CLI knows the input size, so it writes single-segment frames with 1- to 4-byte
    # content sizes: header layouts our own streaming writer never produces.
    zstd = require_tool("zstd")
    data = mixed_data(size, seed=size)
    source = tmp_path / "data"
    source.write_bytes(data)
    blob = subprocess.run(
        [zstd, "-q", "-c", "-3", str(source)], capture_output=True, check=True
    ).stdout
    assert decompress(blob) == data
    for cut in range(1, len(blob), max(1, len(blob) // 400)):
        with pytest.raises(FormatError, match=r"zstd: (compressed data ends|corrupt)"):
            decompress(blob[:cut])


def test_truncation_between_frames_of_a_multi_frame_stream_is_not_an_error():
    # A stream of two whole frames is complete; one and a half is not.
    frame = compress(b"x" * 1000)
    assert decompress(frame + frame) == b"x" * 2000
    with pytest.raises(FormatError, match="truncated"):
        decompress(frame + frame[: len(frame) // 2])


class TestZstdCodecConformance(CodecConformance):
    chunk_size = CHUNK
    codec_class = "xobackup_compress_zstd:ZstdCodec"
    entry_point = "compress_zstd"
    distribution = "xobackup-compress-zstd"
    cli_decompress = ("zstd", "-d", "-c", "-q")
    cli_compress = (
        ("zstd", "-3", "-c", "-q"),
        ("zstd", "-19", "-c", "-q"),
        ("zstd", "--fast=4", "-c", "-q"),
        ("zstd", "-3", "-T2", "-c", "-q"),
        ("zstd", "-1", "--no-check", "-c", "-q"),
    )

    @pytest.fixture
    def codec(self):
        return ZstdCodec()
