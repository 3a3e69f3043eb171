"""Cancel requests: ``xobackup cancel RUNID`` writes one, the running engine polls for it.

Xen Orchestra has no working cancel (its button has been disabled since 2020, xo-backups.md
§8.3 and §12.6: a stuck run is stopped by restarting the server). Here any process sharing
the run log can ask a run to stop: the request is a row in the log's ``cancel_requests``
table (schema version 2), and the process running the run sees it at its next poll
(:class:`~xobackup_core.scheduler.guard.RunGuard`) and stops the run as ``cancelled``.
"""

from __future__ import annotations

from dataclasses import dataclass

from xobackup_core.logs.records import now_ms
from xobackup_core.logs.store import LogStore


@dataclass(frozen=True)
class CancelRequest:
    """Who asked a run to stop, and when (ms since the epoch)."""

    run_id: str
    requested_at: int
    requested_by: str | None


def request_cancel(store: LogStore, run_id: str, *, by: str | None = None) -> bool:
    """Ask run ``run_id`` to stop; False when it had already been asked."""
    with store.transaction() as db:
        changed = db.execute(
            "INSERT OR IGNORE INTO cancel_requests (run_id, requested_at, requested_by)"
            " VALUES (?, ?, ?)",
            (run_id, now_ms(), by),
        ).rowcount
    return changed > 0


def cancel_request(store: LogStore, run_id: str) -> CancelRequest | None:
    """The cancel request of run ``run_id``, or None when nobody asked it to stop."""
    with store.transaction() as db:
        row = db.execute(
            "SELECT run_id, requested_at, requested_by FROM cancel_requests WHERE run_id = ?",
            (run_id,),
        ).fetchone()
    if row is None:
        return None
    return CancelRequest(row[0], row[1], row[2])
