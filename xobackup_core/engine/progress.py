"""Live progress of a run: per-VM stage, bytes and rate.

The engine reports to a :class:`Progress`; the CLI shows it as live per-VM lines on a terminal
(:class:`TerminalProgress`) and as one plain line per event otherwise (:class:`LineProgress`),
so logs captured by cron or systemd stay readable.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TextIO

from xobackup_core.logs.render import format_size


class Progress:
    """Receives progress events; the base class ignores them. Must be thread-safe."""

    def vm_started(self, vm_uuid: str, name: str) -> None:
        """A VM's backup has started."""

    def stage(self, vm_uuid: str, stage: str) -> None:
        """A VM entered a stage (``snapshot``, ``export``, ``retention``...)."""

    def transferred(self, vm_uuid: str, size: int) -> None:
        """``size`` more bytes of the VM's export went out."""

    def vm_finished(self, vm_uuid: str, status: str) -> None:
        """A VM's backup has ended with ``status``."""

    def close(self) -> None:
        """The run is over."""


@dataclass
class _VmLine:
    name: str
    stage: str = "starting"
    done: int = 0
    start: float = field(default_factory=time.monotonic)
    status: str | None = None

    def rate(self) -> float:
        return self.done / max(time.monotonic() - self.start, 1e-3)

    def text(self) -> str:
        state = self.status or self.stage
        return f"{self.name:<28.28} {state:<10} {format_size(self.done):>10} {self.rate_text()}"

    def rate_text(self) -> str:
        return f"{format_size(int(self.rate()))}/s" if self.done else ""


class LineProgress(Progress):
    """One plain line per stage change and per finished VM."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self._lock = threading.Lock()
        self._vms: dict[str, _VmLine] = {}

    def _print(self, text: str) -> None:
        with self._lock:
            print(text, file=self.stream, flush=True)

    def vm_started(self, vm_uuid: str, name: str) -> None:
        self._vms[vm_uuid] = _VmLine(name)
        self._print(f"{name}: started")

    def stage(self, vm_uuid: str, stage: str) -> None:
        line = self._vms.get(vm_uuid)
        if line is not None and line.stage != stage:
            line.stage = stage
            self._print(f"{line.name}: {stage}")

    def transferred(self, vm_uuid: str, size: int) -> None:
        line = self._vms.get(vm_uuid)
        if line is not None:
            line.done += size

    def vm_finished(self, vm_uuid: str, status: str) -> None:
        line = self._vms.get(vm_uuid)
        if line is not None:
            line.status = status
            self._print(f"{line.name}: {status}, {format_size(line.done)} {line.rate_text()}")


class TerminalProgress(LineProgress):
    """Per-VM lines redrawn in place twice a second (ANSI cursor movement)."""

    def __init__(self, stream: TextIO | None = None, interval: float = 0.5) -> None:
        super().__init__(stream)
        self._drawn = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(interval,), daemon=True)
        self._thread.start()

    def _print(self, text: str) -> None:  # events only show through the redraw
        pass

    def _draw(self) -> None:
        with self._lock:
            lines = [vm.text() for vm in self._vms.values()]
            out = self.stream
            if self._drawn:
                out.write(f"\x1b[{self._drawn}F")
            for line in lines:
                out.write("\x1b[2K" + line + "\n")
            out.flush()
            self._drawn = len(lines)

    def _loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self._draw()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._draw()
