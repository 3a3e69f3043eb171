"""Fault injection and in-flight operation counters (xapi-protocol.md §8.3).

A :class:`Fault` is armed on a *target*: an API method as the client calls it
(``VM.snapshot``, ``Async.VM.snapshot``, ``session.login_with_password``) or an HTTP handler
(``/export``, ``/export_raw_vdi``, ``/import``, ``/import_raw_vdi``). A fault on a method also
fires when that method runs inside an ``Async`` task, so the task fails with the error.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

KINDS = (
    "error",  # fail with ``code`` and ``params`` (RPC: Failure envelope; HTTP: 500 page)
    "delay",  # wait ``seconds`` then go on (HTTP: before the first byte)
    "hang",  # block until the fault is released, cleared or the simulator stops
    "drop",  # close the connection without an answer (HTTP: after ``after_bytes`` bytes)
    "http500",  # RPC: answer an HTTP 500 HTML page
    "throttle",  # HTTP streams: at most ``rate`` bytes per second
    "stall",  # HTTP streams: pause ``seconds`` once ``after_bytes`` bytes are out
    "embedded500",  # /export_raw_vdi: 200 header then a complete HTTP/1.1 500 body (xen-api #4603)
    "truncate",  # HTTP streams: stop after ``after_bytes`` bytes but mark the task success
    "task_failure",  # HTTP streams: send everything, then fail the task (VDI_IO_ERROR)
    "corrupt",  # HTTP downloads: flip the byte at offset ``after_bytes`` (checksums, footers)
    "leak_vbd",  # /export_raw_vdi: fail after the header, leaving dom0's VBD plugged on the VDI
)


@dataclass
class Fault:
    """One armed fault; see :data:`KINDS` for what each kind does."""

    target: str
    kind: str = "error"
    code: str = "INTERNAL_ERROR"
    params: tuple[str, ...] = ()
    seconds: float = 0.0
    after_bytes: int = 0
    rate: int = 0
    nth: int | None = None
    """Fire only on the n-th matching call after arming (1-based); None: from the first."""
    times: int | None = 1
    """How many times it fires; None: every matching call until cleared."""
    pool: int | None = None
    """Index of the pool it applies to; None: every pool."""
    reset: bool = False
    """``drop``: close with a TCP RST instead of a FIN."""
    seen: int = 0
    fired: int = 0
    released: threading.Event = field(default_factory=threading.Event)

    def release(self) -> None:
        """Let calls blocked by a ``hang`` go on."""
        self.released.set()

    def wait(self, stop: threading.Event) -> None:
        """Block as a ``hang`` does (``seconds`` > 0 bounds the wait)."""
        deadline = time.monotonic() + self.seconds if self.seconds else None
        while not (self.released.is_set() or stop.is_set()):
            if deadline is not None and time.monotonic() >= deadline:
                return
            self.released.wait(0.05)


class FaultTable:
    """The armed faults of a simulator."""

    def __init__(self) -> None:
        self._faults: list[Fault] = []
        self._lock = threading.Lock()

    def add(self, target: str, kind: str = "error", **options: object) -> Fault:
        """Arm a fault and return it (``release()`` ends a hang)."""
        if kind not in KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; known: {', '.join(KINDS)}")
        if "params" in options:
            options["params"] = tuple(str(p) for p in options["params"])  # type: ignore[union-attr]
        fault = Fault(target, kind, **options)  # type: ignore[arg-type]
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear(self) -> None:
        """Disarm every fault (and release hung calls)."""
        with self._lock:
            for fault in self._faults:
                fault.release()
            self._faults.clear()

    def match(self, pool: int, targets: tuple[str, ...]) -> list[Fault]:
        """Faults firing for this call now (counts the call for ``nth``)."""
        firing = []
        with self._lock:
            for fault in self._faults:
                if fault.target not in targets or fault.pool not in (None, pool):
                    continue
                fault.seen += 1
                if fault.nth is not None and fault.seen != fault.nth:
                    continue
                if fault.times is not None and fault.fired >= fault.times:
                    continue
                fault.fired += 1
                firing.append(fault)
        return firing


OPERATION_KINDS = ("snapshot", "disk_export", "vm_export", "disk_import", "vm_import")


class InFlight:
    """Operations running now in one pool, and the most ever seen at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.current = dict.fromkeys(OPERATION_KINDS, 0)
        self.maximum = dict.fromkeys(OPERATION_KINDS, 0)

    @contextmanager
    def track(self, kind: str) -> Iterator[None]:
        """Count one ``kind`` operation for the duration of the block."""
        with self._lock:
            self.current[kind] += 1
            self.maximum[kind] = max(self.maximum[kind], self.current[kind])
        try:
            yield
        finally:
            with self._lock:
                self.current[kind] -= 1

    def reset(self) -> None:
        """Forget the maxima (current counts stay true)."""
        with self._lock:
            self.maximum = dict(self.current)
