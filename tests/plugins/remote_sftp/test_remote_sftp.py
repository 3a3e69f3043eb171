"""The SFTP remote against a real OpenSSH sshd on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import subprocess
import uuid

import pytest
from click.testing import CliRunner

from tests.conftest import require, require_module, require_tool
from tests.servers.sftp import public_key_fingerprint
from xobackup_core.cli.main import cli
from xobackup_core.config import Secret
from xobackup_core.errors import (
    RemoteConfigError,
    RemoteConnectionError,
    RemoteNoSpaceError,
    RemoteNotFoundError,
    RemotePermissionError,
)
from xobackup_core.plugins import Plugins
from xobackup_core.remote import is_temp_name
from xobackup_core.testing import RemoteConformance, pattern

MiB = 1024 * 1024


@pytest.fixture(scope="session")
def sftp_server():
    require_module("paramiko")
    require_tool("sshd")
    require_tool("ssh-keygen")
    from tests.servers import sftp

    require(sftp.available(), "sshd (as root)")
    server = sftp.SftpServer.create().start()
    yield server
    server.stop()


def _remote(server, path, **options):
    from xobackup_remote_sftp import SftpRemote

    options.setdefault("key_file", str(server.client_key))
    options.setdefault("host_key_fingerprint", server.host_key_fingerprint)
    options.setdefault("name", "sftp-test")
    return SftpRemote.from_url(server.url(path), options)


class TestSftpRemoteConformance(RemoteConformance):
    @pytest.fixture
    def remote(self, sftp_server):
        remote = _remote(sftp_server, f"conformance/{uuid.uuid4().hex[:12]}")
        yield remote
        remote.close()


# -- connection, authentication and host keys ------------------------------------------------
def test_password_login_and_known_hosts(sftp_server):
    remote = _remote(
        sftp_server,
        "password-login",
        key_file=None,
        password=Secret(sftp_server.password),
        host_key_fingerprint=None,
        known_hosts=str(sftp_server.known_hosts),
    )
    with remote:
        remote.write_bytes("/x/hello.txt", b"hello")
        assert remote.read_bytes("/x/hello.txt") == b"hello"
    assert (sftp_server.data_dir / "password-login/x/hello.txt").read_bytes() == b"hello"


def test_wrong_password_is_a_clear_error_without_the_secret(sftp_server):
    wrong = "Not-The-Password-42"
    with pytest.raises(RemotePermissionError) as caught:
        _remote(sftp_server, "p", key_file=None, password=Secret(wrong), name="nas-sftp")
    message = str(caught.value)
    assert "nas-sftp" in message and "authentication failed" in message
    assert sftp_server.user in message
    assert wrong not in message and sftp_server.password not in message


def test_host_key_mismatch_is_refused(sftp_server, tmp_path):
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    wrong = public_key_fingerprint((tmp_path / "other_key.pub").read_text())
    with pytest.raises(RemotePermissionError) as caught:
        _remote(sftp_server, "k", host_key_fingerprint=wrong)
    assert "does not match" in str(caught.value)
    assert sftp_server.host_key_fingerprint in str(caught.value)


def test_unknown_host_key_is_never_accepted(sftp_server, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(RemotePermissionError) as caught:
        _remote(sftp_server, "k", host_key_fingerprint=None, known_hosts=str(empty))
    message = str(caught.value)
    assert "unknown" in message and sftp_server.host_key_fingerprint in message
    assert not (sftp_server.data_dir / "k").exists()


def test_known_hosts_with_another_key_for_the_host_is_refused(sftp_server, tmp_path):
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    key_type, key = (tmp_path / "other_key.pub").read_text().split()[:2]
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{sftp_server.port} {key_type} {key}\n")
    with pytest.raises(RemotePermissionError) as caught:
        _remote(sftp_server, "k", host_key_fingerprint=None, known_hosts=str(known))
    assert "man-in-the-middle" in str(caught.value)


def test_root_that_cannot_be_created(sftp_server):
    from xobackup_remote_sftp import SftpRemote

    url = f"sftp://{sftp_server.user}@127.0.0.1:{sftp_server.port}/root/not-yours/backups"
    with pytest.raises(RemoteConfigError) as caught:
        SftpRemote.from_url(
            url,
            {
                "key_file": str(sftp_server.client_key),
                "host_key_fingerprint": sftp_server.host_key_fingerprint,
                "name": "nas",
            },
        )
    assert "nas" in str(caught.value) and "/root/not-yours/backups" in str(caught.value)


def test_connect_timeout_when_the_server_never_answers():
    from xobackup_remote_sftp import SftpRemote

    with socket.socket() as silent:  # accepts connections but never sends the SSH banner
        silent.bind(("127.0.0.1", 0))
        silent.listen(5)
        port = silent.getsockname()[1]
        with pytest.raises(RemoteConnectionError) as caught:
            SftpRemote.from_url(
                f"sftp://u@127.0.0.1:{port}/x",
                {"password": Secret("pw"), "connect_timeout": 0.5, "retries": 0},
            )
    assert f"127.0.0.1:{port}" in str(caught.value)


def test_server_stopped_mid_upload_leaves_no_file():
    from tests.servers.sftp import SftpServer

    server = SftpServer.create().start()
    try:
        remote = _remote(server, "cut", timeout=5, retries=1, retry_backoff=0.1)
        with pytest.raises(RemoteConnectionError) as caught:
            with remote.open_write("/vm/backup.xva") as writer:
                writer.write(pattern(4 * MiB))
                server.stop_keep_files()
                for _ in range(64):
                    writer.write(pattern(MiB))
        assert "/vm/backup.xva" in str(caught.value)
        assert writer.closed  # aborted by the with block
        server.start()
        assert remote.list("/vm") == []
        assert not remote.exists("/vm/backup.xva")
        leftovers = os.listdir(server.data_dir / "cut" / "vm")
        assert all(is_temp_name(name) for name in leftovers)
        remote.close()
    finally:
        server.stop()


def test_free_space_comes_from_statvfs(sftp_server):
    with _remote(sftp_server, "space") as remote:
        free = remote.free_space()
    expected = os.statvfs(sftp_server.data_dir)
    assert free is not None
    assert abs(free - expected.f_bavail * expected.f_frsize) < 256 * MiB


def test_plugin_hook_and_cli_remote_test(sftp_server, tmp_path):
    config = tmp_path / "config.toml"
    config.write_text(
        f"""
