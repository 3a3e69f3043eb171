"""``xobackup backups list``: what each remote holds, per VM."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import click

from xobackup_core.cli.context import AppContext, pass_app
from xobackup_core.config import redact_url
from xobackup_core.engine.repository import BackupRepository
from xobackup_core.errors import UsageError


def _size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1024
    return f"{size} B"


@click.group("backups")
def backups_group() -> None:
    """Browse the backups stored on remotes."""


@backups_group.command("list")
@click.option("--remote", "remote_names", multiple=True, help="Only this remote (repeatable).")
@click.option("--vm", "vm_filter", help="Only this VM (UUID or name).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_app
def list_command(
    app: AppContext, remote_names: tuple[str, ...], vm_filter: str | None, as_json: bool
) -> None:
    """List every backup: remote, VM, date, mode, size and job."""
    names = list(remote_names) or list(app.config.remotes)
    if not names:
        raise UsageError("no remote is configured; add a [remotes.<name>] table or pass --remote")
    rows = []
    for name in names:
        shown = redact_url(name) if "://" in name else name  # a URL may carry secrets
        with app.open_remote(name) as remote:
            repository = BackupRepository(remote)
            for vm_uuid in repository.list_vms():
                for backup in repository.list_backups(vm_uuid):
                    if vm_filter and vm_filter not in (backup.vm_uuid, backup.vm_name):
                        continue
                    rows.append(backup.listing(shown))
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no backups")
        return
    # The metadata names the job by id only: show the configured job with that id, if any.
    job_names = {app.config.job_id(key): key for key in app.config.jobs}
    for row in rows:
        moment = datetime.fromtimestamp(row["timestamp"] / 1000, tz=UTC)
        job = job_names.get(row["jobId"]) or row["jobId"][:8] or "-"
        click.echo(
            f"{row['remote']:<12} {row['vmName'] or row['vm']:<24} "
            f"{moment:%Y-%m-%d %H:%M:%S} {row['mode']:<5} {_size(row['size']):>10}  "
            f"{job:<12} {row['id']}"
        )


def register(cli: click.Group) -> None:
    cli.add_command(backups_group)
