"""File-level restore: browsing and extracting through a deep VHD chain on a local remote.

* list a partition's root in a 100-deep chain (open the backup, the chain, the MBR, the ext4
  filesystem, list ``/``): target under 2 s. The reference column is the same listing on the
  raw image with the same library (dissect.extfs), for scale.
* extract a 200 MiB file from a 100-deep chain (``files get`` code path: range reads of the
  chain, block cache, dissect.extfs, safe folder writer) vs reading the same file out of the raw
  image with dissect.extfs and writing it to the same folder: target rate >= 0.5x.

The disk: an MBR with one ext4 partition holding the file, backed up as a full plus 99 deltas,
each delta rewriting one block of the file (same bytes) so reads come from every depth. Built
with mkfs.ext4 -d and sfdisk. Quick mode: a 64 MiB file, 20-deep chain.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid as uuidlib
from pathlib import Path
from typing import Any

from common import MIB, compare, data_dir, print_result, result, run_python, size_label

# Imported when the module loads (before the timed call, in each child): both sides are
# measured without library import time (about 0.5 s for ours on a CLI run, 0.1 s for dissect).
try:
    import dissect.extfs
    import dissect.util.stream
    import dissect.volume.disk
    import dissect.volume.lvm
    import xobackup_remote_local
    import xobackup_restore_files.browse as browse
    import xobackup_restore_files.extract as extract
    import xobackup_restore_files.readers as readers

    import xobackup_core.engine.repository as repository_module
    import xobackup_core.formats.vhd_writer as vhd_writer

    MISSING = None
except ImportError as error:
    MISSING = str(error)

LIST_TARGET_S = 2.0
RSS_LIMIT_MIB = 160.0
"""Cache (32 MiB) + read-ahead + the interpreter and libraries: not the file's size."""
EXTRACT_TARGET = 0.5
BLOCK = 2 * MIB
JOB = "0b0b0b0b-0000-4000-8000-00000000be0c"
VDI = "0c0c0c0c-0000-4000-8000-00000000be0c"
PARTITION_START = MIB


def _build(folder: Path, file_size: int, depth: int) -> dict[str, Any]:
    """The raw disk image, and the same disk as a ``depth``-deep chain on a local remote."""
    BackupRepository = repository_module.BackupRepository
    format_timestamp = repository_module.format_timestamp
    ParentLink = vhd_writer.ParentLink
    sparse_file_blocks = vhd_writer.sparse_file_blocks
    write_vhd_stream = vhd_writer.write_vhd_stream

    tree = folder / "tree"
    tree.mkdir()
    (tree / "hello.txt").write_text("hello\n")
    with open(tree / "big.bin", "wb") as out:
        left = file_size
        while left:
            out.write(os.urandom(min(left, 8 * MIB)))
            left -= min(left, 8 * MIB)
    fs_size = (file_size + 64 * MIB) // MIB * MIB
    fs_image = folder / "ext4.img"
    with open(fs_image, "wb") as image:
        image.truncate(fs_size)
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-b", "4096", "-d", str(tree), str(fs_image)],
        check=True,
        capture_output=True,
    )
    shutil.rmtree(tree)
    disk = folder / "disk.img"
    size = PARTITION_START + fs_size + MIB
    with open(disk, "wb") as image:
        image.truncate(size)
    table = f"label: dos\nstart=2048, size={fs_size // 512}, type=83\n"
    subprocess.run(["sfdisk", "-q", str(disk)], input=table.encode(), check=True)
    with open(fs_image, "rb") as src, open(disk, "r+b") as dst:
        dst.seek(PARTITION_START)
        shutil.copyfileobj(src, dst, 8 * MIB)
    fs_image.unlink()

    remote = xobackup_remote_local.LocalRemote(folder / "remote", name="bench")
    repository = BackupRepository(remote)
    vm = str(uuidlib.uuid4())
    fd = os.open(disk, os.O_RDONLY)
    try:
        allocated = sparse_file_blocks(fd, size)

        def block(index: int) -> bytes:
            data = os.pread(fd, BLOCK, index * BLOCK)
            return data + bytes(BLOCK - len(data))

        parent = None
        stamp_ms = 1_785_556_800_000
        tip = ""
        # Deltas rewrite the blocks in the middle of the file, one each, so the data of the
        # file is spread over the whole chain.
        middle = [i for i in allocated if i * BLOCK > PARTITION_START + 16 * MIB][: depth - 1]
        for link in range(depth):
            stamp = format_timestamp(stamp_ms + link * 3_600_000)
            indexes = allocated if link == 0 else [middle[(link - 1) % len(middle)]]
            disk_uuid = uuidlib.uuid4()
            tip = f"vdis/{JOB}/{VDI}/{stamp}.vhd"
            with remote.open_write(f"{repository.vm_folder(vm)}/{tip}") as writer:
                write_vhd_stream(
                    writer.write,
                    size,
                    ((i, block(i)) for i in indexes),
                    indexes,
                    parent=parent,
                    uuid=disk_uuid,
                )
            parent = ParentLink(disk_uuid, f"{stamp}.vhd")
    finally:
        os.close(fd)
    key = f"OpaqueRef:{VDI}"
    metadata = repository.write_metadata(
        vm,
        stamp,
        {
            "mode": "delta",
            "jobId": JOB,
            "timestamp": stamp_ms,
            "vm": {"uuid": vm, "name_label": "bench"},
            "vhds": {key: tip},
            "vdis": {key: {"uuid": VDI, "userdevice": "0", "virtual_size": size}},
        },
    )
    return {"remote": str(remote.root), "metadata": metadata, "disk": str(disk)}


