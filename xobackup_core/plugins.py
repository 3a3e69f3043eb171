"""Plugin discovery and the typed facade through which the engine calls plugins.

Plugins are found through the entry-point group ``xobackup.plugins.v1``. The core's own
features (the smart selector, the ``none`` codec) are registered first, the same way. The rest
of the code never touches ``pm.hook``: it calls the typed methods of :class:`Plugins`.

Vendors and tests control loading with:

* ``disabled`` names (config ``[plugins] disable``, ``--disable-plugin``, or the environment
  variable ``XOBACKUP_DISABLE_PLUGINS=a,b``): those entry points are not loaded;
* ``autoload=False`` (``--no-plugin-autoload`` or ``XOBACKUP_DISABLE_PLUGIN_AUTOLOAD=1``): only
  the core's built-ins and the entry points named in ``only`` (``XOBACKUP_PLUGINS=a,b``) load.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import TYPE_CHECKING, Any

import pluggy

from xobackup_core import hookspecs
from xobackup_core.errors import PluginError, RemoteConfigError

if TYPE_CHECKING:
    import click

    from xobackup_core.compression import Codec
    from xobackup_core.hypervisor import HypervisorDriver, Inventory, Vm
    from xobackup_core.remote import Remote

BUILTIN_PLUGINS = ("xobackup_core.builtin.selector", "xobackup_core.builtin.codecs")
"""Core modules registered as plugins before any entry point."""

KINDS = ("hypervisor", "remote", "compressor", "selector", "file-reader", "reporter", "command")


@dataclass(frozen=True)
class Provided:
    """One capability a plugin declares through ``xobackup_provides``."""

    kind: str
    """One of :data:`KINDS`."""
    name: str
    """What users write in the config: a remote URL scheme, a codec name, a server type..."""
    description: str = ""


@dataclass(frozen=True)
class PluginInfo:
    """A loaded plugin, as ``xobackup plugins`` lists it."""

    name: str
    distribution: str
    version: str
    provides: tuple[Provided, ...] = field(default_factory=tuple)


def _env_list(name: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, "").split(",") if item.strip()]


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


class Plugins:
    """The loaded plugins and the only caller of their hooks."""

    def __init__(
        self,
        *,
        disabled: Iterable[str] = (),
        autoload: bool | None = None,
        only: Iterable[str] = (),
        extra: Iterable[tuple[str, object]] = (),
    ) -> None:
        self._pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self._pm.add_hookspecs(hookspecs)
        self._dist: dict[str, tuple[str, str]] = {}
        self.disabled = frozenset([*disabled, *_env_list("XOBACKUP_DISABLE_PLUGINS")])
        if autoload is None:
            autoload = not _env_flag("XOBACKUP_DISABLE_PLUGIN_AUTOLOAD")
        self.autoload = autoload
        only_names = {*only, *_env_list("XOBACKUP_PLUGINS")}

        core_version = _version("xobackup-core")
        for module_name in BUILTIN_PLUGINS:
            module = __import__(module_name, fromlist=["_"])
            short = module_name.rsplit(".", 1)[-1]
            self._register(module, f"core.{short}", ("xobackup-core", core_version))
        for entry_point in metadata.entry_points(group=hookspecs.ENTRY_POINT_GROUP):
            if entry_point.name in self.disabled:
                continue
            if not autoload and entry_point.name not in only_names:
                continue
            try:
                plugin = entry_point.load()
            except Exception as error:  # a third-party import error must not be a traceback
                raise PluginError(
                    f"plugin {entry_point.name!r} ({entry_point.value}) failed to load: {error}. "
                    f"Disable it with --disable-plugin {entry_point.name} or "
                    f"XOBACKUP_DISABLE_PLUGINS={entry_point.name}."
                ) from error
            dist = entry_point.dist
            dist_info = (dist.name, dist.version) if dist else ("?", "?")
            self._register(plugin, entry_point.name, dist_info)
        for name, plugin in extra:
            self._register(plugin, name, ("(registered in code)", ""))
        try:
            self._pm.check_pending()
        except pluggy.PluginValidationError as error:
            raise PluginError(f"a plugin implements an unknown hook: {error}") from error

    def _register(self, plugin: object, name: str, dist: tuple[str, str]) -> None:
        if self._pm.get_plugin(name) is not None:
            return
        try:
            self._pm.register(plugin, name=name)
        except (pluggy.PluginValidationError, ValueError) as error:
            raise PluginError(f"plugin {name!r} is not valid: {error}") from error
        self._dist[name] = dist

    def register(self, plugin: object, name: str) -> None:
        """Register an in-process plugin (tests, embedding applications)."""
        self._register(plugin, name, ("(registered in code)", ""))

    # -- introspection -----------------------------------------------------------------------
    def plugins_info(self) -> list[PluginInfo]:
        """Every loaded plugin with its distribution, version and capabilities."""
        infos = []
        for name, plugin in self._pm.list_name_plugin():
            impl = getattr(plugin, "xobackup_provides", None)
            provides = tuple(impl()) if impl else ()
            dist, version = self._dist.get(name, ("?", "?"))
            infos.append(PluginInfo(name, dist, version, provides))
        return sorted(infos, key=lambda info: info.name)

    def provided(self, kind: str) -> list[Provided]:
        """Every capability of ``kind`` declared by the loaded plugins, sorted by name."""
        found = [p for group in self._pm.hook.xobackup_provides() for p in group if p.kind == kind]
        return sorted(found, key=lambda p: p.name)

    def provided_names(self, kind: str) -> list[str]:
        return [p.name for p in self.provided(kind)]

    # -- typed hook calls --------------------------------------------------------------------
    def hypervisor(self, server: Mapping[str, Any]) -> HypervisorDriver:
        """The driver for a configured server; PluginError when no plugin handles its type."""
        driver = self._pm.hook.xobackup_hypervisor(server=server)
        if driver is None:
            known = ", ".join(self.provided_names("hypervisor")) or "none installed"
            raise PluginError(
                f"no hypervisor plugin handles server type {server.get('type')!r}; "
                f"installed types: {known}"
            )
        return driver

    def select_vms(self, job: Mapping[str, Any], inventory: Inventory) -> list[Vm]:
        """The VMs ``job`` takes now."""
        selected = self._pm.hook.xobackup_select_vms(job=job, inventory=inventory)
        if selected is None:
            raise PluginError("no selector plugin is loaded (the core's selector was disabled?)")
        return list(selected)

    def remote(self, url: str, options: Mapping[str, Any]) -> Remote:
        """Open the remote at ``url``; PluginError naming the installed schemes if none fits.

        An ``encryptionKey`` option, or one in the URL's query as Xen Orchestra writes it, makes
        it an encrypted remote (XO's format): the plugin never sees the key, and the returned
        remote encrypts and decrypts every file transparently.
        """
        from xobackup_core.config import url_secrets_into_options
        from xobackup_core.remote_encryption import (
            open_encrypted_remote,
            refuse_if_encrypted,
            split_encryption_key,
        )

        try:
            url, options = url_secrets_into_options(url, options)
        except ValueError as error:
            raise RemoteConfigError(str(error), remote=str(options.get("name", "remote"))) from None
        options, encryption_key = split_encryption_key(options)
        remote = self._pm.hook.xobackup_remote(url=url, options=options)
        if remote is None:
            scheme = url.split("://", 1)[0] if "://" in url else url
            known = ", ".join(self.provided_names("remote")) or "none installed"
            raise PluginError(
                f"no remote plugin handles {scheme!r} URLs; installed remote types: {known}"
            )
        if encryption_key is not None:
            return open_encrypted_remote(remote, encryption_key)
        refuse_if_encrypted(remote)
        return remote

    def compressor(self, name: str) -> Codec:
        """The codec called ``name``; PluginError listing the installed codecs if unknown."""
        codec = self._pm.hook.xobackup_compressor(name=name)
        if codec is None:
            known = ", ".join(self.provided_names("compressor"))
            raise PluginError(f"unknown compression {name!r}; installed: {known}")
        return codec

    def file_readers(self) -> list[Any]:
        """Partition, volume and filesystem readers for file-level restore."""
        return [reader for group in self._pm.hook.xobackup_file_readers() for reader in group]

    def add_cli_commands(self, cli: click.Group) -> None:
        """Let plugins add their commands to the CLI."""
        self._pm.hook.xobackup_cli_commands(cli=cli)

    def run_started(self, run: Mapping[str, Any]) -> None:
        self._pm.hook.xobackup_run_started(run=run)

    def task_finished(self, run_id: str, task: Mapping[str, Any]) -> None:
        self._pm.hook.xobackup_task_finished(run_id=run_id, task=task)

    def run_finished(self, run: Mapping[str, Any]) -> None:
        self._pm.hook.xobackup_run_finished(run=run)

    def hook_names(self) -> Sequence[str]:
        """Names of every hook in the contract (for documentation tests)."""
        return [name for name in dir(hookspecs) if name.startswith("xobackup_")]


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "?"
