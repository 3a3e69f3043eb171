"""When a schedule fires: 5-field cron expressions evaluated in an IANA timezone.

Evaluation is delegated to ``cronsim`` (the cron evaluator of healthchecks.io, kept up to date
and tested against Debian cron), which works on timezone-aware local times. Its daylight-saving
rules are Debian cron's, and they are ours (docs/daemon.md):

* **Spring forward (gap).** A schedule whose time does not exist that day (``30 2 * * *`` in
  Europe/Paris on the last Sunday of March) fires **once, at the first valid instant after
  the gap** (03:00 local). A backup is never silently lost to a clock change.
* **Fall back (overlap).** A schedule at a fixed hour inside the repeated hour
  (``30 2 * * *`` in Europe/Paris on the last Sunday of October) fires **once**, at the first
  occurrence. Schedules with a wildcard hour (``*/30 * * * *``) keep firing in real time, so
  they also fire during the second pass of the repeated hour.

Xen Orchestra evaluates its schedules with its own cron library in the schedule's timezone
(reference: xo-backups.md §3.1); the fixed-hour behaviour above is what its users expect from
cron, and the docs state it so nobody has to guess.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from xobackup_core.errors import ConfigError


@dataclass(frozen=True)
class CronSchedule:
    """A cron expression in a timezone: ``next_after`` gives the next instant it fires."""

    expression: str
    timezone: str = "UTC"

    def __post_init__(self) -> None:
        try:
            zone = ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ConfigError(
                f"unknown IANA timezone {self.timezone!r} (example: 'Europe/Paris')"
            ) from None
        try:
            CronSim(self.expression, datetime(2000, 1, 1, tzinfo=zone))
        except CronSimError as error:
            raise ConfigError(
                f"{self.expression!r} is not a valid cron expression: {error}"
            ) from None
        object.__setattr__(self, "_zone", zone)

    @property
    def zone(self) -> ZoneInfo:
        """The schedule's timezone."""
        return self._zone  # type: ignore[attr-defined, no-any-return]

    def iter_after(self, instant: datetime) -> Iterator[datetime]:
        """Every firing instant strictly after ``instant`` (aware), as aware local times."""
        if instant.tzinfo is None:
            raise ValueError("instant must be timezone-aware")
        # cronsim starts from whole minutes and yields instants strictly after its start
        start = instant.astimezone(self.zone).replace(second=0, microsecond=0)
        last_utc = instant.astimezone(UTC)
        for moment in CronSim(self.expression, start):
            moment_utc = moment.astimezone(UTC)
            if moment_utc <= last_utc:
                continue  # the minute of ``instant`` itself, or a repeated wall time
            last_utc = moment_utc
            yield moment

    def next_after(self, instant: datetime) -> datetime:
        """The first firing instant strictly after ``instant``, as an aware local time."""
        return next(self.iter_after(instant))

    def next_after_epoch(self, seconds: float) -> float:
        """The first firing instant strictly after ``seconds`` (Unix time), as Unix time."""
        moment = self.next_after(datetime.fromtimestamp(seconds, UTC))
        return moment.timestamp()

    def upcoming(self, instant: datetime, count: int) -> list[datetime]:
        """The next ``count`` firing instants after ``instant``."""
        found = []
        for moment in self.iter_after(instant):
            if len(found) >= count:
                break
            found.append(moment)
        return found
