"""``xobackup demo``: the main job, for real, against an embedded simulated pool.

It starts the XAPI simulator (from the ``hypervisor_xcpng`` plugin) with a few VMs whose disks
hold real ext4 filesystems, writes a config in the demo folder, runs a smart-mode delta job
twice with guest writes in between and a full job, all to a local remote in that folder, then
prints the logs and the backups. These are the code paths a production run takes; only the
pool is simulated. Nothing outside the folder is touched.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import click

from xobackup_core.cli.context import AppContext, pass_app
from xobackup_core.config import Config, load_config
from xobackup_core.engine.repository import BackupRepository
from xobackup_core.engine.runner import JobRunner
from xobackup_core.errors import ExitCode, UsageError
from xobackup_core.logs.store import LogStore, log_path_from_config

DISK_SIZE = 64 * 1024 * 1024

CONFIG = """\
# Written by `xobackup demo`: a simulated pool, a local remote, two jobs.
log_db = "{folder}/logs.sqlite"

[servers.demo-pool]
url = "{url}"
username = "{username}"
password = {{ file = "{folder}/pool-password" }}

[remotes.demo-remote]
url = "file://{folder}/remote"

[jobs.demo-delta]
mode = "delta"
remotes = ["demo-remote"]
smart = {{ power_state = "all" }}
settings = {{ exportRetention = 3, concurrency = 2 }}

[jobs.demo-full]
mode = "full"
remotes = ["demo-remote"]
vms = ["{first_vm}"]
compression = "zstd"
"""


def _filesystem_image(folder: Path, index: int) -> Path | None:
    """A small ext4 image holding a few files, or None when mkfs.ext4 is missing."""
    mkfs = shutil.which("mkfs.ext4") or (
        "/sbin/mkfs.ext4" if Path("/sbin/mkfs.ext4").exists() else None
    )
    if mkfs is None:
        return None
    tree = folder / f"tree-{index}"
    (tree / "etc").mkdir(parents=True, exist_ok=True)
    (tree / "etc" / "hostname").write_text(f"demo-vm-{index}\n")
    (tree / "home" / "user").mkdir(parents=True, exist_ok=True)
    (tree / "home" / "user" / "notes.txt").write_text("backed up by xobackup\n" * 100)
    (tree / "var").mkdir(exist_ok=True)
    (tree / "var" / "data.bin").write_bytes(bytes(range(256)) * 4096)
    image = folder / f"disk-{index}.ext4"
    with image.open("wb") as stream:
        stream.truncate(DISK_SIZE)
    subprocess.run(
        [mkfs, "-q", "-F", "-d", str(tree), "-L", f"demo{index}", str(image)],
        check=True,
        capture_output=True,
    )
    shutil.rmtree(tree)
    return image


@click.command("demo")
@click.option(
    "--dir",
    "folder",
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for the demo's config, remote, logs and simulated pool (default: a new one).",
)
@click.option("--vms", default=3, show_default=True, help="VMs in the simulated pool.")
@pass_app
def demo_command(app: AppContext, folder: Path | None, vms: int) -> None:
    """Run delta and full backups of a simulated pool into a local folder, then show the logs."""
    try:
        from xobackup_hypervisor_xcpng.sim import Simulator
    except ImportError:
        raise UsageError(
            "the demo needs the hypervisor_xcpng plugin (its XAPI simulator); "
            "install it with scripts/install.sh"
        ) from None
    folder = (folder or Path(tempfile.mkdtemp(prefix="xobackup-demo-"))).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    if any(folder.iterdir()):
        raise UsageError(f"{folder} is not empty; give an empty or new folder with --dir")
    click.echo(f"demo folder: {folder}")
    simulator = Simulator(pools=1, vms=vms, hosts=2, disk_size=DISK_SIZE, data_dir=folder / "pool")
    with simulator:
        guests = [record for _ref, record in simulator.vms(0)]
        (folder / "pool-password").write_text(simulator.password)
        config_path = folder / "config.toml"
        config_path.write_text(
            CONFIG.format(
                folder=folder,
                url=simulator.pool(0).url,
                username=simulator.username,
                first_vm=guests[0]["uuid"],
            )
        )
        config = load_config(config_path)
        store = _open_store(config)
        runner = JobRunner(config, app.plugins, store)
        try:
            inventory = runner.driver("demo-pool").inventory()
            for index, guest in enumerate(guests):
                image = _filesystem_image(folder, index)
                disks = inventory.vm(guest["uuid"]).disks
                if image is not None and disks:
                    simulator.load_image(disks[0].vdi_uuid, image)
                    image.unlink()
            click.echo(f"simulated pool at {simulator.pool(0).url} with {len(guests)} VMs")
            statuses = []
            for step, job in enumerate(("demo-delta", "demo-delta", "demo-full")):
                if step == 1:
                    click.echo("guest writes: 5% of every disk changes")
                    for guest in guests:
                        for disk in inventory.vm(guest["uuid"]).disks:
                            simulator.randomize_blocks(disk.vdi_uuid, 0.05, seed=step)
                outcome = runner.run(job)
                statuses.append(outcome.status)
                click.echo(f"run {outcome.run_id} of {job}: {outcome.status}")
        finally:
            runner.close()
            store.close()
    _show(app, folder)
    click.echo(f"\nconfig: {config_path}\ntry: xobackup --config {config_path} logs")
    if any(status != "success" for status in statuses):
        raise SystemExit(int(ExitCode.FAILURE))


def _open_store(config: Config) -> LogStore:
    return LogStore(log_path_from_config(config))


def _show(app: AppContext, folder: Path) -> None:
    from xobackup_core.logs.render import run_lines

    click.echo("\nruns:")
    with LogStore(folder / "logs.sqlite") as store:
        for line in run_lines(store.list_runs()):
            click.echo("  " + line)
    click.echo("\nbackups:")
    remote = app.plugins.remote(f"file://{folder}/remote", {"name": "demo-remote"})
    repository = BackupRepository(remote)
    for vm_uuid in repository.list_vms():
        for backup in repository.list_backups(vm_uuid):
            click.echo(
                f"  {backup.vm_name:<16} {backup.mode:<5} {backup.size:>12} B  {backup.path}"
            )


def register(cli: click.Group) -> None:
    cli.add_command(demo_command)
