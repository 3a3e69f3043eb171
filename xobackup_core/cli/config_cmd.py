"""``xobackup config check``: validate the config without running anything."""

from __future__ import annotations

from urllib.parse import urlsplit

import click

from xobackup_core.cli.context import AppContext, pass_app
from xobackup_core.config import Config
from xobackup_core.errors import ConfigError
from xobackup_core.plugins import Plugins


def check_plugins(config: Config, plugins: Plugins) -> None:
    """Check that every remote scheme, server type and codec the config uses is installed."""
    schemes = plugins.provided_names("remote")
    for name, remote in config.remotes.items():
        scheme = urlsplit(remote.url).scheme
        if scheme not in schemes:
            raise ConfigError(
                f"no installed remote plugin handles {scheme!r} URLs; "
                f"installed remote types: {', '.join(schemes) or 'none'}",
                key=f"remotes.{name}.url",
                source=config.source,
            )
    types = plugins.provided_names("hypervisor")
    for name, server in config.servers.items():
        if server.type not in types:
            raise ConfigError(
                f"no installed hypervisor plugin handles type {server.type!r}; "
                f"installed types: {', '.join(types) or 'none'}",
                key=f"servers.{name}.type",
                source=config.source,
            )
    codecs = plugins.provided_names("compressor")
    codec_of = {"": "none", "native": "gzip"}
    for name, job in config.jobs.items():
        codec = codec_of.get(job.compression, job.compression)
        if codec not in codecs:
            raise ConfigError(
                f"compression {job.compression!r} needs the {codec!r} compressor plugin; "
                f"installed: {', '.join(codecs)}",
                key=f"jobs.{name}.compression",
                source=config.source,
            )


@click.group("config")
def config_group() -> None:
    """Work with the configuration file."""


@config_group.command("check")
@pass_app
def check_command(app: AppContext) -> None:
    """Validate the config (syntax, keys, types, references, installed plugins)."""
    config = app.config
    check_plugins(config, app.plugins)
    click.echo(
        f"{config.source}: OK ({len(config.servers)} servers, {len(config.remotes)} remotes, "
        f"{len(config.jobs)} jobs, {len(config.schedules)} schedules)"
    )


def register(cli: click.Group) -> None:
    cli.add_command(config_group)
