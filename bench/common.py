"""Helpers every benchmark uses: timing, child processes with their peak RSS, test data, results.

A benchmark measures xobackup against a reference tool in the same run, on the same input, and
reports the ratio (see bench/README.md). Both sides run in child processes so each gets a clean
peak RSS:

* :func:`run_command` runs a program (``zstd``, ``dd``...) and returns its wall time and peak
  RSS;
* :func:`run_python` runs a function of a bench module in a fresh interpreter and returns the
  time of the call itself (interpreter start-up excluded) and the process's peak RSS.

Peak RSS comes from ``wait4()`` on a child forked by a small launcher process, not by the
caller: Linux carries the RSS of the forking process into the child's ``ru_maxrss`` across
``exec``, so a child forked by a big process would report at least the parent's size. The
launcher (a bare ``python -S``) puts a floor of about 10 MiB under every figure.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30
IO_CHUNK = 8 * MIB
"""Read and write size of the benchmarks' own streaming loops."""
BENCH_DIR = Path(__file__).resolve().parent
DATA_KINDS = ("random", "zeros", "text", "mixed", "sparse")


def cpu_count() -> int:
    """CPUs this process may run on (what the codecs use by default)."""
    return len(os.sched_getaffinity(0)) or 1


def data_dir() -> Path:
    """Where test data lives: ``$XOBACKUP_BENCH_DATA`` or ``<tmp>/xobackup-bench``.

    Put it on the disk you want to measure; it needs room for the largest input (4 GiB in
    full mode) plus the outputs.
    """
    configured = os.environ.get("XOBACKUP_BENCH_DATA")
    path = Path(configured) if configured else Path(tempfile.gettempdir(), "xobackup-bench")
    path.mkdir(parents=True, exist_ok=True)
    return path


class Timer:
    """``with Timer() as t: ...`` then ``t.seconds`` (monotonic wall clock)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._start = 0.0

    def __enter__(self) -> Timer:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._start


@dataclass
class ChildRun:
    """What a child process cost."""

    seconds: float
    """Wall time (for :func:`run_python`: of the function call only)."""
    peak_rss_mib: float
    """The child's peak resident set size."""
    value: Any = None
    """What the function returned (:func:`run_python` only; must be JSON-serialisable)."""
    cpu_s: float | None = None
    """User + system CPU time of every thread (for :func:`run_python`: of the call only).

    Steadier than wall time on a busy machine: report it next to the wall-time ratio."""


_LAUNCHER = r"""
import json, os, sys, time
spec = json.loads(sys.argv[1])
start = time.perf_counter()
pid = os.fork()
def redirect(path, target, flags):
    fd = os.open(path, flags, 0o644)
    os.dup2(fd, target)
    os.close(fd)
if pid == 0:
    try:
        if spec["stdin"]:
            redirect(spec["stdin"], 0, os.O_RDONLY)
        write = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        redirect(spec["stdout"] or os.devnull, 1, write)
        redirect(spec["stderr"], 2, write)
        if spec["cwd"]:
            os.chdir(spec["cwd"])
        os.execvp(spec["argv"][0], spec["argv"])
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "maxrss_kib": usage.ru_maxrss,
                  "cpu_s": usage.ru_utime + usage.ru_stime,
                  "exit": os.waitstatus_to_exitcode(status)}))
"""


