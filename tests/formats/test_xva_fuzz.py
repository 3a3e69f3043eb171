"""Generated damage to XVA streams: only FormatError, never another exception, never a hang."""

from __future__ import annotations

import gzip
import io

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import require_module
from xobackup_core.errors import FormatError
from xobackup_core.formats.xva import DiskSpec, XvaReader, build_vm_metadata, write_xva


def _sample() -> bytes:
    require_module("xxhash")
    first = bytes(range(256)) * 8 + bytes(1000)
    second = b"\x00" * 700 + b"\x01"
    meta = build_vm_metadata({"uuid": "v"}, [DiskSpec(len(first), "a"), DiskSpec(len(second), "b")])
    refs = [d.ref for d in meta.disks()]
    out = io.BytesIO()
    write_xva(
        out,
        meta,
        {refs[0]: (io.BytesIO(first), len(first)), refs[1]: (io.BytesIO(second), len(second))},
    )
    return out.getvalue()


SAMPLE = _sample()
SAMPLE_GZ = gzip.compress(SAMPLE, mtime=0)


def _read(blob: bytes) -> None:
    reader = XvaReader(io.BytesIO(blob))
    _ = reader.metadata
    for disk in reader.disks():
        for _ in disk.iter_data():
            pass


def _mutate(base: bytes, flips: list[tuple[int, int]], cut: int | None, insert: bytes) -> bytes:
    data = bytearray(base)
    for position, value in flips:
        data[position % len(data)] = value
    if insert:
        at = flips[0][0] % len(data) if flips else 0
        data[at:at] = insert
    if cut is not None:
        del data[cut % (len(data) + 1) :]
    return bytes(data)


mutations = st.tuples(
    st.sampled_from([SAMPLE, SAMPLE_GZ]),
    st.lists(st.tuples(st.integers(0, 2**20), st.integers(0, 255)), max_size=6),
    st.none() | st.integers(0, 2**20),
    st.binary(max_size=40),
)


@pytest.mark.slow
@settings(
    max_examples=10_000,
    deadline=2000,  # a hang shows up as a deadline failure, not a stuck suite
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)
@given(st.one_of(mutations.map(lambda m: _mutate(*m)), st.binary(max_size=3000)))
def test_damaged_xva_raises_only_format_error(blob):
    # Any other exception type (IndexError, struct.error, zlib.error...) fails the test; a
    # mutation that left the stream valid (tar padding, ignored header fields) may read fine.
    try:
        _read(blob)
    except FormatError:
        pass


def test_the_fuzz_sample_itself_is_valid():
    _read(SAMPLE)
    _read(SAMPLE_GZ)
    with pytest.raises(FormatError):
        _read(SAMPLE[:-1536])
