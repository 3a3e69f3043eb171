"""The plugin contract: every hook a plugin may implement, in one place.

A plugin is a module (or object) registered under the entry-point group
:data:`ENTRY_POINT_GROUP`; it implements any of the hooks below with the
:data:`hookimpl` marker. The core's own features register the same way. The engine never calls
these hooks directly: it goes through the typed facade :class:`xobackup_core.plugins.Plugins`.

"firstresult" hooks stop at the first plugin that returns something other than ``None``;
"collecting" hooks call every plugin and return the list of their results.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import click
import pluggy

if TYPE_CHECKING:
    from xobackup_core.compression import Codec
    from xobackup_core.hypervisor import HypervisorDriver, Inventory, Vm
    from xobackup_core.plugins import Provided
    from xobackup_core.remote import Remote

PROJECT_NAME = "xobackup"
ENTRY_POINT_GROUP = "xobackup.plugins.v1"
"""Versioned: a future incompatible contract gets a new group, so old plugins are not loaded."""

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def xobackup_provides() -> Sequence[Provided]:
    """Declare what this plugin provides, for ``xobackup plugins`` and for config validation.

    Called (collecting) whenever the list of capabilities is needed: listing plugins, and
    checking a config (an unknown remote scheme lists every ``remote`` name declared here).
    Return a sequence of :class:`~xobackup_core.plugins.Provided` (kind, name, description)
    where kind is one of ``hypervisor``, ``remote``, ``compressor``, ``selector``,
    ``file-reader``, ``reporter``, ``command``.
    """


@hookspec(firstresult=True)
def xobackup_hypervisor(server: Mapping[str, Any]) -> HypervisorDriver | None:
    """Return a driver for a configured server, or None when the server's type is not yours.

    Called (firstresult) once per server per run, when the engine first needs that server.
    ``server`` is the validated config table (``type``, ``url``, ``username``, ``password`` as
    a :class:`~xobackup_core.config.Secret`, ``allow_unauthorized``...). Raise
    :class:`~xobackup_core.errors.HypervisorError` when the type is yours but the connection
    fails.
    """


@hookspec(firstresult=True)
def xobackup_select_vms(job: Mapping[str, Any], inventory: Inventory) -> Sequence[Vm] | None:
    """Return the VMs a job takes now, or None to leave the choice to another selector.

    Called (firstresult) at the start of every run, with the validated job table and a fresh
    inventory of every server, so smart rules see VMs created since the job was written. The
    built-in selector handles explicit lists and smart rules; a plugin registered before it can
    override the choice.
    """


@hookspec(firstresult=True)
def xobackup_remote(url: str, options: Mapping[str, Any]) -> Remote | None:
    """Return a :class:`~xobackup_core.remote.Remote` for ``url``, or None if not your scheme.

    Called (firstresult) whenever a configured remote is opened. ``options`` is the remote's
    config table minus ``url`` (credentials as :class:`~xobackup_core.config.Secret`, ``name``
    for messages). Raise a :class:`~xobackup_core.errors.RemoteError` when the scheme is yours
    but the remote cannot be opened (wrong password, missing share...).
    """


@hookspec(firstresult=True)
def xobackup_compressor(name: str) -> Codec | None:
    """Return the streaming :class:`~xobackup_core.compression.Codec` called ``name``, or None.

    Called (firstresult) when a job, a remote or a command needs a codec by name.
    """


@hookspec
def xobackup_file_readers() -> Sequence[Any]:
    """Return readers that open partitions, volumes and filesystems inside a disk image.

    Called (collecting) by file-level restore when it opens a backup's disk. Each reader is an
    object documented by the restore_files plugin's API; the core only passes them along.
    """


@hookspec
def xobackup_cli_commands(cli: click.Group) -> None:
    """Add commands to the ``xobackup`` command line.

    Called (collecting, results ignored) once when the CLI starts, before arguments are parsed.
    Add click commands or groups with ``cli.add_command(...)``.
    """


@hookspec
def xobackup_run_started(run: Mapping[str, Any]) -> None:
    """A backup run has started.

    Called (collecting, results ignored) right after the run's log entry is created. ``run``
    holds ``runId``, ``jobId``, ``jobName``, ``start`` (ms). Must not raise or block long.
    """


@hookspec
def xobackup_task_finished(run_id: str, task: Mapping[str, Any]) -> None:
    """A task of a run (VM, snapshot, export, transfer, merge...) has ended.

    Called (collecting, results ignored) when any task closes, with its final record
    (``id``, ``parentId``, ``name``, ``status``, ``start``, ``end``, ``result``, ``warnings``).
    For live views and metrics; must not raise or block long.
    """


@hookspec
def xobackup_run_finished(run: Mapping[str, Any]) -> None:
    """A backup run has ended (success, failure, skipped or interrupted).

    Called (collecting, results ignored) once, with the whole task tree. Reporters (email,
    webhook) decide here whether to send, per the job's ``reportWhen``.
    """
