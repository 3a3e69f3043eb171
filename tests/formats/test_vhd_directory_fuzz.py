"""Damaged VhdDirectory files: opening and reading raise FormatError, nothing else."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import require_module
from xobackup_core.errors import FormatError
from xobackup_core.formats.vhd_directory import (
    new_vhd_metadata,
    open_remote_disk,
    write_vhd_directory,
)

PARTS = ["footer", "header", "bat", "blocks/0/0", "blocks/0/1", "chunk-filters.json"]


@pytest.mark.slow
@pytest.mark.parametrize("compression", ["brotli", "gzip", None])
def test_damaged_parts_raise_only_format_error(tmp_path_factory, compression):
    require_module("brotli")
    from xobackup_remote_local.remote import LocalRemote

    remote = LocalRemote(tmp_path_factory.mktemp("remote"))
    footer, header, _ = new_vhd_metadata(2 * 2 * 1024 * 1024)
    rng = random.Random(5)
    blocks = [(0, rng.randbytes(4096) * 512), (1, bytes(2 * 1024 * 1024))]
    write_vhd_directory(remote, "/disk.vhd", footer, header, blocks, compression=compression)
    pristine = {part: remote.read_bytes(f"/disk.vhd/{part}") for part in PARTS[:5]}

    @settings(
        max_examples=300,
        deadline=2000,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        database=None,
    )
    @given(
        part=st.sampled_from(PARTS),
        flips=st.lists(st.tuples(st.integers(0, 4096), st.integers(0, 255)), max_size=4),
        cut=st.none() | st.integers(0, 4096),
        replacement=st.none() | st.binary(max_size=64),
    )
    def check(part, flips, cut, replacement):
        original = pristine.get(part, b'["%s"]' % (compression or "none").encode())
        data = bytearray(original if replacement is None else replacement)
        for position, value in flips:
            if data:
                data[position % len(data)] = value
        if cut is not None:
            del data[cut:]
        remote.write_bytes(f"/disk.vhd/{part}", bytes(data))
        try:
            disk = open_remote_disk(remote, "/disk.vhd")
            for index in range(disk.block_count):
                disk.read_block(index)
                disk.read_block_bitmap(index)
        except FormatError:
            pass
        finally:
            if part in pristine:
                remote.write_bytes(f"/disk.vhd/{part}", pristine[part])
            elif compression:
                remote.write_bytes(f"/disk.vhd/{part}", original)
            else:
                remote.delete(f"/disk.vhd/{part}", missing_ok=True)

    check()
