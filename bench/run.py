"""Run the benchmarks: ``python bench/run.py [--quick] [--keep-data] [NAMES...]``.

Finds every ``bench/bench_*.py``, calls its ``run(quick)``, prints a table (name, ours,
reference, ratio, target, pass/FAIL, peak RSS) and writes every result to
``bench/results/<UTC timestamp>.json``. NAMES select benchmarks by module name, with or without
the ``bench_`` prefix (``codecs``, ``bench_xva``). Exits 1 when a result fails its target or a
benchmark raises, 0 otherwise.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
sys.path.insert(0, str(BENCH_DIR))

from common import cpu_count, data_dir, print_table, remove_data_files, result  # noqa: E402


def discover() -> dict[str, Path]:
    """Benchmark modules by short name (``codecs`` for bench_codecs.py), sorted."""
    return {path.stem.removeprefix("bench_"): path for path in sorted(BENCH_DIR.glob("bench_*.py"))}


def load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run xobackup's benchmarks.")
    parser.add_argument("--quick", action="store_true", help="small inputs (a smoke test)")
    parser.add_argument(
        "--keep-data", action="store_true", help="keep the generated data files for the next run"
    )
    parser.add_argument("names", nargs="*", metavar="NAME", help="benchmarks to run (default all)")
    args = parser.parse_args(argv)

    available = discover()
    wanted = [name.removeprefix("bench_").removesuffix(".py") for name in args.names]
    unknown = [name for name in wanted if name not in available]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; known: {', '.join(available)}")
    selected = wanted or list(available)

    started = datetime.now(UTC)
    results: list[dict[str, Any]] = []
    errors: dict[str, str] = {}
    try:
        for name in selected:
            print(f"== {name}{' (quick)' if args.quick else ''}", flush=True)
            begin = time.perf_counter()
            try:
                entries = load(name, available[name]).run(quick=args.quick)
            except Exception as error:  # one broken benchmark must not hide the others' figures
                traceback.print_exc()
                errors[name] = f"{type(error).__name__}: {error}"
                failure = result(
                    f"{name}: {error}", ours_s=None, reference_s=None, reference="-", ok=False
                )
                entries = [failure]
            for entry in entries:
                entry.setdefault("benchmark", name)
            results.extend(entries)
            print(f"   ({time.perf_counter() - begin:.0f} s)", flush=True)
    finally:
        if not args.keep_data:
            remove_data_files()

    print()
    print_table(results)
    RESULTS_DIR.mkdir(exist_ok=True)
    report = RESULTS_DIR / f"{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    report.write_text(
        json.dumps(
            {
                "started": started.isoformat(),
                "quick": args.quick,
                "host": {
                    "cpus": cpu_count(),
                    "load_average": os.getloadavg(),
                    "python": platform.python_version(),
                    "platform": platform.platform(),
                    "data_dir": str(data_dir()),
                },
                "errors": errors,
                "results": results,
            },
            indent=2,
        )
        + "\n"
    )
    failed = [entry["name"] for entry in results if not entry["passed"]]
    print(f"\n{len(results) - len(failed)}/{len(results)} passed; results in {report}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
