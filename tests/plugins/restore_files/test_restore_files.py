"""File-level restore against real filesystems in real VHD chains on a local remote.

Images are made once per module by each filesystem's own tools, put in MBR/GPT disks and an LVM
volume, and backed up as a full plus deltas (only the blocks that changed between two versions
of the tree). Every check compares what comes out with the source tree.
"""

from __future__ import annotations

import io
import os
import random
import signal
import tarfile
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from xobackup_remote_local import LocalRemote

from tests.conftest import require, require_module, require_tool
from tests.plugins.restore_files import images
from tests.plugins.restore_files.images import (
    GPT_BASIC_DATA,
    GPT_LINUX,
    GPT_LVM,
    MIB,
    BackupWriter,
    backup_disk_states,
    disk_size,
)
from xobackup_core.cli.context import AppContext
from xobackup_core.cli.main import cli
from xobackup_core.formats.vhd_structs import DEFAULT_BLOCK_SIZE
from xobackup_core.plugins import Plugins

require_module("dissect.volume")

from xobackup_restore_files.browse import (  # noqa: E402
    WHOLE_DISK,
    list_volumes,
    open_backup,
    select_volume,
)
from xobackup_restore_files.extract import (  # noqa: E402
    extract_to_folder,
    read_guest,
    safe_name,
    safe_relative_path,
    walk,
)
from xobackup_restore_files.readers import FILE, builtin_readers  # noqa: E402
from xobackup_restore_files.stream import DiskStream  # noqa: E402

from xobackup_core.errors import XobackupError  # noqa: E402

BLOCK = DEFAULT_BLOCK_SIZE


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("flr")


@pytest.fixture(scope="module")
def trees(work):
    v1 = images.make_tree(work / "tree-v1", 1)
    v2 = images.make_tree(work / "tree-v2", 2)
    plain_v1 = images.copy_tree_without_symlinks(v1, work / "plain-v1")
    plain_v2 = images.copy_tree_without_symlinks(v2, work / "plain-v2")
    return {"v1": v1, "v2": v2, "plain-v1": plain_v1, "plain-v2": plain_v2}


@pytest.fixture(scope="module")
def remote(work):
    return LocalRemote(work / "remote", name="flr-test")


@pytest.fixture(scope="module")
def remote_url(remote):
    return f"file://{remote.root}"


@pytest.fixture(scope="module")
def mbr_backups(work, trees, remote):
    """MBR disk: FAT16 (1), ext4 (2), NTFS (3), XFS in a logical partition (5); two versions."""
    states = []
    ntfs_populated = True
    for version in ("v1", "v2"):
        folder = work / f"mbr-{version}"
        folder.mkdir()
        fat = images.fat_image(trees[f"plain-{version}"], folder / "fat.img")
        ext4 = images.ext4_image(trees[version], folder / "ext4.img")
        ntfs, populated = images.ntfs_image(trees[f"plain-{version}"], folder / "ntfs.img")
        ntfs_populated = ntfs_populated and populated
        xfs = images.xfs_image(trees[version], folder / "xfs.img")
        states.append(
            images.partitioned_disk(
                folder / "disk.img",
                "dos",
                [
                    (fat, "e", ""),
                    (ext4, "83", ", bootable"),
                    (ntfs, "7", ""),
                    (None, "5", ""),
                    (xfs, "83", ""),
                ],
            )
        )
    size = max(disk_size(s) for s in states)
    writer = BackupWriter(remote)
    paths = backup_disk_states(writer, "a0000000-0000-4000-8000-000000000001", states, size)
    return {"paths": paths, "ntfs_populated": ntfs_populated, "vm": writer.vm_uuid}