def run_command(
    argv: Sequence[str],
    *,
    stdin: str | os.PathLike[str] | None = None,
    stdout: str | os.PathLike[str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> ChildRun:
    """Run ``argv`` with stdin/stdout redirected from/to files (stdout default: /dev/null).

    Raises RuntimeError with the program's stderr when it exits non-zero.
    """
    with tempfile.NamedTemporaryFile(prefix="bench-stderr-", delete=False) as stderr_file:
        stderr_path = stderr_file.name
    spec = {
        "argv": [str(arg) for arg in argv],
        "stdin": str(stdin) if stdin else None,
        "stdout": str(stdout) if stdout else None,
        "stderr": stderr_path,
        "cwd": str(cwd) if cwd else None,
    }
    try:
        launcher = subprocess.run(
            [sys.executable, "-S", "-c", _LAUNCHER, json.dumps(spec)],
            capture_output=True,
            text=True,
            check=True,
        )
        report = json.loads(launcher.stdout)
        if report["exit"] != 0:
            error = Path(stderr_path).read_text(errors="replace").strip()
            raise RuntimeError(f"{' '.join(spec['argv'])} exited with {report['exit']}: {error}")
    finally:
        os.unlink(stderr_path)
    return ChildRun(report["seconds"], report["maxrss_kib"] / 1024, cpu_s=report["cpu_s"])


_BOOTSTRAP = r"""
import importlib, json, sys, time
spec = json.loads(sys.argv[1])
sys.path.insert(0, spec["path"])
module_name, function_name = spec["function"].split(":")
function = getattr(importlib.import_module(module_name), function_name)
start, cpu_start = time.perf_counter(), time.process_time()
value = function(*spec["args"], **spec["kwargs"])
seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
with open(spec["result"], "w") as result:
    json.dump({"seconds": seconds, "cpu_s": cpu, "value": value}, result)
"""


def run_python(function: str, *args: Any, **kwargs: Any) -> ChildRun:
    """Call ``"module:function"`` (a module of bench/ or any importable one) in a fresh child.

    Arguments and the return value go through JSON. ``seconds`` is the call's own duration,
    so the comparison with a C tool is not skewed by the interpreter's start-up and imports.
    """
    with tempfile.NamedTemporaryFile(prefix="bench-result-", suffix=".json", delete=False) as out:
        result_path = out.name
    spec = {
        "path": str(BENCH_DIR),
        "function": function,
        "args": [str(a) if isinstance(a, os.PathLike) else a for a in args],
        "kwargs": {k: str(v) if isinstance(v, os.PathLike) else v for k, v in kwargs.items()},
        "result": result_path,
    }
    try:
        child = run_command([sys.executable, "-c", _BOOTSTRAP, json.dumps(spec)])
        result = json.loads(Path(result_path).read_text())
    finally:
        os.unlink(result_path)
    return ChildRun(result["seconds"], child.peak_rss_mib, result["value"], result["cpu_s"])


def _best(results: Sequence[ChildRun]) -> ChildRun:
    fastest = min(results, key=lambda run: run.seconds)
    return ChildRun(
        fastest.seconds,
        max(run.peak_rss_mib for run in results),
        fastest.value,
        min((run.cpu_s for run in results if run.cpu_s is not None), default=None),
    )


def best_of(runs: int, measure: Callable[[], ChildRun]) -> ChildRun:
    """Call ``measure()`` ``runs`` times: the fastest time, the highest peak RSS seen."""
    return _best([measure() for _ in range(max(runs, 1))])


def then_sync(measure: Callable[[], ChildRun], path: str | os.PathLike[str]) -> ChildRun:
    """``measure()`` (a reference client that writes ``path``), then ``sync path``.

    Our remotes make a file durable before they publish it (fsync, SMB2 FLUSH, NFS COMMIT,
    fsync@openssh.com); the usual clients do not, and a file deleted right after such a
    client wrote it never reaches the disk at all. Timing the sync too compares the same
    work. ``value`` of the result holds ``{"sync_s": seconds}`` so the plain client's time
    can be reported beside it.
    """
    run = measure()
    start = time.perf_counter()
    subprocess.run(["sync", os.fspath(path)], check=True)
    synced = time.perf_counter() - start
    return ChildRun(
        run.seconds + synced, run.peak_rss_mib, value={"sync_s": synced}, cpu_s=run.cpu_s
    )


SETTLE_S = 4.0
"""Pause before each timed run of :func:`compare` with ``settle``. This VM hands freed memory
back to its host about 2 s after it is freed, and a run that writes gigabytes right after the
previous run deleted its file gets those pages back cheaply: 4 GiB written at once took 1 s of
kernel time, the same 3 s later 5 s. Without the pause, whichever side runs second after a
quick start is favoured."""


def compare(
    runs: int,
    ours: Callable[[], ChildRun],
    reference: Callable[[], ChildRun],
    settle: bool = False,
) -> tuple[ChildRun, ChildRun]:
    """Best of ``runs`` for each side, alternating them so a burst of load elsewhere on the
    machine hits both rather than one; with ``settle``, each run starts :data:`SETTLE_S`
    after the previous one ended."""
    ours_runs, reference_runs = [], []
    for _ in range(max(runs, 1)):
        for side, runs_of_side in ((reference, reference_runs), (ours, ours_runs)):
            if settle:
                time.sleep(SETTLE_S)
            runs_of_side.append(side())
    return _best(ours_runs), _best(reference_runs)


# -- test data --------------------------------------------------------------------------------

_VOCABULARY_SEED = 20240229


def _text_blocks(count: int = 16, size: int = MIB) -> list[bytes]:
    """Log-like text: random words and numbers, compressible about 3:1 like real text."""
    rng = random.Random(_VOCABULARY_SEED)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choices(letters, k=rng.randint(2, 10))) for _ in range(4000)]
    blocks = []
    for _ in range(count):
        lines = []
        length = 0
        while length < size:
            line = f"{rng.randint(0, 10**9):010d} {' '.join(rng.choices(words, k=12))}\n"
            lines.append(line)
            length += len(line)
        blocks.append("".join(lines).encode()[:size])
    return blocks


