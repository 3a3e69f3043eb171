"""XVA writer and reader against GNU tar on the same disk image, in the same run.

* write: our XVA writer (1 MiB chunks, XXH64 checksum per chunk, zero chunks left out) vs
  ``tar -cf`` of the raw image (plain archiving, no checksums): target ratio <= 1.5.
* read: our reader (every checksum verified, the disk rebuilt with its zero chunks) vs
  ``tar -xOf <xva> | xxhsum -H1`` (unpacking and one XXH64 over the data; Debian package
  ``xxhash``): target ratio <= 1.5.
* peak RSS of ours under 100 MiB: memory does not grow with the disk.

Input: a mixed image (half random, a quarter zeros, a quarter text); 1 GiB, 64 MiB in quick
mode. Archives go to a temporary folder next to the data (the disk is part of both sides).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from common import (
    GIB,
    MIB,
    best_of,
    data_dir,
    data_file,
    print_result,
    result,
    run_command,
    run_python,
    size_label,
)

# Imported here, not in the measured functions: run_python times the call only.
from xobackup_core.formats.xva import DiskSpec, XvaReader, build_vm_metadata, write_xva

TARGET = 1.5
RSS_LIMIT_MIB = 100.0


def write_xva_file(source: str, target: str) -> int:
    """Write ``source`` (a raw image) as the only disk of an XVA at ``target``."""
    size = os.path.getsize(source)
    meta = build_vm_metadata({"uuid": "bench", "name_label": "bench"}, [DiskSpec(size, "d")])
    with open(source, "rb") as src, open(target, "wb") as dst:
        return write_xva(dst, meta, {meta.disks()[0].ref: (src, size)})


def read_xva_file(source: str) -> int:
    """Read and verify the XVA at ``source``, writing its disk to /dev/null."""
    total = 0
    with open(source, "rb") as src, open("/dev/null", "wb") as sink:
        for disk in XvaReader(src).disks():
            total += disk.read_into(sink)
    return total


def run(quick: bool = False) -> list[dict[str, Any]]:
    """The write and read results; ``quick`` uses a 64 MiB image."""
    tar, xxhsum = shutil.which("tar"), shutil.which("xxhsum")
    if tar is None or xxhsum is None:
        raise SystemExit("GNU tar and xxhsum (Debian package xxhash) are the references")
    size = 64 * MIB if quick else GIB
    runs = 3 if quick else 2
    source = data_file("mixed", size)
    results = []
    with tempfile.TemporaryDirectory(dir=data_dir()) as temp:
        xva = Path(temp) / "vm.xva"
        reference_tar = Path(temp) / "raw.tar"
        ours = best_of(runs, lambda: run_python("bench_xva:write_xva_file", source, xva))
        reference = best_of(
            runs,
            lambda: run_command(
                [tar, "-cf", str(reference_tar), source.name], cwd=str(source.parent)
            ),
        )
        results.append(
            result(
                f"xva write {size_label(size)} mixed",
                ours_s=ours.seconds,
                reference_s=reference.seconds,
                reference="tar -cf (no checksums)",
                max_ratio=TARGET,
                peak_rss_mib=ours.peak_rss_mib,
                max_rss_mib=RSS_LIMIT_MIB,
            )
        )
        ours = best_of(runs, lambda: run_python("bench_xva:read_xva_file", xva))
        reference = best_of(
            runs,
            lambda: run_command(["sh", "-c", f'"{tar}" -xOf "{xva}" | "{xxhsum}" -H1']),
        )
        results.append(
            result(
                f"xva read+verify {size_label(size)} mixed",
                ours_s=ours.seconds,
                reference_s=reference.seconds,
                reference="tar -xOf | xxhsum -H1",
                max_ratio=TARGET,
                peak_rss_mib=ours.peak_rss_mib,
                max_rss_mib=RSS_LIMIT_MIB,
                ok=ours.value == size,
            )
        )
    for entry in results:
        print_result(entry)
    return results


if __name__ == "__main__":
    outcome = run(quick="--quick" in sys.argv[1:])
    sys.exit(0 if all(entry["passed"] for entry in outcome) else 1)