@pytest.fixture(scope="module")
def gpt_backups(work, trees, remote):
    """GPT disk: Btrfs (1), an LVM PV holding vgflr/data with ext4 (2), exFAT (3)."""
    states = []
    for version in ("v1", "v2"):
        folder = work / f"gpt-{version}"
        folder.mkdir()
        btrfs = images.btrfs_image(trees[version], folder / "btrfs.img")
        ext4 = images.ext4_image(trees[version], folder / "lv-ext4.img", 16)
        lvm = images.lvm_image(ext4, folder / "lvm.img", "vgflr", "data")
        exfat = images.exfat_image(trees[f"plain-{version}"], folder / "exfat.img", 16)
        states.append(
            images.partitioned_disk(
                folder / "disk.img",
                "gpt",
                [
                    (btrfs, GPT_LINUX, ', name="root"'),
                    (lvm, GPT_LVM, ', name="pv"'),
                    (exfat, GPT_BASIC_DATA, ', name="data"'),
                ],
            )
        )
    size = max(disk_size(s) for s in states)
    writer = BackupWriter(remote)
    paths = backup_disk_states(writer, "b0000000-0000-4000-8000-000000000002", states, size)
    return {"paths": paths, "vm": writer.vm_uuid, "states": states, "size": size}


# -- helpers -------------------------------------------------------------------------------------
def invoke(*args: str):
    # Only the plugins under test: another plugin's state must not decide these results.
    plugins = Plugins(autoload=False, only=["restore_files", "remote_local"])
    plugins.add_cli_commands(cli)
    return CliRunner().invoke(
        cli, list(args), obj=AppContext(plugins=plugins), catch_exceptions=False
    )


def snapshot(root: Path, *, fold_case: bool = False, symlinks: bool = True) -> dict:
    """Every entry under ``root`` (not following links): kind, bytes or link target."""
    found = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d != "lost+found"]
        for name in dirs + files:
            full = Path(folder, name)
            key = str(full.relative_to(root))
            if fold_case:
                key = key.lower()
            if full.is_symlink():
                if symlinks:
                    found[key] = ("link", os.readlink(full))
            elif full.is_dir():
                found[key] = ("dir", None)
            else:
                found[key] = ("file", full.read_bytes())
    return found


def extract(remote_url, backup_path, disk, volume, target, *paths):
    result = invoke(
        "files", "get", f"{remote_url}:{backup_path}", disk, volume, *paths, "--to", str(target)
    )
    assert result.exit_code == 0, result.output
    return result


# -- volumes and filesystems ---------------------------------------------------------------------
def test_mbr_volumes_are_listed_with_linux_numbers(remote_url, mbr_backups):
    result = invoke("files", "ls", f"{remote_url}:{mbr_backups['paths'][-1]}", "0", "--json")
    assert result.exit_code == 0, result.output
    import json

    volumes = {v["id"]: v["filesystem"] for v in json.loads(result.output)}
    assert volumes == {"1": "fat", "2": "ext", "3": "ntfs", "5": "xfs"}


@pytest.mark.parametrize("volume", ["2", "5"])
def test_mbr_linux_filesystems_extract_like_the_source(
    remote_url, mbr_backups, trees, work, volume
):
    target = work / f"out-mbr-{volume}"
    extract(remote_url, mbr_backups["paths"][-1], "0", volume, target, "/")
    got = snapshot(target)
    want = snapshot(trees["v2"])
    assert got == want


def test_older_backup_shows_the_older_tree(remote_url, mbr_backups, trees, work):
    target = work / "out-mbr-old"
    extract(remote_url, mbr_backups["paths"][0], "0", "2", target, "/hello.txt", "/only-in-v1.txt")
    assert (target / "hello.txt").read_text() == "hello world, version 1\n"
    assert (target / "only-in-v1.txt").exists()


def test_fat_extracts_files_and_long_names(remote_url, mbr_backups, trees, work):
    target = work / "out-fat"
    extract(remote_url, mbr_backups["paths"][-1], "0", "1", target, "/")
    got = snapshot(target, fold_case=True)
    want = snapshot(trees["plain-v2"], fold_case=True)
    assert got == want
    # A long (LFN) name keeps its case.
    assert (target / "Readme-Long-Name.txt").exists()


