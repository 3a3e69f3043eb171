"""The ``gzip`` codec: standard gzip (RFC 1952) through Intel ISA-L (``isal`` package).

ISA-L's deflate is several times faster than zlib at a comparable ratio, and
``isal.igzip_threaded`` compresses 1 MiB blocks on several threads (like ``pigz``), each block
primed with the last 32 KiB of the previous one, into one ordinary gzip member that ``gzip -d``
reads. Decompression is single-threaded (``isal.igzip``), which ISA-L runs at disk speed.

Levels: users give gzip's 1 to 9; ISA-L has 0 to 3. The mapping keeps gzip's meaning (higher
is smaller and slower) and never picks ISA-L's level 0, whose fixed Huffman table makes
incompressible data about 20% larger:

======== ========= ==============================================
gzip     ISA-L     ratio close to
======== ========= ==============================================
1 to 3   1         ``gzip -1`` .. ``gzip -3``
4 to 6   2         ``gzip -6`` (the default: gzip's own default 6)
7 to 9   3         ``gzip -9``
======== ========= ==============================================
"""

from __future__ import annotations

import contextlib
import io
import os
import zlib
from typing import BinaryIO

from isal import igzip, igzip_threaded, isal_zlib

from xobackup_core.errors import FormatError, UsageError

DEFAULT_LEVEL = 6
"""gzip's own default level."""
CHUNK_SIZE = 1 << 20
"""Size of the reads from the compressed source, of the writes into the destination, and of
the blocks each compression thread takes."""


def isal_level(level: int | None) -> int:
    """The ISA-L level for gzip ``level`` 1..9 (None: the default); UsageError otherwise."""
    if level is None:
        level = DEFAULT_LEVEL
    if isinstance(level, bool) or not isinstance(level, int) or not 1 <= level <= 9:
        raise UsageError(
            f"gzip: invalid compression level {level!r}: use 1 to 9 (default {DEFAULT_LEVEL})"
        )
    return (level + 2) // 3


def thread_count(threads: int | None) -> int:
    """Compression threads for ``threads``: None is every CPU this process may run on."""
    if threads is None:
        return len(os.sched_getaffinity(0)) or 1
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise UsageError(
            f"gzip: invalid thread count {threads!r}: use 0 or more (0 or 1: single-threaded)"
        )
    return max(threads, 1)


class _NonClosingRaw(io.RawIOBase):
    """The raw end of a buffer over ``dst``: closing it leaves ``dst`` open."""

    def __init__(self, stream: BinaryIO) -> None:
        super().__init__()
        self._stream = stream
        self.bytes_read = 0
        self.discard = False
        """Set when the compressing stream failed: nothing more reaches ``stream``."""

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        if not self.discard:
            self._stream.write(data)
        return memoryview(data).nbytes

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self._stream.read(len(buffer))
        count = len(data)
        memoryview(buffer)[:count] = data
        self.bytes_read += count
        return count

    def flush(self) -> None:
        if not self.closed and not self.discard:
            self._stream.flush()


class _GzipWriter(io.RawIOBase):
    """A writable stream compressing into ``dst``; closing writes the trailer, not closing dst.

    The ISA-L compressor starts at the first write rather than here: its worker threads stop
    when the thread that created them ends, so they belong to the thread that writes.
    """

    def __init__(self, dst: BinaryIO, level: int, threads: int) -> None:
        super().__init__()
        self._raw_sink = _NonClosingRaw(dst)
        self._sink = io.BufferedWriter(self._raw_sink, buffer_size=CHUNK_SIZE)
        self._level = level
        self._threads = threads
        self._stream: BinaryIO | None = None
        self._finished = False

    def _started(self) -> BinaryIO:
        if self._stream is None:
            if self._threads > 1:
                self._stream = igzip_threaded.open(
                    self._sink,
                    "wb",
                    compresslevel=self._level,
                    threads=self._threads,
                    block_size=CHUNK_SIZE,
                )
            else:
                # mtime 0: the same input gives the same bytes, as the threaded writer does.
                self._stream = igzip.IGzipFile(  # type: ignore[assignment]
                    fileobj=self._sink, mode="wb", compresslevel=self._level, mtime=0
                )
        assert self._stream is not None
        return self._stream

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        if self._finished:
            raise ValueError("write to a closed gzip stream")
        self._started().write(data)
        return memoryview(data).nbytes

    def flush(self) -> None:
        """Hand everything written so far to ``dst`` (a deflate sync point: costs some ratio)."""
        if not self._finished and self._stream is not None:
            self._stream.flush()
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
            self._started().close()
            self._sink.close()
        finally:
            super().close()


class _GzipReader(io.RawIOBase):
    """A readable stream of the data decompressed from ``src``; damage is a FormatError."""

    def __init__(self, src: BinaryIO) -> None:
        super().__init__()
        self._source = _NonClosingRaw(src)
        self._stream = igzip.IGzipFile(
            fileobj=io.BufferedReader(self._source, buffer_size=CHUNK_SIZE), mode="rb"
        )

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        try:
            count = self._stream.readinto(buffer)
        except EOFError as error:
            raise FormatError(
                f"gzip: compressed data ends before the end of its last member after "
                f"{self._source.bytes_read} bytes: the file is truncated"
            ) from error
        except (igzip.BadGzipFile, isal_zlib.error, zlib.error) as error:
            raise FormatError(f"gzip: corrupt compressed data: {error}") from error
        if count == 0 and len(buffer) and not self._source.bytes_read:
            # igzip, like Python's gzip, reads an empty file as empty data; gzip -d does not.
            raise FormatError("gzip: compressed data is empty (not even a gzip header)")
        return count

    def close(self) -> None:
        if not self.closed:
            self._stream.close()
        super().close()


class GzipCodec:
    """gzip (``.gz``), as ``gzip`` and ``pigz`` read and write it."""

    name = "gzip"
    file_suffix = ".gz"

    def open_compress(
        self, dst: BinaryIO, *, level: int | None = None, threads: int | None = None
    ) -> BinaryIO:
        """A writable stream compressing into ``dst`` at gzip ``level`` 1..9 (default 6).

        ``threads`` None uses every CPU this process may run on; 0 or 1 compresses in the
        calling thread. Write from one thread. Closing writes the gzip trailer and leaves
        ``dst`` open; leaving a ``with`` block on an exception writes nothing more into ``dst``.
        """
        return _GzipWriter(dst, isal_level(level), thread_count(threads))  # type: ignore[return-value]

    def open_decompress(self, src: BinaryIO) -> BinaryIO:
        """A readable stream of the data decompressed from ``src`` (which stays open).

        Several gzip members one after another (``cat a.gz b.gz``) read as one stream.
        """
        return io.BufferedReader(_GzipReader(src), buffer_size=CHUNK_SIZE)  # type: ignore[return-value]
