"""The codec conformance suite: what every :class:`~xobackup_core.compression.Codec` must do.

A compressor plugin proves itself by inheriting this class and giving a ``codec`` fixture::

    import pytest
    from xobackup_core.testing import CodecConformance

    class TestLz4Codec(CodecConformance):
        cli_decompress = ["lz4", "-d", "-c"]          # a reference tool reading our output
        cli_compress = [["lz4", "-1", "-c"], ["lz4", "-9", "-c"]]  # ... and writing its own

        @pytest.fixture
        def codec(self):
            return Lz4Codec()

The suite checks round trips across chunk boundaries, interoperability with the reference
command-line tool in both directions, that closing never closes the destination, that an error
(of the destination, or inside the ``with`` block) never leaves a complete-looking stream, that
every truncation and corruption is a :class:`~xobackup_core.errors.FormatError`, and that a
stream opened in one thread can be used in another (the engine does that).
"""

from __future__ import annotations

import io
import os
import random
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest

from xobackup_core.compression import Codec
from xobackup_core.errors import FormatError, UsageError
from xobackup_core.plugins import Plugins

MiB = 1024 * 1024


def mixed_data(size: int, seed: int = 1) -> bytes:
    """Random, zero and text runs of uneven lengths, so every kind of block a codec makes
    (stored, compressed, run-length) appears."""
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


