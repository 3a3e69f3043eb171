"""Compressor plugins against their reference tools, on the same input file, in the same run.

* zstd plugin, level 3, every CPU, vs ``zstd -3 -T<same>``: target ratio <= 1.15.
* gzip plugin (ISA-L), level 6, every CPU, vs Python's single-threaded ``gzip`` module at the
  same level: target ratio <= 0.5 (at least twice as fast); ``gzip -t`` must accept our output.
* decompression, each plugin vs its command-line tool (``zstd -d``, ``gzip -d``) reading the
  same file: target ratio <= 1.15 for zstd, <= 1.0 for gzip (ISA-L's inflate is not slower
  than gzip's).
* peak RSS of each plugin under 100 MiB at 1 GiB, and at 4 GiB in full mode.

Input: a file of mixed data (half random, a quarter zeros, a quarter text), read in 8 MiB
chunks; output to /dev/null (the codec is measured, not the disk). Quick mode uses 64 MiB.
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
    best_of,
    compare,
    cpu_count,
    data_dir,
    data_file,
    print_result,
    result,
    rss_result,
    run_command,
    run_python,
    size_label,
)

ZSTD_TARGET = 1.15
GZIP_TARGET = 0.5
RSS_LIMIT_MIB = 100.0


def compress_file(
    codec: str, source: str, target: str, level: int, threads: int
) -> dict[str, float]:
    """Compress ``source`` into ``target`` with a plugin codec or Python's ``gzip`` module.

    Runs in a child process (see common.run_python). Returns the wall and CPU seconds spent
    streaming, from the first read to the closed output: loading the plugin is not measured.
    """
    with open(source, "rb") as src, open(target, "wb") as dst:
        if codec == "python-gzip":
            import gzip

            start, cpu_start = time.perf_counter(), time.process_time()
            writer: Any = gzip.GzipFile(fileobj=dst, mode="wb", compresslevel=level, mtime=0)
        else:
            from xobackup_core.plugins import Plugins

            # Only this codec's plugin: the others' imports would count in the peak RSS.
            plugin = Plugins(autoload=False, only=[f"compress_{codec}"]).compressor(codec)
            start, cpu_start = time.perf_counter(), time.process_time()
            writer = plugin.open_compress(dst, level=level, threads=threads)
        buffer = bytearray(IO_CHUNK)
        view = memoryview(buffer)
        with writer:
            while count := src.readinto(buffer):
                writer.write(view[:count])
        return {"seconds": time.perf_counter() - start, "cpu_s": time.process_time() - cpu_start}


def decompress_file(codec: str, source: str) -> dict[str, float]:
    """Decompress ``source`` with a plugin codec into /dev/null, in 8 MiB reads.

    Runs in a child process; returns the wall and CPU seconds from opening to the last read.
    """
    from xobackup_core.plugins import Plugins

    plugin = Plugins(autoload=False, only=[f"compress_{codec}"]).compressor(codec)
    buffer = bytearray(IO_CHUNK)
    with open(source, "rb") as src, open("/dev/null", "wb") as sink:
        start, cpu_start = time.perf_counter(), time.process_time()
        with plugin.open_decompress(src) as reader:
            while count := reader.readinto(buffer):
                sink.write(memoryview(buffer)[:count])
        return {"seconds": time.perf_counter() - start, "cpu_s": time.process_time() - cpu_start}


def _decompress(codec: str, source: Path) -> ChildRun:
    child = run_python("bench_codecs:decompress_file", codec, source)
    return ChildRun(child.value["seconds"], child.peak_rss_mib, cpu_s=child.value["cpu_s"])


def _decompression(source: Path, size: int, threads: int, runs: int) -> list[dict[str, Any]]:
    """Both plugins reading back, against the command-line tools reading the same file."""
    zstd, gzip_tool = shutil.which("zstd"), shutil.which("gzip")
    if zstd is None or gzip_tool is None:
        raise RuntimeError("the zstd and gzip programs are needed")
    compressed = {
        "zstd": data_dir() / "bench-codecs-input.zst",
        "gzip": data_dir() / "bench-codecs-input.gz",
    }
    entries = []
    try:
        run_command([zstd, "-q", "-3", f"-T{threads}", "-c", source], stdout=compressed["zstd"])
        _compress("gzip", source, compressed["gzip"], 6, threads)
        for codec, tool, target in (("zstd", zstd, ZSTD_TARGET), ("gzip", gzip_tool, 1.0)):
            ours, reference = compare(
                runs,
                lambda codec=codec: _decompress(codec, compressed[codec]),
                lambda tool=tool, codec=codec: run_command([tool, "-d", "-c", compressed[codec]]),
            )
            entries.append(
                result(
                    f"{codec} decompress {size_label(size)} mixed",
                    ours_s=ours.seconds,
                    reference_s=reference.seconds,
                    reference=f"{codec} -d CLI",
                    max_ratio=target,
                    peak_rss_mib=ours.peak_rss_mib,
                    max_rss_mib=RSS_LIMIT_MIB,
                    reference_rss_mib=round(reference.peak_rss_mib, 1),
                    cpu_ratio=_cpu_ratio(ours, reference),
                    mib_per_s=round(size / MIB / ours.seconds, 1),
                )
            )
    finally:
        for path in compressed.values():
            path.unlink(missing_ok=True)
    return entries


def _compress(codec: str, source: Path, target: str | Path, level: int, threads: int) -> ChildRun:
    child = run_python("bench_codecs:compress_file", codec, source, target, level, threads)
    return ChildRun(child.value["seconds"], child.peak_rss_mib, cpu_s=child.value["cpu_s"])


def _cpu_ratio(ours: ChildRun, reference: ChildRun) -> float | None:
    if ours.cpu_s is None or not reference.cpu_s:
        return None
    return round(ours.cpu_s / reference.cpu_s, 3)


def _zstd(source: Path, size: int, threads: int, runs: int) -> dict[str, Any]:
    zstd = shutil.which("zstd")
    if zstd is None:
        raise RuntimeError("the zstd program is needed (apt-get install zstd)")
    ours, reference = compare(
        runs,
        lambda: _compress("zstd", source, "/dev/null", 3, threads),
        lambda: run_command([zstd, "-q", "-3", f"-T{threads}", "-c", source]),
    )
    return result(
        f"zstd -3 compress {size_label(size)} mixed, T{threads}",
        ours_s=ours.seconds,
        reference_s=reference.seconds,
        reference=f"zstd -3 -T{threads} CLI",
        max_ratio=ZSTD_TARGET,
        peak_rss_mib=ours.peak_rss_mib,
        max_rss_mib=RSS_LIMIT_MIB,
        reference_rss_mib=round(reference.peak_rss_mib, 1),
        cpu_ratio=_cpu_ratio(ours, reference),
        mib_per_s=round(size / MIB / ours.seconds, 1),
    )


def _gzip(source: Path, size: int, threads: int, runs: int) -> dict[str, Any]:
    gzip_tool = shutil.which("gzip")
    if gzip_tool is None:
        raise RuntimeError("the gzip program is needed")
    ours = best_of(runs, lambda: _compress("gzip", source, "/dev/null", 6, threads))
    # zlib at level 6 runs at under 100 MB/s: one run is long enough to be stable.
    reference = _compress("python-gzip", source, "/dev/null", 6, 1)
    # The output check, outside the timed runs: gzip(1) must read what we wrote.
    output = data_dir() / "bench-codecs-output.gz"
    try:
        _compress("gzip", source, output, 6, threads)
        run_command([gzip_tool, "-t", output])
        readable = True
    except RuntimeError as error:
        print(f"gzip -t rejected our output: {error}", file=sys.stderr)
        readable = False
    finally:
        output.unlink(missing_ok=True)
    return result(
        f"gzip -6 compress {size_label(size)} mixed, T{threads}",
        ours_s=ours.seconds,
        reference_s=reference.seconds,
        reference="Python gzip module -6",
        max_ratio=GZIP_TARGET,
        peak_rss_mib=ours.peak_rss_mib,
        max_rss_mib=RSS_LIMIT_MIB,
        ok=readable,
        gzip_t_accepts_output=readable,
        reference_rss_mib=round(reference.peak_rss_mib, 1),
        cpu_ratio=_cpu_ratio(ours, reference),
        mib_per_s=round(size / MIB / ours.seconds, 1),
    )


def run(quick: bool = False) -> list[dict[str, Any]]:
    """Every codec result; ``quick`` uses 64 MiB inputs and skips the 4 GiB memory check."""
    threads = cpu_count()
    size = 64 * MIB if quick else GIB
    runs = 3
    source = data_file("mixed", size)
    results = []
    for measure in (_zstd, _gzip):
        entry = measure(source, size, threads, runs)
        print_result(entry)
        results.append(entry)
    for entry in _decompression(source, size, threads, runs):
        print_result(entry)
        results.append(entry)
    if not quick:
        big = data_file("mixed", 4 * GIB)
        for codec, level in (("zstd", 3), ("gzip", 6)):
            run_ = _compress(codec, big, "/dev/null", level, threads)
            entry = rss_result(
                f"{codec} compress 4 GiB mixed, peak RSS",
                run_.peak_rss_mib,
                RSS_LIMIT_MIB,
                ours_s=run_.seconds,
            )
            print_result(entry)
            results.append(entry)
    return results


if __name__ == "__main__":
    outcome = run(quick="--quick" in sys.argv[1:])
    sys.exit(0 if all(entry["passed"] for entry in outcome) else 1)
