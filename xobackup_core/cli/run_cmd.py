"""``xobackup run JOB``: run a backup job now."""

from __future__ import annotations

import sys

import click

from xobackup_core.cli.context import AppContext, pass_app
from xobackup_core.engine.progress import LineProgress, TerminalProgress
from xobackup_core.engine.runner import JobRunner
from xobackup_core.errors import ExitCode, UsageError
from xobackup_core.scheduler.daemon import record_already_running, running_run_of


@click.command("run")
@click.argument("job")
@click.option("--schedule", help="Run as this schedule (its retention and settings apply).")
@pass_app
def run_command(app: AppContext, job: str, schedule: str | None) -> None:
    """Run JOB now and print its outcome (exit 0 on success, 1 on failure or skip)."""
    config = app.config
    if job not in config.jobs:
        known = ", ".join(sorted(config.jobs)) or "none defined"
        raise UsageError(f"unknown job {job!r}; jobs in the config: {known}")
    if schedule is not None and schedule not in config.schedules:
        known = ", ".join(sorted(config.schedules)) or "none defined"
        raise UsageError(f"unknown schedule {schedule!r}; schedules in the config: {known}")
    if schedule is None:
        schedule = next((k for k, s in config.schedules.items() if s.job == job), None)
    store = app.log_store()
    running = running_run_of(store, config.job_id(job))
    if running is not None:
        record_already_running(store, app.plugins, config, job, schedule, running)
        click.secho(f"job {job!r} is already running (run {running}): skipped", fg="yellow")
        raise SystemExit(int(ExitCode.FAILURE))
    progress = TerminalProgress() if sys.stdout.isatty() else LineProgress()
    runner = JobRunner(config, app.plugins, store, progress=progress)
    try:
        outcome = runner.run(job, schedule)
    finally:
        progress.close()
        runner.close()
    colour = {"success": "green", "failure": "red", "skipped": "yellow"}.get(outcome.status)
    click.secho(f"run {outcome.run_id}: {outcome.status}", fg=colour)
    for vm_uuid, status in outcome.vm_status.items():
        click.echo(f"  {vm_uuid}: {status}")
    click.echo(f"details: xobackup logs show {outcome.run_id}")
    if outcome.status != "success":
        raise SystemExit(int(ExitCode.FAILURE))


def register(cli: click.Group) -> None:
    cli.add_command(run_command)
