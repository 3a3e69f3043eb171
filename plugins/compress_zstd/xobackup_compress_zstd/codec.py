"""The ``zstd`` codec: Zstandard through the ``zstandard`` package (libzstd), streaming.

Compression runs on libzstd's own worker threads (``threads``), so it does not hold the GIL
and its speed matches the ``zstd`` command with the same ``-T``. Memory is bounded by the
level's window and the number of workers, never by the stream size: at the default level 3
each worker holds 10 to 25 MiB (jobs in flight, input and output), so two workers stay near
70 MiB; levels 20 to 22 use windows of up to 128 MiB. Output is a standard zstd frame with a
content checksum, readable by ``zstd -d``; decompression accepts anything ``zstd -d`` reads
(several frames, skippable frames) and reports corrupt or truncated input as
:class:`~xobackup_core.errors.FormatError`.
"""

from __future__ import annotations

import contextlib
import io
import os
from typing import BinaryIO

import zstandard

from xobackup_compress_zstd.frames import FrameTracker
from xobackup_core.errors import FormatError, UsageError

DEFAULT_LEVEL = 3
"""libzstd's own default: the best speed/ratio trade-off for backups."""
MAX_LEVEL = zstandard.MAX_COMPRESSION_LEVEL
"""22. Levels 20 to 22 ("ultra") use windows up to 128 MiB, hence that much memory per worker."""
MIN_FAST_LEVEL = -131072
"""libzstd's ZSTD_minCLevel(): negative levels trade ratio for speed (``zstd --fast=N``)."""
CHUNK_SIZE = 1 << 20
"""Size of the reads from the compressed source and of the writes into the destination, so a
remote sees few large requests rather than one per compressed block."""
JOB_SIZE_MIN = 4 << 20


def check_level(level: int | None) -> int:
    """The libzstd level for ``level`` (None: the default); UsageError when out of range."""
    if level is None:
        return DEFAULT_LEVEL
    if isinstance(level, bool) or not isinstance(level, int) or level == 0:
        valid = False
    else:
        valid = MIN_FAST_LEVEL <= level <= MAX_LEVEL
    if not valid:
        raise UsageError(
            f"zstd: invalid compression level {level!r}: use 1 to {MAX_LEVEL} "
            f"(default {DEFAULT_LEVEL}), or -1 to {MIN_FAST_LEVEL} for the fast levels"
        )
    return level


def worker_count(threads: int | None) -> int:
    """libzstd's number of worker threads for ``threads`` (0 compresses in the caller)."""
    if threads is None:
        return len(os.sched_getaffinity(0)) or 1
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise UsageError(
            f"zstd: invalid thread count {threads!r}: use 0 or more (0 or 1: single-threaded)"
        )
    # One libzstd worker would still compress on a second thread; the contract says 1 means
    # single-threaded, which is libzstd's 0 workers.
    return 0 if threads <= 1 else threads


def _parameters(level: int, workers: int) -> zstandard.ZstdCompressionParameters:
    """libzstd's parameters for ``level``, with a smaller job per worker than its default.

    libzstd gives each worker jobs of 4 windows (8 MiB at level 3) and keeps about two jobs
    per worker in flight, input and output: a process compressing with two workers peaks near
    100 MiB. Jobs of 2 windows, at least 4 MiB, bring that to about 75 MiB with no measurable
    loss of speed or ratio.
    """
    defaults = zstandard.ZstdCompressionParameters.from_level(level)
    extra = {}
    if workers:
        extra["job_size"] = max(JOB_SIZE_MIN, 2 << defaults.window_log)
    return zstandard.ZstdCompressionParameters.from_level(
        level, threads=workers, write_checksum=True, **extra
    )


class _NonClosingRaw(io.RawIOBase):
    """The raw end of the write buffer: writes go to ``dst``, which closing leaves open."""

    def __init__(self, dst: BinaryIO) -> None:
        super().__init__()
        self._dst = dst
        self.discard = False
        """Set when the stream failed: nothing more reaches ``dst``."""

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        if not self.discard:
            self._dst.write(data)
        return memoryview(data).nbytes

    def flush(self) -> None:
        if not self.closed and not self.discard:
            self._dst.flush()


