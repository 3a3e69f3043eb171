"""The local-folder remote writing a stream, against ``dd`` writing the same file.

* write 2 GiB: ``Remote.open_write`` on a ``file://`` remote (8 MiB writes, disk writes
  started every 32 MiB, fsync, atomic rename, folder fsync) vs ``dd bs=8M conv=fsync`` into
  the same folder: target ratio <= 1.1.
* peak RSS of ours under 100 MiB writing 1 GiB and 4 GiB (4 GiB in full mode only).

Input: a mixed data file read in 8 MiB chunks (from the page cache: the disk being measured is
the one written). Both sides' outputs are deleted after each run. Quick mode uses 64 MiB.
Set ``XOBACKUP_BENCH_DATA`` to put the data and the remote's folder on the disk to measure.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any

from common import (
    GIB,
    IO_CHUNK,
    MIB,
    ChildRun,
    compare,
    data_dir,
    data_file,
    print_result,
    result,
    rss_result,
    run_command,
    run_python,
    size_label,
)

TARGET = 1.1
RSS_LIMIT_MIB = 100.0


def write_to_remote(source: str, folder: str, name: str) -> float:
    """Stream ``source`` into ``name`` on the remote ``file://<folder>``.

    Runs in a child process (see common.run_python). Returns the seconds from opening the
    remote file to its commit (fsync and rename): loading the plugin is not measured.
    """
    from xobackup_core.plugins import Plugins

    remote = Plugins(autoload=False, only=["remote_local"]).remote(
        f"file://{folder}", {"name": "bench"}
    )
    buffer = bytearray(IO_CHUNK)
    view = memoryview(buffer)
    start = time.perf_counter()
    with open(source, "rb") as src, remote.open_write(name) as writer:
        while count := src.readinto(buffer):
            writer.write(view[:count])
    return time.perf_counter() - start


def _ours(source: Path, folder: Path) -> ChildRun:
    try:
        child = run_python("bench_remote_local:write_to_remote", source, folder, "ours.bin")
        return ChildRun(child.value, child.peak_rss_mib)
    finally:
        (folder / "ours.bin").unlink(missing_ok=True)


def _dd(dd: str, source: Path, folder: Path) -> ChildRun:
    target = folder / "dd.bin"
    try:
        return run_command(
            [dd, f"if={source}", f"of={target}", "bs=8M", "conv=fsync", "status=none"]
        )
    finally:
        target.unlink(missing_ok=True)


def _warm(source: Path) -> None:
    """Read ``source`` once so both sides read it from the page cache."""
    with open(source, "rb") as src:
        while src.read(IO_CHUNK):
            pass


def run(quick: bool = False) -> list[dict[str, Any]]:
    """Every local-remote result; ``quick`` uses 64 MiB and skips the 4 GiB memory check."""
    dd = shutil.which("dd")
    if dd is None:
        raise RuntimeError("the dd program is needed (coreutils)")
    folder = data_dir() / "remote-local"
    folder.mkdir(exist_ok=True)
    results = []
    try:
        size = 64 * MIB if quick else 2 * GIB
        source = data_file("mixed", size)
        _warm(source)
        ours, reference = compare(3, lambda: _ours(source, folder), lambda: _dd(dd, source, folder))
        entry = result(
            f"local remote write {size_label(size)} + fsync",
            ours_s=ours.seconds,
            reference_s=reference.seconds,
            reference="dd bs=8M conv=fsync",
            max_ratio=TARGET,
            peak_rss_mib=ours.peak_rss_mib,
            max_rss_mib=RSS_LIMIT_MIB,
            mib_per_s=round(size / MIB / ours.seconds, 1),
        )
        print_result(entry)
        results.append(entry)
        for rss_size in [64 * MIB] if quick else [GIB, 4 * GIB]:
            source = data_file("mixed", rss_size)
            child = _ours(source, folder)
            entry = rss_result(
                f"local remote write {size_label(rss_size)}, peak RSS",
                child.peak_rss_mib,
                RSS_LIMIT_MIB,
                ours_s=child.seconds,
            )
            print_result(entry)
            results.append(entry)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return results


if __name__ == "__main__":
    outcome = run(quick="--quick" in sys.argv[1:])
    sys.exit(0 if all(entry["passed"] for entry in outcome) else 1)
