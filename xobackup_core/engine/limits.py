"""Per-pool limits on operations in flight, shared by every job the process runs.

Xen Orchestra defines snapshot 2 / disk export 12 / VM export 2 per pool but, because its
backups run in forked workers, the limits do not apply to backups (reference: xo-backups.md
§4.2). Here one :class:`PoolLimiter` per process holds one set of semaphores per pool, and
every job goes through it, so two jobs hitting one pool share the same budget.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

OPERATIONS = ("snapshots", "disk_exports", "vm_exports")


@dataclass(frozen=True)
class LimitValues:
    snapshots: int = 2
    disk_exports: int = 12
    vm_exports: int = 2


class PoolLimiter:
    """Semaphores per (pool, operation). Thread-safe; export slots are held while streaming."""

    def __init__(self, values: LimitValues | None = None) -> None:
        self.values = values or LimitValues()
        self._lock = threading.Lock()
        self._semaphores: dict[tuple[str, str], threading.BoundedSemaphore] = {}

    def _semaphore(self, pool_uuid: str, operation: str) -> threading.BoundedSemaphore:
        key = (pool_uuid, operation)
        with self._lock:
            if key not in self._semaphores:
                self._semaphores[key] = threading.BoundedSemaphore(getattr(self.values, operation))
            return self._semaphores[key]

    @contextmanager
    def slot(self, pool_uuid: str, operation: str) -> Iterator[None]:
        """Hold one slot of ``operation`` (see :data:`OPERATIONS`) on ``pool_uuid``."""
        if operation not in OPERATIONS:
            raise ValueError(f"unknown operation {operation!r}")
        semaphore = self._semaphore(pool_uuid, operation)
        semaphore.acquire()
        try:
            yield
        finally:
            semaphore.release()


_shared: PoolLimiter | None = None
_shared_lock = threading.Lock()


def shared_limiter(values: LimitValues | None = None) -> PoolLimiter:
    """The process-wide limiter (created on first use with ``values``)."""
    global _shared
    with _shared_lock:
        if _shared is None or (values is not None and values != _shared.values):
            _shared = PoolLimiter(values)
        return _shared