class _ZstdWriter(io.RawIOBase):
    """A writable stream compressing into ``dst``; closing ends the frame, ``dst`` stays open."""

    def __init__(self, dst: BinaryIO, level: int, workers: int) -> None:
        super().__init__()
        self._raw_sink = _NonClosingRaw(dst)
        self._sink = io.BufferedWriter(self._raw_sink, buffer_size=CHUNK_SIZE)
        compressor = zstandard.ZstdCompressor(compression_params=_parameters(level, workers))
        self._stream = compressor.stream_writer(
            self._sink, closefd=False, write_return_read=True, write_size=CHUNK_SIZE
        )
        self._finished = False

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        if self._finished:
            raise ValueError("write to a closed zstd stream")
        return self._stream.write(data)

    def flush(self) -> None:
        """Hand everything written so far to ``dst`` (ends a zstd block: costs some ratio)."""
        if not self._finished:
            self._stream.flush(zstandard.FLUSH_BLOCK)
            self._sink.flush()

    def __exit__(self, exc_type: object, exc: object, traceback: object) -> None:
        if exc_type is None:
            self.close()
            return
        # The block failed, perhaps in dst itself: stop the compressor without writing its
        # trailer into dst, and let the original error through. The caller discards dst.
        self._raw_sink.discard = True
        with contextlib.suppress(Exception):
            self.close()

    def close(self) -> None:
        if self._finished:
            return
        self._finished = True
        try:
            self._stream.close()
            self._sink.close()
        finally:
            super().close()


class _TrackedSource:
    """What the decoder reads: ``src``, with every byte shown to a :class:`FrameTracker`."""

    def __init__(self, src: BinaryIO, tracker: FrameTracker) -> None:
        self._src = src
        self._tracker = tracker

    def read(self, size: int = -1) -> bytes:
        data = self._src.read(size)
        if data:
            self._tracker.feed(data)
        return data


class _ZstdReader(io.RawIOBase):
    """A readable stream of the data decompressed from ``src``, checked to the last frame."""

    def __init__(self, src: BinaryIO) -> None:
        super().__init__()
        self._tracker = FrameTracker()
        self._stream = zstandard.ZstdDecompressor().stream_reader(
            _TrackedSource(src, self._tracker),
            read_size=CHUNK_SIZE,
            read_across_frames=True,
            closefd=False,
        )

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        try:
            count = self._stream.readinto(buffer)
        except zstandard.ZstdError as error:
            raise FormatError(f"zstd: corrupt compressed data: {error}") from error
        if count == 0 and len(buffer) and not self._tracker.at_frame_end:
            if not self._tracker.bytes_seen:
                raise FormatError("zstd: compressed data is empty (not even a zstd frame)")
            raise FormatError(
                f"zstd: compressed data ends in the middle of a frame after "
                f"{self._tracker.bytes_seen} bytes: the file is truncated"
            )
        return count

    def close(self) -> None:
        if not self.closed:
            self._stream.close()
        super().close()


class ZstdCodec:
    """Zstandard, as ``zstd`` writes it (``.zst``)."""

    name = "zstd"
    file_suffix = ".zst"

    def open_compress(
        self, dst: BinaryIO, *, level: int | None = None, threads: int | None = None
    ) -> BinaryIO:
        """A writable stream compressing into ``dst`` at ``level`` (1..22, -1..-131072 fast).

        ``threads`` None uses every CPU this process may run on; 0 or 1 compresses in the
        calling thread. Closing the stream ends the frame and leaves ``dst`` open; leaving a
        ``with`` block on an exception writes nothing more into ``dst``.
        """
        return _ZstdWriter(dst, check_level(level), worker_count(threads))  # type: ignore[return-value]

    def open_decompress(self, src: BinaryIO) -> BinaryIO:
        """A readable stream of the data decompressed from ``src`` (which stays open)."""
        return io.BufferedReader(_ZstdReader(src), buffer_size=CHUNK_SIZE)  # type: ignore[return-value]
