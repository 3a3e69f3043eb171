"""Cron evaluation in IANA timezones, across daylight-saving changes."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from xobackup_core.errors import ConfigError
from xobackup_core.scheduler.cron import CronSchedule


def utc_times(schedule: CronSchedule, start: datetime, count: int) -> list[str]:
    return [m.astimezone(UTC).strftime("%m-%d %H:%M") for m in schedule.upcoming(start, count)]


@pytest.mark.parametrize(
    ("zone", "start", "expected"),
    [
        # Paris: 02:00 CET jumps to 03:00 CEST on 2026-03-29; 02:30 fires once, at 03:00 CEST
        (
            "Europe/Paris",
            datetime(2026, 3, 27, 12, tzinfo=UTC),
            ["03-28 01:30", "03-29 01:00", "03-30 00:30"],
        ),
        # New York: 02:00 EST jumps to 03:00 EDT on 2026-03-08
        (
            "America/New_York",
            datetime(2026, 3, 6, 12, tzinfo=UTC),
            ["03-07 07:30", "03-08 07:00", "03-09 06:30"],
        ),
    ],
)
def test_spring_forward_gap_fires_once_at_the_first_valid_instant(zone, start, expected):
    assert utc_times(CronSchedule("30 2 * * *", zone), start, 3) == expected


@pytest.mark.parametrize(
    ("zone", "start", "expected"),
    [
        # Paris: 03:00 CEST falls back to 02:00 CET on 2026-10-25: 02:30 happens twice
        (
            "Europe/Paris",
            datetime(2026, 10, 23, 12, tzinfo=UTC),
            ["10-24 00:30", "10-25 00:30", "10-26 01:30"],
        ),
        (
            "America/New_York",
            datetime(2026, 10, 30, 12, tzinfo=UTC),
            ["10-31 05:30", "11-01 05:30", "11-02 06:30"],
        ),
    ],
)
def test_fall_back_overlap_fires_once(zone, start, expected):
    hour = "2" if zone == "Europe/Paris" else "1"
    assert utc_times(CronSchedule(f"30 {hour} * * *", zone), start, 3) == expected


def test_wildcard_hours_keep_real_time_through_the_repeated_hour():
    every_half_hour = CronSchedule("*/30 * * * *", "Europe/Paris")
    times = utc_times(every_half_hour, datetime(2026, 10, 24, 23, 45, tzinfo=UTC), 5)
    # 02:00 and 02:30 local come twice, an hour apart in UTC: nothing is skipped or doubled
    assert times == ["10-25 00:00", "10-25 00:30", "10-25 01:00", "10-25 01:30", "10-25 02:00"]


def test_next_after_is_strictly_after():
    nightly = CronSchedule("0 3 * * *", "UTC")
    at_three = datetime(2026, 5, 1, 3, 0, tzinfo=UTC)
    assert nightly.next_after(at_three) == datetime(2026, 5, 2, 3, 0, tzinfo=UTC)
    assert nightly.next_after_epoch(at_three.timestamp() - 0.5) == at_three.timestamp()


def test_day_of_week_and_local_time():
    sundays = CronSchedule("15 4 * * 0", "America/New_York")
    first = sundays.next_after(datetime(2026, 6, 1, tzinfo=UTC))
    assert (first.weekday(), first.hour, first.minute) == (6, 4, 15)
    assert first.astimezone(UTC).hour == 8  # EDT is UTC-4


@pytest.mark.parametrize(
    ("expression", "zone", "message"),
    [
        ("61 * * * *", "UTC", "not a valid cron expression"),
        ("0 3 * * *", "Mars/Olympus", "unknown IANA timezone"),
    ],
)
def test_bad_input_is_a_config_error(expression, zone, message):
    with pytest.raises(ConfigError, match=message):
        CronSchedule(expression, zone)