def test_ntfs_root_and_files(remote_url, mbr_backups, trees, work):
    result = invoke("files", "ls", f"{remote_url}:{mbr_backups['paths'][-1]}", "0", "3", "/")
    assert result.exit_code == 0, result.output
    assert "$MFT" not in result.output and "hello.txt" in result.output
    target = work / "out-ntfs"
    extract(remote_url, mbr_backups["paths"][-1], "0", "3", target, "/")
    want = snapshot(trees["plain-v2"])
    if not mbr_backups["ntfs_populated"]:
        # Without FUSE only the root's files could be written (ntfscp).
        want = {k: v for k, v in want.items() if "/" not in k and v[0] == "file"}
    assert snapshot(target) == want


def test_gpt_btrfs_lvm_exfat(remote_url, gpt_backups, trees, work):
    backup = f"{remote_url}:{gpt_backups['paths'][-1]}"
    result = invoke("files", "ls", backup, "0", "--json")
    assert result.exit_code == 0, result.output
    import json

    volumes = {v["id"]: v["filesystem"] for v in json.loads(result.output)}
    assert volumes == {"1": "btrfs", "vgflr/data": "ext", "3": "exfat"}
    for volume, tree in (("1", "v2"), ("vgflr/data", "v2"), ("3", "plain-v2")):
        target = work / f"out-gpt-{volume.replace('/', '-')}"
        extract(remote_url, gpt_backups["paths"][-1], "0", volume, target, "/")
        assert snapshot(target) == snapshot(trees[tree]), volume


def test_listing_shows_types_sizes_and_link_targets(remote_url, mbr_backups):
    result = invoke("files", "ls", f"{remote_url}:{mbr_backups['paths'][-1]}", "0", "2", "/")
    assert result.exit_code == 0, result.output
    lines = {
        line.split()[-1] if "->" not in line else line.split()[-3]: line
        for line in result.output.splitlines()
    }
    assert lines["link-to-hello"].startswith("l ") and "-> hello.txt" in lines["link-to-hello"]
    assert lines["sub"].startswith("d ")
    assert lines["hello.txt"].split()[1] == str(len("hello world, version 2\n"))
    disks = invoke("files", "ls", f"{remote_url}:{mbr_backups['paths'][-1]}")
    assert disks.exit_code == 0 and "disk 0" in disks.output


def test_short_backup_names(remote_url, mbr_backups):
    latest = invoke(
        "files", "ls", f"{remote_url}:{mbr_backups['vm']}/latest", "0", "2", "/hello.txt"
    )
    assert latest.exit_code == 0, latest.output
    assert "hello.txt" in latest.output


# -- archives ------------------------------------------------------------------------------------
def test_tar_and_zip_hold_the_same_tree(remote_url, mbr_backups, trees, work):
    backup = f"{remote_url}:{mbr_backups['paths'][-1]}"
    tar_path, zip_path = work / "out.tar.gz", work / "out.zip"
    assert invoke("files", "get", backup, "0", "2", "/", "--tar", str(tar_path)).exit_code == 0
    assert invoke("files", "get", backup, "0", "2", "/", "--zip", str(zip_path)).exit_code == 0
    want = snapshot(trees["v2"])
    with tarfile.open(tar_path) as archive:
        got = {}
        for member in archive.getmembers():
            if member.name.startswith("lost+found"):
                continue
            if member.issym():
                got[member.name] = ("link", member.linkname)
            elif member.isdir():
                got[member.name] = ("dir", None)
            else:
                got[member.name] = ("file", archive.extractfile(member).read())
    assert got == want
    with zipfile.ZipFile(zip_path) as archive:
        got = {}
        for info in archive.infolist():
            mode = info.external_attr >> 16
            if info.filename.startswith("lost+found"):
                continue
            if info.is_dir():
                got[info.filename.rstrip("/")] = ("dir", None)
            elif (mode & 0o170000) == 0o120000:
                got[info.filename] = ("link", archive.read(info).decode())
            else:
                got[info.filename] = ("file", archive.read(info))
    assert got == want


