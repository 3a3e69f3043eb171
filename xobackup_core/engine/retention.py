"""Which backups (or snapshots, or replicas) a retention policy deletes.

The rule is Xen Orchestra's (reference: xo-backups.md §3.3): entries of one schedule on one
target, sorted by time, keep the newest ``retention``; with long-term retention (GFS) also keep,
for each granularity, the **oldest** entry of each of the N most recent periods that have an
entry (empty periods do not use up retention). Periods are computed in the job's timezone:
day ``YYYY-MM-DD``, ISO week ``YYYY-ww``, month ``YYYY-MM``, year ``YYYY``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

T = TypeVar("T")

PERIODS: dict[str, Callable[[datetime], str]] = {
    "daily": lambda moment: moment.strftime("%Y-%m-%d"),
    "weekly": lambda moment: "{}-{:02d}".format(*moment.isocalendar()[:2]),
    "monthly": lambda moment: moment.strftime("%Y-%m"),
    "yearly": lambda moment: moment.strftime("%Y"),
}


def period_tags(timestamp_ms: int, timezone: str = "UTC") -> list[str]:
    """The long-term retention buckets of a moment, as stored in backup metadata ``tags``."""
    moment = datetime.fromtimestamp(timestamp_ms / 1000, tz=UTC).astimezone(ZoneInfo(timezone))
    return [f"{name}={key(moment)}" for name, key in PERIODS.items()]


def entries_to_delete(
    entries: Sequence[T],
    *,
    keep: int,
    timestamp_of: Callable[[T], int],
    long_term: Mapping[str, Any] | None = None,
    timezone: str = "UTC",
) -> list[T]:
    """The entries a policy removes, newest first (so deltas merge the fewest times).

    ``entries`` may be in any order; ``keep`` is how many of the newest stay; ``long_term`` is
    the ``longTermRetention`` setting (``{"daily": {"retention": 7}, ...}``).
    """
    ordered = sorted(entries, key=timestamp_of)
    kept: set[int] = set(range(max(len(ordered) - keep, 0), len(ordered))) if keep > 0 else set()
    zone = ZoneInfo(timezone)
    for granularity, rule in (long_term or {}).items():
        if not rule:
            continue
        count = int(rule["retention"] if isinstance(rule, Mapping) else rule.retention)
        if count <= 0:
            continue
        key_of = PERIODS[granularity]
        oldest_per_period: dict[str, int] = {}
        for index, entry in enumerate(ordered):
            moment = datetime.fromtimestamp(timestamp_of(entry) / 1000, tz=UTC).astimezone(zone)
            oldest_per_period.setdefault(key_of(moment), index)
        newest_periods = sorted(oldest_per_period, reverse=True)[:count]
        kept.update(oldest_per_period[period] for period in newest_periods)
    return [entry for index, entry in reversed(list(enumerate(ordered))) if index not in kept]
