"""The streaming codec contract (compressors) and the built-in ``none`` codec.

A codec wraps a stream: ``open_compress(dst)`` returns a writable file object that compresses
into ``dst``; ``open_decompress(src)`` returns a readable file object that decompresses from
``src``. Both work chunk by chunk, so memory stays constant whatever the stream size. Closing
the compressing wrapper flushes the codec's trailer but does not close ``dst``.
"""

from __future__ import annotations

import io
from typing import BinaryIO, Protocol, runtime_checkable


@runtime_checkable
class Codec(Protocol):
    """A named streaming compressor, as returned by the ``xobackup_compressor`` hook."""

    name: str
    """The name users write in the config (``zstd``, ``gzip``, ``none``)."""
    file_suffix: str
    """What the codec appends to a file name (``.zst``, ``.gz``, ``''``)."""

    def open_compress(
        self, dst: BinaryIO, *, level: int | None = None, threads: int | None = None
    ) -> BinaryIO:
        """Return a writable stream compressing into ``dst``.

        ``level`` None is the codec's default; ``threads`` None lets the codec choose (0 or 1
        means single-threaded). Closing the result writes the trailer and leaves ``dst`` open.
        """
        ...

    def open_decompress(self, src: BinaryIO) -> BinaryIO:
        """Return a readable stream of the data decompressed from ``src``."""
        ...


class _NonClosingWriter(io.RawIOBase):
    """Passes writes through to ``dst`` and leaves it open on close."""

    def __init__(self, dst: BinaryIO) -> None:
        super().__init__()
        self._dst = dst

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        self._dst.write(data)
        return memoryview(data).nbytes


class NoneCodec:
    """No compression: the identity codec, so a pipeline never needs a special case."""

    name = "none"
    file_suffix = ""

    def open_compress(
        self, dst: BinaryIO, *, level: int | None = None, threads: int | None = None
    ) -> BinaryIO:
        return _NonClosingWriter(dst)  # type: ignore[return-value]

    def open_decompress(self, src: BinaryIO) -> BinaryIO:
        return src