def _unit(kind: str, rng: random.Random, text: list[bytes], zeros: bytes) -> bytes:
    """``IO_CHUNK`` bytes of ``kind``."""
    if kind == "random":
        return os.urandom(IO_CHUNK)
    if kind == "zeros":
        return zeros
    if kind == "text":
        return b"".join(rng.choice(text) for _ in range(IO_CHUNK // MIB))
    # mixed: half random, a quarter zeros, a quarter text, in 1 MiB runs
    parts = []
    for index in range(IO_CHUNK // MIB):
        slot = index % 4
        if slot < 2:
            parts.append(os.urandom(MIB))
        elif slot == 2:
            parts.append(zeros[:MIB])
        else:
            parts.append(rng.choice(text))
    return b"".join(parts)


def make_data_file(path: str | os.PathLike[str], size: int, kind: str) -> Path:
    """Write ``size`` bytes of ``kind`` (one of :data:`DATA_KINDS`) to ``path``.

    random: incompressible; zeros: zero bytes written out (not holes); text: log-like lines;
    mixed: half random, a quarter zeros, a quarter text; sparse: a file of holes with 1 MiB of
    random data every 64 MiB. About 300 MB/s (random data comes from the kernel's generator).
    """
    if kind not in DATA_KINDS:
        raise ValueError(f"unknown data kind {kind!r}: one of {', '.join(DATA_KINDS)}")
    path = Path(path)
    rng = random.Random(size)
    with open(path, "wb") as out:
        if kind == "sparse":
            out.truncate(size)
            for offset in range(0, size, 64 * MIB):
                out.seek(offset)
                out.write(os.urandom(min(MIB, size - offset)))
            return path
        text = _text_blocks() if kind in ("text", "mixed") else []
        zeros = bytes(IO_CHUNK)
        written = 0
        while written < size:
            unit = _unit(kind, rng, text, zeros)[: size - written]
            out.write(unit)
            written += len(unit)
    return path


_made_here: set[Path] = set()


def data_file(kind: str, size: int) -> Path:
    """A cached data file of ``kind`` and ``size`` in :func:`data_dir` (made on first use).

    Safe when several benchmark processes share the folder: each writes under its own
    temporary name and renames, so none reads a half-written file.
    """
    path = data_dir() / f"{kind}-{size // MIB}MiB.bin"
    if not path.exists() or path.stat().st_size != size:
        temp = path.with_name(f".{path.name}.{os.getpid()}.partial")
        try:
            make_data_file(temp, size, kind)
            temp.rename(path)
        finally:
            temp.unlink(missing_ok=True)
        _made_here.add(path)
    return path


def remove_data_files() -> None:
    """Delete the data files this process made with :func:`data_file` (not other runs')."""
    for path in _made_here:
        path.unlink(missing_ok=True)
    _made_here.clear()


def size_label(size: int) -> str:
    """``1 GiB``, ``64 MiB``..."""
    return f"{size // GIB} GiB" if size >= GIB and size % GIB == 0 else f"{size // MIB} MiB"


# -- results ----------------------------------------------------------------------------------


def result(
    name: str,
    *,
    ours_s: float | None,
    reference_s: float | None,
    reference: str,
    max_ratio: float | None = None,
    min_ratio: float | None = None,
    ratio: float | None = None,
    peak_rss_mib: float | None = None,
    max_rss_mib: float | None = None,
    ok: bool = True,
    **extra: Any,
) -> dict[str, Any]:
    """One benchmark result, as bench/run.py and bench/results/*.json expect it.

    ``ratio`` defaults to ours_s / reference_s. It passes when it is within ``max_ratio`` /
    ``min_ratio``, the peak RSS is under ``max_rss_mib`` (when given), and ``ok`` (an output
    check, e.g. "gzip -t accepts it") holds. Extra keyword arguments are kept as extra keys.
    """
    if ratio is None and ours_s is not None and reference_s:
        ratio = ours_s / reference_s
    targets = []
    passed = ok and ratio is not None
    if max_ratio is not None:
        targets.append(f"<= {max_ratio:g}")
        passed = passed and ratio is not None and ratio <= max_ratio
    if min_ratio is not None:
        targets.append(f">= {min_ratio:g}")
        passed = passed and ratio is not None and ratio >= min_ratio
    if max_rss_mib is not None:
        targets.append(f"RSS < {max_rss_mib:g} MiB")
        passed = passed and peak_rss_mib is not None and peak_rss_mib < max_rss_mib
    return {
        "name": name,
        "ours_s": None if ours_s is None else round(ours_s, 3),
        "reference_s": None if reference_s is None else round(reference_s, 3),
        "reference": reference,
        "ratio": None if ratio is None else round(ratio, 3),
        "target": ", ".join(targets),
        "passed": bool(passed),
        "peak_rss_mib": None if peak_rss_mib is None else round(peak_rss_mib, 1),
        **extra,
    }


def stream_file(source: str | os.PathLike[str], writer: Any) -> None:
    """Copy ``source`` into ``writer`` (anything with ``write``) in ``IO_CHUNK`` pieces, the
    way the remote write benchmarks feed a remote."""
    buffer = bytearray(IO_CHUNK)
    view = memoryview(buffer)
    with open(source, "rb") as src:
        while count := src.readinto(buffer):
            writer.write(view[:count])


def write_rate_result(
    name: str,
    size: int,
    mine: ChildRun,
    theirs: ChildRun,
    reference: str,
    *,
    min_ratio: float,
    max_rss_mib: float,
) -> dict[str, Any]:
    """A remote write benchmark's result: ``ratio`` is our rate over the reference's (higher is
    better), with both rates in MiB/s, the CPU-time ratio when both sides measured it, and
    the ratio against the reference without its sync when it was made with
    :func:`then_sync`."""
    extra: dict[str, Any] = {
        "mib_per_s": round(size / MIB / mine.seconds, 1),
        "reference_mib_per_s": round(size / MIB / theirs.seconds, 1),
    }
    if isinstance(theirs.value, dict) and "sync_s" in theirs.value:
        extra["ratio_without_sync"] = round(
            (theirs.seconds - theirs.value["sync_s"]) / mine.seconds, 3
        )
    if mine.cpu_s and theirs.cpu_s:
        # CPU time (user + system) per side: steadier than wall time on a busy machine.
        extra["cpu_ratio"] = round(mine.cpu_s / theirs.cpu_s, 2)
    return result(
        name,
        ours_s=mine.seconds,
        reference_s=theirs.seconds,
        reference=reference,
        ratio=theirs.seconds / mine.seconds,
        min_ratio=min_ratio,
        peak_rss_mib=mine.peak_rss_mib,
        max_rss_mib=max_rss_mib,
        **extra,
    )


def rss_result(
    name: str, peak_rss_mib: float, max_rss_mib: float, *, ours_s: float | None = None, **extra: Any
) -> dict[str, Any]:
    """A result whose metric is peak RSS alone (``ratio`` holds the RSS in MiB)."""
    return result(
        name,
        ours_s=ours_s,
        reference_s=None,
        reference="-",
        ratio=peak_rss_mib,
        max_ratio=None,
        peak_rss_mib=peak_rss_mib,
        max_rss_mib=max_rss_mib,
        **extra,
    )


def _cell(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_result(entry: dict[str, Any]) -> str:
    """One line: name, ours, reference, ratio, target, PASS/FAIL, peak RSS."""
    reference = (
        f"{entry['reference']} {_cell(entry['reference_s'])}s"
        if entry["reference_s"] is not None
        else "no reference"
    )
    return (
        f"{entry['name']:<44} ours {_cell(entry['ours_s']):>7}s  {reference}  "
        f"ratio {_cell(entry['ratio'], 3)}  target {entry['target'] or '-'}  "
        f"{'pass' if entry['passed'] else 'FAIL'}  peak RSS {_cell(entry['peak_rss_mib'], 1)} MiB"
        + (f"  (CPU time ratio {entry['cpu_ratio']:.3f})" if entry.get("cpu_ratio") else "")
    )


def print_result(entry: dict[str, Any]) -> None:
    """Print :func:`format_result` (each benchmark prints one line per result as it goes)."""
    print(format_result(entry), flush=True)


def print_table(entries: Sequence[dict[str, Any]]) -> None:
    """A fixed-width table of results."""
    header = (
        "benchmark",
        "ours s",
        "reference",
        "ref s",
        "ratio",
        "target",
        "result",
        "RSS MiB",
        "CPU ratio",
    )
    rows = [
        (
            entry["name"],
            _cell(entry["ours_s"]),
            entry["reference"],
            _cell(entry["reference_s"]),
            _cell(entry["ratio"], 3),
            entry["target"] or "-",
            "pass" if entry["passed"] else "FAIL",
            _cell(entry["peak_rss_mib"], 1),
            _cell(entry.get("cpu_ratio"), 3),
        )
        for entry in entries
    ]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)))
