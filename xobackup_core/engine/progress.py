"""Live progress of a run: per-VM stage, bytes and rate.

The engine reports to a :class:`Progress`; the CLI shows it as live per-VM lines on a terminal
(:class:`TerminalProgress`) and as one plain line per event otherwise (:class:`LineProgress`),
so logs captured by cron or systemd stay readable. The runner also records every run's
progress in the run log (:class:`StoredProgress`, next to the caller's through
:class:`TeeProgress`) so that other processes (``xobackup serve``) can show it.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from xobackup_core.logs.records import now_ms
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


class TeeProgress(Progress):
    """Passes every event to each of ``receivers`` in turn."""

    def __init__(self, *receivers: Progress) -> None:
        self.receivers = receivers

    def vm_started(self, vm_uuid: str, name: str) -> None:
        for receiver in self.receivers:
            receiver.vm_started(vm_uuid, name)

    def stage(self, vm_uuid: str, stage: str) -> None:
        for receiver in self.receivers:
            receiver.stage(vm_uuid, stage)

    def transferred(self, vm_uuid: str, size: int) -> None:
        for receiver in self.receivers:
            receiver.transferred(vm_uuid, size)

    def vm_finished(self, vm_uuid: str, status: str) -> None:
        for receiver in self.receivers:
            receiver.vm_finished(vm_uuid, status)

    def close(self) -> None:
        for receiver in self.receivers:
            receiver.close()


@dataclass
class _StoredVm:
    name: str
    start: int
    stage: str = "starting"
    done: int = 0
    status: str | None = None
    written: float = 0.0
    dirty: bool = False


class StoredProgress(Progress):
    """Records one run's per-VM progress in the run log (``LogStore.record_progress``).

    Bytes are written at most once per ``interval`` seconds per VM, so a fast export costs
    a handful of small SQLite transactions rather than one per chunk; a VM's start, each
    stage change and its end are written at once, and :meth:`close` writes what is left.
    A failed write is dropped: progress is a display aid and must never fail a backup.
    """

    def __init__(
        self,
        store: Any,
        run_id: str,
        *,
        interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.run_id = run_id
        self.interval = interval
        self.clock = clock
        self._lock = threading.Lock()
        self._vms: dict[str, _StoredVm] = {}

    def _write(self, vm_uuid: str, vm: _StoredVm) -> None:
        # called with the lock held: the row written is never older than one written before
        vm.written = self.clock()
        vm.dirty = False
        try:
            self.store.record_progress(
                self.run_id,
                vm_uuid,
                name=vm.name,
                stage=vm.stage,
                transferred=vm.done,
                start=vm.start,
                status=vm.status,
            )
        except Exception:  # a busy or closed log must not stop the export
            vm.dirty = True

    def vm_started(self, vm_uuid: str, name: str) -> None:
        with self._lock:
            vm = self._vms[vm_uuid] = _StoredVm(name, now_ms())
            self._write(vm_uuid, vm)

    def stage(self, vm_uuid: str, stage: str) -> None:
        with self._lock:
            vm = self._vms.get(vm_uuid)
            if vm is not None and vm.stage != stage:
                vm.stage = stage
                self._write(vm_uuid, vm)

    def transferred(self, vm_uuid: str, size: int) -> None:
        with self._lock:
            vm = self._vms.get(vm_uuid)
            if vm is None:
                return
            vm.done += size
            vm.dirty = True
            if self.clock() - vm.written >= self.interval:
                self._write(vm_uuid, vm)

    def vm_finished(self, vm_uuid: str, status: str) -> None:
        with self._lock:
            vm = self._vms.get(vm_uuid)
            if vm is not None:
                vm.status = status
                self._write(vm_uuid, vm)

    def close(self) -> None:
        with self._lock:
            for vm_uuid, vm in self._vms.items():
                if vm.dirty:
                    self._write(vm_uuid, vm)
