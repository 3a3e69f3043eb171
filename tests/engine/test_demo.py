"""`xobackup demo`, run as a user runs it after installing."""

import json
import os

from xobackup_remote_local import LocalRemote

from tests.core.conftest import run_cli
from xobackup_core.formats.vhd_chain import open_vhd_chain
from xobackup_core.formats.vhd_directory import remote_disk_opener


def test_demo_runs_the_main_job_inside_its_folder(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    folder = tmp_path / "demo"
    env = {
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_STATE_HOME": str(home / ".state"),
    }
    result = run_cli("demo", "--dir", str(folder), "--vms", "2", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(": success") == 3
    assert os.listdir(home) == [], "the demo must not touch anything outside its folder"
    logs = run_cli("--config", str(folder / "config.toml"), "logs", "--json", env=env)
    runs = json.loads(logs.stdout)
    assert [run["status"] for run in runs] == ["success"] * 3
    assert sorted(run["jobName"] for run in runs) == ["demo-delta", "demo-delta", "demo-full"]
    listing = run_cli("--config", str(folder / "config.toml"), "backups", "list", "--json", env=env)
    backups = json.loads(listing.stdout)
    assert sorted(b["mode"] for b in backups) == ["delta"] * 4 + ["full"]
    # the disks hold real ext4 filesystems: the superblock magic is in the backed-up chain
    remote = LocalRemote(folder / "remote")
    newest_delta = max((b for b in backups if b["mode"] == "delta"), key=lambda b: b["timestamp"])
    metadata = json.loads(remote.read_bytes(newest_delta["id"]))
    vm_folder = newest_delta["id"].rsplit("/", 1)[0]
    [vhd] = metadata["vhds"].values()
    with open_vhd_chain(f"{vm_folder}/{vhd}", remote_disk_opener(remote)) as chain:
        superblock = chain.read_at(1024, 1024)
    assert superblock[56:58] == b"\x53\xef"
