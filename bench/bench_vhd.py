"""VHD chain reads, merges and streamed writes against plain tools, in the same run.

* read: the whole virtual disk of a 30-deep chain (4 GiB disk: a full base and 29 deltas of
  128 MiB) written to /dev/null, vs ``cat`` of a raw file of the same size: target <= 1.5.
* merge: 10 deltas of 256 MiB changed data each into an 8 GiB base (in place, through the
  local remote, fsync before the rename), vs ``cp`` of the 2.5 GiB of changed data followed
  by ``sync`` of the copy: target <= 1.5. The same merge into
  a 32 GiB base must take about as long (time follows changed data, not disk size):
  target 32 GiB / 8 GiB <= 1.3.
* write: a VHD stream from a sparse 4 GiB raw image (1 GiB of data) vs
  ``qemu-img convert -O vpc``: target <= 1.3.
* peak RSS of ours under 150 MiB everywhere.

Quick mode divides the sizes by 16. The base compared with cp holds data in every block; the
two bases of the scaling pair are preallocated (fallocate) without being written, so a 32 GiB
base costs nothing to make.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from common import (
    GIB,
    MIB,
    best_of,
    compare,
    data_dir,
    print_result,
    result,
    run_command,
    run_python,
    then_sync,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BLOCK = 2 * MIB
RSS_LIMIT_MIB = 150.0


# -- functions run in a child by run_python --------------------------------------------------


def cat_chain(leaf: str, target: str) -> int:
    """Write the virtual disk of the chain ending at ``leaf`` to ``target``."""
    from xobackup_core.formats.vhd_chain import open_vhd_chain

    total = 0
    with open_vhd_chain(leaf) as chain, open(target, "wb") as out:
        for _, data in chain.iter_blocks():
            total += out.write(data)
    return total


def merge_chain(folder: str, names: list[str]) -> int:
    """Merge ``names[1:]`` into ``names[0]`` in ``folder`` through the local remote."""
    from xobackup_remote_local import LocalRemote

    from xobackup_core.formats.vhd_merge import merge_vhd_chain

    return merge_vhd_chain(LocalRemote(folder), names).merged_bytes


def write_vhd(source: str, target: str) -> int:
    """Stream ``source`` (a sparse raw image) into a dynamic VHD at ``target``."""
    from xobackup_core.formats.vhd_writer import (
        read_file_blocks,
        sparse_file_blocks,
        write_vhd_stream,
    )

    fd = os.open(source, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        allocated = sparse_file_blocks(fd, size)
        with open(target, "wb") as out:
            layout = write_vhd_stream(
                out.write, size, read_file_blocks(fd, allocated, size), allocated
            )
        return layout.stream_size
    finally:
        os.close(fd)


# -- data ------------------------------------------------------------------------------------


def _write_vhd(path: Path, size: int, blocks: Any, allocated: list[int], parent: Any = None) -> Any:
    from xobackup_core.formats.vhd_writer import write_vhd_stream

    with open(path, "wb") as out:
        return write_vhd_stream(out.write, size, blocks, allocated, parent=parent)


def _delta_blocks(indexes: list[int]) -> Any:
    for index in indexes:
        yield index, os.urandom(BLOCK)


def _make_chain(folder: Path, size: int, depth: int, delta_blocks: int) -> tuple[Path, Path]:
    """A 30-deep chain with a base full of random data; also the raw image of the same size."""
    from xobackup_core.formats.vhd_writer import ParentLink

    folder.mkdir(parents=True, exist_ok=True)
    raw = folder / "same-size.raw"
    count = size // BLOCK
    with open(raw, "wb") as out:
        for _ in range(count):
            out.write(os.urandom(BLOCK))
    fd = os.open(raw, os.O_RDONLY)
    try:
        from xobackup_core.formats.vhd_writer import read_file_blocks

        blocks = list(range(count))
        layout = _write_vhd(folder / "d00.vhd", size, read_file_blocks(fd, blocks, size), blocks)
    finally:
        os.close(fd)
    step = max(1, count // delta_blocks)
    for depth_index in range(1, depth):
        link = ParentLink(layout.footer.uuid, f"d{depth_index - 1:02d}.vhd")
        start = depth_index % step
        indexes = list(range(start, count, step))[:delta_blocks]
        layout = _write_vhd(
            folder / f"d{depth_index:02d}.vhd", size, _delta_blocks(indexes), indexes, link
        )
    return folder / f"d{depth - 1:02d}.vhd", raw


def _make_base(path: Path, size: int, base_uuid: uuid.UUID, written: bool) -> None:
    """A dynamic VHD with every block allocated.

    ``written``: every block holds data, like a real full backup (costs a write of the whole
    disk). Otherwise the blocks are preallocated with ``fallocate`` but never written, so a
    32 GiB base costs nothing to make; still real extents, unlike holes, which would charge
    the merge for allocating blocks.
    """
    from xobackup_core.formats.source import LocalFile
    from xobackup_core.formats.vhd_structs import build_footer
    from xobackup_core.formats.vhd_writer import plan_vhd_stream

    count = size // BLOCK
    layout = plan_vhd_stream(size, range(count), uuid=base_uuid)
    with open(path, "wb") as out:
        out.write(layout.metadata)
        if not written:
            os.posix_fallocate(out.fileno(), 0, layout.stream_size)
    pattern = os.urandom(BLOCK)
    with LocalFile(path) as file:
        bitmap = b"\xff" * 512
        for position in range(count):
            offset = layout.first_block_offset + position * (BLOCK + 512)
            file.write_at(offset, bitmap + pattern if written else bitmap)
        file.write_at(layout.stream_size - 512, build_footer(layout.footer))


def _make_merge_set(folder: Path, size: int, deltas: int, delta_size: int) -> uuid.UUID:
    """10 chained delta files (changed blocks spread over the disk) on top of a base whose
    uuid is returned, and the same changed data as one raw file, ``changed.raw``."""
    from xobackup_core.formats.vhd_writer import ParentLink

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    base_uuid = uuid.uuid4()
    parent = ParentLink(base_uuid, "base.vhd")
    per_delta = delta_size // BLOCK
    with open(folder / "changed.raw", "wb") as raw:
        for number in range(deltas):
            indexes = [number + deltas * k for k in range(per_delta)]

            def blocks(indexes: list[int] = indexes) -> Any:
                for index in indexes:
                    data = os.urandom(BLOCK)
                    raw.write(data)
                    yield index, data

            name = f"delta{number:02d}.vhd"
            layout = _write_vhd(folder / name, size, blocks(), indexes, parent)
            parent = ParentLink(layout.footer.uuid, name)
    return base_uuid


def _install_merge(folder: Path, data: Path, size: int, base_uuid: uuid.UUID, written: bool):
    """A fresh merge input in ``folder``: a new base and copies of the deltas."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    _make_base(folder / "base.vhd", size, base_uuid, written)
    names = ["base.vhd"]
    for delta in sorted(data.glob("delta*.vhd")):
        shutil.copyfile(delta, folder / delta.name)
        names.append(delta.name)
    return names


