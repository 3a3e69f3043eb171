"""The plugin module registered under ``xobackup.plugins.v1`` as ``hypervisor_xcpng``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import click

from xobackup_core.hookspecs import hookimpl
from xobackup_core.hypervisor import HypervisorDriver
from xobackup_core.plugins import Provided


@hookimpl
def xobackup_provides() -> Sequence[Provided]:
    """XCP-ng/Citrix pools as a hypervisor type, and the ``xobackup sim`` command."""
    return [
        Provided("hypervisor", "xcpng", "XCP-ng and Citrix Hypervisor pools over XAPI"),
        Provided("command", "sim", "run an XAPI simulator (xobackup sim serve)"),
    ]


@hookimpl
def xobackup_hypervisor(server: Mapping[str, Any]) -> HypervisorDriver | None:
    """The XAPI driver for ``type = "xcpng"`` servers."""
    if server.get("type", "xcpng") != "xcpng":
        return None
    from xobackup_hypervisor_xcpng.driver import XapiDriver

    return XapiDriver(server)


@hookimpl
def xobackup_cli_commands(cli: click.Group) -> None:
    """Add ``xobackup sim``."""
    from xobackup_hypervisor_xcpng.sim.cli import sim

    cli.add_command(sim)
