"""Shared test helpers.

In CI (``CI=true``) a missing tool or server is a failure, never a skip: the test setup
(``scripts/test.sh``) installs everything, so a missing piece means the setup is broken.
"""

from __future__ import annotations

import os
import shutil

import pytest

pytest.register_assert_rewrite("xobackup_core.testing")

# The XAPI simulator's fixtures (xapi_sim, xapi_sim_session) for every test folder.
pytest_plugins = ["xobackup_hypervisor_xcpng.sim.pytest_fixtures"]

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(condition: bool, what: str) -> None:
    """Skip (locally) or fail (in CI) when ``condition`` is false."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"{what} is missing in CI: scripts/test.sh should have installed it")
    pytest.skip(f"{what} is not installed (scripts/test.sh installs it)")


def require_tool(name: str) -> str:
    """Path of an executable; skip locally / fail in CI when it is missing."""
    path = shutil.which(name) or next(
        (
            p
            for p in (f"/usr/sbin/{name}", f"/sbin/{name}", f"/usr/bin/{name}")
            if os.path.exists(p)
        ),
        None,
    )
    require(path is not None, f"the program {name!r}")
    assert path is not None
    return path


def require_module(name: str) -> object:
    """Import a Python module; skip locally / fail in CI when it is missing."""
    try:
        return __import__(name)
    except ImportError:
        require(False, f"the Python module {name!r}")
        raise
