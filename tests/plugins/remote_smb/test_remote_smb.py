"""The SMB remote against a real Samba smbd on 127.0.0.1 (private config and passdb)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid

import pytest

from tests.conftest import require, require_module, require_tool
from xobackup_core.config import Secret
from xobackup_core.errors import (
    RemoteConfigError,
    RemoteConnectionError,
    RemoteError,
    RemoteNoSpaceError,
    RemotePermissionError,
)
from xobackup_core.plugins import Plugins
from xobackup_core.testing import RemoteConformance
from xobackup_core.testing.remote_conformance import pattern

MiB = 1024 * 1024
CLI = [sys.executable, "-m", "xobackup_core.cli"]


@pytest.fixture(scope="session")
def smb_server(tmp_path_factory):
    require_module("smbprotocol")
    require_tool("smbd")
    require_tool("smbpasswd")
    from tests.servers import smb

    require(smb.available(), "smbd (as root)")
    server = smb.SmbServer(tmp_path_factory.mktemp("smbd")).start()
    yield server
    server.stop()


def _remote(server, sub: str, **options):
    from xobackup_remote_smb import open_smb_remote

    options.setdefault("password", Secret(server.password))
    options.setdefault("name", "smb-test")
    return open_smb_remote(server.url(sub), options)


class TestSmbRemoteConformance(RemoteConformance):
    large_file_size = 32 * MiB

    @pytest.fixture
    def remote(self, smb_server):
        remote = _remote(smb_server, f"conformance/{uuid.uuid4().hex[:12]}")
        yield remote
        remote.close()


class TestSmbRemoteEncryptedConformance(RemoteConformance):
    """The same contract over an SMB3-encrypted session (a different data path in the client)."""

    large_file_size = 16 * MiB
    concurrent_writers = 4

    @pytest.fixture
    def remote(self, smb_server):
        remote = _remote(smb_server, f"encrypted/{uuid.uuid4().hex[:12]}", encrypt=True)
        yield remote
        remote.close()


def test_encryption_is_negotiated_on_request(smb_server):
    with _remote(smb_server, "enc-check", encrypt=True) as remote:
        connection = next(iter(remote._cache.values()))
        session = next(iter(connection.session_table.values()))
        assert session.encrypt_data
    with _remote(smb_server, "enc-check") as remote:
        connection = next(iter(remote._cache.values()))
        session = next(iter(connection.session_table.values()))
        assert not session.encrypt_data


def test_signing_modes(smb_server):
    """Default: only what SMB 3.1.1 demands is signed (the tree connect, which the server
    checks); signing = required signs every request. Both must work against Samba."""
    data = pattern(3 * MiB, seed=9)
    for signing, expected in (("auto", False), ("required", True)):
        with _remote(smb_server, f"sign-{signing}", signing=signing) as remote:
            remote.write_bytes("/f", data)
            assert remote.read_bytes("/f") == data
            connection = next(iter(remote._cache.values()))
            session = next(iter(connection.session_table.values()))
            assert session.signing_required is expected
    with pytest.raises(RemoteConfigError, match="signing"):
        _remote(smb_server, "x", signing="sometimes")


def test_files_land_in_the_share_with_the_final_name_only(smb_server):
    data = pattern(5 * MiB + 3, seed=3)
    with _remote(smb_server, "layout/deep") as remote:
        with remote.open_write("/vm/disk.vhd") as writer:
            writer.write(data)
            # While writing, only a hidden temp file exists on the server's disk.
            names = os.listdir(smb_server.share_dir / "layout/deep/vm")
            assert len(names) == 1 and names[0].startswith(".disk.vhd.tmp-")
    on_disk = smb_server.share_dir / "layout/deep/vm/disk.vhd"
    assert on_disk.read_bytes() == data
    assert os.listdir(on_disk.parent) == ["disk.vhd"]


def test_read_ahead_stops_at_the_end_and_is_collected_on_close(smb_server):
    data = pattern(10 * MiB + 123, seed=5)
    with _remote(smb_server, "readahead") as remote:
        remote.write_bytes("/f", data)
        connection = next(iter(remote._cache.values()))
        before = len(connection.outstanding_requests)
        with remote.open_read("/f") as stream:
            assert stream.read(MiB) == data[:MiB]  # closed with READs still in flight
        with remote.open_read("/f", 3 * MiB + 5) as stream:
            assert stream.read() == data[3 * MiB + 5 :]
        with remote.open_read("/f", MiB - 1, 2 * MiB + 2) as stream:
            assert b"".join(iter(lambda: stream.read(100_000), b"")) == data[MiB - 1 : 3 * MiB + 1]
        assert len(connection.outstanding_requests) <= before + 2
        assert remote.read_bytes("/f") == data


def test_commit_over_a_file_open_for_reading(smb_server):
    """SMB servers refuse to replace a file another handle has open (Windows semantics):
    the commit retries briefly, then fails cleanly, keeping the old file and no temp file."""
    old, new = pattern(3 * MiB, seed=1), pattern(2 * MiB, seed=2)
    with _remote(smb_server, "busy") as remote:
        remote.write_bytes("/f", old)
        with remote.open_read("/f") as stream:
            assert stream.read(MiB) == old[:MiB]
            with pytest.raises(RemotePermissionError) as caught:
                remote.write_bytes("/f", new)
            assert "commit" in str(caught.value) and "/f" in str(caught.value)
            assert stream.read() == old[MiB:]
        assert os.listdir(smb_server.share_dir / "busy") == ["f"]
        remote.write_bytes("/f", new)  # once the reader is gone the replace goes through
        assert remote.read_bytes("/f") == new


def test_free_space_matches_the_server_filesystem(smb_server):
    with _remote(smb_server, "space") as remote:
        free = remote.free_space()
    stat = os.statvfs(smb_server.share_dir)
    expected = stat.f_bavail * stat.f_frsize
    assert free is not None
    assert abs(free - expected) < 512 * MiB


def test_wrong_password_is_a_clear_error_without_the_secret(smb_server):
    wrong = "Wr0ng-Pa55-" + uuid.uuid4().hex[:8]
    with pytest.raises(RemotePermissionError) as caught:
        _remote(smb_server, "x", password=Secret(wrong), retries=0)
    message = str(caught.value)
    assert "authentication failed" in message
    assert smb_server.user in message
    assert "smb-test" in message
    assert wrong not in message and wrong not in repr(caught.value.__dict__)


def test_missing_share_is_a_config_error(smb_server):
    from xobackup_remote_smb import open_smb_remote

    url = smb_server.url().replace("/backup", "/no-such-share")
    with pytest.raises(RemoteConfigError) as caught:
        open_smb_remote(url, {"password": Secret(smb_server.password), "retries": 0})
    assert "no-such-share" in str(caught.value)
    assert smb_server.password not in str(caught.value)


def test_nobody_listening_is_a_connection_error(smb_server):
    from xobackup_remote_smb import open_smb_remote

    from tests.servers.base import free_port

    url = f"smb://{smb_server.user}@127.0.0.1:{free_port()}/backup"
    with pytest.raises(RemoteConnectionError) as caught:
        open_smb_remote(url, {"password": Secret("pw"), "retries": 1, "connect_timeout": 2})
    assert "connect" in str(caught.value)


def test_bad_urls_and_options(smb_server):
    from xobackup_remote_smb import open_smb_remote

    with pytest.raises(RemoteConfigError, match="share"):
        open_smb_remote("smb://user@host", {"password": "x"})
    with pytest.raises(RemoteConfigError, match="password"):
        open_smb_remote(smb_server.url(), {})
    with pytest.raises(RemoteConfigError, match="bogus"):
        open_smb_remote(smb_server.url(), {"password": "x", "bogus": 1})


def test_password_in_the_url_never_shows(smb_server):
    from xobackup_remote_smb import open_smb_remote

    url = smb_server.url("in-url").replace(
        f"{smb_server.user}@", f"{smb_server.user}:{smb_server.password}@"
    )
    with open_smb_remote(url, {}) as remote:
        assert smb_server.password not in remote.name and "***" in remote.name
        with pytest.raises(RemoteError) as caught:
            remote.read_bytes("/missing")
        assert smb_server.password not in str(caught.value)


def test_plugin_hook_and_listing(smb_server):
    plugins = Plugins()
    assert "smb" in plugins.provided_names("remote")
    remote = plugins.remote(
        smb_server.url("hooked"), {"password": Secret(smb_server.password), "name": "cfg-name"}
    )
    try:
        assert remote.name == "cfg-name"
        remote.write_bytes("/x", b"y")
        assert (smb_server.share_dir / "hooked/x").read_bytes() == b"y"
    finally:
        remote.close()


def test_cli_remote_test(smb_server):
    env = {**os.environ, "XOBACKUP_SMB_PASSWORD": smb_server.password}
    result = subprocess.run(
        [*CLI, "remote", "test", smb_server.url("cli"), "--size", "2"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout
    assert smb_server.password not in result.stdout + result.stderr
    assert os.listdir(smb_server.share_dir / "cli") == []


def test_cli_wrong_password_exit_code(smb_server):
    env = {**os.environ, "XOBACKUP_SMB_PASSWORD": "not-the-password-123"}
    result = subprocess.run(
        [*CLI, "remote", "test", smb_server.url("cli")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "authentication failed" in result.stderr
    assert "not-the-password-123" not in result.stdout + result.stderr


def test_server_stopped_mid_upload(tmp_path):
    """A write cut by a dead server never appears under its final name; the next one works."""
    require_module("smbprotocol")
    require_tool("smbd")
    from tests.servers import smb

    require(smb.available(), "smbd (as root)")
    server = smb.SmbServer(tmp_path / "smbd").start()
    try:
        remote = _remote(server, "cut", timeout=10, retries=0)
        remote.write_bytes("/vm/backup.xva", b"previous backup")
        writer = remote.open_write("/vm/backup.xva")
        writer.write(pattern(8 * MiB))
        server.stop()
        with pytest.raises(RemoteError):
            for _ in range(64):
                writer.write(pattern(MiB))
            writer.commit()
        writer.abort()  # what a `with` block does; must not hang or raise on a dead server
        assert writer.closed
        server.start()
        names = os.listdir(server.share_dir / "cut/vm")
        assert "backup.xva" in names
        assert (server.share_dir / "cut/vm/backup.xva").read_bytes() == b"previous backup"
        # The abandoned temp file is never listed, and the next write goes through.
        remote = _remote(server, "cut", timeout=10)
        assert remote.list("/vm") == ["backup.xva"]
        remote.write_bytes("/vm/backup.xva", b"next backup")
        assert remote.read_bytes("/vm/backup.xva") == b"next backup"
        remote.close()
    finally:
        server.stop()


def test_disk_full_is_a_no_space_error(tmp_path):
    """The share sits on a 16 MiB loop-mounted ext4: filling it gives RemoteNoSpaceError,
    the final name never appears, and space is usable again after the abort."""
    require_module("smbprotocol")
    require_tool("smbd")
    require_tool("mkfs.ext4")
    from tests.servers import smb

    require(smb.available() and os.path.exists("/dev/loop-control"), "smbd and loop devices")
    image = tmp_path / "small.img"
    with image.open("wb") as handle:
        handle.truncate(16 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, capture_output=True)
    share = tmp_path / "smbd" / "share"
    share.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-o", "loop", str(image), str(share)], capture_output=True)
    require(mounted.returncode == 0, "loop mounts")
    server = None
    try:
        server = smb.SmbServer(tmp_path / "smbd").start()
        with _remote(server, "", retries=0) as remote:
            remote.write_bytes("/keep", b"previous")
            with pytest.raises(RemoteNoSpaceError) as caught, remote.open_write("/big") as writer:
                for _ in range(64):
                    writer.write(pattern(MiB))
            assert "smb-test" in str(caught.value) and "/big" in str(caught.value)
            assert remote.list("/") == ["keep", "lost+found"]
            assert sorted(os.listdir(share)) == ["keep", "lost+found"]
            remote.write_bytes("/after", b"space is back")
            assert remote.read_bytes("/after") == b"space is back"
    finally:
        if server is not None:
            server.stop()
        subprocess.run(["umount", str(share)], capture_output=True)


def test_silent_server_times_out(smb_server):
    """A server that stops answering (SIGSTOP) makes operations fail after the timeout."""
    import signal

    remote = _remote(smb_server, "frozen", timeout=2, retries=0)
    remote.write_bytes("/a", b"a")
    pids = _session_members(smb_server.process.pid)
    assert pids, "smbd's processes were not found"
    for pid in pids:
        os.kill(int(pid), signal.SIGSTOP)
    outcome: list[BaseException] = []
    try:
        thread = threading.Thread(target=lambda: _capture(outcome, remote.stat, "/a"))
        thread.start()
        thread.join(30)
        assert not thread.is_alive(), "the operation hung past its timeout"
    finally:
        for pid in pids:
            os.kill(int(pid), signal.SIGCONT)
    assert outcome and isinstance(outcome[0], RemoteConnectionError)
    assert "stat" in str(outcome[0]) and "/a" in str(outcome[0])
    assert remote.read_bytes("/a") == b"a"  # reconnects once the server answers again
    remote.close()


def _session_members(session_id):
    """PIDs of the processes in session ``session_id`` (smbd and its helpers)."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == session_id:
                    members.append(entry)
            except OSError:
                continue
    return members


def _capture(outcome, function, *args):
    try:
        function(*args)
    except BaseException as error:
        outcome.append(error)
