"""``xobackup files ls`` and ``xobackup files get``: browse and extract files from a backup."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime

import click

from xobackup_core.cli.context import AppContext, pass_app
from xobackup_core.errors import UsageError
from xobackup_core.remote import Remote
from xobackup_restore_files.browse import (
    BackupBrowser,
    Volume,
    find_backup,
    parse_backup_ref,
    select_volume,
)
from xobackup_restore_files.extract import (
    extract_to_folder,
    extract_to_tar,
    extract_to_zip,
    read_guest,
)
from xobackup_restore_files.readers import DIRECTORY, FILE, SYMLINK, Node, builtin_readers

_KIND_LETTER = {DIRECTORY: "d", FILE: "-", SYMLINK: "l"}


def _readers(app: AppContext) -> list[object]:
    readers = app.plugins.file_readers()
    return readers or list(builtin_readers())


def _open(app: AppContext, backup_text: str) -> tuple[BackupBrowser, Remote]:
    ref = parse_backup_ref(backup_text)
    remote = app.open_remote(ref.remote)
    try:
        browser = BackupBrowser(remote, find_backup(remote, ref.path), _readers(app))
    except BaseException:
        remote.close()
        raise
    return browser, remote


def _mtime(moment: datetime | None) -> str:
    if moment is None:
        return "-"
    if moment.tzinfo is not None:
        # Unix filesystems and NTFS record UTC; FAT records local time without a zone.
        moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def _node_row(node: Node) -> dict[str, object]:
    return {
        "name": node.name,
        "type": node.kind,
        "size": node.size,
        "mtime": node.mtime.isoformat() if node.mtime else None,
        "target": node.link_target,
    }


def _volume_row(volume: Volume) -> dict[str, object]:
    return {
        "id": volume.id,
        "description": volume.description,
        "offset": volume.offset,
        "size": volume.size,
        "filesystem": volume.filesystem,
        "label": volume.label,
    }


@click.group("files")
def files_group() -> None:
    """File-level restore: browse a delta backup's disks and copy files out of them.

    BACKUP is REMOTE:PATH, the remote's name (or URL) and the metadata file of the backup,
    e.g. nas:/xo-vm-backups/<vm uuid>/20260801T040000Z.json, or nas:<vm uuid>/<timestamp>
    (or <vm uuid>/latest). Nothing is mounted or downloaded whole: the disk chain is read
    from the remote with range reads.
    """


@files_group.command("ls")
@click.argument("backup")
@click.argument("disk", required=False)
@click.argument("partition", required=False)
@click.argument("path", required=False, default="/")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_app
def ls_command(
    app: AppContext,
    backup: str,
    disk: str | None,
    partition: str | None,
    path: str,
    as_json: bool,
) -> None:
    """List the disks of BACKUP, the partitions of DISK, or the entries at PATH.

    DISK is a device number, a VDI uuid or the key in the metadata; PARTITION is a number
    (MBR logical partitions from 5), an LVM volume VG/LV, or "whole" for a filesystem without
    a partition table.
    """
    browser, remote = _open(app, backup)
    with remote, browser:
        if disk is None:
            rows = [
                {
                    "device": d.device,
                    "key": d.key,
                    "name": d.name,
                    "vdi": d.vdi_uuid,
                    "size": d.virtual_size,
                }
                for d in browser.disks
            ]
            if as_json:
                click.echo(json.dumps(rows, indent=2))
                return
            for row in rows:
                click.echo(
                    f"{row['device'] or '-':<4} {row['size']:>14}  {row['name'] or '-':<24} "
                    f"{row['key']}"
                )
            return
        volumes = browser.volumes(disk)
        if partition is None:
            if as_json:
                click.echo(json.dumps([_volume_row(v) for v in volumes], indent=2))
                return
            for volume in volumes:
                click.echo(
                    f"{volume.id:<12} {volume.filesystem or '-':<7} {volume.size:>14}  "
                    f"{volume.description}{'  ' + volume.label if volume.label else ''}"
                )
            return
        filesystem = select_volume(volumes, partition).open_filesystem()
        node = read_guest(path, lambda: filesystem.get(path))
        entries = [node]
        if node.kind == DIRECTORY:
            entries = read_guest(path, lambda: sorted(node.children(), key=lambda n: n.name))
        if as_json:
            click.echo(json.dumps([_node_row(n) for n in entries], indent=2, ensure_ascii=False))
            return
        for entry in entries:
            target = f" -> {entry.link_target}" if entry.kind == SYMLINK else ""
            click.echo(
                f"{_KIND_LETTER.get(entry.kind, '?')} {entry.size:>12} {_mtime(entry.mtime)}  "
                f"{entry.name}{target}"
            )


@files_group.command("get")
@click.argument("backup")
@click.argument("disk")
@click.argument("partition")
@click.argument("paths", nargs=-1, required=True)
@click.option("--to", "folder", type=click.Path(file_okay=False), help="Copy into this folder.")
@click.option("--tar", "tar_path", type=click.Path(dir_okay=False), help="Write a tar (.tar.gz).")
@click.option("--zip", "zip_path", type=click.Path(dir_okay=False), help="Write a zip archive.")
@click.option("--overwrite", is_flag=True, help="Replace existing files.")
@pass_app
def get_command(
    app: AppContext,
    backup: str,
    disk: str,
    partition: str,
    paths: Sequence[str],
    folder: str | None,
    tar_path: str | None,
    zip_path: str | None,
    overwrite: bool,
) -> None:
    """Copy PATHS (files, folders with their content, symlinks as links) out of a backup.

    Each PATH lands under its own name at the top of the folder or archive. Names that could
    escape it (.., absolute, with slashes) are made safe, and symlinks are never followed.
    """
    outputs = [o for o in (folder, tar_path, zip_path) if o]
    if len(outputs) != 1:
        raise UsageError("give exactly one of --to DIR, --tar FILE, --zip FILE")

    def warn(message: str) -> None:
        click.secho(f"xobackup: warning: {message}", fg="yellow", err=True)

    browser, remote = _open(app, backup)
    with remote, browser:
        filesystem = select_volume(browser.volumes(disk), partition).open_filesystem()
        items = [(path, read_guest(path, lambda p=path: filesystem.get(p))) for path in paths]
        if folder:
            count, size = extract_to_folder(items, folder, overwrite=overwrite, warn=warn)
        elif tar_path:
            count, size = extract_to_tar(items, tar_path, overwrite=overwrite, warn=warn)
        else:
            assert zip_path is not None
            count, size = extract_to_zip(items, zip_path, overwrite=overwrite, warn=warn)
    click.echo(f"restored {count} entries, {size} bytes of file data to {outputs[0]}")
