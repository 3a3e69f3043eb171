"""Generated corrupt VHDs: always a FormatError (or a correct read), never a hang or a blow-up.

Tiny templates (4 KiB blocks) are damaged by random byte writes, field overwrites with extreme
values, BAT entries pointing anywhere, truncation and parent loops, with the checksums
optionally recomputed so the damage reaches the deeper checks.
"""

from __future__ import annotations

import itertools
import struct
import tracemalloc
import uuid

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from xobackup_core.errors import FormatError
from xobackup_core.formats.vhd import VhdFile, verify_vhd_file
from xobackup_core.formats.vhd_chain import open_vhd_chain
from xobackup_core.formats.vhd_structs import checksum
from xobackup_core.formats.vhd_writer import ParentLink, plan_vhd_stream, vhd_stream

BLOCK = 4096
SIZE = 6 * BLOCK
MEMORY_LIMIT = 64 * 1024 * 1024


class BytesSource:
    """An in-memory RandomAccessSource (fast enough for 10,000 cases)."""

    def __init__(self, name: str, data: bytes) -> None:
        self.name = name
        self.data = data

    def size(self) -> int:
        return len(self.data)

    def read_at(self, offset: int, length: int) -> bytes:
        return self.data[offset : offset + length]

    def close(self) -> None:
        pass


def _vhd(allocated: list[int], parent: ParentLink | None = None) -> tuple[bytes, uuid.UUID]:
    layout = plan_vhd_stream(SIZE, allocated, parent=parent, block_size=BLOCK)
    blocks = [(index, bytes([index + 1]) * BLOCK) for index in allocated]
    return b"".join(bytes(chunk) for chunk in vhd_stream(layout, blocks)), layout.footer.uuid


PARENT, PARENT_UUID = _vhd([0, 2, 5])
CHILD, CHILD_UUID = _vhd([1, 2], ParentLink(PARENT_UUID, "parent.vhd"))


def _fixed_template() -> bytes:
    footer = bytearray(PARENT[:512])
    footer[16:24] = b"\xff" * 8
    footer[60:64] = struct.pack(">I", 2)
    footer[64:68] = struct.pack(">I", checksum(footer, 64))
    return bytes(range(256)) * (SIZE // 256) + bytes(footer)


FIXED = _fixed_template()

FIELDS = [
    # (offset, width) of interesting fields: footer copy, header, BAT, trailing footer (-512)
    (16, 8),
    (40, 8),
    (48, 8),
    (60, 4),
    (512 + 8, 8),
    (512 + 16, 8),
    (512 + 28, 4),
    (512 + 32, 4),
    (512 + 40, 16),
    (512 + 64, 32),
    (512 + 576, 24),
    (1536, 4),
    (1540, 4),
    (1544, 4),
    (-512 + 16, 8),
    (-512 + 48, 8),
    (-512 + 60, 4),
]
EXTREMES = [0, 1, 2, 3, 4, 511, 512, 1536, 0x7FFFFFFF, 0xFFFFFFFF, 1 << 40, (1 << 64) - 1]

mutation = st.one_of(
    st.tuples(st.just("byte"), st.integers(0, 1 << 16), st.integers(0, 255)),
    st.tuples(
        st.just("field"),
        st.sampled_from(FIELDS),
        st.one_of(st.sampled_from(EXTREMES), st.integers(0, (1 << 64) - 1)),
    ),
    st.tuples(st.just("truncate"), st.integers(0, 1 << 16), st.just(0)),
    st.tuples(st.just("loop"), st.just(0), st.just(0)),
)


def _fix_checksums(data: bytearray) -> None:
    for start, size, at in ((0, 512, 64), (512, 1024, 36), (len(data) - 512, 512, 64)):
        if 0 <= start and start + size <= len(data):
            part = data[start : start + size]
            data[start + at : start + at + 4] = struct.pack(">I", checksum(part, at))


def _mutate(template: bytes, mutations: list, fix: bool) -> bytes:
    data = bytearray(template)
    for kind, where, value in mutations:
        if not data:
            break
        if kind == "byte":
            data[where % len(data)] = value
        elif kind == "field":
            offset, width = where
            offset = offset % len(data) if offset >= 0 else len(data) + offset
            if offset < 0:
                continue
            raw = (value % (1 << (8 * width))).to_bytes(width, "big")
            data[offset : offset + width] = raw[: max(0, len(data) - offset)]
        elif kind == "truncate":
            del data[where % (len(data) + 1) :]
        elif kind == "loop" and len(data) >= 1536:
            # A child that names itself as its parent, with its own uuid.
            data[60:64] = struct.pack(">I", 4)
            data[512 + 40 : 512 + 56] = CHILD_UUID.bytes
            data[512 + 64 : 512 + 576] = "child.vhd".encode("utf-16-be").ljust(512, b"\0")
            data[-512:] = data[:512]
    if fix:
        _fix_checksums(data)
    return bytes(data)


def _exercise(files: dict[str, bytes]) -> None:
    def open_disk(path: str) -> VhdFile:
        name = path.rsplit("/", 1)[-1]
        if name not in files:
            raise FileNotFoundError(path)
        return VhdFile.open(BytesSource(name, files[name]))

    with open_vhd_chain("child.vhd", open_disk) as chain:
        for disk in chain.disks:
            verify_vhd_file(disk)  # type: ignore[arg-type]
        for index in itertools.islice(chain.allocated_blocks(), 8):
            assert len(chain.read_block(index)) == chain.block_size
        chain.read_at(max(0, chain.size - 5000), 10000)


@pytest.mark.slow
@settings(
    max_examples=10000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)
@given(
    template=st.sampled_from(["child", "parent", "fixed"]),
    mutations=st.lists(mutation, min_size=1, max_size=4),
    fix=st.booleans(),
    damage_parent=st.booleans(),
)
def test_corrupt_vhds_raise_format_error(
    template: str, mutations: list, fix: bool, damage_parent: bool
) -> None:
    source = {"child": CHILD, "parent": PARENT, "fixed": FIXED}[template]
    files = {"child.vhd": _mutate(source, mutations, fix), "parent.vhd": PARENT}
    if damage_parent and template == "child":
        files["parent.vhd"] = _mutate(PARENT, mutations[::-1], fix)
    tracemalloc.start()
    try:
        _exercise(files)
        event("read fine")
    except FormatError as error:
        event(f"FormatError {error.field}")
        assert "child.vhd" in str(error) or "parent.vhd" in str(error)
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < MEMORY_LIMIT


def test_templates_are_valid() -> None:
    """The undamaged templates read correctly, so the fuzz damage is what fails."""
    _exercise({"child.vhd": CHILD, "parent.vhd": PARENT})
    with open_vhd_chain(
        "child.vhd", lambda p: VhdFile.open(BytesSource(p, {"child.vhd": CHILD}.get(p, PARENT)))
    ) as chain:
        assert (
            chain.read_at(0, 3 * BLOCK)
            == bytes([1]) * BLOCK + bytes([2]) * BLOCK + bytes([3]) * BLOCK
        )
    with pytest.raises(FormatError, match="parent loop"):
        _exercise({"child.vhd": _mutate(CHILD, [("loop", 0, 0)], True)})
    fixed = VhdFile.open(BytesSource("fixed.vhd", FIXED))
    assert fixed.read_block(0).data[:SIZE] == FIXED[:SIZE]
