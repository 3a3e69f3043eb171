"""Enforced timeouts and cancellation for a run: a deadline, and a watchdog that acts on it.

Xen Orchestra declares the ``timeout`` and ``vmTimeout`` settings but never enforces them
(xo-backups.md §3.2, §13.2), and has no way to cancel a run (§12.6). The engine uses:

* :class:`Deadline` — a budget of seconds (``0``/``None``: unlimited). ``child()`` gives a VM
  its ``vmTimeout`` bounded by what is left of the job's ``timeout``. ``check()`` raises
  :class:`RunTimeoutError` once it has passed.
* :class:`RunGuard` — a thread that watches the run's deadline and the cancel requests of
  the run log (``xobackup cancel``). When either fires it remembers why, and calls the
  callbacks registered with :meth:`RunGuard.on_stop` (for example to abort a transfer stream
  blocked in a read). The engine calls :meth:`RunGuard.check` between steps and blocks;
  it raises :class:`~xobackup_core.errors.CancelledError` or :class:`RunTimeoutError`.

Usage in the engine::

    deadline = Deadline(settings["timeout"], what=f"job {name!r}", setting="timeout")
    with RunGuard(store, recorder.run_id, deadline) as guard:
        for vm in vms:
            vm_deadline = deadline.child(vm_settings["vmTimeout"], what=f"VM {vm.name}",
                                         setting="vmTimeout")
            unwatch = guard.watch(vm_deadline, lambda error: export_stream.close())
            ...
            guard.check(); vm_deadline.check()   # between blocks
            unwatch()
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from types import TracebackType

from xobackup_core.errors import CancelledError, XobackupError
from xobackup_core.logs.store import LogStore
from xobackup_core.scheduler.cancel import cancel_request

_log = logging.getLogger(__name__)


class RunTimeoutError(XobackupError):
    """A job or a VM ran past its ``timeout`` / ``vmTimeout``."""


def _format_seconds(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:g} h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g} min"
    return f"{seconds:g} s"


class Deadline:
    """A time budget that starts now. ``seconds`` of 0 or None means no limit."""

    def __init__(
        self,
        seconds: float | None,
        *,
        what: str = "the run",
        setting: str = "timeout",
        clock: Callable[[], float] = time.monotonic,
        _bound: Deadline | None = None,
    ) -> None:
        self.seconds = float(seconds) if seconds else None
        self.what = what
        self.setting = setting
        self._clock = clock
        self._at = None if self.seconds is None else clock() + self.seconds
        self._bound = _bound

    def child(self, seconds: float | None, *, what: str, setting: str = "vmTimeout") -> Deadline:
        """A nested budget (a VM inside its job) that also ends when this one ends."""
        return Deadline(seconds, what=what, setting=setting, clock=self._clock, _bound=self)

    def remaining(self) -> float | None:
        """Seconds left (never below 0), or None when unlimited."""
        lefts = []
        if self._at is not None:
            lefts.append(max(0.0, self._at - self._clock()))
        if self._bound is not None:
            bound = self._bound.remaining()
            if bound is not None:
                lefts.append(bound)
        return min(lefts) if lefts else None

    @property
    def expired(self) -> bool:
        left = self.remaining()
        return left is not None and left <= 0

    def check(self) -> None:
        """Raise :class:`RunTimeoutError` (naming what and the setting) once expired."""
        if self._bound is not None:
            self._bound.check()
        if self._at is not None and self._clock() >= self._at:
            assert self.seconds is not None
            raise RunTimeoutError(
                f"{self.what} exceeded its timeout of {_format_seconds(self.seconds)} "
                f"(setting '{self.setting}')"
            )


CHECK_STORE_INTERVAL = 0.25
"""Seconds between two reads of the cancel requests by ``RunGuard.check``."""


class RunGuard:
    """Watches one run for a cancel request and for its deadline (see the module doc)."""

    def __init__(
        self,
        store: LogStore | None,
        run_id: str,
        deadline: Deadline | None = None,
        *,
        poll_interval: float = 2.0,
    ) -> None:
        self.store = store
        self.run_id = run_id
        self.deadline = deadline or Deadline(None)
        self.poll_interval = poll_interval
        self.error: XobackupError | None = None
        """Why the run must stop, once it must."""
        self._callbacks: list[Callable[[XobackupError], None]] = []
        self._watched: list[tuple[Deadline, Callable[[RunTimeoutError], None]]] = []
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._wakeup = threading.Event()  # a new deadline to watch, or the end
        self._thread: threading.Thread | None = None
        self._store_read_at = -math.inf  # monotonic time of the last read of cancel requests

    def on_stop(self, callback: Callable[[XobackupError], None]) -> Callable[[], None]:
        """Call ``callback(error)`` when the run must stop (at once if it already must).

        Returns a function that unregisters the callback.
        """
        with self._lock:
            error = self.error
            if error is None:
                self._callbacks.append(callback)
        if error is not None:
            callback(error)

        def unregister() -> None:
            with self._lock:
                if callback in self._callbacks:
                    self._callbacks.remove(callback)

        return unregister

    def watch(
        self, deadline: Deadline, callback: Callable[[RunTimeoutError], None]
    ) -> Callable[[], None]:
        """Also watch ``deadline`` (a VM's ``vmTimeout``): call ``callback(error)`` once when it
        passes, from the guard's thread. The run itself goes on (the VM fails, the others
        continue). Returns a function that stops watching it."""
        entry = (deadline, callback)
        with self._lock:
            self._watched.append(entry)
        self._wakeup.set()  # the watcher may be asleep for longer than this deadline

        def unwatch() -> None:
            with self._lock:
                if entry in self._watched:
                    self._watched.remove(entry)

        return unwatch

    def _poll_watched(self) -> None:
        with self._lock:
            expired = [entry for entry in self._watched if entry[0].expired]
            for entry in expired:
                self._watched.remove(entry)
        for deadline, callback in expired:
            try:
                deadline.check()
            except RunTimeoutError as error:
                _log.warning("run %s: %s", self.run_id, error)
                try:
                    callback(error)
                except Exception:
                    _log.exception("a timeout callback of run %s failed", self.run_id)

    @property
    def stopping(self) -> bool:
        return self.error is not None

    def check(self) -> None:
        """Raise the reason to stop, if there is one (poll now rather than wait).

        Streams call this for every chunk they move: the deadline is looked at each time, the
        log store at most every ``CHECK_STORE_INTERVAL`` seconds, since a read of SQLite per
        chunk would cost more than the copy of the chunk itself.
        """
        if self.error is None:
            self.poll(store_within=CHECK_STORE_INTERVAL)
        if self.error is not None:
            raise self.error

    def poll(self, *, store_within: float = 0.0) -> XobackupError | None:
        """Look at the deadline and the cancel requests once; the reason to stop, if any.

        ``store_within``: skip the cancel requests when they were read less than that many
        seconds ago.
        """
        if self.error is not None:
            return self.error
        reason: XobackupError | None = None
        try:
            self.deadline.check()
        except RunTimeoutError as error:
            reason = error
        now = time.monotonic()
        if reason is None and self.store is not None and now - self._store_read_at >= store_within:
            self._store_read_at = now
            try:
                request = cancel_request(self.store, self.run_id)
            except Exception:  # a busy log must not stop a backup
                _log.warning("could not read the cancel requests of run %s", self.run_id)
                request = None
            if request is not None:
                by = f" by {request.requested_by}" if request.requested_by else ""
                reason = CancelledError(f"run {self.run_id} was cancelled{by}")
        if reason is not None:
            self._trigger(reason)
        return self.error

    def stop_now(self, reason: XobackupError) -> None:
        """Stop the run for ``reason`` (Ctrl-C on ``xobackup run``): callbacks fire at once."""
        self._trigger(reason)

    def _trigger(self, reason: XobackupError) -> None:
        with self._lock:
            if self.error is not None:
                return
            self.error = reason
            callbacks = list(self._callbacks)
            self._callbacks.clear()
        _log.warning("run %s stops: %s", self.run_id, reason)
        for callback in callbacks:
            try:
                callback(reason)
            except Exception:
                _log.exception("a stop callback of run %s failed", self.run_id)

    def _watch(self) -> None:
        while not self._done.is_set():
            if self.poll() is not None:
                return
            self._poll_watched()
            with self._lock:
                deadlines = [self.deadline] + [deadline for deadline, _ in self._watched]
            lefts = [d.remaining() for d in deadlines]
            wait = min([self.poll_interval] + [left for left in lefts if left is not None])
            self._wakeup.wait(max(0.01, wait))
            self._wakeup.clear()

    def start(self) -> RunGuard:
        """Start watching in a daemon thread."""
        self._thread = threading.Thread(
            target=self._watch, name=f"guard-{self.run_id[:8]}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop watching (the run ended)."""
        self._done.set()
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> RunGuard:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
