"""Build real filesystem images, partitioned disks and XO-layout backups for the FLR tests.

Every image is made by the filesystem's own tools (e2fsprogs, dosfstools+mtools, ntfs-3g,
xfsprogs, btrfs-progs, exfatprogs), disks by sfdisk, LVM metadata by the LVM tools through a
loop device. Backups are VHD chains written with the core's stream writer onto a local remote,
in Xen Orchestra's layout, with one metadata JSON per backup.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import uuid as uuidlib
from collections.abc import Iterable, Iterator
from pathlib import Path

from xobackup_remote_local import LocalRemote

from tests.conftest import require, require_tool
from xobackup_core.engine.repository import BackupRepository, format_timestamp
from xobackup_core.formats.vhd_directory import (
    ALIAS_SUFFIX,
    new_vhd_metadata,
    write_vhd_directory_backup,
)
from xobackup_core.formats.vhd_structs import DEFAULT_BLOCK_SIZE
from xobackup_core.formats.vhd_writer import ParentLink, sparse_file_blocks, write_vhd_stream

MIB = 1 << 20
BLOCK = DEFAULT_BLOCK_SIZE
JOB = "5f0e8a34-1c2d-4e5f-8a9b-0c1d2e3f4a5b"
LVM_CONFIG = (
    "global { activation = 0 } backup { backup = 0 archive = 0 } "
    "devices { obtain_device_list_from_udev = 0 }"
)
GPT_LINUX = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
GPT_LVM = "E6D6D379-F507-44C2-A23C-238F2A3DF928"
GPT_BASIC_DATA = "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"


def run(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=True, capture_output=True, **kwargs)


# -- source trees --------------------------------------------------------------------------------
def make_tree(root: Path, version: int, *, symlinks: bool = True) -> Path:
    """A small tree; version 2 changes a file, adds one and removes one."""
    if root.exists():
        shutil.rmtree(root)
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "unicode").mkdir()
    (root / "hello.txt").write_text(f"hello world, version {version}\n")
    (root / "Readme-Long-Name.txt").write_text("a long name with capitals\n" * 20)
    (root / "sub" / "deeper" / "leaf.txt").write_text("bottom\n")
    (root / "unicode" / "Ünïcødé-ファイル.txt").write_text("grüße\n")
    seed = 0x5EED + version
    # 3 MiB of pseudo-random bytes: spans two VHD blocks, so file data crosses block borders.
    (root / "sub" / "big.bin").write_bytes(_pseudo_random(3 * MIB + 123, seed))
    if version == 1:
        (root / "only-in-v1.txt").write_text("removed by version 2\n")
    else:
        (root / "only-in-v2.txt").write_text("added by version 2\n")
    if symlinks:
        os.symlink("hello.txt", root / "link-to-hello")
        os.symlink("/etc/passwd", root / "absolute-link")
        os.symlink("../../nowhere/file", root / "sub" / "dangling")
    return root


def _pseudo_random(size: int, seed: int) -> bytes:
    import random

    return random.Random(seed).randbytes(size)


def copy_tree_without_symlinks(source: Path, target: Path) -> Path:
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target, symlinks=True, ignore=_ignore_symlinks)
    return target


def _ignore_symlinks(folder: str, names: list[str]) -> list[str]:
    return [n for n in names if os.path.islink(os.path.join(folder, n))]


# -- filesystem images ---------------------------------------------------------------------------
def ext4_image(tree: Path, path: Path, size_mib: int = 24, *, extra: Iterable[str] = ()) -> Path:
    require_tool("mkfs.ext4")
    path.unlink(missing_ok=True)
    with open(path, "wb") as image:
        image.truncate(size_mib * MIB)
    run("mkfs.ext4", "-q", "-F", "-b", "4096", "-L", "flr-ext4", *extra, "-d", str(tree), str(path))
    return path


def ext4_update(image: Path, source: Path, target: Path, new_tree: Path) -> Path:
    """``target``: a copy of ``image`` changed in place with debugfs into ``new_tree`` (files
    that differ rewritten, files only in one tree removed or added), so only the blocks those
    files touch change: a realistic delta."""
    debugfs = require_tool("debugfs")
    shutil.copyfile(image, target)
    commands = []
    for folder, _dirs, files in os.walk(source):
        for name in files:
            old = Path(folder, name)
            relative = old.relative_to(source)
            new = new_tree / relative
            if old.is_symlink():
                continue
            if not new.exists() or new.read_bytes() != old.read_bytes():
                commands.append(f'rm "/{relative}"')
    for folder, _dirs, files in os.walk(new_tree):
        for name in files:
            new = Path(folder, name)
            relative = new.relative_to(new_tree)
            old = source / relative
            if new.is_symlink():
                continue
            if not old.exists() or new.read_bytes() != old.read_bytes():
                commands.append(f'cd "/{relative.parent}"')
                commands.append(f'write "{new}" "{name}"')
    script = target.with_suffix(".debugfs")
    script.write_text("\n".join(commands) + "\n")
    run(debugfs, "-w", "-f", str(script), str(target))
    return target


def fat_image(tree: Path, path: Path, size_mib: int = 24) -> Path:
    require_tool("mkfs.vfat")
    require_tool("mcopy")
    path.unlink(missing_ok=True)
    run("mkfs.vfat", "-F", "16", "-n", "FLRFAT", "-C", str(path), str(size_mib * 1024))
    names = sorted(os.listdir(tree))
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    run("mcopy", "-s", "-p", "-m", "-i", str(path), *names, "::/", cwd=tree, env=env)
    return path


def ntfs_image(tree: Path, path: Path, size_mib: int = 24) -> tuple[Path, bool]:
    """An NTFS image holding ``tree`` (regular files and folders).

    Folders can only be made through the ntfs-3g FUSE driver; where FUSE is not available the
    root's files are written with ntfscp instead. Returns (path, whole tree written)."""
    require_tool("mkntfs")
    path.unlink(missing_ok=True)
    with open(path, "wb") as image:
        image.truncate(size_mib * MIB)
    run("mkntfs", "-F", "-Q", "-q", "-L", "flr-ntfs", str(path))
    mount_point = Path(tempfile.mkdtemp(prefix="flr-ntfs-"))
    try:
        mounted = subprocess.run(["ntfs-3g", str(path), str(mount_point)], capture_output=True)
        if mounted.returncode != 0:
            ntfscp = require_tool("ntfscp")
            for entry in sorted(tree.iterdir()):
                if entry.is_file() and not entry.is_symlink():
                    run(ntfscp, "-q", str(path), str(entry), entry.name)
            return path, False
        try:
            for entry in tree.iterdir():
                if entry.is_symlink():
                    continue  # ntfs-3g stores them as Interix files, not reparse points
                if entry.is_dir():
                    shutil.copytree(
                        entry, mount_point / entry.name, symlinks=True, ignore=_ignore_symlinks
                    )
                else:
                    shutil.copy2(entry, mount_point / entry.name)
        finally:
            run("umount", str(mount_point))
        return path, True
    finally:
        mount_point.rmdir()


