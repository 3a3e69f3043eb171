"""File-level restore for xobackup: browse a delta backup's disks and copy files out of them.

``xobackup files ls`` and ``xobackup files get`` read the backup's VHD chain straight from the
remote with range reads, find partitions (MBR, GPT), LVM logical volumes and filesystems
(ext2/3/4, XFS, Btrfs, NTFS, FAT, exFAT) with the dissect.* parsers, and write files into a
folder or a tar/zip stream: no mount, no root, no FUSE, no chain-length limit.

Licence: AGPL-3.0-or-later, because dissect.* is; no other part of xobackup imports this
package.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import click

from xobackup_core.hookspecs import hookimpl
from xobackup_core.plugins import Provided
from xobackup_restore_files.readers import builtin_readers

__all__ = ["builtin_readers"]


@hookimpl
def xobackup_provides() -> list[Provided]:
    found = [
        Provided("file-reader", reader.name, (reader.__doc__ or "").split("\n")[0])
        for reader in builtin_readers()
    ]
    return [*found, Provided("command", "files", "file-level restore: files ls, files get")]


@hookimpl
def xobackup_file_readers() -> Sequence[Any]:
    return builtin_readers()


@hookimpl
def xobackup_cli_commands(cli: click.Group) -> None:
    from xobackup_restore_files.cli import files_group

    cli.add_command(files_group)
