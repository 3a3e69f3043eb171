"""VDI content: sparse, deterministic, versioned per 2 MiB block, never held in memory.

A VDI is a map ``block index -> blob``; a missing index reads as zeros. A blob is immutable:
either a block of generated data (negative id: ``-seed``; the bytes are recomputed from the
seed when read, so a 16 GiB disk full of data costs nothing) or a 2 MiB slot of the
simulator's data file (id = offset), written by guest writes and uploads. Snapshots and
clones copy the map only, and the delta between a snapshot and its base is the set of
indexes whose blobs differ — the 2 MiB granularity of XAPI's VHD deltas (§6.5).
"""

from __future__ import annotations

import functools
import hashlib
import os
import threading
from pathlib import Path

from Crypto.Cipher import AES

BLOCK_SIZE = 2 * 1024 * 1024
"""The VHD block size: the unit of allocation, snapshots and deltas."""
ZERO_BLOCK = bytes(BLOCK_SIZE)
_HALF_OF_ZEROS = memoryview(ZERO_BLOCK)[: BLOCK_SIZE // 2]


def derive_seed(*parts: object) -> int:
    """A stable positive 62-bit seed from any printable parts (not Python's salted hash)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") >> 2) or 1


_TEXT_LINE = b"xobackup simulated guest data: half of each generated block is text\n"
_TEXT_HALF = (_TEXT_LINE * (BLOCK_SIZE // 2 // len(_TEXT_LINE) + 1))[: BLOCK_SIZE // 2]
"""The text half of every generated block (the random half makes each block unique)."""


@functools.lru_cache(maxsize=8)
def generated_block(seed: int) -> bytes:
    """The content of a generated block: half random, half text, so codecs have work to do.

    The random half is an AES-CTR keystream keyed by the seed: as unpredictable for a
    compressor as a Mersenne Twister's output, and ten times cheaper to make (the simulator
    shares the CPU with the backup it serves).
    """
    cipher = AES.new(seed.to_bytes(16, "big"), AES.MODE_CTR, nonce=b"")
    return cipher.encrypt(_HALF_OF_ZEROS) + _TEXT_HALF


class BlobStore:
    """Immutable 2 MiB blobs in one sparse file of the simulator's data folder."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "blocks.bin"
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self._next = 0
        self._lock = threading.Lock()

    def fileno(self) -> int:
        """The data file's descriptor (exports ``sendfile`` stored blocks from it)."""
        return self._fd

    def close(self) -> None:
        """Close the data file (blobs are gone with it)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def put(self, data: bytes) -> int:
        """Store one block (padded to 2 MiB); return its blob id."""
        with self._lock:
            offset = self._next
            self._next += BLOCK_SIZE
        if len(data) < BLOCK_SIZE:
            data = bytes(data) + bytes(BLOCK_SIZE - len(data))
        os.pwrite(self._fd, data, offset)
        return offset

    def get(self, blob: int) -> bytes:
        """The 2 MiB content of a blob."""
        if blob < 0:
            return generated_block(-blob)
        return os.pread(self._fd, BLOCK_SIZE, blob)


class VdiData:
    """The content of one VDI: a size and a block map (copy-on-write by construction)."""

    __slots__ = ("blocks", "lock", "size", "store")

    def __init__(self, store: BlobStore, size: int, blocks: dict[int, int] | None = None) -> None:
        self.store = store
        self.size = size
        self.blocks: dict[int, int] = dict(blocks or {})
        self.lock = threading.Lock()

    @property
    def block_count(self) -> int:
        """Number of 2 MiB blocks covering the virtual size."""
        return (self.size + BLOCK_SIZE - 1) // BLOCK_SIZE

    def copy(self) -> VdiData:
        """A snapshot/clone: shares every blob, costs one dict copy."""
        with self.lock:
            return VdiData(self.store, self.size, self.blocks)

    def read_block(self, index: int) -> bytes | None:
        """Block ``index``'s 2 MiB, or None when it was never written (zeros)."""
        blob = self.blocks.get(index)
        return None if blob is None else self.store.get(blob)

    def allocated(self) -> list[int]:
        """Indexes of allocated blocks, ascending."""
        with self.lock:
            return sorted(self.blocks)

    def changed_blocks(self, base: VdiData) -> list[int]:
        """Indexes whose content may differ from ``base`` (different blob on either side)."""
        with self.lock:  # one lock at a time: two opposite comparisons cannot deadlock
            mine = dict(self.blocks)
        with base.lock:
            theirs = dict(base.blocks)
        return sorted(i for i in mine.keys() | theirs.keys() if mine.get(i) != theirs.get(i))

    def set_block(self, index: int, data: bytes | None) -> None:
        """Replace a whole block; None or all-zero data deallocates it."""
        if data is None or data.count(0) == len(data):
            with self.lock:
                self.blocks.pop(index, None)
            return
        blob = self.store.put(data)
        with self.lock:
            self.blocks[index] = blob

    def set_generated(self, index: int, seed: int) -> None:
        """Fill a block with generated data (no storage used)."""
        with self.lock:
            self.blocks[index] = -seed

    def write(self, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset`` (read-modify-write of partial blocks)."""
        if offset < 0 or offset + len(data) > self.size:
            raise ValueError(f"write of {len(data)} bytes at {offset} is outside {self.size}")
        view = memoryview(data)
        while view:
            index, within = divmod(offset, BLOCK_SIZE)
            take = min(len(view), BLOCK_SIZE - within)
            if within == 0 and take == BLOCK_SIZE:
                self.set_block(index, bytes(view[:take]))
            else:
                block = bytearray(self.read_block(index) or ZERO_BLOCK)
                block[within : within + take] = view[:take]
                self.set_block(index, bytes(block))
            offset += take
            view = view[take:]

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` (for tests; exports stream whole blocks)."""
        out = bytearray()
        end = min(offset + length, self.size)
        while offset < end:
            index, within = divmod(offset, BLOCK_SIZE)
            take = min(end - offset, BLOCK_SIZE - within)
            block = self.read_block(index)
            out += block[within : within + take] if block else bytes(take)
            offset += take
        return bytes(out)

    def resize(self, size: int) -> None:
        """Grow or shrink the virtual size (blocks past the end are dropped)."""
        with self.lock:
            self.size = size
            limit = self.block_count
            for index in [i for i in self.blocks if i >= limit]:
                del self.blocks[index]


class VdiWriter:
    """Sequential writes into a VDI, assembled per block so each block is stored once."""

    def __init__(self, data: VdiData) -> None:
        self.data = data
        self._index = -1
        self._block: bytearray | None = None

    def write_at(self, offset: int, payload: bytes | memoryview) -> None:
        """Write ``payload`` at ``offset`` (forward-moving offsets are the cheap case)."""
        if offset < 0 or offset + len(payload) > self.data.size:
            raise ValueError(
                f"{len(payload)} bytes at offset {offset} go past the disk size {self.data.size}"
            )
        view = memoryview(payload)
        while view:
            index, within = divmod(offset, BLOCK_SIZE)
            take = min(len(view), BLOCK_SIZE - within)
            if index != self._index:
                self.flush()
                self._index = index
                if within == 0 and take == BLOCK_SIZE:
                    self.data.set_block(index, bytes(view[:take]))
                    self._index = -1
                    offset += take
                    view = view[take:]
                    continue
                self._block = bytearray(self.data.read_block(index) or ZERO_BLOCK)
            assert self._block is not None
            self._block[within : within + take] = view[:take]
            offset += take
            view = view[take:]

    def flush(self) -> None:
        """Store the block being assembled."""
        if self._block is not None and self._index >= 0:
            self.data.set_block(self._index, bytes(self._block))
        self._block = None
        self._index = -1


class VdiReader:
    """A file-like view of a VDI's content (``read`` only), served block by block."""

    def __init__(self, data: VdiData) -> None:
        self.data = data
        self.position = 0
        self._block: bytes = b""
        self._block_start = -1

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes (never crosses a block boundary)."""
        remaining = self.data.size - self.position
        if remaining <= 0:
            return b""
        if size < 0 or size > remaining:
            size = remaining
        index, within = divmod(self.position, BLOCK_SIZE)
        if self._block_start != index:
            self._block = self.data.read_block(index) or ZERO_BLOCK
            self._block_start = index
        piece = self._block[within : within + min(size, BLOCK_SIZE - within)]
        self.position += len(piece)
        return piece