# -- errors --------------------------------------------------------------------------------------
def test_user_mistakes_exit_2_with_a_message(remote_url, mbr_backups, remote, work):
    backup = f"{remote_url}:{mbr_backups['paths'][-1]}"
    cases = {
        ("ls", backup, "7"): "no disk '7'",
        ("ls", backup, "0", "9"): "no partition or volume '9'",
        ("ls", backup, "0", "2", "/missing/file"): "missing",
        ("ls", f"{remote_url}:/xo-vm-backups/nope/20260101T000000Z.json"): "no backup metadata",
        ("ls", "no-colon-here"): "REMOTE:PATH",
    }
    for args, message in cases.items():
        result = invoke("files", *args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (args, result.output)
    # A full (XVA) backup cannot be browsed.
    writer = BackupWriter(remote)
    full = writer.write_metadata(writer.next_stamp(), {}, mode="full")
    result = invoke("files", "ls", f"{remote_url}:{full}")
    assert result.exit_code == 2
    assert "delta backup" in result.output


def test_existing_files_are_kept_unless_overwrite(remote_url, mbr_backups, work):
    backup = f"{remote_url}:{mbr_backups['paths'][-1]}"
    target = work / "out-overwrite"
    target.mkdir()
    (target / "hello.txt").write_text("mine")
    result = invoke("files", "get", backup, "0", "2", "/hello.txt", "--to", str(target))
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert (target / "hello.txt").read_text() == "mine"
    result = invoke(
        "files", "get", backup, "0", "2", "/hello.txt", "--to", str(target), "--overwrite"
    )
    assert result.exit_code == 0, result.output
    assert (target / "hello.txt").read_text() == "hello world, version 2\n"


# -- path safety ---------------------------------------------------------------------------------
def test_sanitiser():
    assert safe_name("..") is None
    assert safe_name(".") is None
    assert safe_name("") is None
    assert safe_name("../../etc/passwd") == ".._.._etc_passwd"
    assert safe_name("a\\..\\b") == "a_.._b"
    assert safe_name("nul\x00byte") == "nul_byte"
    assert safe_relative_path("/etc/passwd") == "etc/passwd"
    assert safe_relative_path("a/../../b/./c") == "a/b/c"
    assert safe_relative_path("../..") is None


def test_symlinks_never_lead_outside(remote_url, mbr_backups, work):
    """A restored symlink to / or .. is a link only; a later entry through it is refused, and
    --overwrite replaces a link instead of writing where it points."""
    backup = f"{remote_url}:{mbr_backups['paths'][-1]}"
    outside = work / "outside"
    outside.mkdir()
    target = work / "out-escape"
    target.mkdir()
    # A link named like the folder about to be restored, pointing outside the target.
    os.symlink(outside, target / "sub")
    result = invoke("files", "get", backup, "0", "2", "/sub", "--to", str(target))
    assert result.exit_code == 2 and "already exists" in result.output
    assert list(outside.iterdir()) == []
    result = invoke("files", "get", backup, "0", "2", "/sub", "--to", str(target), "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (target / "sub").is_symlink() and (target / "sub" / "big.bin").is_file()
    assert list(outside.iterdir()) == []
    # The same one level down: a link where a sub-folder goes.
    nested = work / "out-escape-nested"
    (nested / "sub").mkdir(parents=True)
    os.symlink(outside, nested / "sub" / "deeper")
    result = invoke("files", "get", backup, "0", "2", "/sub", "--to", str(nested))
    assert result.exit_code == 2
    assert list(outside.iterdir()) == []
    assert os.path.islink(nested / "sub" / "deeper")
    # --overwrite on a file whose current name is a link to outside: the link is replaced.
    os.symlink(outside / "victim.txt", target / "hello.txt")
    result = invoke(
        "files", "get", backup, "0", "2", "/hello.txt", "--to", str(target), "--overwrite"
    )
    assert result.exit_code == 0, result.output
    assert not (target / "hello.txt").is_symlink()
    assert list(outside.iterdir()) == []
    # Links from the backup are restored as links with their text, not followed.
    extract(
        remote_url, mbr_backups["paths"][-1], "0", "2", target, "/absolute-link", "/sub/dangling"
    )
    assert os.readlink(target / "absolute-link") == "/etc/passwd"
    assert os.readlink(target / "dangling") == "../../nowhere/file"


def test_crafted_names_stay_inside(work, remote, remote_url):
    """An ext4 directory patched to hold '../evil' and '/etc/pwn' style names."""
    tree = work / "crafted-tree"
    (tree / "d").mkdir(parents=True)
    (tree / "d" / "AAAAAAA").write_text("escape attempt 1\n")
    (tree / "d" / "BBBBBBB").write_text("escape attempt 2\n")
    image = images.ext4_image(tree, work / "crafted.img", 8, extra=["-O", "^metadata_csum"])
    data = bytearray(image.read_bytes())
    for original, crafted in ((b"AAAAAAA", b"../evil"), (b"BBBBBBB", b"/x/pwn2")):
        position = data.find(original)
        assert position > 0
        data[position : position + 7] = crafted
    image.write_bytes(bytes(data))
    writer = BackupWriter(remote)
    [path] = backup_disk_states(
        writer, "c0000000-0000-4000-8000-000000000003", [image], disk_size(image)
    )
    listing = invoke("files", "ls", f"{remote_url}:{path}", "0", WHOLE_DISK, "/d")
    assert "../evil" in listing.output
    target = work / "out-crafted" / "inner"
    for option in ("--to", "--tar", "--zip"):
        out = target if option == "--to" else work / f"crafted{option.replace('--', '.')}"
        result = invoke(
            "files", "get", f"{remote_url}:{path}", "0", WHOLE_DISK, "/d", option, str(out)
        )
        assert result.exit_code == 0, result.output
    assert sorted(os.listdir(target / "d")) == [".._evil", "_x_pwn2"]
    assert (target / "d" / ".._evil").read_text() == "escape attempt 1\n"
    assert not (work / "out-crafted" / "evil").exists()
    with tarfile.open(work / "crafted.tar") as archive:
        assert sorted(archive.getnames()) == ["d", "d/.._evil", "d/_x_pwn2"]
    with zipfile.ZipFile(work / "crafted.zip") as archive:
        assert sorted(archive.namelist()) == ["d/", "d/.._evil", "d/_x_pwn2"]


# -- chains --------------------------------------------------------------------------------------
def test_150_deep_chain(work, trees, remote, remote_url):
    """Whole-disk ext4; 149 deltas scribble garbage over some blocks, then put the newer
    version back; blocks never rewritten come from the full at the bottom."""
    v1 = images.ext4_image(trees["v1"], work / "deep-v1.img", 16)
    v2 = images.ext4_update(v1, trees["v1"], work / "deep-v2.img", trees["v2"])
    size = disk_size(v1)
    count = size // BLOCK
    final = images.disk_blocks(v2, size)
    changed = images.changed_blocks(v1, v2, size)
    writer = BackupWriter(remote)
    vdi = "d0000000-0000-4000-8000-000000000004"
    stamp = writer.next_stamp()
    relative = writer.write_link(vdi, size, images.disk_blocks(v1, size), stamp)
    rng = random.Random(150)
    scribbled = set()
    for depth in range(1, 150):
        stamp = writer.next_stamp()
        if depth <= 100:
            index = rng.randrange(count // 2, count)
            scribbled.add(index)
            blocks = {index: rng.randbytes(BLOCK)}
        else:
            # Repair: every scribbled or changed block ends with version 2's data, spread over
            # the last links so each comes from a different depth.
            todo = sorted(scribbled | set(changed))
            index = todo[(depth - 101) % len(todo)]
            blocks = {index: final.get(index, bytes(BLOCK))}
            if depth == 149:
                blocks = {i: final.get(i, bytes(BLOCK)) for i in todo}
        relative = writer.write_link(vdi, size, blocks, stamp)
    path = writer.write_metadata(stamp, {vdi: (relative, size)})
    untouched = set(range(count)) - scribbled - set(changed)
    assert untouched, "some blocks must come from the full at depth 150"
    with open_backup(remote, path, builtin_readers()) as browser:
        _, stream = browser.open_disk("0")
        assert len(stream.device.disks) == 150
    target = work / "out-deep"
    extract(remote_url, path, "0", WHOLE_DISK, target, "/")
    assert snapshot(target) == snapshot(trees["v2"])


def test_disk_stream_reads_like_the_image(work, trees):
    """Unaligned reads and seeks across block borders match the raw bytes."""
    image = images.ext4_image(trees["v2"], work / "stream.img", 8)
    raw = image.read_bytes()

    class Device:
        size = len(raw)
        block_size = 1 * MIB

        def read_block(self, index):
            return raw[index * MIB : (index + 1) * MIB]

    stream = DiskStream(Device(), cache_blocks=2)
    rng = random.Random(7)
    for _ in range(200):
        offset = rng.randrange(len(raw))
        length = rng.randrange(3 * MIB)
        stream.seek(offset)
        assert stream.read(length) == raw[offset : offset + length]
        assert stream.tell() == min(offset + length, len(raw))
    stream.seek(-10, io.SEEK_END)
    assert stream.read() == raw[-10:]
    # In order, as a file copy reads: blocks come from the read-ahead thread.
    stream.seek(0)
    chunks = []
    while chunk := stream.read(300_000):
        chunks.append(chunk)
    assert b"".join(chunks) == raw
    assert stream._pool is not None
    stream.close()
    volumes = list_volumes(DiskStream(Device()), builtin_readers())
    assert [(v.id, v.filesystem) for v in volumes] == [(WHOLE_DISK, "ext")]


def test_vhd_directory_chain_with_aliases(remote, remote_url, gpt_backups, trees, work):
    """The same GPT disk stored as VhdDirectory disks (brotli chunks) behind alias files, the
    layout of object-store remotes: the chain is followed through the aliases."""
    writer = BackupWriter(remote, directory=True)
    paths = backup_disk_states(
        writer, "e0000000-0000-4000-8000-000000000005", gpt_backups["states"], gpt_backups["size"]
    )
    vm_folder = remote.real_path(f"/xo-vm-backups/{writer.vm_uuid}")
    aliases = sorted(Path(vm_folder).rglob("*.alias.vhd"))
    assert len(aliases) == 2
    target = work / "out-directory"
    extract(remote_url, paths[-1], "0", "vgflr/data", target, "/")
    assert snapshot(target) == snapshot(trees["v2"])


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind",
    ["mbr-v2/fat", "mbr-v2/ext4", "mbr-v2/ntfs", "mbr-v2/xfs", "gpt-v2/btrfs", "gpt-v2/exfat"],
)
def test_damaged_filesystems_fail_cleanly(mbr_backups, gpt_backups, work, kind):
    """Random bytes over a filesystem's metadata: browsing and reading either work or raise
    one of xobackup's errors (a message and exit code 3), never another exception or a hang."""
    image = work / f"{kind}.img"
    readers = builtin_readers()
    outcomes = {"ok": 0, "error": 0}

    def alarm(*_):
        # Not an Exception: nothing on the way may turn it into a FormatError.
        raise _Hang(f"reading a damaged {kind} filesystem did not finish")

    previous = signal.signal(signal.SIGALRM, alarm)
    try:
        for seed in range(20):
            rng = random.Random(seed)
            damage = {
                rng.randrange(256 * 1024): rng.randrange(256)
                for _ in range(rng.choice((8, 64, 512)))
            }
            signal.alarm(20)
            try:
                device = _DamagedDevice(image, damage)
                volume = select_volume(list_volumes(DiskStream(device), readers), WHOLE_DISK)
                filesystem = volume.open_filesystem()
                root = read_guest("/", lambda fs=filesystem: fs.get("/"))
                # Every entry, and the first MiB of each file: a damaged size can claim GiBs.
                for path, node in walk(root, "", lambda m: None):
                    if node.kind == FILE:
                        stream = read_guest(path, node.open)
                        read_guest(path, lambda s=stream: s.read(MIB))
                outcomes["ok"] += 1
            except XobackupError:
                outcomes["error"] += 1
            finally:
                signal.alarm(0)
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert outcomes["ok"] + outcomes["error"] == 20


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mbr-v2", "gpt-v2"])
def test_damaged_partition_tables_fail_cleanly(mbr_backups, gpt_backups, work, kind):
    """Random bytes over the first 64 KiB of a partitioned disk (MBR, EBR, GPT headers and
    entries): listing volumes and their roots works or raises xobackup's errors only."""
    image = work / kind / "disk.img"
    for seed in range(30):
        rng = random.Random(seed)
        damage = {rng.randrange(64 * 1024): rng.randrange(256) for _ in range(rng.choice((4, 32)))}
        try:
            volumes = list_volumes(DiskStream(_DamagedDevice(image, damage)), builtin_readers())
        except XobackupError:
            continue
        for volume in volumes:
            try:
                root = volume.open_filesystem().get("/")
                read_guest("/", lambda r=root: list(r.children()))
            except XobackupError:
                pass


class _Hang(BaseException):
    pass


class _DamagedDevice:
    """An image file read in 1 MiB blocks, with some bytes replaced."""

    block_size = 1 * MIB

    def __init__(self, path: Path, damage: dict[int, int]) -> None:
        self.path = path
        self.size = path.stat().st_size
        self.damage = damage

    def read_block(self, index):
        with open(self.path, "rb") as image:
            image.seek(index * MIB)
            block = bytearray(image.read(MIB).ljust(MIB, b"\0"))
        for offset, value in self.damage.items():
            if index * MIB <= offset < (index + 1) * MIB:
                block[offset - index * MIB] = value
        return bytes(block)


def test_remote_by_config_name(remote, mbr_backups, work):
    """BACKUP as ``<remote name>:<vm>/<timestamp>`` with the remote from the config file."""
    config = work / "config.toml"
    config.write_text(f"[remotes.nas]\nurl = 'file://{remote.root}'\n")
    stamp = mbr_backups["paths"][-1].rsplit("/", 1)[1][: -len(".json")]
    result = invoke(
        "--config",
        str(config),
        "files",
        "ls",
        f"nas:{mbr_backups['vm']}/{stamp}",
        "0",
        "2",
        "/only-in-v2.txt",
    )
    assert result.exit_code == 0, result.output
    assert "only-in-v2.txt" in result.output
    unknown = invoke("--config", str(config), "files", "ls", f"elsewhere:{mbr_backups['vm']}/x")
    assert unknown.exit_code == 2 and "unknown remote 'elsewhere'" in unknown.output


def test_plugin_declares_its_readers_and_command():
    plugins = Plugins(autoload=False, only=["restore_files"])
    assert {p.name for p in plugins.provided("file-reader")} == {
        "partition-table",
        "lvm",
        "ext",
        "xfs",
        "btrfs",
        "ntfs",
        "fat",
        "exfat",
    }
    assert [p.name for p in plugins.provided("command")] == ["files"]
    kinds = {getattr(reader, "kind", None) for reader in plugins.file_readers()}
    assert kinds == {"volumes", "filesystem"}


def test_lvm_physical_volume_on_the_whole_disk(gpt_backups, work, trees):
    """A PV written straight onto the disk (no partition table): its LVs are the volumes."""
    device = _DamagedDevice(work / "gpt-v2" / "lvm.img", {})
    volumes = list_volumes(DiskStream(device), builtin_readers())
    assert [(v.id, v.filesystem) for v in volumes] == [("vgflr/data", "ext")]
    filesystem = select_volume(volumes, "vgflr/data").open_filesystem()
    assert filesystem.get("/hello.txt").open().read() == (trees["v2"] / "hello.txt").read_bytes()


class _CountingRemote(LocalRemote):
    """Counts the bytes read from the remote."""

    read_bytes_total = 0

    def read_range(self, path, offset, length):
        data = super().read_range(path, offset, length)
        self.read_bytes_total += len(data)
        return data

    def open_read(self, path, offset=0, length=None):
        # The metadata JSON is read whole; disks never are.
        assert path.endswith(".json"), f"{path} opened for a streaming read"
        return super().open_read(path, offset, length)


def test_browsing_reads_ranges_not_whole_disks(remote, mbr_backups):
    """Listing a folder reads a few blocks of the chain, never whole disk files."""
    counting = _CountingRemote(remote.root)
    stored = sum(p.stat().st_size for p in Path(remote.root).rglob("*.vhd"))
    with open_backup(counting, mbr_backups["paths"][-1], builtin_readers()) as browser:
        names = {n.name for n in browser.filesystem("0", "2").get("/sub").children()}
    assert names == {"big.bin", "deeper", "dangling"}
    assert counting.read_bytes_total < 16 * MIB < stored / 2


def test_mbr_logical_partitions_are_numbered_from_5(work):
    """Two logical partitions behind a primary: ids 1, 5, 6 with Linux's numbering, the
    extended container itself hidden; an empty partition is listed without a filesystem."""
    blank = work / "blank.img"
    with open(blank, "wb") as image:
        image.truncate(4 * MIB)
    disk = images.partitioned_disk(
        work / "logical.img",
        "dos",
        [(blank, "83", ""), (None, "5", ""), (blank, "83", ""), (blank, "82", "")],
    )
    volumes = list_volumes(DiskStream(_DamagedDevice(disk, {})), builtin_readers())
    assert [(v.id, v.filesystem) for v in volumes] == [("1", None), ("5", None), ("6", None)]
    assert volumes[1].offset < volumes[2].offset
    with pytest.raises(XobackupError, match="no filesystem"):
        volumes[2].open_filesystem()


@pytest.fixture(scope="module")
def sftp_remote():
    """An SFTP remote on a throwaway sshd (the same server the SFTP remote's tests use)."""
    require_module("paramiko")
    require_tool("sshd")
    require_tool("ssh-keygen")
    from tests.servers import sftp

    require(sftp.available(), "sshd (as root)")
    server = sftp.SftpServer.create().start()
    from xobackup_remote_sftp import SftpRemote

    options = {
        "key_file": str(server.client_key),
        "host_key_fingerprint": server.host_key_fingerprint,
        "name": "flr-sftp",
    }
    remote = SftpRemote.from_url(server.url("flr"), options)
    try:
        yield remote
    finally:
        remote.close()
        server.stop()


def test_chain_on_an_sftp_remote(sftp_remote, trees, work):
    """The chain is read over SFTP with range reads: a full and a delta written there, then
    files extracted from the newest backup."""
    v1 = images.ext4_image(trees["v1"], work / "sftp-v1.img", 16)
    v2 = images.ext4_update(v1, trees["v1"], work / "sftp-v2.img", trees["v2"])
    writer = BackupWriter(sftp_remote)
    paths = backup_disk_states(
        writer, "f0000000-0000-4000-8000-000000000006", [v1, v2], disk_size(v1)
    )
    target = work / "out-sftp"
    with open_backup(sftp_remote, paths[-1], builtin_readers()) as browser:
        filesystem = browser.filesystem("0", WHOLE_DISK)
        extract_to_folder([("/", filesystem.get("/"))], str(target), overwrite=False, warn=print)
    assert snapshot(target) == snapshot(trees["v2"])
