"""VhdDirectory: layout, round trips per codec, mixed chains, qemu-img interop, merges."""

from __future__ import annotations

import gzip
import json
import os
import random
import subprocess
import uuid as uuidlib

import pytest

from tests.conftest import require_module, require_tool
from xobackup_core.errors import FormatError
from xobackup_core.formats.vhd_chain import open_vhd_chain
from xobackup_core.formats.vhd_directory import (
    VhdDirectory,
    block_path,
    copy_disk_to_directory,
    merge_vhd_directory_chain,
    new_vhd_metadata,
    open_remote_disk,
    remote_disk_opener,
    resolve_alias,
    resume_directory_merges,
    vhd_file_stream,
    write_vhd_directory_backup,
)
from xobackup_core.formats.vhd_structs import full_bitmap, parse_footer, parse_header
from xobackup_core.formats.vhd_writer import ParentLink, write_vhd_stream
from xobackup_core.remote import Remote

BLOCK = 2 * 1024 * 1024
VDI = "/xo-vm-backups/vm/vdis/job/vdi"


@pytest.fixture
def remote(tmp_path) -> Remote:
    from xobackup_remote_local.remote import LocalRemote

    return LocalRemote(tmp_path / "remote")


def _pattern(seed: int, length: int = BLOCK) -> bytes:
    """Block content that is neither zero nor trivially compressible, yet cheap to make."""
    rng = random.Random(seed)
    return rng.randbytes(4096) * (length // 4096) + rng.randbytes(length % 4096)


def _read_all(remote: Remote, path: str) -> bytes:
    with open_vhd_chain(path, remote_disk_opener(remote)) as chain:
        return chain.read_at(0, chain.size)


def _write_disk(
    remote: Remote,
    date: str,
    size: int,
    blocks: dict[int, bytes],
    *,
    parent: VhdDirectory | None = None,
    parent_alias: str | None = None,
    compression: str | None = "brotli",
) -> str:
    link = None
    if parent is not None:
        assert parent_alias is not None
        link = ParentLink(parent.uuid, os.path.basename(parent_alias), parent.footer.timestamp)
    footer, header, locators = new_vhd_metadata(size, parent=link)
    return write_vhd_directory_backup(
        remote,
        VDI,
        date,
        footer,
        header,
        sorted(blocks.items()),
        compression=compression,
        parent_locators=locators,
    )


def _apply(image: bytearray, blocks: dict[int, bytes]) -> None:
    for index, data in blocks.items():
        image[index * BLOCK : index * BLOCK + len(data)] = data


# -- layout and round trips --------------------------------------------------------------------
@pytest.mark.parametrize("compression", ["brotli", "gzip", None])
def test_written_directory_reads_back_bit_exact(remote, compression):
    brotli = require_module("brotli")
    size = 5 * BLOCK + 3 * 512
    blocks = {0: _pattern(1), 2: bytes(BLOCK), 5: _pattern(3, 3 * 512)}
    alias = _write_disk(remote, "20260801T040000Z", size, blocks, compression=compression)
    data_dir = f"{VDI}/data/20260801T040000Z.vhd"
    assert alias == f"{VDI}/20260801T040000Z.alias.vhd"
    assert remote.read_bytes(alias) == b"data/20260801T040000Z.vhd"
    assert resolve_alias(remote, alias) == data_dir

    names = sorted(p.removeprefix(data_dir + "/") for p in remote.walk(data_dir))
    expected_names = ["bat", "blocks/0/0", "blocks/0/2", "blocks/0/5", "footer", "header"]
    if compression:
        expected_names.append("chunk-filters.json")
        assert json.loads(remote.read_bytes(f"{data_dir}/chunk-filters.json")) == [compression]
    assert names == sorted(expected_names)

    # Decode the stored chunks with the codecs' own libraries, not our reader.
    def decode(name: str) -> bytes:
        raw = remote.read_bytes(f"{data_dir}/{name}")
        if compression == "brotli":
            return brotli.decompress(raw)
        if compression == "gzip":
            return gzip.decompress(raw)
        return raw

    assert decode("bat") == bytes([0b10100100])
    assert decode("blocks/0/0") == full_bitmap(BLOCK) + blocks[0]
    assert decode("blocks/0/5") == full_bitmap(BLOCK) + blocks[5] + bytes(BLOCK - 3 * 512)
    assert parse_footer(decode("footer")).current_size == size
    assert parse_header(decode("header")).max_table_entries == 6

    image = bytearray(size)
    _apply(image, blocks)
    assert _read_all(remote, alias) == bytes(image)
    disk = open_remote_disk(remote, alias)
    assert list(disk.allocated_blocks()) == [0, 2, 5]
    assert disk.compression == compression


def test_block_files_are_spread_over_folders_of_1000(remote):
    assert block_path(0) == "blocks/0/0"
    assert block_path(999) == "blocks/0/999"
    assert block_path(1001) == "blocks/1/1"
    size = 1010 * BLOCK
    alias = _write_disk(remote, "20260801T040000Z", size, {1001: _pattern(9)})
    disk = open_remote_disk(remote, alias)
    assert remote.exists(f"{VDI}/data/20260801T040000Z.vhd/blocks/1/1")
    assert list(disk.allocated_blocks()) == [1001]
    assert bytes(disk.read_block(1001).data) == _pattern(9)


def test_write_failure_leaves_nothing_behind(remote):
    footer, header, _ = new_vhd_metadata(4 * BLOCK)

    def blocks():
        yield 0, _pattern(1)
        yield 1, _pattern(2)
        raise OSError("source disk went away")

    with pytest.raises(OSError, match="went away"):
        write_vhd_directory_backup(remote, VDI, "20260801T040000Z", footer, header, blocks())
    assert list(remote.walk("/")) == []


def test_damaged_directories_raise_format_error(remote):
    brotli = require_module("brotli")
    alias = _write_disk(remote, "20260801T040000Z", 2 * BLOCK, {0: _pattern(1), 1: _pattern(2)})
    data_dir = resolve_alias(remote, alias)
    remote.write_bytes(f"{data_dir}/blocks/0/1", b"not brotli at all")
    disk = open_remote_disk(remote, alias)
    with pytest.raises(FormatError, match="blocks/0/1: corrupt brotli chunk"):
        disk.read_block(1)
    remote.delete(f"{data_dir}/blocks/0/0")
    with pytest.raises(FormatError, match=r"bat\[0\]: block is marked present"):
        disk.read_block(0)
    footer = brotli.decompress(remote.read_bytes(f"{data_dir}/footer"))
    remote.write_bytes(f"{data_dir}/footer", brotli.compress(footer[:-1] + b"\x01"))
    with pytest.raises(FormatError, match=r"footer\.checksum"):
        open_remote_disk(remote, alias)
    remote.delete(f"{data_dir}/footer")
    with pytest.raises(FormatError, match="footer: missing"):
        open_remote_disk(remote, alias)
    remote.write_bytes(f"{data_dir}/chunk-filters.json", b'["lz4"]')
    with pytest.raises(FormatError, match="unsupported chunk codec"):
        open_remote_disk(remote, alias)
    remote.write_bytes(f"{VDI}/loop.alias.vhd", b"other.alias.vhd")
    with pytest.raises(FormatError, match="another alias"):
        resolve_alias(remote, f"{VDI}/loop.alias.vhd")


# -- chains mixing files and directories, and qemu-img ------------------------------------------
def test_chain_mixing_vhd_files_and_directories(remote):
    size = 4 * BLOCK
    base_blocks = {0: _pattern(10), 1: _pattern(11), 3: _pattern(13)}
    base_uuid = uuidlib.uuid4()
    with remote.open_write(f"{VDI}/20260801T040000Z.vhd") as writer:
        write_vhd_stream(
            writer.write, size, sorted(base_blocks.items()), sorted(base_blocks), uuid=base_uuid
        )
    base = open_remote_disk(remote, f"{VDI}/20260801T040000Z.vhd")
    # A directory delta whose parent is a VHD file...
    link = ParentLink(base.uuid, "20260801T040000Z.vhd")
    footer, header, locators = new_vhd_metadata(size, parent=link)
    delta = {1: _pattern(21)}
    middle = write_vhd_directory_backup(
        remote, VDI, "20260802T040000Z", footer, header, delta.items(), parent_locators=locators
    )
    middle_disk = open_remote_disk(remote, middle)
    # ... and a VHD-file delta whose parent is the directory's alias.
    top = {3: _pattern(33), 2: _pattern(32)}
    with remote.open_write(f"{VDI}/20260803T040000Z.vhd") as writer:
        write_vhd_stream(
            writer.write,
            size,
            sorted(top.items()),
            sorted(top),
            parent=ParentLink(middle_disk.uuid, "20260802T040000Z.alias.vhd"),
        )
    image = bytearray(size)
    for layer in (base_blocks, delta, top):
        _apply(image, layer)
    assert _read_all(remote, f"{VDI}/20260803T040000Z.vhd") == bytes(image)
    with open_vhd_chain(f"{VDI}/20260803T040000Z.vhd", remote_disk_opener(remote)) as chain:
        assert [type(d).__name__ for d in chain.disks] == ["VhdFile", "VhdDirectory", "VhdFile"]


@pytest.mark.parametrize("compression", ["brotli", None])
def test_directory_converted_to_a_vhd_file_reads_in_qemu(remote, tmp_path, compression):
    qemu_img = require_tool("qemu-img")
    size = 3 * BLOCK + 512 * 7
    blocks = {0: _pattern(40), 3: _pattern(43, 512 * 7)}
    alias = _write_disk(remote, "20260801T040000Z", size, blocks, compression=compression)
    vhd = tmp_path / "disk.vhd"
    with open(vhd, "wb") as out:
        for piece in vhd_file_stream(open_remote_disk(remote, alias)):
            out.write(piece)
    raw = tmp_path / "disk.raw"
    # The footer's creator is "tap", for which qemu takes the size from `current size` (§6.8).
    subprocess.run(
        [qemu_img, "convert", "-f", "vpc", "-O", "raw", str(vhd), str(raw)],
        check=True,
        capture_output=True,
    )
    image = bytearray(size)
    _apply(image, blocks)
    assert raw.read_bytes() == bytes(image)
    # And back: the VHD file stored as a directory again reads the same.
    from xobackup_core.formats.source import LocalFileSource
    from xobackup_core.formats.vhd import VhdFile

    with VhdFile.open(LocalFileSource(vhd)) as disk:
        copy_disk_to_directory(disk, remote, "/copy.vhd", compression="gzip")
    assert _read_all(remote, "/copy.vhd") == bytes(image)


# -- merges ------------------------------------------------------------------------------------
class CountingRemote(Remote):
    """Counts the bytes written through it (a move must write none of the block data)."""

    def __init__(self, inner: Remote) -> None:
        self.inner = inner
        self.name = inner.name
        self.bytes_written = 0
        self.renames = 0

    def open_write(self, path):
        writer = self.inner.open_write(path)
        original = writer._write

        def counted(data):
            self.bytes_written += len(data)
            return original(data)

        writer._write = counted
        return writer

    def open_read(self, path, offset=0, length=None):
        return self.inner.open_read(path, offset, length)

    def read_range(self, path, offset, length):
        return self.inner.read_range(path, offset, length)

    def list(self, path="/"):
        return self.inner.list(path)

    def stat(self, path):
        return self.inner.stat(path)

    def rename(self, source, target):
        self.renames += 1
        self.inner.rename(source, target)

    def delete(self, path, *, missing_ok=False):
        self.inner.delete(path, missing_ok=missing_ok)

    def delete_tree(self, path):
        self.inner.delete_tree(path)

    def makedirs(self, path):
        self.inner.makedirs(path)


def _three_disk_chain(remote: Remote, *, child_compression: str = "brotli", size=None):
    size = size or 6 * BLOCK
    base = {0: _pattern(100), 1: _pattern(101), 2: _pattern(102), 4: _pattern(104)}
    first = {1: _pattern(201), 3: _pattern(203), 5: _pattern(205)}
    second = {1: _pattern(301), 4: _pattern(304)}
    a = _write_disk(remote, "20260801T040000Z", 6 * BLOCK, base)
    b = _write_disk(
        remote,
        "20260802T040000Z",
        size,
        first,
        parent=open_remote_disk(remote, a),
        parent_alias=a,
        compression=child_compression,
    )
    c = _write_disk(
        remote,
        "20260803T040000Z",
        size,
        second,
        parent=open_remote_disk(remote, b),
        parent_alias=b,
        compression=child_compression,
    )
    return [a, b, c]


def test_merge_moves_block_files_instead_of_copying(remote):
    chain = _three_disk_chain(remote)
    expected = _read_all(remote, chain[-1])
    leaf_uuid = open_remote_disk(remote, chain[-1]).uuid
    root = remote.real_path("/")
    inode = {}
    for alias in chain[1:]:
        data_dir = resolve_alias(remote, alias)
        for path in remote.walk(f"{data_dir}/blocks"):
            inode[(alias, path.rsplit("blocks/", 1)[1])] = os.stat(root + path).st_ino
    parent_data = resolve_alias(remote, chain[0])
    counting = CountingRemote(remote)

    result = merge_vhd_directory_chain(counting, chain)

    assert result.path == chain[-1]
    assert _read_all(remote, chain[-1]) == expected
    merged = open_remote_disk(remote, chain[-1])
    assert merged.uuid == leaf_uuid and not merged.is_differencing
    assert resolve_alias(remote, chain[-1]) == parent_data
    # The newest version of each child block is the very file the child had: same inode.
    moved = {"0/1": chain[2], "0/4": chain[2], "0/3": chain[1], "0/5": chain[1]}
    for name, alias in moved.items():
        assert os.stat(root + f"{parent_data}/blocks/{name}").st_ino == inode[(alias, name)]
    # Only metadata was written: bat, header, footer, state; no 2 MiB block.
    assert counting.bytes_written < 64 * 1024
    assert counting.renames == len(moved) + 1  # blocks + the alias
    # Children are gone, and so is the merge state.
    assert sorted(remote.list(VDI)) == ["20260803T040000Z.alias.vhd", "data"]
    assert remote.list(f"{VDI}/data") == ["20260801T040000Z.vhd"]


def test_merge_across_compressions_copies_and_grows(remote):
    chain = _three_disk_chain(remote, child_compression="gzip", size=8 * BLOCK)
    expected = _read_all(remote, chain[-1])
    assert len(expected) == 8 * BLOCK
    merge_vhd_directory_chain(remote, chain)
    assert _read_all(remote, chain[-1]) == expected
    merged = open_remote_disk(remote, chain[-1])
    assert merged.size == 8 * BLOCK and merged.compression == "brotli"


def test_merge_composes_partial_blocks(remote):
    base_blocks = {0: _pattern(1)}
    a = _write_disk(remote, "20260801T040000Z", 2 * BLOCK, base_blocks)
    parent = open_remote_disk(remote, a)
    footer, header, locators = new_vhd_metadata(
        2 * BLOCK, parent=ParentLink(parent.uuid, os.path.basename(a))
    )
    bitmap = bytearray(512)
    bitmap[0] = 0b01000000  # sector 1 only
    bitmap[10] = 0xFF  # sectors 80..87
    child_data = _pattern(2)
    b = write_vhd_directory_backup(
        remote,
        VDI,
        "20260802T040000Z",
        footer,
        header,
        [(0, bytes(bitmap), child_data), (1, full_bitmap(BLOCK), _pattern(3))],
        parent_locators=locators,
    )
    expected = bytearray(base_blocks[0] + _pattern(3))
    expected[512:1024] = child_data[512:1024]
    expected[80 * 512 : 88 * 512] = child_data[80 * 512 : 88 * 512]
    assert _read_all(remote, b) == bytes(expected)
    merge_vhd_directory_chain(remote, [a, b])
    assert _read_all(remote, b) == bytes(expected)


def test_merge_state_of_missing_disks_is_dropped(remote):
    chain = _three_disk_chain(remote)
    state = f"{VDI}/.20260801T040000Z.alias.vhd.merge.json"
    remote.write_bytes(
        state,
        json.dumps(
            {
                "chain": ["20260801T040000Z.alias.vhd", "gone.alias.vhd"],
                "step": "mergeBlocks",
                "currentBlock": 0,
            }
        ).encode(),
    )
    with pytest.raises(FormatError, match="no longer exist"):
        resume_directory_merges(remote, VDI)
    assert not remote.exists(state)
    assert _read_all(remote, chain[-1])  # the chain itself is untouched


KILL_SCRIPT = r"""
import os, signal, sys
from xobackup_remote_local.remote import LocalRemote
from xobackup_core.formats.vhd_directory import merge_vhd_directory_chain

root, kill_at, chain = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
inner = LocalRemote(root)
count = 0

def counted(method):
    def wrapper(*args, **kwargs):
        global count
        count += 1
        if count == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return method(*args, **kwargs)
    return wrapper

for name in ("write_bytes", "rename", "delete", "delete_tree"):
    setattr(inner, name, counted(getattr(inner, name)))
merge_vhd_directory_chain(inner, chain, state_interval=0)
print(count)
"""


def test_merge_killed_at_random_points_resumes_to_the_same_result(remote, tmp_path):
    import shutil

    from xobackup_remote_local.remote import LocalRemote

    chain = _three_disk_chain(remote)
    expected = _read_all(remote, chain[-1])
    template = remote.real_path("/")
    env = {**os.environ, "PYTHONPATH": os.getcwd()}

    def run(root: str, kill_at: int, delay: float | None = None) -> subprocess.CompletedProcess:
        command = ["python", "-c", KILL_SCRIPT, root, str(kill_at), *chain]
        if delay is None:
            return subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
        try:
            process.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            process.kill()  # SIGKILL
        process.wait()
        return subprocess.CompletedProcess(command, process.returncode, "", "")

    dry_root = str(tmp_path / "dry")
    shutil.copytree(template, dry_root)
    dry = run(dry_root, 0)
    assert dry.returncode == 0, dry.stderr
    total = int(dry.stdout.strip())
    assert total > 8
    rng = random.Random(1234)
    trials = [(n, None) for n in rng.sample(range(1, total + 1), min(total, 20))]
    trials += [(0, rng.uniform(0.05, 1.0)) for _ in range(4)]
    killed = 0
    for trial, (kill_at, delay) in enumerate(trials):
        root = str(tmp_path / f"trial{trial}")
        shutil.copytree(template, root)
        outcome = run(root, kill_at, delay)
        killed += outcome.returncode == -9
        trial_remote = LocalRemote(root)
        if trial % 2 and remote_has_state(trial_remote):
            # The way a cleanup pass finds interrupted merges: by their state files.
            assert resume_directory_merges(trial_remote, VDI) == [chain[-1]]
        elif remote_has_state(trial_remote) or (
            # a kill on a timer may land after the merge finished: nothing left to do then
            outcome.returncode != 0 and trial_remote.exists(chain[0])
        ):
            merge_vhd_directory_chain(trial_remote, chain)
        assert _read_all(trial_remote, chain[-1]) == expected, f"kill at op {kill_at}"
        assert sorted(trial_remote.list(VDI)) == ["20260803T040000Z.alias.vhd", "data"]
        assert trial_remote.list(f"{VDI}/data") == ["20260801T040000Z.vhd"]
    assert killed >= 20


def remote_has_state(remote: Remote) -> bool:
    return any(name.endswith(".merge.json") for name in remote.list(VDI))


def test_merge_chain_dispatches_vhd_files_to_the_file_merge(remote):
    from xobackup_core.formats.vhd_directory import merge_chain

    size = 3 * BLOCK
    base_uuid = uuidlib.uuid4()
    with remote.open_write(f"{VDI}/a.vhd") as writer:
        write_vhd_stream(
            writer.write, size, [(0, _pattern(1)), (2, _pattern(2))], [0, 2], uuid=base_uuid
        )
    with remote.open_write(f"{VDI}/b.vhd") as writer:
        write_vhd_stream(
            writer.write, size, [(2, _pattern(3))], [2], parent=ParentLink(base_uuid, "a.vhd")
        )
    expected = _read_all(remote, f"{VDI}/b.vhd")
    result = merge_chain(remote, [f"{VDI}/a.vhd", f"{VDI}/b.vhd"], concurrency=2)
    assert result.path == f"{VDI}/b.vhd"
    assert _read_all(remote, f"{VDI}/b.vhd") == expected
    assert remote.list(VDI) == ["b.vhd"]