class CodecConformance:
    """Inherit me and provide a ``codec`` fixture returning the codec under test."""

    chunk_size: int = MiB
    """The codec's natural chunk: round trips are tried just below and above it."""
    thread_options: Sequence[int] = (0, 2)
    cli_decompress: Sequence[str] | None = None
    """A reference tool that decompresses a file to stdout, e.g. ``["gzip", "-d", "-c"]``."""
    cli_compress: Sequence[Sequence[str]] = ()
    """Reference commands that compress a file to stdout, e.g. ``[["gzip", "-1", "-c"]]``."""
    codec_class: str | None = None
    """``"module:Class"`` of the codec, to measure its memory in a fresh process."""
    entry_point: str | None = None
    """The plugin's entry-point name, to check ``xobackup plugins`` lists it."""
    distribution: str | None = None
    """The plugin's distribution name, as ``xobackup plugins`` shows it."""
    memory_limit_mib: float = 100.0

    @pytest.fixture
    def codec(self) -> Codec:  # pragma: no cover - overridden by every subclass
        raise NotImplementedError("the test class must define a 'codec' fixture")

    # -- helpers ---------------------------------------------------------------------------
    @staticmethod
    def compress(codec: Codec, data: bytes, pieces: int = 65_537, **options: int) -> bytes:
        out = io.BytesIO()
        with codec.open_compress(out, **options) as writer:
            for start in range(0, len(data), pieces):
                writer.write(data[start : start + pieces])
        return out.getvalue()

    @staticmethod
    def decompress(codec: Codec, blob: bytes, read_size: int = -1) -> bytes:
        reader = codec.open_decompress(io.BytesIO(blob))
        if read_size < 0:
            return reader.read()
        parts = []
        while chunk := reader.read(read_size):
            parts.append(chunk)
        return b"".join(parts)

    @staticmethod
    def _tool(argv: Sequence[str]) -> list[str]:
        from shutil import which

        if which(argv[0]) is None:
            if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
                pytest.fail(f"the reference tool {argv[0]!r} is missing in CI")
            pytest.skip(f"the reference tool {argv[0]!r} is not installed")
        return list(argv)

    # -- round trips -------------------------------------------------------------------------
    @pytest.mark.parametrize("extra", [-1, 1])
    def test_round_trip_across_chunk_boundaries(self, codec: Codec, extra: int) -> None:
        for threads in self.thread_options:
            for size in (0, 1, self.chunk_size + extra, 3 * self.chunk_size + 12_345):
                data = mixed_data(size, seed=size)
                blob = self.compress(codec, data, threads=threads)
                assert self.decompress(codec, blob) == data, (size, threads)
                assert self.decompress(codec, blob, read_size=99_991) == data, (size, threads)

    def test_one_large_write_and_large_reads(self, codec: Codec) -> None:
        data = mixed_data(24 * MiB, seed=7)
        blob = self.compress(codec, data, pieces=len(data), threads=max(self.thread_options))
        assert len(blob) < len(data) * 0.8
        assert self.decompress(codec, blob, read_size=8 * MiB) == data

    # -- stream ownership ----------------------------------------------------------------------
    def test_close_leaves_destination_open(self, codec: Codec) -> None:
        for threads in self.thread_options:
            out = io.BytesIO()
            writer = codec.open_compress(out, threads=threads)
            writer.write(b"payload" * 1000)
            writer.close()
            writer.close()
            assert not out.closed
            out.write(b"trailer")
            assert out.getvalue().endswith(b"trailer")
            with pytest.raises(ValueError):
                writer.write(b"more")

    def test_decompress_leaves_source_open(self, codec: Codec) -> None:
        source = io.BytesIO(self.compress(codec, b"abc" * 100))
        with codec.open_decompress(source) as reader:
            assert reader.read() == b"abc" * 100
        assert not source.closed

    # -- errors --------------------------------------------------------------------------------
    def test_failing_destination_error_comes_through(self, codec: Codec) -> None:
        for threads in self.thread_options:

            class FullDisk(io.RawIOBase):
                received = 0
                calls_after_failure = 0

                def writable(self) -> bool:
                    return True

                def write(self, data: bytes) -> int:  # type: ignore[override]
                    if self.received >= 3 * MiB:
                        self.calls_after_failure += 1
                        raise OSError(28, "No space left on device")
                    self.received += len(data)
                    return len(data)

            destination = FullDisk()
            with pytest.raises(OSError, match="No space left") as caught:
                with codec.open_compress(destination, threads=threads) as writer:
                    for _ in range(32):
                        writer.write(os.urandom(MiB))
            # The destination's first error, not another one raised while closing.
            assert caught.value.__context__ in (None, caught.value)
            assert destination.calls_after_failure == 1, "no trailer after a failed write"

    def test_error_in_the_block_leaves_no_complete_stream(self, codec: Codec) -> None:
        out = io.BytesIO()
        with pytest.raises(RuntimeError, match="source broke"):
            with codec.open_compress(out) as writer:
                writer.write(b"x" * 1000)
                raise RuntimeError("source broke")
        assert not out.closed
        with pytest.raises(FormatError):
            self.decompress(codec, out.getvalue())

    def test_every_truncation_is_a_format_error(self, codec: Codec) -> None:
        blob = self.compress(codec, mixed_data(600_000, seed=17), threads=0)
        rng = random.Random(4)
        cuts = {*range(1, 30), *range(len(blob) - 30, len(blob))}
        cuts |= {rng.randrange(1, len(blob)) for _ in range(200)}
        for cut in sorted(cuts):
            with pytest.raises(FormatError):
                self.decompress(codec, blob[:cut], read_size=65_536)

    def test_garbage_and_empty_input_are_format_errors(self, codec: Codec) -> None:
        with pytest.raises(FormatError):
            self.decompress(codec, b"this is not compressed data at all" * 10)
        with pytest.raises(FormatError):
            self.decompress(codec, b"")

    def test_invalid_thread_count_is_a_usage_error(self, codec: Codec) -> None:
        with pytest.raises(UsageError, match=codec.name):
            codec.open_compress(io.BytesIO(), threads=-2)

    # -- threads ---------------------------------------------------------------------------
    def test_stream_opened_in_one_thread_is_usable_in_another(self, codec: Codec) -> None:
        holder = {}
        out = io.BytesIO()
        threads = max(self.thread_options)
        opener = threading.Thread(
            target=lambda: holder.setdefault("w", codec.open_compress(out, threads=threads))
        )
        opener.start()
        opener.join()
        data = mixed_data(6 * MiB, seed=23)

        def write_all() -> None:
            with holder["w"] as writer:
                writer.write(data)

        writer_thread = threading.Thread(target=write_all, daemon=True)
        writer_thread.start()
        writer_thread.join(timeout=60)
        assert not writer_thread.is_alive(), "compression hung"
        assert self.decompress(codec, out.getvalue()) == data

    # -- interoperability --------------------------------------------------------------------
    def test_reference_tool_reads_our_output(self, codec: Codec, tmp_path: Path) -> None:
        if self.cli_decompress is None:
            pytest.skip("no reference tool declared for this codec")
        argv = self._tool(self.cli_decompress)
        data = mixed_data(5 * MiB, seed=11)
        for threads in self.thread_options:
            path = tmp_path / f"ours-{threads}{codec.file_suffix}"
            path.write_bytes(self.compress(codec, data, threads=threads))
            run = subprocess.run([*argv, str(path)], capture_output=True)
            assert run.returncode == 0, run.stderr
            assert run.stdout == data

    def test_we_read_reference_tool_output(self, codec: Codec, tmp_path: Path) -> None:
        if not self.cli_compress:
            pytest.skip("no reference tool declared for this codec")
        data = mixed_data(3 * MiB, seed=13)
        source = tmp_path / "data"
        source.write_bytes(data)
        for command in self.cli_compress:
            argv = self._tool(command)
            run = subprocess.run([*argv, str(source)], capture_output=True, check=True)
            assert self.decompress(codec, run.stdout, read_size=77_777) == data, command

    # -- constant memory and registration ---------------------------------------------------
    def test_memory_stays_constant_on_256_mib(self, codec: Codec, tmp_path: Path) -> None:
        if self.codec_class is None:
            pytest.skip("codec_class is not declared")
        path = str(tmp_path / f"big{codec.file_suffix}")
        assert self._peak_rss_mib("compress", path) < self.memory_limit_mib
        assert os.path.getsize(path) < 140 * MiB
        assert self._peak_rss_mib("decompress", path) < self.memory_limit_mib

    def _peak_rss_mib(self, mode: str, path: str) -> float:
        # The child reports its own high-water mark (VmHWM, KiB). getrusage() is no good here:
        # the kernel carries the RSS of the process that forked into the child's ru_maxrss
        # across exec, and a test process is bigger than the limit being checked.
        assert self.codec_class is not None
        run = subprocess.run(
            [sys.executable, "-c", _MEMORY_SCRIPT, self.codec_class, mode, path],
            capture_output=True,
            text=True,
            check=True,
        )
        return int(run.stdout) / 1024

    def test_plugin_is_registered_and_listed(
        self, codec: Codec, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        if self.entry_point is None:
            pytest.skip("entry_point is not declared")
        # Only this plugin besides the core's: another plugin's import error must not fail this.
        monkeypatch.setenv("XOBACKUP_PLUGINS", self.entry_point)
        found = Plugins(autoload=False).compressor(codec.name)
        assert isinstance(found, Codec)
        assert (found.name, found.file_suffix) == (codec.name, codec.file_suffix)

        from xobackup_core.cli.main import main

        with pytest.raises(SystemExit) as exit_info:
            main(["--no-plugin-autoload", "plugins"])
        assert exit_info.value.code == 0
        marker = f"compressor:{codec.name}"
        listed = [line for line in capsys.readouterr().out.splitlines() if marker in line]
        assert len(listed) == 1
        assert listed[0].split()[:2] == [self.entry_point, self.distribution]


_MEMORY_SCRIPT = r"""
import importlib, os, sys
module, name = sys.argv[1].split(":")
mode, path = sys.argv[2], sys.argv[3]
codec = getattr(importlib.import_module(module), name)()
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

__all__ = ["CodecConformance", "mixed_data"]