[remotes.nas]
url = "{sftp_server.url("cli")}"
password = "{sftp_server.password}"
options = {{ host_key_fingerprint = "{sftp_server.host_key_fingerprint}" }}
"""
    )
    plugins = Plugins()
    assert "sftp" in plugins.provided_names("remote")
    result = CliRunner().invoke(cli, ["--config", str(config), "remote", "test", "nas"])
    assert result.exit_code == 0, result.output
    assert "OK" in result.output and sftp_server.password not in result.output
    assert os.listdir(sftp_server.data_dir / "cli") == []


def test_cli_remote_test_with_options_in_the_url(sftp_server):
    fingerprint = sftp_server.host_key_fingerprint
    url = (
        f"{sftp_server.url('cli-url')}?host_key_fingerprint={fingerprint}"
        f"&key_file={sftp_server.client_key}&timeout=30s"
    )
    result = CliRunner().invoke(cli, ["remote", "test", "--size", "3", url])
    assert result.exit_code == 0, result.output
    assert "OK" in result.output
    assert os.listdir(sftp_server.data_dir / "cli-url") == []


def test_secrets_are_refused_in_the_url_query(sftp_server):
    from xobackup_remote_sftp import SftpRemote

    with pytest.raises(RemoteConfigError) as caught:
        SftpRemote.from_url(f"{sftp_server.url('q')}?password=Hunter2-secret", {"name": "q"})
    assert "password" in str(caught.value) and "Hunter2-secret" not in str(caught.value)


def test_a_dropped_connection_is_retried_on_a_new_one():
    from tests.servers.sftp import SftpServer

    server = SftpServer.create().start()
    try:
        with _remote(server, "retry", retries=2, retry_backoff=0.05) as remote:
            remote.write_bytes("/a.json", b"{}")
            assert server.kill_sessions() > 0  # every pooled connection is now dead
            assert remote.read_bytes("/a.json") == b"{}"
            assert remote.list("/") == ["a.json"]
    finally:
        server.stop()


def test_permanent_errors_are_not_retried(sftp_server):
    with _remote(sftp_server, "no-retry", retries=5, retry_backoff=30) as remote:
        # With a 30 s backoff a retried NotFound would hang the test; it must fail at once.
        with pytest.raises(RemoteNotFoundError):
            remote.stat("/missing")


def test_full_disk_is_reported_as_no_space(sftp_server):
    require(os.geteuid() == 0, "root (to mount a small tmpfs)")
    small = sftp_server.data_dir / "small"
    small.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0777", "tmpfs", str(small)], check=True
    )
    try:
        with _remote(sftp_server, "small", name="tiny") as remote:
            with pytest.raises(RemoteNoSpaceError) as caught:
                with remote.open_write("/vm/backup.xva") as writer:
                    for _ in range(8):
                        writer.write(pattern(MiB))
            assert "tiny" in str(caught.value) and "/vm/backup.xva" in str(caught.value)
            assert remote.list("/vm") == []
            assert os.listdir(small / "vm") == []  # the temporary file was removed
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_a_password_in_the_url_never_shows_in_errors(sftp_server):
    from xobackup_remote_sftp import SftpRemote

    url = f"sftp://{sftp_server.user}:Wrong-Pa55word@127.0.0.1:{sftp_server.port}/x"
    fingerprint = sftp_server.host_key_fingerprint
    with pytest.raises(RemotePermissionError) as caught:
        # The CLI passes the URL itself as the remote's name.
        SftpRemote.from_url(url, {"name": url, "host_key_fingerprint": fingerprint})
    assert "Wrong-Pa55word" not in str(caught.value)
    assert "***" in str(caught.value)


def test_create_exclusive_has_one_winner(sftp_server):
    import threading

    from xobackup_core.errors import RemoteExistsError

    with _remote(sftp_server, "locks") as remote:
        winners, losers = [], []
        barrier = threading.Barrier(6)

        def contend(index: int) -> None:
            barrier.wait()
            try:
                remote.create_exclusive("/xo-vm-backups/vm.lock", f"holder {index}".encode())
                winners.append(index)
            except RemoteExistsError:
                losers.append(index)

        threads = [threading.Thread(target=contend, args=(n,)) for n in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(winners) == 1 and len(losers) == 5
        assert remote.read_bytes("/xo-vm-backups/vm.lock") == f"holder {winners[0]}".encode()
        assert os.listdir(sftp_server.data_dir / "locks" / "xo-vm-backups") == ["vm.lock"]
