"""``xobackup daemon``, ``xobackup schedules`` and ``xobackup cancel``."""

from __future__ import annotations

import getpass
import json
import logging
import os
import sys
from datetime import UTC, datetime

import click

from xobackup_core.cli.context import AppContext, pass_app
from xobackup_core.config import load_config
from xobackup_core.errors import ExitCode, UsageError
from xobackup_core.logs.records import Status
from xobackup_core.logs.store import LogStore, log_path_from_config
from xobackup_core.scheduler.cancel import request_cancel
from xobackup_core.scheduler.clock import SystemClock
from xobackup_core.scheduler.daemon import Daemon, cron_of


@click.command("schedules")
@click.option("--count", default=3, show_default=True, type=click.IntRange(1, 1000))
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@pass_app
def schedules_command(app: AppContext, count: int, as_json: bool) -> None:
    """Every schedule: its job, cron, timezone, whether enabled, and its next COUNT runs."""
    config = app.config
    now = datetime.fromtimestamp(SystemClock().now(), UTC)
    rows = []
    for key, schedule in config.schedules.items():
        cron = cron_of(config, key)
        upcoming = cron.upcoming(now, count) if schedule.enabled else []
        rows.append(
            {
                "schedule": key,
                "job": schedule.job,
                "cron": schedule.cron,
                "timezone": cron.timezone,
                "enabled": schedule.enabled,
                "next": [
                    {"local": moment.isoformat(), "utc": moment.astimezone(UTC).isoformat()}
                    for moment in upcoming
                ],
            }
        )
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no schedules in the config")
    for row in rows:
        state = "enabled" if row["enabled"] else "disabled"
        click.echo(
            f"{row['schedule']}: job {row['job']}, '{row['cron']}' {row['timezone']}, {state}"
        )
        for moment in row["next"]:
            click.echo(f"  {moment['local']}  ({moment['utc']})")


@click.command("daemon")
@click.option(
    "--shutdown-grace",
    default=300.0,
    show_default=True,
    type=click.FloatRange(0),
    help="Seconds running jobs get to end after SIGTERM/SIGINT before they are marked interrupted.",
)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
)
@click.option(
    "--run-now",
    "run_now",
    multiple=True,
    metavar="SCHEDULE",
    help="Also run this schedule once at start-up (repeatable).",
)
@pass_app
def daemon_command(
    app: AppContext, shutdown_grace: float, log_level: str, run_now: tuple[str, ...]
) -> None:
    """Run every enabled schedule in the foreground, logging to stderr.

    SIGHUP reloads the config (a bad one is logged and the old one kept); SIGTERM or SIGINT
    stop it cleanly.
    """
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    path = app.config_path
    config = app.config
    # the daemon sweeps the runs of dead processes itself, at start-up, and logs each one
    store = LogStore(log_path_from_config(config))
    daemon = Daemon(
        lambda: load_config(path),
        app.plugins,
        store,
        config=config,
        shutdown_grace=shutdown_grace,
    )
    daemon.install_signal_handlers()
    daemon.run(run_now)
    if daemon.abandoned:
        # Engine worker threads of abandoned runs would keep the interpreter alive at exit.
        logging.shutdown()
        sys.stderr.flush()
        os._exit(int(ExitCode.INTERRUPTED))


@click.command("cancel")
@click.argument("run_id")
@pass_app
def cancel_command(app: AppContext, run_id: str) -> None:
    """Ask a running backup run (a full id or a prefix) to stop."""
    store = app.log_store()
    full = store.find_run(run_id)
    if full is None:
        raise UsageError(f"no run has the id {run_id!r} (see 'xobackup logs')")
    run = store.get_run(full)
    assert run is not None
    if run.status is not Status.PENDING:
        raise UsageError(f"run {full} is not running: it ended {run.status.value}")
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry for this uid (a container)
        user = f"uid {os.getuid()}"
    who = f"{user} (pid {os.getpid()})"
    if request_cancel(store, full, by=who):
        click.echo(f"cancel requested for run {full}; it stops at its next check")
    else:
        click.echo(f"cancel was already requested for run {full}")


def register(cli: click.Group) -> None:
    cli.add_command(schedules_command)
    cli.add_command(daemon_command)
    cli.add_command(cancel_command)
