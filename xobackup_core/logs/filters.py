"""Which runs to list: the filters of ``xobackup logs`` and :meth:`LogStore.list_runs`."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from datetime import datetime

from xobackup_core.errors import UsageError
from xobackup_core.logs.records import STATUSES

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$", re.IGNORECASE)


def parse_since(value: str | datetime | int | float, *, now: float | None = None) -> int:
    """A point in time, in ms since epoch, from a datetime or from text.

    Text is an age (``"30m"``, ``"12h"``, ``"2d"``, ``"1w"``) counted back from ``now``, or an
    ISO 8601 date or date-time (``"2026-11-20"``, ``"2026-11-20T08:00"``, local time unless it
    carries an offset). A number is already ms since epoch.
    """
    if isinstance(value, bool):
        raise UsageError(f"--since: {value!r} is not a time")
    if isinstance(value, int | float):
        return int(value)
    if isinstance(value, datetime):
        return int(value.timestamp() * 1000)
    match = _AGE.match(value)
    if match:
        seconds = float(match.group(1)) * _UNITS[match.group(2).lower()]
        current = time.time() if now is None else now
        return int((current - seconds) * 1000)
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise UsageError(
            f"--since: {value!r} is neither an age (30m, 12h, 2d, 1w) "
            "nor a date (2026-11-20 or 2026-11-20T08:00)"
        ) from None
    return int(parsed.timestamp() * 1000)


def check_statuses(statuses: list[str] | tuple[str, ...]) -> list[str]:
    """The statuses, lower-cased; UsageError naming the valid ones if one is unknown."""
    checked = []
    for status in statuses:
        lowered = status.strip().lower()
        if lowered not in STATUSES:
            raise UsageError(
                f"--status: unknown status {status!r}; valid statuses: {', '.join(STATUSES)}"
            )
        checked.append(lowered)
    return checked


@dataclass
class RunFilter:
    """Conditions a listed run meets, all of them (an unset field matches everything)."""

    job: str | None = None
    """Job id, or job name (case-insensitive)."""
    statuses: list[str] = field(default_factory=list)
    """Any of these statuses."""
    vm: str | None = None
    """A VM uuid or name label: the run has a task whose data is that VM."""
    since: int | None = None
    """Runs started at or after this time (ms since epoch; see :func:`parse_since`)."""
    search: str | None = None
    """Free text (case-insensitive) in the job name, task names, warnings, infos, data, results."""
    limit: int | None = 50
    """At most this many runs, newest first; None for all."""

    def __post_init__(self) -> None:
        self.statuses = check_statuses(self.statuses)
        if self.limit is not None and self.limit < 0:
            raise UsageError(f"--limit: must be 0 or more, got {self.limit}")
