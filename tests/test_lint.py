"""The code base stays ruff clean (lint rules and formatting, configured in pyproject.toml)."""

import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import require

ROOT = Path(__file__).resolve().parents[1]


def ruff() -> list[str]:
    found = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    require(found is not None, "the ruff linter")
    return [found]


def test_ruff_check():
    result = subprocess.run([*ruff(), "check", "--no-cache", "."], cwd=ROOT, capture_output=True)
    assert result.returncode == 0, result.stdout.decode()[-3000:]


def test_ruff_format():
    result = subprocess.run(
        [*ruff(), "format", "--check", "--no-cache", "."], cwd=ROOT, capture_output=True
    )
    assert result.returncode == 0, result.stdout.decode()[-3000:]
