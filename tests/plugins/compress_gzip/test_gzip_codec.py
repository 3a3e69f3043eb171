"""The gzip codec: round trips, interoperability with gzip(1), levels, errors, constant memory."""

from __future__ import annotations

import gzip
import io
import os
import subprocess
import sys

import pytest
from xobackup_compress_gzip import GzipCodec
from xobackup_compress_gzip.codec import CHUNK_SIZE as CHUNK
from xobackup_compress_gzip.codec import isal_level

from xobackup_core.compression import Codec
from xobackup_core.errors import FormatError, UsageError
from xobackup_core.plugins import Plugins
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


_MEMORY_SCRIPT = r"""
import os, sys
from xobackup_compress_gzip import GzipCodec
mode, path = sys.argv[1], sys.argv[2]
codec = GzipCodec()
if mode == "compress":
    zeros = bytes(4 << 20)
    with open(path, "wb") as dst, codec.open_compress(dst, threads=2) as writer:
        for index in range(64):  # 256 MiB, half random
            writer.write(os.urandom(4 << 20) if index % 2 else zeros)
else:
    total = 0
    with open(path, "rb") as src, codec.open_decompress(src) as reader:
        while chunk := reader.read(4 << 20):
            total += len(chunk)
    assert total == 256 << 20, total
with open("/proc/self/status") as status:
    print(next(line.split()[1] for line in status if line.startswith("VmHWM:")))
"""


def _peak_rss_mib(*args: str) -> float:
    # The child reports its own high-water mark (VmHWM, KiB). getrusage() is no good here:
    # the kernel carries the RSS of the process that forked into the child's ru_maxrss across
    # exec, and this test process is bigger than the limit being checked.
    run = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, *args], capture_output=True, text=True, check=True
    )
    return int(run.stdout) / 1024


def test_memory_stays_constant_on_256_mib(tmp_path):
    path = str(tmp_path / "big.gz")
    assert _peak_rss_mib("compress", path) < 100
    assert os.path.getsize(path) < 140 * MIB
    assert _peak_rss_mib("decompress", path) < 100


def test_plugin_is_registered_and_listed(capsys, monkeypatch):
    # Only this plugin besides the core's: another plugin's import error must not fail this.
    monkeypatch.setenv("XOBACKUP_PLUGINS", "compress_gzip")
    codec = Plugins(autoload=False).compressor("gzip")
    assert isinstance(codec, Codec)
    assert (codec.name, codec.file_suffix) == ("gzip", ".gz")

    from xobackup_core.cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--no-plugin-autoload", "plugins"])
    assert exit_info.value.code == 0
    listed = [line for line in capsys.readouterr().out.splitlines() if "compressor:gzip" in line]
    assert len(listed) == 1
    assert listed[0].split()[:2] == ["compress_gzip", "xobackup-compress-gzip"]


class TestGzipCodecConformance(CodecConformance):
    chunk_size = CHUNK
    cli_decompress = ("gzip", "-d", "-c")
    cli_compress = (("gzip", "-1", "-c"), ("gzip", "-6", "-c"), ("gzip", "-9", "-c"))

    @pytest.fixture
    def codec(self):
        return GzipCodec()

    def test_python_gzip_reads_our_output(self, codec):
        data = mixed_data(3 * CHUNK + 12_345, seed=5)
        for threads in self.thread_options:
            assert gzip.decompress(compress(data, threads=threads)) == data
