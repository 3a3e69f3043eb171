"""The daemon's sense of time, injectable so tests can move it forward without waiting.

:class:`SystemClock` is the real one. :class:`ManualClock` is for tests and simulations: time
stands still until :meth:`ManualClock.advance` moves it, and a waiter wakes exactly when the
time it waits for is reached.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol


class Clock(Protocol):
    """What the daemon needs from a clock."""

    def now(self) -> float:
        """The current time, seconds since the Unix epoch (UTC)."""
        ...

    def sleep_until(self, moment: float, wake: threading.Event) -> bool:
        """Wait until ``moment`` (Unix time) or until ``wake`` is set; True when ``wake`` was
        set. May return early (the caller looks at the time again)."""
        ...


class SystemClock:
    """Wall-clock time; waits are cut in slices of at most a minute so that a wall-clock
    jump (NTP, a resumed laptop) is noticed within a minute."""

    max_slice = 60.0

    def now(self) -> float:
        return time.time()

    def sleep_until(self, moment: float, wake: threading.Event) -> bool:
        return wake.wait(max(0.0, min(moment - time.time(), self.max_slice)))


class ManualClock:
    """A clock that only moves when told to (:meth:`advance`, :meth:`set`)."""

    def __init__(self, start: float) -> None:
        self._now = float(start)
        self._changed = threading.Condition()
        self._sleepers: dict[int, float] = {}  # wait id -> the time it waits for
        self._next_id = 0

    def now(self) -> float:
        with self._changed:
            return self._now

    def sleep_until(self, moment: float, wake: threading.Event) -> bool:
        with self._changed:
            until = moment
            self._next_id += 1
            wait_id = self._next_id
            self._sleepers[wait_id] = until
            self._changed.notify_all()
            try:
                while self._now < until and not wake.is_set():
                    # a short real timeout: ``wake`` is an Event, not this condition
                    self._changed.wait(0.01)
            finally:
                del self._sleepers[wait_id]
                self._changed.notify_all()
            return wake.is_set()

    def set(self, moment: float) -> None:
        """Jump to ``moment`` (never backwards)."""
        with self._changed:
            self._now = max(self._now, float(moment))
            self._changed.notify_all()

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``."""
        with self._changed:
            self._now += max(0.0, seconds)
            self._changed.notify_all()

    def idle(self) -> bool:
        """True when some thread waits on this clock and none of the waits is due."""
        with self._changed:
            return bool(self._sleepers) and all(u > self._now for u in self._sleepers.values())

    def wait_until_idle(self, timeout: float = 10.0) -> bool:
        """Block until :meth:`idle` (the daemon has done what was due and sleeps again)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not (self._sleepers and all(u > self._now for u in self._sleepers.values())):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(min(left, 0.01))
            return True
