"""The plugin contract itself: every hook documented as a contract, and tested."""

import inspect
from pathlib import Path

import pytest

from xobackup_core import hookspecs

HOOKS = [
    name
    for name, _ in inspect.getmembers(hookspecs, inspect.isfunction)
    if name.startswith("xobackup_")
]
TESTS = Path(__file__).resolve().parents[1]


def test_there_are_hooks():
    assert "xobackup_remote" in HOOKS and len(HOOKS) >= 10


@pytest.mark.parametrize("name", HOOKS)
def test_every_hook_is_documented(name):
    doc = inspect.getdoc(getattr(hookspecs, name)) or ""
    assert "Called" in doc, f"{name}: the docstring must say when it is called"
    assert "firstresult" in doc or "collecting" in doc, f"{name}: say firstresult or collecting"
    assert len(doc.split()) >= 20, f"{name}: the docstring is too short to be a contract"


@pytest.mark.parametrize("name", HOOKS)
def test_every_hook_has_a_test(name):
    this_file = Path(__file__).resolve()
    for path in TESTS.rglob("test_*.py"):
        if path.resolve() != this_file and name in path.read_text(errors="replace"):
            return
    pytest.fail(f"no test under tests/ mentions {name}")


def test_entry_point_group_is_versioned():
    assert hookspecs.ENTRY_POINT_GROUP.endswith(".v1")
