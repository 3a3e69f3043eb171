"""Merging VHD deltas into their parent: same virtual disk, resumable after kill -9."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import require_module
from tests.formats.conftest import BLOCK, BuiltChain, ChainBuilder, read_chain
from xobackup_core.errors import FormatError, UsageError
from xobackup_core.formats.source import LocalFile, LocalFileSource
from xobackup_core.formats.vhd import VhdFile, verify_vhd_file
from xobackup_core.formats.vhd_chain import open_vhd_chain
from xobackup_core.formats.vhd_merge import merge_state_path, merge_vhd_chain, resume_merges
from xobackup_core.formats.vhd_writer import ParentLink, write_vhd_stream

SIZE = 16 * BLOCK
REPO = Path(__file__).resolve().parents[2]


def _local_remote(folder: Path):
    module = require_module("xobackup_remote_local")
    return module.LocalRemote(str(folder))


def _add_partial_child(chain: BuiltChain, seed: int, size: int) -> None:
    """Append a differencing child of ``size`` bytes whose blocks set scattered sectors only."""
    rnd = random.Random(seed)
    chain.size = size
    chain.expected.extend(bytes(size - len(chain.expected)))
    with VhdFile.open(LocalFileSource(chain.leaf)) as parent:
        link = ParentLink(parent.uuid, chain.leaf.name, parent.footer.timestamp)
    path = chain.leaf.with_name(f"partial{len(chain.paths):04d}.vhd")
    with open(path, "wb") as stream:
        write_vhd_stream(stream.write, chain.size, [], [], parent=link)
    with LocalFile(path) as file:
        disk = VhdFile.open_update(file, str(path))
        for index in rnd.sample(range(chain.size // BLOCK), 3):
            bitmap = bytearray(512)
            data = rnd.randbytes(BLOCK)
            for sector in rnd.sample(range(BLOCK // 512), 700):
                bitmap[sector >> 3] |= 0x80 >> (sector & 7)
                start = index * BLOCK + sector * 512
                chain.expected[start : start + 512] = data[sector * 512 : sector * 512 + 512]
            disk.write_block(index, bytes(bitmap), data)
        disk.write_footer()
        disk.flush()
    chain.paths.append(path)


def _build(builder: ChainBuilder, grown: int = SIZE) -> tuple[BuiltChain, bytes]:
    """base + 3 full-block deltas + 1 partial delta + 1 newer delta that is not merged.

    The partial delta and the newest one have ``grown`` bytes (a resized disk when larger
    than the others). Returns the chain and the virtual disk of the last merged child.
    """
    layers = builder.random_layers(16, 4, 4)
    layers[0].update({index: builder.block() for index in (0, 1, 15)})
    chain = builder.write(SIZE, layers)
    _add_partial_child(chain, seed=5, size=grown)
    merged_view = read_chain(chain.leaf)
    assert merged_view == bytes(chain.expected)
    with VhdFile.open(LocalFileSource(chain.leaf)) as parent:
        link = ParentLink(parent.uuid, chain.leaf.name, parent.footer.timestamp)
    newest = chain.leaf.with_name("newest.vhd")
    top = {3: builder.block(), 9: builder.block()}
    with open(newest, "wb") as stream:
        write_vhd_stream(stream.write, grown, sorted(top.items()), sorted(top), parent=link)
    for index, data in top.items():
        chain.expected[index * BLOCK : (index + 1) * BLOCK] = data
    chain.paths.append(newest)
    return chain, merged_view


def _same_disk(path: Path, expected: bytes | bytearray) -> bool:
    """Whether the chain at ``path`` reads as ``expected``, compared block by block."""
    with open_vhd_chain(str(path)) as chain:
        if chain.size != len(expected):
            return False
        for index, data in chain.iter_blocks():
            start = index * BLOCK
            if expected[start : start + len(data)] != bytes(data):
                return False
    return True


def _check_merged(folder: Path, chain: BuiltChain, merged_view: bytes) -> None:
    merged = chain.paths[-2]
    # Listed through the remote, which hides the temporary file of a write cut by kill -9.
    names = _local_remote(folder).list("/")
    assert names == sorted([merged.name, "newest.vhd"]), names
    assert _same_disk(merged, merged_view)
    assert _same_disk(folder / "newest.vhd", chain.expected)
    with VhdFile.open(LocalFileSource(merged)) as disk:
        assert not disk.is_differencing
        verify_vhd_file(disk)


def test_merge_gives_the_same_virtual_disk(tmp_path: Path) -> None:
    chain, merged_view = _build(ChainBuilder(tmp_path, seed=1))
    base_size = chain.paths[0].stat().st_size
    base_blocks = VhdFile.open(LocalFileSource(chain.paths[0])).allocated_count()
    remote = _local_remote(tmp_path)
    names = [path.name for path in chain.paths[:-1]]
    progress: list[tuple[int, int]] = []
    result = merge_vhd_chain(remote, names, progress=lambda *args: progress.append(args))
    assert result.path == "/" + names[-1]
    _check_merged(tmp_path, chain, merged_view)
    # Only blocks the children held were written: the file grew by the blocks it lacked.
    with VhdFile.open(LocalFileSource(chain.paths[-2])) as disk:
        added = disk.allocated_count() - base_blocks
        assert disk.source.size() == base_size + added * (BLOCK + 512)
        assert result.merged_blocks == len(progress) == progress[-1][1]
        assert result.merged_blocks < 16


def test_merge_refuses_a_broken_chain(tmp_path: Path) -> None:
    chain, _ = _build(ChainBuilder(tmp_path, seed=2))
    remote = _local_remote(tmp_path)
    with pytest.raises(FormatError, match="is not a child of"):
        merge_vhd_chain(remote, [chain.paths[0].name, chain.paths[2].name])
    assert not any(name.endswith(".merge.json") for name in os.listdir(tmp_path))
    with pytest.raises(UsageError):
        merge_vhd_chain(remote, [chain.paths[0].name])


def test_state_file_has_xo_fields(tmp_path: Path) -> None:
    chain, merged_view = _build(ChainBuilder(tmp_path, seed=3))
    remote = _local_remote(tmp_path)
    names = [path.name for path in chain.paths[:-1]]
    seen: list[dict] = []

    def spy(done: int, total: int) -> None:
        state_file = tmp_path / merge_state_path(names[0]).lstrip("/")
        seen.append(json.loads(state_file.read_text()))

    merge_vhd_chain(remote, names, progress=spy, state_interval=0)
    state = seen[-1]
    assert set(state) == {
        "child",
        "parent",
        "chain",
        "currentBlock",
        "mergedDataSize",
        "step",
        "diskSize",
    }
    assert state["chain"] == names
    assert state["step"] == "mergeBlocks"
    assert state["diskSize"] == SIZE
    assert state["currentBlock"] > seen[0]["currentBlock"]
    _check_merged(tmp_path, chain, merged_view)


def _merge_worker(folder: str, names: list[str], progress_pipe) -> None:
    """The merge in a forked child, reporting each merged block to the test."""
    module = require_module("xobackup_remote_local")

    def progress(done: int, total: int) -> None:
        progress_pipe.send((done, total))
        time.sleep(0.004)

    merge_vhd_chain(module.LocalRemote(folder), names, progress=progress, state_interval=0)
    progress_pipe.send("done")


def _start_worker(folder: Path, names: list[str]):
    """A forked child process (cheaper than a new interpreter) running the merge."""
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    worker = context.Process(target=_merge_worker, args=(str(folder), names, send), daemon=True)
    worker.start()
    send.close()
    return worker, receive


def test_killed_merge_resumes_to_the_same_result(tmp_path: Path) -> None:
    require_module("xobackup_remote_local")
    pristine = tmp_path / "pristine"
    pristine.mkdir()
    # The last merged delta is larger: each merge also grows the parent's BAT first.
    chain, merged_view = _build(ChainBuilder(pristine, seed=4), grown=150 * BLOCK)
    names = [path.name for path in chain.paths[:-1]]

    def fresh(trial: int) -> tuple[Path, BuiltChain]:
        folder = tmp_path / f"trial{trial}"
        shutil.copytree(pristine, folder)
        moved = BuiltChain([folder / p.name for p in chain.paths], chain.size, chain.expected)
        return folder, moved

    folder, copy = fresh(0)
    worker, messages = _start_worker(folder, names)
    total = messages.recv()[1]
    while (message := messages.recv()) != "done":
        pass
    worker.join()
    _check_merged(folder, copy, merged_view)
    rnd = random.Random(11)
    outcomes = {"killed": 0, "finished": 0, "mergeBlocks": 0, "cleanup": 0}
    for trial in range(1, 23):
        folder, copy = fresh(trial)
        worker, messages = _start_worker(folder, names)
        # Kill after a random number of merged blocks (0: while the merge starts; all: in
        # the cleanup or just after it), at a random moment of the following work.
        target = rnd.randint(0, total)
        while target:
            message = messages.recv()
            if message == "done" or message[0] >= target:
                break
        time.sleep(rnd.uniform(0, 0.006))
        os.kill(worker.pid, signal.SIGKILL)
        worker.join()
        messages.close()
        outcomes["killed" if worker.exitcode == -signal.SIGKILL else "finished"] += 1
        remote = _local_remote(folder)
        state_file = folder / merge_state_path(names[0]).lstrip("/")
        if state_file.exists():
            outcomes[json.loads(state_file.read_text())["step"]] += 1
        resume_merges(remote, "/")
        if (folder / names[0]).exists():  # killed before the merge wrote its state
            merge_vhd_chain(remote, names)
        _check_merged(folder, copy, merged_view)
        shutil.rmtree(folder)
    assert outcomes["killed"] >= 20, outcomes
    assert outcomes["mergeBlocks"] >= 10, outcomes  # most kills land while blocks are copied


@pytest.fixture(scope="module")
def sftp_remote():
    require_module("paramiko")
    from tests.conftest import require, require_tool
    from tests.servers import sftp

    require_tool("sshd")
    require(sftp.available(), "sshd (as root)")
    server = sftp.SftpServer.create().start()
    module = require_module("xobackup_remote_sftp")
    remote = module.SftpRemote.from_url(
        server.url("vhd-merge"),
        {
            "key_file": str(server.client_key),
            "host_key_fingerprint": server.host_key_fingerprint,
            "name": "sftp-test",
        },
    )
    yield remote
    remote.close()
    server.stop()


@pytest.fixture(scope="module")
def smb_remote(tmp_path_factory):
    require_module("smbprotocol")
    from tests.conftest import require, require_tool
    from tests.servers import smb
    from xobackup_core.config import Secret

    require_tool("smbd")
    require_tool("smbpasswd")
    require(smb.available(), "smbd (as root)")
    server = smb.SmbServer(tmp_path_factory.mktemp("smbd")).start()
    module = require_module("xobackup_remote_smb")
    remote = module.open_smb_remote(
        server.url("vhd-merge"), {"password": Secret(server.password), "name": "smb-test"}
    )
    yield remote
    remote.close()
    server.stop()


@pytest.mark.parametrize("remote_fixture", ["sftp_remote", "smb_remote"])
def test_merge_through_network_remotes(tmp_path: Path, remote_fixture: str, request) -> None:
    """The same merge on real SFTP and SMB servers: in-place writes through RemoteFile."""
    from xobackup_core.formats.vhd_chain import open_vhd_chain, remote_disk_opener

    remote = request.getfixturevalue(remote_fixture)

    chain, merged_view = _build(ChainBuilder(tmp_path, seed=6))
    for path in chain.paths:
        with remote.open_write(path.name) as writer:
            writer.write(path.read_bytes())
    names = [path.name for path in chain.paths[:-1]]
    merge_vhd_chain(remote, names)
    assert remote.list("/") == sorted([names[-1], "newest.vhd"])
    opener = remote_disk_opener(remote)
    with open_vhd_chain(names[-1], opener) as merged:
        assert len(merged.disks) == 1
        assert merged.read_at(0, SIZE) == merged_view
    with open_vhd_chain("newest.vhd", opener) as newest:
        assert newest.read_at(0, SIZE) == bytes(chain.expected)


def test_merge_into_a_fixed_parent(tmp_path: Path) -> None:
    """qemu's fixed VHD as the base: blocks are written in place, the footer stays fixed."""
    from tests.conftest import require_tool

    qemu_img = require_tool("qemu-img")
    rnd = random.Random(9)
    raw = tmp_path / "base.raw"
    raw.write_bytes(rnd.randbytes(4 * BLOCK))
    options = "subformat=fixed,force_size=on"
    target = tmp_path / "base.vhd"
    subprocess.run(
        [qemu_img, "convert", "-f", "raw", "-O", "vpc", "-o", options, raw, target], check=True
    )
    raw.unlink()
    with VhdFile.open(LocalFileSource(tmp_path / "base.vhd")) as base:
        link = ParentLink(base.uuid, "base.vhd", base.footer.timestamp)
    changed = {1: rnd.randbytes(BLOCK), 3: rnd.randbytes(BLOCK)}
    with open(tmp_path / "delta.vhd", "wb") as stream:
        write_vhd_stream(
            stream.write, 4 * BLOCK, sorted(changed.items()), sorted(changed), parent=link
        )
    expected = read_chain(tmp_path / "delta.vhd")
    merge_vhd_chain(_local_remote(tmp_path), ["base.vhd", "delta.vhd"])
    assert sorted(os.listdir(tmp_path)) == ["delta.vhd"]
    with VhdFile.open(LocalFileSource(tmp_path / "delta.vhd")) as merged:
        assert merged.type_name == "fixed"
        assert merged.source.size() == 4 * BLOCK + 512
    assert read_chain(tmp_path / "delta.vhd") == expected


