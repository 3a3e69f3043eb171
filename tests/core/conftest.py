from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None):
    """Run the real ``xobackup`` command in a child process and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "xobackup_core.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        timeout=120,
    )


@pytest.fixture
def cli():
    return run_cli
