"""The zstd codec: round trips, interoperability with the zstd CLI, errors, constant memory."""

from __future__ import annotations

import io
import os
import random
import subprocess
import sys
import threading

import pytest
from xobackup_compress_zstd import ZstdCodec
from xobackup_compress_zstd.codec import CHUNK_SIZE as CHUNK

from tests.conftest import require_tool
from xobackup_core.compression import Codec
from xobackup_core.errors import FormatError, UsageError
from xobackup_core.plugins import Plugins

MIB = 1 << 20


def mixed_data(size: int, seed: int = 1) -> bytes:
    """Random, zero and text runs of uneven lengths, so every kind of zstd block appears."""
    rng = random.Random(seed)
    words = [bytes(rng.choices(b"abcdefghij klmnopqrst", k=rng.randint(2, 9))) for _ in range(300)]
    parts: list[bytes] = []
    total = 0
    while total < size:
        run = rng.randint(1, 300_000)
        kind = rng.randrange(3)
        if kind == 0:
            part = rng.randbytes(run)
        elif kind == 1:
            part = bytes(run)
        else:
            part = b" ".join(rng.choices(words, k=run // 5))[:run]
        parts.append(part)
        total += len(part)
    return b"".join(parts)[:size]


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


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK + 1, 3 * CHUNK + 12_345])
@pytest.mark.parametrize("threads", [0, 2])
def test_round_trip_across_chunk_boundaries(size, threads):
    data = mixed_data(size, seed=size)
    blob = compress(data, threads=threads)
    assert decompress(blob) == data
    assert decompress(blob, read_size=99_991) == data


def test_one_large_write_and_large_reads():
    data = mixed_data(24 * MIB, seed=7)
    blob = compress(data, pieces=len(data), threads=2)
    assert len(blob) < len(data) * 0.8  # zero and text runs did compress
    assert decompress(blob, read_size=8 * MIB) == data


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


def test_close_leaves_destination_open():
    out = io.BytesIO()
    writer = ZstdCodec().open_compress(out)
    writer.write(b"payload" * 1000)
    writer.close()
    writer.close()  # closing twice is harmless
    assert not out.closed
    out.write(b"trailer")
    assert out.getvalue().endswith(b"trailer")
    with pytest.raises(ValueError):
        writer.write(b"more")


@pytest.mark.parametrize("threads", [0, 2])
def test_failing_destination_error_comes_through(threads):
    class FullDisk(io.RawIOBase):
        def __init__(self):
            self.received = 0
            self.calls_after_failure = 0

        def writable(self):
            return True

        def write(self, data):
            if self.received >= 3 * MIB:
                self.calls_after_failure += 1
                raise OSError(28, "No space left on device")
            self.received += len(data)
            return len(data)

    dst = FullDisk()
    with pytest.raises(OSError, match="No space left") as caught:
        with ZstdCodec().open_compress(dst, threads=threads) as writer:
            for _ in range(32):
                writer.write(os.urandom(MIB))
    # The destination's first error, not another one raised while closing (ISA-L's worker
    # re-raises the very same error object, which then is its own context).
    assert caught.value.__context__ in (None, caught.value)
    assert dst.calls_after_failure == 1  # no trailer was pushed into the failed destination


def test_error_in_the_block_leaves_destination_without_trailer():
    out = io.BytesIO()
    with pytest.raises(RuntimeError, match="source broke"):
        with ZstdCodec().open_compress(out) as writer:
            writer.write(b"x" * 1000)
            raise RuntimeError("source broke")
    assert not out.closed
    with pytest.raises(FormatError):
        ZstdCodec().open_decompress(io.BytesIO(out.getvalue())).read()


def test_decompress_leaves_source_open():
    source = io.BytesIO(compress(b"abc" * 100))
    with ZstdCodec().open_decompress(source) as reader:
        assert reader.read() == b"abc" * 100
    assert not source.closed


