"""The ``xobackup`` command: a click group whose subcommands live one per module.

Errors a user can act on (:class:`~xobackup_core.errors.XobackupError`) are printed as one
paragraph on stderr with the documented exit code (:class:`~xobackup_core.errors.ExitCode`);
only a bug in xobackup itself shows a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from xobackup_core import __version__
from xobackup_core.cli import (
    backups_cmd,
    config_cmd,
    daemon_cmd,
    demo_cmd,
    logs_cmd,
    plugins_cmd,
    remote_cmd,
    restore_cmd,
    run_cmd,
    vhd_cmd,
)
from xobackup_core.cli.context import AppContext
from xobackup_core.errors import ExitCode, XobackupError
from xobackup_core.plugins import Plugins


class _Cli(click.Group):
    """Turns xobackup's errors into a message and an exit code instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except XobackupError as error:
            click.secho(f"xobackup: error: {error}", fg="red", err=True)
            ctx.exit(int(error.exit_code))
        except KeyboardInterrupt:
            click.echo("xobackup: interrupted", err=True)
            ctx.exit(int(ExitCode.INTERRUPTED))


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="xobackup")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="XOBACKUP_CONFIG",
    help="Config file (default: $XDG_CONFIG_HOME/xobackup/config.toml).",
)
@click.option(
    "--disable-plugin",
    "disabled_plugins",
    multiple=True,
    metavar="NAME",
    help="Do not load this plugin (repeatable).",
)
@click.option("--no-plugin-autoload", is_flag=True, help="Load only the core's built-ins.")
@click.pass_context
def cli(
    ctx: click.Context,
    config_path: Path | None,
    disabled_plugins: Sequence[str],
    no_plugin_autoload: bool,
) -> None:
    """Back up XCP-ng and Citrix Hypervisor VMs to Xen Orchestra-compatible remotes."""
    app = ctx.find_object(AppContext)
    if app is None:  # invoked without main(), e.g. by click's test runner
        app = AppContext(plugins=_load_plugins(disabled_plugins, no_plugin_autoload))
        ctx.obj = app
    app.config_path = config_path


for module in (
    plugins_cmd,
    config_cmd,
    demo_cmd,
    remote_cmd,
    run_cmd,
    backups_cmd,
    restore_cmd,
    logs_cmd,
    vhd_cmd,
    daemon_cmd,
):
    module.register(cli)


def _load_plugins(disabled: Sequence[str], no_autoload: bool) -> Plugins:
    return Plugins(disabled=disabled, autoload=False if no_autoload else None)


def _prescan(argv: Sequence[str]) -> tuple[list[str], bool]:
    """Read the plugin-loading options before click parses, so plugin commands can register."""
    disabled: list[str] = []
    no_autoload = False
    args = list(argv)
    for index, arg in enumerate(args):
        if arg == "--":
            break
        if arg == "--no-plugin-autoload":
            no_autoload = True
        elif arg == "--disable-plugin" and index + 1 < len(args):
            disabled.append(args[index + 1])
        elif arg.startswith("--disable-plugin="):
            disabled.append(arg.split("=", 1)[1])
    return disabled, no_autoload


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        plugins = _load_plugins(*_prescan(args))
        plugins.add_cli_commands(cli)
    except XobackupError as error:
        click.secho(f"xobackup: error: {error}", fg="red", err=True)
        sys.exit(int(error.exit_code))
    cli.main(args=args, prog_name="xobackup", obj=AppContext(plugins=plugins))
