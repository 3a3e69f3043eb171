"""``xobackup restore BACKUP --sr SR``: a backup back as a new VM, on any pool."""

from __future__ import annotations

import click

from xobackup_core.cli.context import AppContext, pass_app
from xobackup_core.config import redact_url
from xobackup_core.engine.repository import BackupRepository
from xobackup_core.engine.restore import parse_backup_ref, restore_backup
from xobackup_core.errors import FormatError, RemoteNotFoundError, UsageError


@click.command("restore")
@click.argument("backup")
@click.option("--sr", "sr_uuid", required=True, help="UUID of the SR that receives the disks.")
@click.option(
    "--pool",
    "pool_name",
    help="Server (config name) or pool (name or UUID) to restore to; default: the one with the SR.",
)
@click.option(
    "--halted", is_flag=True, help="Restore a memory backup without its memory (a halted VM)."
)
@click.option(
    "--new-mac-addresses",
    is_flag=True,
    help="Give the VM's network interfaces new MAC addresses (default: the backed-up ones).",
)
@click.option(
    "--start", is_flag=True, help="Start the VM once restored (a Suspended one is resumed)."
)
@pass_app
def restore_command(
    app: AppContext,
    backup: str,
    sr_uuid: str,
    pool_name: str | None,
    halted: bool,
    new_mac_addresses: bool,
    start: bool,
) -> None:
    """Restore BACKUP (REMOTE:PATH, as 'xobackup backups list' prints it) as a new VM."""
    remote_name, path = parse_backup_ref(backup)
    config = app.config
    with app.open_remote(remote_name) as remote:
        try:
            metadata = BackupRepository(remote).read_metadata(path)
        except RemoteNotFoundError:
            raise UsageError(f"no backup {path} on remote {redact_url(remote_name)!r}") from None
        except FormatError as error:
            raise UsageError(f"{backup} is not a readable backup: {error}") from None
        candidates = list(config.servers)
        if pool_name is not None and pool_name in config.servers:
            candidates = [pool_name]
        for server in candidates:
            driver = app.plugins.hypervisor(config.server_view(server))
            try:
                inventory = driver.inventory()
                pools = [
                    p
                    for p in inventory.pools
                    if any(sr.uuid == sr_uuid for sr in p.srs)
                    and (pool_name in (None, server, p.name, p.uuid))
                ]
                if not pools:
                    continue
                result = restore_backup(
                    remote,
                    metadata,
                    driver,
                    sr_uuid=sr_uuid,
                    pool=pools[0],
                    allow_halted=halted,
                    new_mac_addresses=new_mac_addresses,
                    start=start,
                )
            finally:
                driver.close()
            if result.started:
                state = "resumed, with its memory" if result.suspended else "running"
            else:
                state = "Suspended, with its memory" if result.suspended else "halted"
            click.echo(f"restored {result.name} as VM {result.vm_uuid} ({state}) on {server}")
            return
    where = f" in pool {pool_name!r}" if pool_name else ""
    raise UsageError(f"no configured server has an SR {sr_uuid}{where}")


def register(cli: click.Group) -> None:
    cli.add_command(restore_command)
