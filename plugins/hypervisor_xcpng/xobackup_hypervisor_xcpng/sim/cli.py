"""``xobackup sim serve``: run the XAPI simulator in the foreground."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType

import click

from xobackup_core.errors import UsageError
from xobackup_hypervisor_xcpng.sim.simulator import FLAVOURS, Simulator


@click.group("sim")
def sim() -> None:
    """Run an XAPI simulator (simulated XCP-ng / Citrix Hypervisor pools on loopback)."""


@sim.command("serve")
@click.option(
    "--pools",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="Number of pools (one port each).",
)
@click.option(
    "--vms", type=click.IntRange(0, 10000), default=4, show_default=True, help="VMs per pool."
)
@click.option(
    "--hosts",
    type=click.IntRange(1, 16),
    default=2,
    show_default=True,
    help="Hosts per pool (members answer HOST_IS_SLAVE).",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=0,
    show_default=True,
    help="Port of the first pool (pool i uses PORT+i); 0 picks free ports.",
)
@click.option(
    "--data",
    "data_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for disk content (default: a temporary folder, deleted on exit).",
)
@click.option(
    "--flavour",
    type=click.Choice(sorted(FLAVOURS)),
    default="xcp-ng",
    show_default=True,
    help="xcp-ng (zstd, Suspended VM creation) or citrix.",
)
@click.option(
    "--disk-size",
    type=click.IntRange(1, 2040),
    default=4,
    show_default=True,
    help="Virtual size of each VM's disk, in GiB (content is sparse).",
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed of the generated names, uuids and disk content.",
)
@click.option(
    "--password", default="xobackup-sim", show_default=True, help="Password of the root user."
)
@click.option(
    "--no-jsonrpc",
    is_flag=True,
    help="Answer /jsonrpc with text/xml, like a host older than JSON-RPC.",
)
def serve(
    pools: int,
    vms: int,
    hosts: int,
    port: int,
    data_dir: Path | None,
    flavour: str,
    disk_size: int,
    seed: int,
    password: str,
    no_jsonrpc: bool,
) -> None:
    """Serve simulated pools until Ctrl-C or SIGTERM; prints each pool's URL and login."""
    if port and port + pools - 1 > 65535:
        raise UsageError(f"--port {port} leaves no room for {pools} pools")
    if data_dir is not None:
        data_dir.mkdir(parents=True, exist_ok=True)
    simulator = Simulator(
        pools=pools,
        vms=vms,
        hosts=hosts,
        flavour=flavour,
        port=port,
        data_dir=data_dir,
        seed=seed,
        password=password,
        disk_size=disk_size * 1024**3,
        jsonrpc=not no_jsonrpc,
    )
    try:
        simulator.start()
    except OSError as error:
        simulator.stop()
        raise UsageError(f"cannot listen on port {port}: {error.strerror or error}") from None
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = signal.signal(signal.SIGTERM, on_signal)
    click.echo(
        f"XAPI simulator ({flavour}), user {simulator.username!r}, password {simulator.password!r}"
    )
    for pool in simulator.pools:
        members = ", ".join(pool.member_urls) or "none"
        click.echo(f"pool {pool.index}: {pool.url}  (members: {members})")
    click.echo("Press Ctrl-C to stop.", err=True)
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        simulator.stop()
        click.echo("simulator stopped", err=True)
