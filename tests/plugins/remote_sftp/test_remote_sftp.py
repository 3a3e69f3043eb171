"""The SFTP remote against a real OpenSSH sshd on 127.0.0.1."""

from __future__ import annotations

import uuid

import pytest

from tests.conftest import require, require_module, require_tool
from xobackup_core.testing import RemoteConformance


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
