from datetime import UTC, datetime, timedelta

from xobackup_core.engine.retention import entries_to_delete, period_tags


def ms(*args):
    return int(datetime(*args, tzinfo=UTC).timestamp() * 1000)


def names(deleted):
    return [entry[0] for entry in deleted]


def test_keep_newest_and_delete_newest_first():
    entries = [(f"b{i}", ms(2026, 8, 1, i)) for i in range(6)]
    deleted = entries_to_delete(entries[::-1], keep=2, timestamp_of=lambda e: e[1])
    assert names(deleted) == ["b3", "b2", "b1", "b0"]
    assert entries_to_delete(entries, keep=10, timestamp_of=lambda e: e[1]) == []
    assert names(entries_to_delete(entries, keep=0, timestamp_of=lambda e: e[1]))[0] == "b5"


def test_long_term_keeps_oldest_of_each_recent_non_empty_period():
    start = datetime(2026, 7, 1, 3, tzinfo=UTC)
    # two backups a day (03:00, 15:00) for 40 days, none on July 10-12 (empty periods)
    entries = []
    for day in range(40):
        if 9 <= day <= 11:
            continue
        for hour in (0, 12):
            moment = start + timedelta(days=day, hours=hour)
            entries.append((moment.strftime("%m-%d %H"), int(moment.timestamp() * 1000)))
    deleted = entries_to_delete(
        entries,
        keep=3,
        timestamp_of=lambda e: e[1],
        long_term={"daily": {"retention": 5}, "monthly": {"retention": 2}},
    )
    kept = sorted(set(names(entries)) - set(names(deleted)))
    # newest 3, the oldest of each of the last 5 days, the oldest of July and August
    assert kept == [
        "07-01 03", "08-01 03", "08-05 03", "08-06 03", "08-07 03",
        "08-08 03", "08-08 15", "08-09 03", "08-09 15",
    ]  # fmt: skip


def test_long_term_periods_follow_the_timezone():
    # 23:30 UTC on Aug 1 is already Aug 2 in Paris
    entries = [("late", ms(2026, 8, 1, 23, 30)), ("early", ms(2026, 8, 1, 8))]
    paris = entries_to_delete(
        entries,
        keep=0,
        timestamp_of=lambda e: e[1],
        long_term={"daily": {"retention": 2}},
        timezone="Europe/Paris",
    )
    assert paris == []
    utc = entries_to_delete(
        entries, keep=0, timestamp_of=lambda e: e[1], long_term={"daily": {"retention": 2}}
    )
    assert names(utc) == ["late"]


def test_period_tags_use_xo_names():
    assert period_tags(ms(2026, 8, 1, 4)) == [
        "daily=2026-08-01",
        "weekly=2026-31",
        "monthly=2026-08",
        "yearly=2026",
    ]
