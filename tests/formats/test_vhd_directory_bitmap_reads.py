"""A compressed VhdDirectory block's bitmap is read from the start of its file only.

A merge checks the bitmap of every block it moves; on an object store, downloading the whole
compressed block for that would move as many bytes as copying the block through the client.
"""

from __future__ import annotations

import random
import uuid as uuidlib

import pytest

from tests.conftest import require_module
from xobackup_core.errors import FormatError
from xobackup_core.formats.vhd_directory import (
    VhdDirectory,
    merge_vhd_directory_chain,
    new_vhd_metadata,
    open_remote_disk,
    write_vhd_directory_backup,
)
from xobackup_core.formats.vhd_structs import full_bitmap
from xobackup_core.formats.vhd_writer import ParentLink
from xobackup_core.remote import Remote

BLOCK = 2 * 1024 * 1024
VDI = "/xo-vm-backups/vm/vdis/job/vdi"
CODECS = ["gzip", "brotli"]


class CountingReads:
    """Wraps a remote: counts the bytes every read returns (what a client would download)."""

    def __init__(self, inner: Remote) -> None:
        self.inner = inner
        self.read = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def read_bytes(self, path: str) -> bytes:
        data = self.inner.read_bytes(path)
        self.read += len(data)
        return data

    def read_range(self, path: str, offset: int, length: int) -> bytes:
        data = self.inner.read_range(path, offset, length)
        self.read += len(data)
        return data

    def open_read(self, path: str, offset: int = 0, length: int | None = None) -> object:
        raise AssertionError("bitmap reads and merges use ranged reads here")


@pytest.fixture(params=CODECS)
def compression(request) -> str:
    """Each codec of VhdDirectory blocks; brotli must be installed (a failure in CI)."""
    if request.param == "brotli":
        require_module("brotli")
    return request.param


@pytest.fixture
def remote(tmp_path) -> Remote:
    from xobackup_remote_local.remote import LocalRemote

    return LocalRemote(tmp_path / "remote")


def _write(remote: Remote, date: str, blocks: dict, compression: str, parent=None) -> str:
    footer, header, locators = new_vhd_metadata(
        16 * BLOCK, parent=parent, uuid=uuidlib.UUID(int=random.getrandbits(128), version=4)
    )
    return write_vhd_directory_backup(
        remote,
        VDI,
        date,
        footer,
        header,
        (
            (index, *value) if isinstance(value, tuple) else (index, value)
            for index, value in sorted(blocks.items())
        ),
        compression=compression,
        parent_locators=locators,
    )


def _random_block(seed: int) -> bytes:
    return random.Random(seed).randbytes(BLOCK)


def test_bitmap_comes_from_a_prefix_of_the_block_file(remote, compression) -> None:
    partial = bytearray(512)
    partial[0] = 0xF0  # the first 4 sectors only
    alias = _write(
        remote,
        "20260101T000000Z",
        {1: (full_bitmap(BLOCK), _random_block(1)), 3: (bytes(partial), _random_block(3))},
        compression,
    )
    disk = open_remote_disk(remote, alias)
    assert isinstance(disk, VhdDirectory)
    stored = remote.stat(disk.block_file(1)).size
    assert stored > BLOCK  # random data: the compressed file is as big as the block
    counting = CountingReads(remote)
    disk.remote = counting
    assert disk.read_block_bitmap(1) == full_bitmap(BLOCK)
    assert disk.read_block_bitmap(3) == bytes(partial)
    assert disk.read_block_bitmap(2) == bytes(512)  # not allocated: nothing read
    # Two bitmaps out of two ~2 MiB files: a few KiB read, not the files.
    assert 0 < counting.read <= 2 * 4096
    assert disk.read_block(3).bitmap == bytes(partial)  # the full read agrees


def test_bitmap_of_a_short_or_missing_block_file_is_an_error(remote, compression) -> None:
    alias = _write(
        remote, "20260101T000000Z", {0: _random_block(0), 1: _random_block(1)}, compression
    )
    disk = open_remote_disk(remote, alias)
    assert isinstance(disk, VhdDirectory)
    remote.write_bytes(disk.block_file(0), remote.read_range(disk.block_file(0), 0, 8))
    with pytest.raises(FormatError, match=r"shorter than its bitmap|corrupt"):
        disk.read_block_bitmap(0)
    remote.delete(disk.block_file(1))
    with pytest.raises(FormatError, match="missing"):
        disk.read_block_bitmap(1)


def test_merge_moves_whole_blocks_without_downloading_them(remote, compression) -> None:
    base = _write(
        remote, "20260101T000000Z", {0: _random_block(10), 5: _random_block(15)}, compression
    )
    chain, parent_disk = [base], open_remote_disk(remote, base)
    expected = {0: _random_block(10), 5: _random_block(15)}
    for step, indices in enumerate([(0, 2), (2, 7), (7, 9)], 1):
        link = ParentLink(
            parent_disk.uuid, chain[-1].rsplit("/", 1)[1], parent_disk.footer.timestamp
        )
        blocks = {index: _random_block(step * 100 + index) for index in indices}
        expected.update(blocks)
        chain.append(_write(remote, f"2026010{step + 1}T000000Z", blocks, compression, link))
        parent_disk = open_remote_disk(remote, chain[-1])
    counting = CountingReads(remote)
    result = merge_vhd_directory_chain(counting, chain)
    # 4 distinct blocks (8 MiB) moved by rename; reads: metadata and bitmap prefixes only.
    assert result.merged_blocks == 4
    assert counting.read < 64 * 1024
    merged = open_remote_disk(remote, result.path)
    assert sorted(merged.allocated_blocks()) == sorted(expected)
    for index, data in expected.items():
        assert bytes(merged.read_block(index).data) == data