def xfs_image(tree: Path, path: Path) -> Path:
    """XFS; mkfs.xfs refuses less than 300 MB, but the image stays sparse."""
    require_tool("mkfs.xfs")
    path.unlink(missing_ok=True)
    with open(path, "wb") as image:
        image.truncate(300 * MIB)
    proto = path.with_suffix(".proto")
    proto.write_text(_xfs_protofile(tree))
    run("mkfs.xfs", "-q", "-f", "-L", "flr-xfs", "-p", str(proto), str(path))
    return path


def _xfs_protofile(root: Path) -> str:
    """mkfs.xfs protofile: boot image, block/inode counts, root mode, then the tree."""
    lines = ["/dev/null", "0 0", "d--755 0 0"]

    def walk(folder: Path, depth: int) -> None:
        for entry in sorted(folder.iterdir()):
            pad = " " * depth
            if entry.is_symlink():
                lines.append(f"{pad}{entry.name} l--777 0 0 {os.readlink(entry)}")
            elif entry.is_dir():
                lines.append(f"{pad}{entry.name} d--755 0 0")
                walk(entry, depth + 1)
                lines.append(f"{pad}$")
            else:
                lines.append(f"{pad}{entry.name} ---644 0 0 {entry.resolve()}")

    walk(root, 1)
    lines.append("$")
    return "\n".join(lines) + "\n"


