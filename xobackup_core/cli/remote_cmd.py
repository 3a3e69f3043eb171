"""``xobackup remote test``: check that a remote works and how fast it is."""

from __future__ import annotations

import click

from xobackup_core.cli.context import AppContext, pass_app
from xobackup_core.config import redact_url
from xobackup_core.errors import ExitCode


def _rate(bytes_per_second: float) -> str:
    return f"{bytes_per_second / (1024 * 1024):.1f} MiB/s"


@click.group("remote")
def remote_group() -> None:
    """Work with remotes (where backups are stored)."""


@remote_group.command("test")
@click.argument("remote")
@click.option("--size", default=10, show_default=True, help="MiB to write and read back.")
@pass_app
def test_command(app: AppContext, remote: str, size: int) -> None:
    """Write, read back and delete a test file on REMOTE (a config name or a URL)."""
    # A URL may carry a password (s3://key:secret@host/...): only its redacted form is shown.
    shown = redact_url(remote) if "://" in remote else remote
    with app.open_remote(remote) as opened:
        result = opened.test(size * 1024 * 1024)
    if not result.success:
        click.secho(f"remote {shown!r}: {result.step} failed: {result.error}", fg="red", err=True)
        raise SystemExit(int(ExitCode.FAILURE))
    click.echo(
        f"remote {shown!r}: OK, write {_rate(result.write_rate)}, read {_rate(result.read_rate)}"
    )


def register(cli: click.Group) -> None:
    cli.add_command(remote_group)
