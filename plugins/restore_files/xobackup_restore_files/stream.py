"""A backup disk chain as a seekable, read-only file object, for the partition and filesystem
parsers.

The parsers read in small pieces (a superblock, an inode, a directory block) and often go back
to the same places, while :class:`~xobackup_core.formats.vhd_chain.VhdChain` reads whole blocks
(2 MiB) from the remote. A small LRU cache of composed blocks sits between them, so browsing
costs a handful of range reads and streaming a file costs one read per block. Memory is bounded
by the cache: ``cache_blocks`` × block size, plus ``READ_AHEAD`` blocks.

When blocks are read in order (a file being copied out), the next ones are fetched in a
background thread while the current one is used, so the remote's latency overlaps the parsing
and writing (the core reads VHD blocks ahead the same way).
"""

from __future__ import annotations

import io
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

DEFAULT_CACHE_BLOCKS = 16
"""32 MiB with 2 MiB blocks: room for a filesystem's metadata plus a file being streamed."""
READ_AHEAD = 2
READ_AHEAD_WORKERS = 1
"""Blocks fetched ahead once reads are sequential."""


class BlockDevice(Protocol):
    """What the stream reads: a virtual disk made of equal blocks (a VhdChain fits)."""

    size: int
    block_size: int

    def read_block(self, index: int) -> bytes | memoryview:
        """The ``block_size`` bytes of block ``index``."""


class DiskStream(io.RawIOBase):
    """``read``/``seek``/``tell`` over a :class:`BlockDevice`, with a per-block LRU cache."""

    def __init__(self, device: BlockDevice, *, cache_blocks: int = DEFAULT_CACHE_BLOCKS) -> None:
        super().__init__()
        self.device = device
        self.size = device.size
        self.block_size = device.block_size
        self._position = 0
        self._cache: OrderedDict[int, bytes | memoryview] = OrderedDict()
        self._cache_blocks = max(cache_blocks, 1)
        self._block_count = -(-self.size // self.block_size)
        self._last_miss = -2
        self._pending: dict[int, Future[bytes | memoryview]] = {}
        self._pool: ThreadPoolExecutor | None = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            position = offset
        elif whence == io.SEEK_CUR:
            position = self._position + offset
        elif whence == io.SEEK_END:
            position = self.size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if position < 0:
            raise ValueError("negative seek position")
        self._position = position
        return position

    def _block(self, index: int) -> bytes | memoryview:
        cached = self._cache.get(index)
        if cached is not None:
            self._cache.move_to_end(index)
            return cached
        # Kept as the device returns it (often a memoryview): only the slices asked for are
        # copied, never the whole block.
        pending = self._pending.pop(index, None)
        block = pending.result() if pending is not None else self.device.read_block(index)
        if index == self._last_miss + 1:
            self._read_ahead(index)
        self._last_miss = index
        self._cache[index] = block
        if len(self._cache) > self._cache_blocks:
            self._cache.popitem(last=False)
        return block

    def _read_ahead(self, index: int) -> None:
        for stale in [i for i in self._pending if i < index]:
            self._pending.pop(stale).cancel()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(
                max_workers=READ_AHEAD_WORKERS, thread_name_prefix="flr-read-ahead"
            )
        for ahead in range(index + 1, min(index + 1 + READ_AHEAD, self._block_count)):
            if ahead not in self._pending and ahead not in self._cache:
                self._pending[ahead] = self._pool.submit(self.device.read_block, ahead)

    def close(self) -> None:
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        super().close()

    def read_at(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes from ``offset`` (fewer only at the end of the disk)."""
        end = min(offset + length, self.size)
        if offset >= end:
            return b""
        first, within = divmod(offset, self.block_size)
        if within + (end - offset) <= self.block_size:
            # The common case for metadata reads: one block, one slice.
            return bytes(self._block(first)[within : within + end - offset])
        parts = []
        while offset < end:
            index, within = divmod(offset, self.block_size)
            take = min(self.block_size - within, end - offset)
            parts.append(memoryview(self._block(index))[within : within + take])
            offset += take
        return b"".join(parts)

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            size = max(self.size - self._position, 0)
        data = self.read_at(self._position, size)
        self._position += len(data)
        return data

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)