def test_stale_state_files_are_removed(tmp_path: Path) -> None:
    remote = _local_remote(tmp_path)
    state = {"chain": ["gone.vhd", "also-gone.vhd"], "step": "mergeBlocks", "currentBlock": 0}
    (tmp_path / ".gone.vhd.merge.json").write_text(json.dumps(state))
    with pytest.raises(FormatError, match="no longer exist"):
        resume_merges(remote, "/")
    assert os.listdir(tmp_path) == []


def test_merge_grows_the_parent_for_a_resized_disk(tmp_path: Path) -> None:
    """The child is larger (the VM disk was resized): the parent's BAT grows in place, moving
    the block in its way, and the merged disk has the child's size and content."""
    builder = ChainBuilder(tmp_path, seed=12)
    small = 4 * BLOCK
    base = builder.write(small, [{index: builder.block() for index in range(4)}])
    with VhdFile.open(LocalFileSource(base.leaf)) as parent:
        link = ParentLink(parent.uuid, base.leaf.name, parent.footer.timestamp)
        first_block = parent.block_offset(0)
    large = 150 * BLOCK  # 150 BAT entries need two sectors: block 0 is in the way
    changed = {1: builder.block(), 140: builder.block()}
    with open(tmp_path / "grown.vhd", "wb") as stream:
        blocks = sorted(changed.items())
        write_vhd_stream(stream.write, large, blocks, sorted(changed), parent=link)
    expected = read_chain(tmp_path / "grown.vhd")
    assert expected[:BLOCK] == bytes(base.expected[:BLOCK])
    merge_vhd_chain(_local_remote(tmp_path), [base.leaf.name, "grown.vhd"])
    assert sorted(os.listdir(tmp_path)) == ["grown.vhd"]
    with VhdFile.open(LocalFileSource(tmp_path / "grown.vhd")) as merged:
        assert merged.size == large
        assert merged.block_count == 150
        assert merged.block_offset(0) != first_block
        verify_vhd_file(merged)
    assert read_chain(tmp_path / "grown.vhd") == expected
    # qemu-img agrees on the moved block and the grown BAT.
    from tests.conftest import require_tool

    out = tmp_path / "grown.raw"
    options = f"driver=vpc,force_size_calc=current_size,file.filename={tmp_path / 'grown.vhd'}"
    subprocess.run(
        [require_tool("qemu-img"), "convert", "--image-opts", options, "-O", "raw", out],
        check=True,
    )
    assert out.read_bytes() == expected