def btrfs_image(tree: Path, path: Path) -> Path:
    require_tool("mkfs.btrfs")
    path.unlink(missing_ok=True)
    run(
        "mkfs.btrfs",
        "-q",
        "-f",
        "-M",
        "-L",
        "flr-btrfs",
        "--rootdir",
        str(tree),
        "--shrink",
        str(path),
    )
    return path


@contextlib.contextmanager
def loop_device(path: Path) -> Iterator[str]:
    """Attach ``path`` to a free loop device; always detached afterwards (by device name)."""
    losetup = require_tool("losetup")
    attached = subprocess.run([losetup, "-f", "--show", str(path)], capture_output=True, text=True)
    require(attached.returncode == 0, f"a loop device ({attached.stderr.strip()})")
    device = attached.stdout.strip()
    try:
        yield device
    finally:
        subprocess.run([losetup, "-d", device], capture_output=True)


def exfat_image(tree: Path, path: Path, size_mib: int = 24) -> Path:
    """exFAT, populated through exfat-fuse on a loop device (it wants a block device)."""
    require_tool("mkfs.exfat")
    fuse = require_tool("mount.exfat-fuse")
    path.unlink(missing_ok=True)
    with open(path, "wb") as image:
        image.truncate(size_mib * MIB)
    run("mkfs.exfat", "-L", "flrexfat", str(path))
    mount_point = Path(tempfile.mkdtemp(prefix="flr-exfat-"))
    try:
        with loop_device(path) as device:
            mounted = subprocess.run([fuse, device, str(mount_point)], capture_output=True)
            require(mounted.returncode == 0, f"exfat-fuse ({mounted.stderr.decode().strip()})")
            try:
                for entry in tree.iterdir():
                    if entry.is_symlink():
                        continue
                    if entry.is_dir():
                        shutil.copytree(entry, mount_point / entry.name, ignore=_ignore_symlinks)
                    else:
                        shutil.copyfile(entry, mount_point / entry.name)
            finally:
                run("umount", str(mount_point))
    finally:
        mount_point.rmdir()
    return path