def _make_sparse_source(path: Path, size: int, data_fraction: float) -> None:
    """A raw image whose data (random) fills ``data_fraction`` of it in 16 MiB runs."""
    run = 16 * MIB
    every = int(run / data_fraction)
    with open(path, "wb") as out:
        out.truncate(size)
        for offset in range(0, size, every):
            out.seek(offset)
            for _ in range(run // MIB):
                out.write(os.urandom(MIB))


# -- benchmarks ------------------------------------------------------------------------------


def _drop(path: Path) -> None:
    if path.exists():
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def bench_read(work: Path, size: int, delta_blocks: int, runs: int) -> dict[str, Any]:
    leaf, raw = _make_chain(work / "chain", size, 30, delta_blocks)
    ours = best_of(runs, lambda: run_python("bench_vhd:cat_chain", str(leaf), os.devnull))
    assert ours.value == size
    reference = best_of(runs, lambda: run_command(["cat", raw]))
    entry = result(
        f"vhd read 30-deep chain {size // MIB} MiB",
        ours_s=ours.seconds,
        reference_s=reference.seconds,
        reference="cat raw",
        max_ratio=1.5,
        peak_rss_mib=ours.peak_rss_mib,
        max_rss_mib=RSS_LIMIT_MIB,
    )
    _drop(work / "chain")
    return entry


def bench_merge(work: Path, base_size: int, big_base: int, delta_size: int, runs: int) -> list:
    data = work / "merge-data"
    rss = 0.0

    def merge(size: int, written: bool, base_uuid: uuid.UUID, source: Path) -> Any:
        names = _install_merge(work / "merge", source, size, base_uuid, written)
        subprocess.run(["sync"], check=True)
        run = run_python("bench_vhd:merge_chain", str(work / "merge"), names)
        assert run.value == 10 * delta_size, run.value
        return run

    # The comparison with cp uses a base full of data.
    base_uuid = _make_merge_set(data, base_size, 10, delta_size)
    written_run = best_of(runs, lambda: merge(base_size, True, base_uuid, data))
    rss = max(rss, written_run.peak_rss_mib)
    # The scaling pair uses preallocated bases of both sizes, each with its own deltas, and
    # alternates them so that load elsewhere on the machine, and what one merge leaves in the
    # page cache, weigh on both sides alike.
    big_data = work / "merge-data-big"
    big_uuid = _make_merge_set(big_data, big_base, 10, delta_size)
    big_run, small_run = compare(
        runs + 1,
        lambda: merge(big_base, False, big_uuid, big_data),
        lambda: merge(base_size, False, base_uuid, data),
    )
    rss = max(rss, small_run.peak_rss_mib, big_run.peak_rss_mib)
    _drop(big_data)
    changed = data / "changed.raw"
    copy_target = work / "merge-data" / "copy.raw"

    def copy() -> Any:
        # The merge makes its writes durable (fsync) before it renames anything, so the
        # reference does too: cp, then sync of the copy alone.
        subprocess.run(["sync"], check=True)
        return then_sync(lambda: run_command(["cp", changed, copy_target]), copy_target)

    reference = best_of(runs, copy)
    entries = [
        result(
            f"vhd merge 10x{delta_size // MIB} MiB into {base_size // GIB or base_size // MIB}"
            f"{' GiB' if base_size >= GIB else ' MiB'}",
            ours_s=written_run.seconds,
            reference_s=reference.seconds,
            reference="cp+sync changed data",
            max_ratio=1.5,
            peak_rss_mib=written_run.peak_rss_mib,
            max_rss_mib=RSS_LIMIT_MIB,
        ),
        result(
            f"vhd merge scaling base {big_base // base_size}x larger",
            ours_s=big_run.seconds,
            reference_s=small_run.seconds,
            reference="same merge, small base",
            max_ratio=1.3,
            peak_rss_mib=rss,
            max_rss_mib=RSS_LIMIT_MIB,
        ),
    ]
    _drop(work / "merge")
    _drop(work / "merge-data")
    return entries


def bench_write(work: Path, size: int, runs: int) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    source = work / "sparse-source.raw"
    _make_sparse_source(source, size, 0.25)
    ours_target = work / "ours.vhd"
    qemu_target = work / "qemu.vhd"
    qemu = shutil.which("qemu-img")
    if qemu is None:
        raise RuntimeError("qemu-img is needed for the write benchmark (Debian qemu-utils)")

    def fresh(target: Path) -> None:
        # Both sides create a new file: replacing one makes ext4 flush it on close.
        _drop(target)
        subprocess.run(["sync"], check=True)

    def ours_run() -> Any:
        fresh(ours_target)
        return run_python("bench_vhd:write_vhd", str(source), str(ours_target))

    def qemu_run() -> Any:
        fresh(qemu_target)
        return run_command([qemu, "convert", "-f", "raw", "-O", "vpc", source, qemu_target])

    ours = best_of(runs, ours_run)
    reference = best_of(runs, qemu_run)
    same = (
        subprocess.run(
            [
                qemu,
                "compare",
                "-q",
                "-f",
                "raw",
                "-F",
                "vpc",
                source,
                ours_target,
            ],
            check=False,
        ).returncode
        == 0
    )
    entry = result(
        f"vhd write stream from sparse {size // MIB} MiB raw",
        ours_s=ours.seconds,
        reference_s=reference.seconds,
        reference="qemu-img convert -O vpc",
        max_ratio=1.3,
        peak_rss_mib=ours.peak_rss_mib,
        max_rss_mib=RSS_LIMIT_MIB,
        ok=same,
    )
    for path in (source, ours_target, qemu_target):
        _drop(path)
    return entry


def run(quick: bool = False) -> list[dict[str, Any]]:
    """All VHD benchmarks; ``quick`` uses sizes 16 times smaller."""
    scale = 16 if quick else 1
    runs = 1 if quick else 2
    work = data_dir() / "vhd"
    work.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        entry = bench_read(work, 4 * GIB // scale, 64 // scale, runs)
        print_result(entry)
        results.append(entry)
        for entry in bench_merge(
            work, 8 * GIB // scale, 32 * GIB // scale, 256 * MIB // scale, runs
        ):
            print_result(entry)
            results.append(entry)
        entry = bench_write(work, 4 * GIB // scale, runs)
        print_result(entry)
        results.append(entry)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results


if __name__ == "__main__":
    run(quick="--quick" in sys.argv)
