"""Helpers for scheduler tests: configs on disk, an engine stand-in that records real runs."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from xobackup_core.config import load_config
from xobackup_core.logs.store import LogStore
from xobackup_core.plugins import Plugins


def config_text(
    tmp_path: Path,
    schedules: dict[str, dict],
    *,
    server_url: str = "http://127.0.0.1:9",
    settings: dict | None = None,
) -> str:
    """A tiny config: one server (unreachable by default), a local remote, two jobs."""
    lines = [
        f'log_db = "{tmp_path / "logs.sqlite"}"',
        "[servers.pool]",
        f'url = "{server_url}"',
        'password = "x"',
        "timeout = 600",
        "[remotes.nas]",
        f'url = "file://{tmp_path / "remote"}"',
        "[jobs.nightly]",
        'mode = "delta"',
        'remotes = ["nas"]',
        "[jobs.weekly]",
        'mode = "full"',
        'remotes = ["nas"]',
    ]
    if settings:
        lines.append("[settings]")
        lines += [f"{key} = {value!r}".replace("'", '"') for key, value in settings.items()]
    for key, schedule in schedules.items():
        lines.append(f"[schedules.{key}]")
        for name, value in schedule.items():
            if isinstance(value, bool):
                lines.append(f"{name} = {'true' if value else 'false'}")
            else:
                lines.append(f'{name} = "{value}"')
    return "\n".join(lines) + "\n"


def write_config(tmp_path: Path, schedules: dict[str, dict], **kwargs) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(config_text(tmp_path, schedules, **kwargs))
    return path


@dataclass
class Fired:
    job: str
    schedule: str
    at: float
    run_id: str


class RecordingRunner:
    """Stands in for the engine: records a real run in the log store, then waits for
    ``release`` (so a run can be made to last) and ends it successfully."""

    def __init__(self, config, plugins, store, *, clock, release: threading.Event) -> None:
        self.config = config
        self.store = store
        self.clock = clock
        self.release = release
        self.fired: list[Fired] = []
        self.closed = False

    def run(self, job_key: str, schedule_key: str | None = None):
        recorder = self.store.start_run(
            self.config.job_id(job_key), job_key, schedule_id=schedule_key, heartbeat_interval=None
        )
        self.fired.append(Fired(job_key, schedule_key, self.clock.now(), recorder.run_id))
        with recorder, recorder.task("backup VM", {"type": "VM", "id": "vm-1"}):
            self.release.wait(30)
        return recorder

    def close(self) -> None:
        self.closed = True


class RunnerFactory:
    """Makes :class:`RecordingRunner` per config generation and remembers every firing."""

    def __init__(self, clock) -> None:
        self.clock = clock
        self.release = threading.Event()
        self.release.set()
        self.runners: list[RecordingRunner] = []

    def __call__(self, config, plugins, store):
        runner = RecordingRunner(config, plugins, store, clock=self.clock, release=self.release)
        self.runners.append(runner)
        return runner

    @property
    def fired(self) -> list[Fired]:
        return [fired for runner in self.runners for fired in runner.fired]


def wait_until(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.fixture
def store(tmp_path):
    with LogStore(tmp_path / "logs.sqlite") as opened:
        yield opened


@pytest.fixture
def plugins():
    return Plugins(autoload=False)


def load(path: Path):
    return load_config(path)
