"""``xobackup vhd info|check|cat``: inspect, verify and extract VHD files and chains.

PATH is a local file, or a path on a remote with ``--remote NAME_OR_URL``. A differencing
disk is opened with all its parents (found by their relative parent name, like XO).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, BinaryIO

import click

from xobackup_core.cli.context import AppContext, pass_app
from xobackup_core.errors import FormatError, RemoteNotFoundError, UsageError
from xobackup_core.formats.vhd import VhdDisk, VhdFile, describe, verify_vhd_file
from xobackup_core.formats.vhd_chain import (
    VhdChain,
    open_local_disk,
    open_vhd_chain,
)
from xobackup_core.remote import Remote

if TYPE_CHECKING:
    from xobackup_core.formats.vhd_directory import VhdDirectory

_remote_option = click.option(
    "--remote",
    "remote_name",
    metavar="NAME_OR_URL",
    help="Read PATH on this remote (a config name or a URL such as file:///srv/backups).",
)


@contextlib.contextmanager
def _open_chain(app: AppContext, path: str, remote_name: str | None) -> Iterator[VhdChain]:
    # VhdDirectory disks (and their aliases) are read through a remote, so a chain may mix
    # them with VHD files; imported late because only these commands need them.
    from xobackup_core.formats.vhd_directory import open_remote_disk, remote_disk_opener

    if remote_name:
        with app.open_remote(remote_name) as remote:
            if not remote.exists(path):
                raise UsageError(f"{path}: no such file on remote {remote.name!r}")
            try:
                chain = open_vhd_chain(path, remote_disk_opener(remote))
            except RemoteNotFoundError as error:
                raise UsageError(str(error)) from None
            with chain:
                yield chain
        return
    if not os.path.exists(path):
        raise UsageError(f"{path}: no such file")
    with contextlib.ExitStack() as stack:
        root: list[Remote] = []

        def open_disk(disk_path: str) -> VhdDisk:
            if os.path.isdir(disk_path) or disk_path.endswith(".alias.vhd"):
                if not root:
                    root.append(stack.enter_context(app.open_remote("file:///")))
                return open_remote_disk(root[0], os.path.abspath(disk_path))
            return open_local_disk(disk_path)

        try:
            chain = open_vhd_chain(path, open_disk)
        except PermissionError as error:
            raise UsageError(f"{path}: {error.strerror}") from None
        with chain:
            yield chain


def _size(value: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{value} B"
        value /= 1024  # type: ignore[assignment]
    return str(value)


@click.group("vhd")
def vhd_group() -> None:
    """Inspect, check and extract VHD disks and chains."""


@vhd_group.command("info")
@click.argument("path")
@_remote_option
@pass_app
def info_command(app: AppContext, path: str, remote_name: str | None) -> None:
    """Print the type, size, blocks and parents of the VHD at PATH."""
    with _open_chain(app, path, remote_name) as chain:
        for depth, disk in enumerate(chain.disks):
            facts = describe(disk)
            role = "disk" if depth == 0 else f"parent {depth}"
            click.echo(f"{role}: {chain.paths[depth]}")
            click.echo(f"  type: {facts['type']}")
            click.echo(f"  size: {facts['size']} bytes ({_size(int(facts['size']))})")  # type: ignore[arg-type]
            click.echo(f"  uuid: {facts['uuid']}")
            click.echo(f"  creator: {facts['creator']!r}")
            click.echo(
                f"  blocks: {facts['allocated_blocks']} allocated of {facts['blocks']} "
                f"({_size(int(facts['block_size']))} each)"  # type: ignore[arg-type]
            )
            if facts["parent_uuid"]:
                click.echo(f"  parent: {facts['parent_name']} (uuid {facts['parent_uuid']})")
        click.echo(
            f"chain: {len(chain.disks)} disk(s), virtual size {chain.size} bytes, "
            f"{sum(1 for _ in chain.allocated_blocks())} allocated block(s)"
        )


@vhd_group.command("check")
@click.argument("path")
@_remote_option
@pass_app
def check_command(app: AppContext, path: str, remote_name: str | None) -> None:
    """Verify the VHD at PATH and its parents; exit 3 (DATA) on corruption.

    A VhdDirectory has each block in its own file: every block its ``bat`` marks allocated is
    read and decoded, one at a time.
    """
    from xobackup_core.formats.vhd_directory import VhdDirectory

    with _open_chain(app, path, remote_name) as chain:
        for disk in chain.disks:
            if isinstance(disk, VhdFile):
                verify_vhd_file(disk)
            elif isinstance(disk, VhdDirectory):
                _verify_directory_blocks(disk)
        click.echo(f"{path}: OK ({len(chain.disks)} disk(s) in the chain)")


def _verify_directory_blocks(disk: VhdDirectory) -> None:
    """Every allocated block of ``disk`` has a file that decodes to a bitmap and a block."""
    for index in disk.allocated_blocks():
        try:
            disk.read_block(index)
        except FormatError as error:
            # The format layer names the file; the message also names the block, whose
            # number is not obvious from a ``blocks/<n/1000>/<n%1000>`` path.
            where = f"{disk.remote.name}:{disk.block_file(index)}"
            raise FormatError(
                f"block {index}: {_reason(error)}", path=where, field=f"bat[{index}]"
            ) from None


def _reason(error: FormatError) -> str:
    """The message of ``error`` without the path and field it starts with."""
    text = str(error)
    prefix = ": ".join(p for p in (error.path, error.field) if p)
    if prefix and text.startswith(prefix + ": "):
        text = text[len(prefix) + 2 :]
    return text.removeprefix("block ")


@vhd_group.command("cat")
@click.argument("path")
@_remote_option
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, writable=True),
    help="Write to this file (sparse: unallocated blocks become holes) instead of stdout.",
)
@pass_app
def cat_command(app: AppContext, path: str, remote_name: str | None, output: str | None) -> None:
    """Write the virtual disk of PATH as a raw image to stdout or --output."""
    with _open_chain(app, path, remote_name) as chain:
        if output is None:
            _cat(chain, sys.stdout.buffer, sparse=False)
            return
        with open(output, "wb") as stream:
            _cat(chain, stream, sparse=True)


def _cat(chain: VhdChain, stream: BinaryIO, *, sparse: bool) -> None:
    for index, data in chain.iter_blocks():
        if sparse and not chain.has_block(index):
            stream.seek(len(data), os.SEEK_CUR)
            continue
        stream.write(data)
    if sparse:
        stream.truncate(chain.size)
    stream.flush()


def register(cli: click.Group) -> None:
    cli.add_command(vhd_group)
