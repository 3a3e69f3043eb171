"""VM locks on S3 through the optional ``create_exclusive`` extension (If-None-Match: *).

The S3 remote does not offer the extension yet; :class:`ExclusiveS3Remote` shows the few lines
it takes and proves the lock is then exclusive on a real S3 API server (moto).
"""

from __future__ import annotations

import threading
import uuid

import pytest

from tests.conftest import require_module
from xobackup_core.config import Secret
from xobackup_core.errors import RemoteExistsError
from xobackup_core.scheduler.locks import VmLock, VmLockedError, lock_guarantee, lock_path

VM = "0b9d2e1c-5a6f-4e7d-8c9b-a1b2c3d4e5f6"


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    require_module("boto3")
    require_module("moto")
    require_module("flask")  # moto[server]
    from tests.servers.s3 import MotoServer

    server = MotoServer(tmp_path_factory.mktemp("moto")).start()
    yield server
    server.stop()


@pytest.fixture
def remote(moto):
    require_module("xobackup_remote_s3")
    import botocore.exceptions
    from xobackup_remote_s3 import S3Remote

    from tests.servers.s3 import client

    class ExclusiveS3Remote(S3Remote):
        def create_exclusive(self, path: str, data: bytes) -> None:
            try:
                self._client.put_object(
                    Bucket=self.settings.bucket, Key=self._key(path), Body=data, IfNoneMatch="*"
                )
            except botocore.exceptions.ClientError as error:
                code = error.response.get("Error", {}).get("Code")
                if code in ("PreconditionFailed", "ConditionalRequestConflict"):
                    raise RemoteExistsError("exists", remote=self.name, path=path) from None
                raise self._map(error, "create", path) from None

    bucket = f"xob-{uuid.uuid4().hex[:12]}"
    client(moto).create_bucket(Bucket=bucket)
    opened = ExclusiveS3Remote.from_url(
        f"s3://{bucket}/backups",
        {
            "endpoint": moto.endpoint,
            "access_key": moto.access_key,
            "secret_key": Secret(moto.secret_key),
            "name": "s3",
            "retries": 1,
        },
    )
    yield opened
    opened.close()


def test_s3_lock_with_if_none_match_is_exclusive(remote):
    assert lock_guarantee(remote) == "exclusive"
    with VmLock(remote, VM, "job nightly", ttl=30):
        assert remote.exists(lock_path(VM))
        with pytest.raises(VmLockedError, match="on remote 's3' is locked by job nightly"):
            VmLock(remote, VM, "job weekly").acquire()
    assert not remote.exists(lock_path(VM))

    winners = []
    start = threading.Barrier(4)

    def contend(number: int) -> None:
        lock = VmLock(remote, VM, f"thread {number}", ttl=30)
        start.wait()
        try:
            lock.acquire()
        except VmLockedError:
            return
        winners.append(lock)

    threads = [threading.Thread(target=contend, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(winners) == 1
    winners[0].release()