def test_cli_reads_our_output(tmp_path):
    zstd = require_tool("zstd")
    data = mixed_data(5 * MIB, seed=11)
    for threads in (0, 2):
        path = tmp_path / f"ours-{threads}.zst"
        path.write_bytes(compress(data, threads=threads))
        run = subprocess.run([zstd, "-d", "-c", str(path)], capture_output=True, check=True)
        assert run.stdout == data
        subprocess.run([zstd, "-t", "-q", str(path)], check=True)


@pytest.mark.parametrize(
    "options", [["-3"], ["-19"], ["--fast=4"], ["-3", "-T2"], ["-1", "--no-check"]]
)
def test_we_read_cli_output(tmp_path, options):
    zstd = require_tool("zstd")
    data = mixed_data(3 * MIB, seed=13)
    source = tmp_path / "data"
    source.write_bytes(data)
    subprocess.run([zstd, "-q", *options, str(source), "-o", str(tmp_path / "d.zst")], check=True)
    assert decompress((tmp_path / "d.zst").read_bytes(), read_size=77_777) == data


def test_we_read_several_frames_and_skippable_frames():
    first, second = mixed_data(MIB, seed=1), mixed_data(MIB, seed=2)
    skippable = (0x184D2A53).to_bytes(4, "little") + (5).to_bytes(4, "little") + b"hello"
    blob = compress(first) + skippable + compress(second)
    assert decompress(blob) == first + second


@pytest.mark.parametrize("level", [0, 23, -131_073, "3", 2.5, True])
def test_invalid_level_is_a_usage_error(level):
    with pytest.raises(UsageError, match=r"zstd: invalid compression level .*1 to 22"):
        ZstdCodec().open_compress(io.BytesIO(), level=level)


def test_invalid_thread_count_is_a_usage_error():
    with pytest.raises(UsageError, match=r"zstd: invalid thread count -1"):
        ZstdCodec().open_compress(io.BytesIO(), threads=-1)


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


def test_every_truncation_is_a_format_error():
    # Many small blocks (raw, RLE and compressed) so cuts land in every part of a frame.
    data = mixed_data(600_000, seed=17)
    blob = compress(data, level=1, threads=0)
    rng = random.Random(4)
    cuts = {*range(1, 40), *range(len(blob) - 40, len(blob))}
    cuts |= {rng.randrange(1, len(blob)) for _ in range(300)}
    for cut in sorted(cuts):
        with pytest.raises(FormatError, match=r"zstd: (compressed data ends|corrupt)"):
            decompress(blob[:cut], read_size=65_536)
    assert decompress(blob) == data


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


def test_stream_opened_in_one_thread_is_usable_in_another():
    holder = {}
    out = io.BytesIO()
    opener = threading.Thread(
        target=lambda: holder.setdefault("w", ZstdCodec().open_compress(out, threads=2))
    )
    opener.start()
    opener.join()
    data = mixed_data(6 * MIB, seed=23)
    with holder["w"] as writer:
        writer.write(data)
    assert decompress(out.getvalue()) == data


_MEMORY_SCRIPT = r"""
import os, sys
from xobackup_compress_zstd import ZstdCodec
mode, path = sys.argv[1], sys.argv[2]
codec = ZstdCodec()
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
    path = str(tmp_path / "big.zst")
    assert _peak_rss_mib("compress", path) < 100
    assert os.path.getsize(path) < 140 * MIB
    assert _peak_rss_mib("decompress", path) < 100


def test_plugin_is_registered_and_listed(capsys, monkeypatch):
    # Only this plugin besides the core's: another plugin's import error must not fail this.
    monkeypatch.setenv("XOBACKUP_PLUGINS", "compress_zstd")
    codec = Plugins(autoload=False).compressor("zstd")
    assert isinstance(codec, Codec)
    assert (codec.name, codec.file_suffix) == ("zstd", ".zst")

    from xobackup_core.cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--no-plugin-autoload", "plugins"])
    assert exit_info.value.code == 0
    listed = [line for line in capsys.readouterr().out.splitlines() if "compressor:zstd" in line]
    assert len(listed) == 1
    assert listed[0].split()[:2] == ["compress_zstd", "xobackup-compress-zstd"]