def lvm_image(fs_image: Path, path: Path, vg: str, lv: str) -> Path:
    """A PV holding one VG with one LV, the filesystem image copied at the LV's offset.

    The LVM tools need a block device, so the metadata is written through a loop device with
    activation off (no device-mapper needed); nothing is left in /etc/lvm."""
    for tool in ("pvcreate", "vgcreate", "lvcreate", "pvs", "lvs"):
        require_tool(tool)
    fs_size = fs_image.stat().st_size
    lv_mib = -(-fs_size // (4 * MIB)) * 4
    path.unlink(missing_ok=True)
    with open(path, "wb") as image:
        image.truncate((lv_mib + 8) * MIB)
    env = {**os.environ, "LVM_SUPPRESS_FD_WARNINGS": "1"}
    with loop_device(path) as device:
        cfg = ["--config", LVM_CONFIG]
        run("pvcreate", "-q", *cfg, "-y", device, env=env)
        try:
            run("vgcreate", "-q", *cfg, vg, device, env=env)
            run("lvcreate", "-q", *cfg, "-an", "-Zn", "-L", f"{lv_mib}M", "-n", lv, vg, env=env)
            out = (
                run(
                    "pvs",
                    *cfg,
                    "--noheadings",
                    "--units",
                    "b",
                    "--nosuffix",
                    "-o",
                    "pe_start,vg_extent_size",
                    device,
                    env=env,
                )
                .stdout.decode()
                .split()
            )
            pe_start, extent = int(out[0]), int(out[1])
            ranges = (
                run("lvs", *cfg, "--noheadings", "-o", "seg_pe_ranges", f"{vg}/{lv}", env=env)
                .stdout.decode()
                .strip()
            )
            first_extent = int(ranges.rsplit(":", 1)[1].split("-")[0])
        finally:
            subprocess.run(
                ["vgchange", "-q", "--config", LVM_CONFIG, "-an", vg], capture_output=True, env=env
            )
    sparse_copy(fs_image, path, pe_start + first_extent * extent)
    return path


# -- disks ---------------------------------------------------------------------------------------
def sparse_copy(source: Path, target: Path, offset: int) -> None:
    """Copy ``source`` into ``target`` at ``offset``, leaving zero runs as holes."""
    with open(source, "rb") as src, open(target, "r+b") as dst:
        position = 0
        while True:
            chunk = src.read(MIB)
            if not chunk:
                break
            if chunk.count(0) != len(chunk):
                dst.seek(offset + position)
                dst.write(chunk)
            position += len(chunk)


def partitioned_disk(path: Path, label: str, parts: list[tuple[Path | None, str, str]]) -> Path:
    """A disk with an MBR (``label="dos"``) or GPT table; ``parts`` are (image, type, extra).

    In an MBR, an entry without an image is an extended partition: every later entry becomes a
    logical partition inside it, each after room for its EBR."""
    require_tool("sfdisk")
    start = 2048
    lines = [f"label: {label}"]
    placements = []
    logical = False
    for position, (image, type_, extra) in enumerate(parts):
        if image is None:
            rest = sum(_sectors(p[0]) + 2048 for p in parts[position + 1 :] if p[0] is not None)
            lines.append(f"start={start}, size={rest}, type={type_}")
            logical = True
            start += 2048
            continue
        size = _sectors(image)
        lines.append(f"start={start}, size={size}, type={type_}{extra}")
        placements.append((image, start))
        start += size + (2048 if logical else 0)
    total = start + 2048 + 34
    path.unlink(missing_ok=True)
    with open(path, "wb") as disk:
        disk.truncate(total * 512)
    run("sfdisk", "-q", str(path), input="\n".join(lines).encode() + b"\n")
    for image, sector in placements:
        sparse_copy(image, path, sector * 512)
    return path


def _sectors(image: Path) -> int:
    return -(-image.stat().st_size // MIB) * 2048


# -- backups on a local remote ------------------------------------------------------------------
def disk_blocks(path: Path, size: int) -> dict[int, bytes]:
    """The blocks of a raw image that hold data (holes skipped)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        found = {}
        for index in sparse_file_blocks(fd, size):
            data = os.pread(fd, BLOCK, index * BLOCK)
            found[index] = data + bytes(BLOCK - len(data))
        return found
    finally:
        os.close(fd)


def changed_blocks(old: Path, new: Path, size: int) -> dict[int, bytes]:
    """Blocks of ``new`` that differ from ``old`` (a real delta between two disk states)."""
    before = disk_blocks(old, size)
    after = disk_blocks(new, size)
    zero = bytes(BLOCK)
    return {
        index: after.get(index, zero)
        for index in sorted(set(before) | set(after))
        if before.get(index, zero) != after.get(index, zero)
    }


class BackupWriter:
    """Writes one VM's disk chains and metadata JSON on a local remote, XO layout."""

    def __init__(
        self, remote: LocalRemote, vm_uuid: str | None = None, *, directory: bool = False
    ) -> None:
        self.remote = remote
        self.directory = directory
        """True: VhdDirectory disks behind alias files (brotli chunks), as on object stores."""
        self.repository = BackupRepository(remote)
        self.vm_uuid = vm_uuid or str(uuidlib.uuid4())
        self.timestamp_ms = 1_785_556_800_000  # 2026-08-01T04:00:00Z
        self.tips: dict[str, tuple[uuidlib.UUID, str]] = {}

    def _folder(self, vdi: str) -> str:
        return f"vdis/{JOB}/{vdi}"

    def write_link(self, vdi: str, size: int, blocks: dict[int, bytes], stamp: str) -> str:
        """One VHD of ``vdi``'s chain (a full for the first, then differencing)."""
        if self.directory:
            return self._write_directory_link(vdi, size, blocks, stamp)
        relative = f"{self._folder(vdi)}/{stamp}.vhd"
        parent = None
        if vdi in self.tips:
            parent_uuid, parent_name = self.tips[vdi]
            parent = ParentLink(parent_uuid, parent_name)
        disk_uuid = uuidlib.uuid4()
        path = f"{self.repository.vm_folder(self.vm_uuid)}/{relative}"
        with self.remote.open_write(path) as writer:
            indexes = sorted(blocks)
            write_vhd_stream(
                writer.write,
                size,
                ((i, blocks[i]) for i in indexes),
                indexes,
                parent=parent,
                uuid=disk_uuid,
            )
        self.tips[vdi] = (disk_uuid, f"{stamp}.vhd")
        return relative

    def _write_directory_link(
        self, vdi: str, size: int, blocks: dict[int, bytes], stamp: str
    ) -> str:
        parent = None
        if vdi in self.tips:
            parent = ParentLink(*self.tips[vdi])
        disk_uuid = uuidlib.uuid4()
        footer, header, locators = new_vhd_metadata(size, parent=parent, uuid=disk_uuid)
        folder = f"{self.repository.vm_folder(self.vm_uuid)}/{self._folder(vdi)}"
        write_vhd_directory_backup(
            self.remote,
            folder,
            stamp,
            footer,
            header,
            sorted(blocks.items()),
            compression="brotli",
            parent_locators=locators,
        )
        # Parent names in a VhdDirectory chain are paths between alias files.
        self.tips[vdi] = (disk_uuid, f"{stamp}{ALIAS_SUFFIX}")
        return f"{self._folder(vdi)}/{stamp}{ALIAS_SUFFIX}"

    def next_stamp(self) -> str:
        self.timestamp_ms += 3_600_000
        return format_timestamp(self.timestamp_ms)

    def write_metadata(
        self, stamp: str, disks: dict[str, tuple[str, int]], mode: str = "delta"
    ) -> str:
        """``disks``: vdi uuid → (relative tip path, virtual size)."""
        data = {
            "mode": mode,
            "jobId": JOB,
            "scheduleId": "b1c2d3e4-0000-4000-8000-000000000001",
            "timestamp": self.timestamp_ms,
            "vm": {"uuid": self.vm_uuid, "name_label": "flr-test-vm"},
            "vmSnapshot": {"uuid": str(uuidlib.uuid4()), "name_label": "flr-test-vm"},
        }
        if mode == "delta":
            data["vhds"] = {}
            data["vdis"] = {}
            data["isVhdDifferencing"] = {}
            for position, (vdi, (relative, size)) in enumerate(disks.items()):
                key = f"OpaqueRef:{vdi}"
                data["vhds"][key] = relative
                data["vdis"][key] = {
                    "uuid": str(uuidlib.uuid4()),
                    "name_label": f"disk {position}",
                    "virtual_size": size,
                    "userdevice": str(position),
                    "other_config": {"$snapshot_of$uuid": vdi},
                }
                data["isVhdDifferencing"][key] = False
        else:
            data["xva"] = f"./{stamp}.xva"
        return self.repository.write_metadata(self.vm_uuid, stamp, data)


def backup_disk_states(writer: BackupWriter, vdi: str, states: list[Path], size: int) -> list[str]:
    """A full backup of ``states[0]`` then one delta per later state (only changed blocks);
    returns the metadata path of each backup."""
    paths = []
    previous = None
    for state in states:
        stamp = writer.next_stamp()
        blocks = (
            disk_blocks(state, size) if previous is None else changed_blocks(previous, state, size)
        )
        relative = writer.write_link(vdi, size, blocks, stamp)
        paths.append(writer.write_metadata(stamp, {vdi: (relative, size)}))
        previous = state
    return paths


def disk_size(path: Path) -> int:
    size = path.stat().st_size
    return -(-size // 512) * 512
