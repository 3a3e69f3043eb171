"""The gzip codec: round trips, interoperability with gzip(1), levels, errors, constant memory."""

from __future__ import annotations

import gzip
import io
import os

import pytest
from xobackup_compress_gzip import GzipCodec
from xobackup_compress_gzip.codec import CHUNK_SIZE as CHUNK
from xobackup_compress_gzip.codec import isal_level

from xobackup_core.errors import FormatError, UsageError
from xobackup_core.testing import CodecConformance
from xobackup_core.testing.codec_conformance import mixed_data

MIB = 1 << 20


def compress(data: bytes, pieces: int = 65_537, **options: int) -> bytes:
    out = io.BytesIO()
    with GzipCodec().open_compress(out, **options) as writer:
        for start in range(0, len(data), pieces):
            writer.write(data[start : start + pieces])
    return out.getvalue()


def decompress(blob: bytes, read_size: int = -1) -> bytes:
    reader = GzipCodec().open_decompress(io.BytesIO(blob))
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

    with GzipCodec().open_compress(Recorder(), threads=0) as writer:
        for _ in range(16):
            writer.write(os.urandom(MIB))
    assert len(sizes) <= sum(sizes) // CHUNK + 2


def test_level_mapping():
    assert [isal_level(level) for level in range(1, 10)] == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert isal_level(None) == 2  # gzip's default 6
    text = mixed_data(6 * MIB, seed=3).replace(b"\0", b"a")
    sizes = {level: len(compress(text, level=level, threads=0)) for level in (1, 6, 9)}
    assert sizes[9] <= sizes[6] < sizes[1]


def test_concatenated_members_read_as_one_stream():
    first, second = mixed_data(MIB, seed=1), mixed_data(MIB, seed=2)
    assert decompress(compress(first) + compress(second, threads=0)) == first + second


@pytest.mark.parametrize("level", [0, 10, -1, "6", 2.5, True])
def test_invalid_level_is_a_usage_error(level):
    with pytest.raises(UsageError, match=r"gzip: invalid compression level .*1 to 9"):
        GzipCodec().open_compress(io.BytesIO(), level=level)


def test_corrupt_data_is_a_format_error():
    data = mixed_data(2 * MIB, seed=5)
    blob = bytearray(compress(data, threads=0))
    blob[len(blob) // 2] ^= 0x55
    with pytest.raises(FormatError, match=r"gzip: (corrupt compressed data|compressed data ends)"):
        decompress(bytes(blob))
    with pytest.raises(FormatError, match=r"gzip: corrupt compressed data: Not a gzipped file"):
        decompress(b"this is not gzip data at all")
    with pytest.raises(FormatError, match=r"gzip: compressed data is empty"):
        decompress(b"")
    crc_broken = bytearray(compress(data, threads=0))
    crc_broken[-8] ^= 0xFF
    with pytest.raises(FormatError, match=r"gzip: corrupt compressed data: CRC check failed"):
        decompress(bytes(crc_broken))


class TestGzipCodecConformance(CodecConformance):
    chunk_size = CHUNK
    codec_class = "xobackup_compress_gzip:GzipCodec"
    entry_point = "compress_gzip"
    distribution = "xobackup-compress-gzip"
    cli_decompress = ("gzip", "-d", "-c")
    cli_compress = (("gzip", "-1", "-c"), ("gzip", "-6", "-c"), ("gzip", "-9", "-c"))

    @pytest.fixture
    def codec(self):
        return GzipCodec()

    def test_python_gzip_reads_our_output(self, codec):
        data = mixed_data(3 * CHUNK + 12_345, seed=5)
        for threads in self.thread_options:
            assert gzip.decompress(compress(data, threads=threads)) == data
