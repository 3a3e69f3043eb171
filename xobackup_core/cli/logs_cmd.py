"""``xobackup logs``: list backup runs; ``xobackup logs show RUNID``: one run's task tree."""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import click

from xobackup_core.cli.context import AppContext, pass_app
from xobackup_core.config import default_config_path
from xobackup_core.errors import UsageError
from xobackup_core.logs import LogStore, RunFilter, log_path_from_config, parse_since
from xobackup_core.logs.render import format_size, format_speed, run_lines, tree_lines

_COLOR_CHOICES = click.Choice(["auto", "always", "never"])


def _db_option(function: click.decorators.FC) -> click.decorators.FC:
    return click.option(
        "--db",
        "db_path",
        type=click.Path(dir_okay=False, path_type=Path),
        help="Log database (default: 'log_db' from the config, else the state folder).",
    )(function)


def _color_option(function: click.decorators.FC) -> click.decorators.FC:
    return click.option(
        "--color",
        "color",
        type=_COLOR_CHOICES,
        default="auto",
        show_default=True,
        help="Colour the statuses: on a terminal only (auto, which honours NO_COLOR), "
        "always or never.",
    )(function)


def _use_color(choice: str) -> bool | None:
    """What to pass to click.echo: None lets click decide (terminal or not)."""
    if choice == "always":
        return True
    if choice == "never" or os.environ.get("NO_COLOR"):
        return False
    return None


def _log_path(app: AppContext, db_path: Path | None) -> Path:
    if db_path is not None:
        return db_path
    if app.config_path is not None or default_config_path().exists():
        return log_path_from_config(app.config)
    return log_path_from_config(None)


def _open(app: AppContext, db_path: Path | None) -> LogStore | None:
    """The log store, or None when there is no log yet (nothing has run)."""
    path = _log_path(app, db_path)
    if not path.exists():
        return None
    store = LogStore(path)
    try:
        store.mark_interrupted()  # so a dead process's run never reads as still running
    except sqlite3.OperationalError:
        pass  # a read-only copy of the log: list it as it is
    return store


@click.group("logs", invoke_without_command=True)
@click.option("--job", metavar="JOB", help="Only this job (id or name).")
@click.option(
    "--status",
    "statuses",
    multiple=True,
    metavar="STATUS",
    help="Only runs with this status: pending, success, failure, skipped, interrupted, "
    "cancelled (repeatable).",
)
@click.option("--vm", metavar="VM", help="Only runs that backed up this VM (uuid or name).")
@click.option("--since", metavar="WHEN", help="Only runs started since: 12h, 2d, 1w, 2026-11-20.")
@click.option(
    "--search",
    metavar="TEXT",
    help="Only runs whose tasks, messages, warnings or data contain TEXT.",
)
@click.option(
    "--limit", default=50, show_default=True, type=click.IntRange(min=0), help="0: no limit."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_db_option
@_color_option
@click.pass_context
def logs_group(
    ctx: click.Context,
    job: str | None,
    statuses: Sequence[str],
    vm: str | None,
    since: str | None,
    search: str | None,
    limit: int,
    as_json: bool,
    db_path: Path | None,
    color: str,
) -> None:
    """List backup runs, newest first; `xobackup logs show RUNID` draws one run's tasks."""
    ctx.meta["xobackup.logs"] = {"db_path": db_path, "color": color}
    if ctx.invoked_subcommand is not None:
        return
    run_filter = RunFilter(
        job=job,
        statuses=list(statuses),
        vm=vm,
        since=parse_since(since) if since else None,
        search=search,
        limit=limit or None,
    )
    app = ctx.find_object(AppContext)
    assert app is not None, "the xobackup group puts the AppContext in place"
    store = _open(app, db_path)
    runs = [] if store is None else store.list_runs(run_filter)
    if store is not None:
        store.close()
    if as_json:
        click.echo(json.dumps([run.to_dict(tasks=False) for run in runs], indent=2))
        return
    for line in run_lines(runs):
        click.echo(line, color=_use_color(color))


@logs_group.command("show")
@click.argument("run_id", metavar="RUNID")
@click.option("--json", "as_json", is_flag=True, help="Print the run and its tasks as JSON.")
@_db_option
@_color_option
@click.pass_context
@pass_app
def show_command(
    app: AppContext,
    ctx: click.Context,
    run_id: str,
    as_json: bool,
    db_path: Path | None,
    color: str,
) -> None:
    """Draw the task tree of run RUNID (a full id or its first characters)."""
    parent = ctx.meta.get("xobackup.logs", {})
    db_path = db_path or parent.get("db_path")
    if color == "auto":
        color = parent.get("color", "auto")
    store = _open(app, db_path)
    if store is None:
        raise UsageError(
            f"no run {run_id!r}: there is no log database at {_log_path(app, db_path)} yet"
        )
    with store:
        full_id = store.find_run(run_id)
        run = store.get_run(full_id) if full_id else None
        progress = store.run_progress(full_id, pending_only=True) if run else {}
    if run is None:
        raise UsageError(
            f"no run {run_id!r} in the log database {store.path}; "
            "`xobackup logs` lists the runs and their ids"
        )
    if as_json:
        click.echo(json.dumps(run.to_dict(), indent=2))
        return
    for line in tree_lines(run):
        click.echo(line, color=_use_color(color))
    for vm in progress.values():  # a running run: how far each VM has got, as last recorded
        rate = f"  {format_speed(vm.speed)}" if vm.speed else ""
        click.echo(f"now: {vm.name}  {vm.stage}  {format_size(vm.transferred)}{rate}")


def register(cli: click.Group) -> None:
    cli.add_command(logs_group)
