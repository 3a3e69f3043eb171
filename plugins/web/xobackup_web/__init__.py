"""xobackup's web overview: ``xobackup serve`` (see docs/web.md).

A small server over the config and the run log: jobs with their schedules and next runs,
runs with status colours and expandable task trees, a filter box, backups per VM and remote,
a "run now" button, live updates while a run goes on, and the same data as a documented JSON
API under ``/api/``.
"""

from __future__ import annotations

from collections.abc import Sequence

import click

from xobackup_core.hookspecs import hookimpl
from xobackup_core.plugins import Provided


@hookimpl
def xobackup_provides() -> Sequence[Provided]:
    """The ``serve`` command."""
    return [Provided("command", "serve", "web overview and JSON API of jobs, runs, backups")]


@hookimpl
def xobackup_cli_commands(cli: click.Group) -> None:
    """Add ``xobackup serve``."""
    from xobackup_web.cli import serve_command

    cli.add_command(serve_command)