# -- measured in child processes ----------------------------------------------------------------
def ours_list(remote_root: str, metadata: str) -> int:
    with browse.open_backup(
        xobackup_remote_local.LocalRemote(remote_root), metadata, readers.builtin_readers()
    ) as browser:
        return len(list(browser.filesystem("0", "1").get("/").children()))


def reference_list(disk: str) -> int:
    with open(disk, "rb") as raw:
        size = os.fstat(raw.fileno()).st_size - PARTITION_START
        fs = dissect.extfs.ExtFS(dissect.util.stream.RangeStream(raw, PARTITION_START, size))
        return len([n for n in fs.get("/").listdir() if n not in (".", "..")])


def ours_extract(remote_root: str, metadata: str, target: str) -> int:
    with browse.open_backup(
        xobackup_remote_local.LocalRemote(remote_root), metadata, readers.builtin_readers()
    ) as browser:
        filesystem = browser.filesystem("0", "1")
        items = [("/big.bin", filesystem.get("/big.bin"))]
        _, size = extract.extract_to_folder(items, target, overwrite=True, warn=print)
    return size


def reference_extract(disk: str, target: str) -> int:
    os.makedirs(target, exist_ok=True)
    with open(disk, "rb") as raw, open(Path(target, "big.bin"), "wb") as out:
        size = os.fstat(raw.fileno()).st_size - PARTITION_START
        stream = dissect.util.stream.RangeStream(raw, PARTITION_START, size)
        source = dissect.extfs.ExtFS(stream).get("/big.bin").open()
        copied = 0
        while chunk := source.read(MIB):
            out.write(chunk)
            copied += len(chunk)
    return copied


# -- the benchmark ------------------------------------------------------------------------------
def run(quick: bool = False) -> list[dict[str, Any]]:
    """Listing and extraction results; ``quick`` uses a 64 MiB file and a 20-deep chain."""
    if MISSING:
        raise RuntimeError(f"install plugins/restore_files and remote_local first ({MISSING})")
    for tool in ("mkfs.ext4", "sfdisk"):
        if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
            raise RuntimeError(f"the {tool} program is needed (e2fsprogs, fdisk)")
    file_size = 64 * MIB if quick else 200 * MIB
    depth = 20 if quick else 100
    folder = data_dir() / f"file-restore-{os.getpid()}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    results = []
    try:
        built = _build(folder, file_size, depth)
        ours, reference = compare(
            3,
            lambda: run_python("bench_file_restore:ours_list", built["remote"], built["metadata"]),
            lambda: run_python("bench_file_restore:reference_list", built["disk"]),
        )
        entry = result(
            f"list / of an ext4 partition, {depth}-deep chain",
            ours_s=ours.seconds,
            reference_s=reference.seconds,
            reference="dissect.extfs on the raw image (for scale)",
            ratio=ours.seconds,
            max_ratio=LIST_TARGET_S,
            peak_rss_mib=ours.peak_rss_mib,
            ok=ours.value == reference.value,
        )
        entry["target"] = f"ours_s < {LIST_TARGET_S:g} s"
        print_result(entry)
        results.append(entry)

        ours_target, reference_target = folder / "out-ours", folder / "out-reference"

        # Each side starts with no dirty pages: the other side's 200 MiB of output being written
        # back must not slow it down.
        def measure_ours():
            shutil.rmtree(ours_target, ignore_errors=True)
            os.sync()
            return run_python(
                "bench_file_restore:ours_extract",
                built["remote"],
                built["metadata"],
                str(ours_target),
            )

        def measure_reference():
            shutil.rmtree(reference_target, ignore_errors=True)
            os.sync()
            return run_python(
                "bench_file_restore:reference_extract", built["disk"], str(reference_target)
            )

        ours, reference = compare(2 if not quick else 3, measure_ours, measure_reference)
        same = _same_file(ours_target / "big.bin", reference_target / "big.bin")
        entry = result(
            f"extract a {size_label(file_size)} file, {depth}-deep chain",
            ours_s=ours.seconds,
            reference_s=reference.seconds,
            reference="dissect.extfs reading the raw image",
            ratio=reference.seconds / ours.seconds,
            min_ratio=EXTRACT_TARGET,
            peak_rss_mib=ours.peak_rss_mib,
            max_rss_mib=RSS_LIMIT_MIB,
            ok=same and ours.value == file_size,
            mib_per_s=round(file_size / MIB / ours.seconds, 1),
        )
        entry["target"] = f"rate >= {EXTRACT_TARGET:g}x reference, RSS < {RSS_LIMIT_MIB:g} MiB"
        print_result(entry)
        results.append(entry)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return results


def _same_file(first: Path, second: Path) -> bool:
    with open(first, "rb") as a, open(second, "rb") as b:
        while True:
            left, right = a.read(8 * MIB), b.read(8 * MIB)
            if left != right:
                return False
            if not left:
                return True


if __name__ == "__main__":
    start = time.perf_counter()
    outcome = run(quick="--quick" in sys.argv[1:])
    if "--json" in sys.argv[1:]:
        print(json.dumps(outcome, indent=2))
    sys.exit(0 if all(entry["passed"] for entry in outcome) else 1)
