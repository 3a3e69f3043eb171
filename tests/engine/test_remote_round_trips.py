"""Every remote plugin, end to end: delta and full backups written through it by the engine,
cleaned up by retention, then restored from it into the pool, checked bit for bit.

Each server is real and started here on 127.0.0.1 (sshd, an S3 server, smbd, nfs-ganesha in
a private network namespace).
"""

import contextlib
import uuid

import pytest
from xobackup_hypervisor_xcpng.sim import Simulator

from tests.conftest import require, require_module, require_tool
from tests.engine.conftest import Harness
from xobackup_core.engine.repository import BackupRepository
from xobackup_core.engine.restore import restore_backup

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def sftp_remote():
    require_module("paramiko")
    require_tool("sshd")
    from tests.servers import sftp

    require(sftp.available(), "sshd (as root)")
    server = sftp.SftpServer.create().start()
    yield (
        {
            "url": server.url(f"round-trip/{uuid.uuid4().hex[:8]}"),
            "options": {
                "key_file": str(server.client_key),
                "host_key_fingerprint": server.host_key_fingerprint,
            },
        },
        contextlib.nullcontext,
    )
    server.stop()


@pytest.fixture(scope="module")
def s3_remote(tmp_path_factory):
    require_module("moto")
    from tests.servers.s3 import MotoServer, client

    server = MotoServer(tmp_path_factory.mktemp("moto")).start()
    bucket = f"xob-{uuid.uuid4().hex[:12]}"
    client(server).create_bucket(Bucket=bucket)
    yield (
        {
            "url": f"s3://{bucket}/backups",
            "access_key": server.access_key,
            "secret_key": server.secret_key,
            "options": {"endpoint": server.endpoint},
        },
        contextlib.nullcontext,
    )
    server.stop()


@pytest.fixture(scope="module")
def smb_remote(tmp_path_factory):
    require_module("smbprotocol")
    require_tool("smbd")
    from tests.servers import smb

    require(smb.available(), "smbd (as root)")
    server = smb.SmbServer(tmp_path_factory.mktemp("smbd")).start()
    yield (
        {"url": server.url(f"round-trip-{uuid.uuid4().hex[:8]}"), "password": server.password},
        contextlib.nullcontext,
    )
    server.stop()


@pytest.fixture(scope="module")
def nfs_remote(tmp_path_factory):
    for tool in ("ganesha.nfsd", "rpcbind", "unshare", "nsenter"):
        require_tool(tool)
    from xobackup_remote_nfs import libnfs

    from tests.servers import nfs

    require(nfs.available(), "ganesha with rpcbind in a network namespace (as root)")
    require(libnfs.available(), "libnfs")
    server = nfs.NfsServer(tmp_path_factory.mktemp("ganesha")).start()
    # The engine, the simulator and their threads all run inside the server's namespace.
    yield {"url": server.url(f"round-trip-{uuid.uuid4().hex[:8]}")}, server.joined
    server.stop()


@pytest.mark.parametrize("kind", ["sftp", "s3", "smb", "nfs"])
def test_backup_and_restore_through_remote(kind, request, tmp_path):
    remote_config, context = request.getfixturevalue(f"{kind}_remote")
    with (
        context(),
        Simulator(pools=1, vms=1, hosts=1, disk_size=16 * MiB, data_dir=tmp_path / "sim") as sim,
    ):
        harness = Harness(tmp_path, sim)
        config = harness.config(
            {
                "delta": {
                    "mode": "delta",
                    "remotes": ["far"],
                    "smart": {},
                    "settings": {"exportRetention": 2},
                },
                "full": {"mode": "full", "remotes": ["far"], "smart": {}},
            },
            remotes={"far": remote_config},
        )
        driver = harness.plugins.hypervisor(config.server_view("pool0"))
        vm = next(v for v in driver.inventory().vms if not v.is_snapshot)
        vdi = vm.disks[0].vdi_uuid
        contents = []
        for run in range(3):
            sim.randomize_blocks(vdi, 0.25, seed=run)
            contents.append(sim.read(vdi, 0, sim.vdi_data(vdi).size))
            outcome = harness.run(config, "delta")
            assert outcome.status == "success", harness.store.get_run(outcome.run_id).to_dict()
        assert harness.run(config, "full").status == "success"

        remote = harness.plugins.remote(
            remote_config["url"], config.remotes["far"].plugin_options("far")
        )
        backups = BackupRepository(remote).list_backups(vm.uuid)
        deltas = [b for b in backups if b.mode == "delta"]
        assert len(deltas) == 2, "retention merged the oldest delta away"
        if not remote.supports_update:
            assert all(path.endswith(".alias.vhd") for b in deltas for path in b.vhd_paths.values())
        sr = next(sr for sr in driver.inventory().pools[0].srs if sr.name == "Shared storage")
        for backup, expected in zip(deltas, contents[1:], strict=True):
            restored = restore_backup(remote, backup, driver, sr_uuid=sr.uuid)
            disk = driver.inventory().vm(restored.vm_uuid).disks[0]
            assert sim.read(disk.vdi_uuid, 0, sim.vdi_data(disk.vdi_uuid).size) == expected
        [full] = [b for b in backups if b.mode == "full"]
        restored = restore_backup(remote, full, driver, sr_uuid=sr.uuid)
        disk = driver.inventory().vm(restored.vm_uuid).disks[0]
        assert sim.read(disk.vdi_uuid, 0, sim.vdi_data(disk.vdi_uuid).size) == contents[-1]
        remote.close()
        driver.close()
