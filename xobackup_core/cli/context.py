"""What every command shares: the loaded plugins and the config, read on first use."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import click

from xobackup_core.config import Config, load_config, redact_url
from xobackup_core.errors import UsageError
from xobackup_core.plugins import Plugins
from xobackup_core.remote import Remote

if TYPE_CHECKING:
    from xobackup_core.logs.store import LogStore


@dataclass
class AppContext:
    plugins: Plugins
    config_path: Path | None = None
    _config: Config | None = None

    @property
    def config(self) -> Config:
        """The validated config; plugins the config disables are unloaded at this point."""
        if self._config is None:
            self._config = load_config(self.config_path)
            extra = set(self._config.plugins.disable) - self.plugins.disabled
            if extra:
                self.plugins = Plugins(
                    disabled=self.plugins.disabled | extra, autoload=self.plugins.autoload
                )
        return self._config

    def log_store(self) -> LogStore:
        """The run log named by the config; runs left pending by dead processes are closed
        as interrupted first, so nothing stays pending forever."""
        from xobackup_core.logs.store import LogStore, log_path_from_config

        store = LogStore(log_path_from_config(self.config))
        store.mark_interrupted()
        return store

    def open_remote(self, name_or_url: str) -> Remote:
        """A remote by its config name, or directly by URL (``file:///tmp/x``)."""
        if "://" in name_or_url:
            return self.plugins.remote(name_or_url, {"name": redact_url(name_or_url)})
        remotes = self.config.remotes
        if name_or_url not in remotes:
            known = ", ".join(sorted(remotes)) or "none defined"
            raise UsageError(f"unknown remote {name_or_url!r}; remotes in the config: {known}")
        remote = remotes[name_or_url]
        return self.plugins.remote(remote.url, remote.plugin_options(name_or_url))


pass_app = click.make_pass_decorator(AppContext)
