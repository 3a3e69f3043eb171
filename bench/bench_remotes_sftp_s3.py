"""The SFTP and S3 remotes writing a stream, against the standard tools on the same servers.

* SFTP, write 1 GiB: ``Remote.open_write`` on an ``sftp://`` remote (connect, pipelined
  writes, fsync, posix-rename) vs OpenSSH ``sftp -b`` (batch mode) ``put`` of the same file to
  the same sshd on 127.0.0.1, then ``sync`` of the file it wrote (ours fsyncs before it
  publishes; ``ratio_without_sync`` records the plain client's figure too): target rate
  >= 0.8x OpenSSH's.
* S3, write 1 GiB: ``Remote.open_write`` on an ``s3://`` remote (streaming multipart upload)
  vs boto3 ``upload_file`` with its default transfer settings, against the same moto server:
  target rate >= 0.8x boto3's.
* peak RSS of ours while writing (each side runs in its own child process).

Input: a random data file read in 8 MiB chunks from the page cache. Quick mode uses 64 MiB.
``ratio`` is our rate divided by the reference's (higher is better).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from common import (
    GIB,
    IO_CHUNK,
    MIB,
    ChildRun,
    compare,
    data_file,
    print_result,
    run_command,
    run_python,
    size_label,
    stream_file,
    then_sync,
    write_rate_result,
)

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MIN_RATE_RATIO = 0.8
RSS_LIMIT_MIB = 256.0
"""Bounded whatever the size: boto3 and paramiko themselves (60-75 MiB), parts in flight (S3:
at most 48 MiB plus the part being filled) and allocator slack."""


def sftp_write(source: str, url: str, key_file: str, fingerprint: str, name: str) -> float:
    """Child process: connect and stream ``source`` to ``name``; seconds including connect."""
    from xobackup_core.plugins import Plugins

    plugins = Plugins(autoload=False, only=["remote_sftp"])
    start = time.perf_counter()
    remote = plugins.remote(
        url, {"name": "bench", "key_file": key_file, "host_key_fingerprint": fingerprint}
    )
    with remote, remote.open_write(name) as writer:
        stream_file(source, writer)
    return time.perf_counter() - start


def s3_write(
    source: str, endpoint: str, bucket: str, access: str, secret: str, key: str
) -> tuple[float, float]:
    """Child process: open the remote and stream ``source`` to ``key``; wall and CPU seconds
    of the same span (the imports before it are not the upload's cost)."""
    from xobackup_core.config import Secret
    from xobackup_core.plugins import Plugins

    plugins = Plugins(autoload=False, only=["remote_s3"])
    start, cpu_start = time.perf_counter(), time.process_time()
    remote = plugins.remote(
        f"s3://{bucket}/",
        {"name": "bench", "endpoint": endpoint, "access_key": access, "secret_key": Secret(secret)},
    )
    with remote, remote.open_write(key) as writer:
        stream_file(source, writer)
    return time.perf_counter() - start, time.process_time() - cpu_start


def boto3_upload_file(
    source: str, endpoint: str, bucket: str, access: str, secret: str, key: str
) -> tuple[float, float]:
    """Child process: the reference, boto3's managed upload with default transfer settings;
    wall and CPU seconds after the imports, as :func:`s3_write` measures."""
    import boto3
    from botocore.config import Config

    start, cpu_start = time.perf_counter(), time.process_time()
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=access,
        aws_secret_access_key=secret,
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}),
    )
    client.upload_file(source, bucket, key)
    return time.perf_counter() - start, time.process_time() - cpu_start


def _sftp_results(size: int, source: Path, runs: int) -> list[dict[str, Any]]:
    from tests.servers.sftp import SftpServer

    sftp_program = shutil.which("sftp")
    if sftp_program is None:
        raise RuntimeError("the OpenSSH sftp client is needed (openssh-client)")
    server = SftpServer.create().start()
    work = Path(tempfile.mkdtemp(prefix="bench-sftp-"))
    try:
        target_dir = server.data_dir / "bench"
        target_dir.mkdir()
        shutil.chown(target_dir, server.user)
        batch = work / "batch"
        batch.write_text(f"put {source} {target_dir}/openssh.bin\n")

        def ours() -> ChildRun:
            try:
                child = run_python(
                    "bench_remotes_sftp_s3:sftp_write",
                    str(source),
                    server.url("bench"),
                    str(server.client_key),
                    server.host_key_fingerprint,
                    "ours.bin",
                )
                return ChildRun(child.value, child.peak_rss_mib)
            finally:
                (target_dir / "ours.bin").unlink(missing_ok=True)

        def reference() -> ChildRun:
            try:
                return then_sync(
                    lambda: run_command(
                        [
                            sftp_program,
                            "-q",
                            "-b",
                            str(batch),
                            "-P",
                            str(server.port),
                            "-i",
                            str(server.client_key),
                            "-o",
                            f"UserKnownHostsFile={server.known_hosts}",
                            "-o",
                            "StrictHostKeyChecking=yes",
                            "-o",
                            "BatchMode=yes",
                            f"{server.user}@127.0.0.1",
                        ]
                    ),
                    target_dir / "openssh.bin",
                )
            finally:
                (target_dir / "openssh.bin").unlink(missing_ok=True)

        mine, theirs = compare(runs, ours, reference)
        entry = write_rate_result(
            f"sftp remote write {size_label(size)}",
            size,
            mine,
            theirs,
            "OpenSSH sftp -b put (same sshd) + sync",
            min_ratio=MIN_RATE_RATIO,
            max_rss_mib=RSS_LIMIT_MIB,
        )
        print_result(entry)
        return [entry]
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


def _s3_results(size: int, source: Path, runs: int) -> list[dict[str, Any]]:
    from tests.servers.s3 import MotoServer, client

    work = Path(tempfile.mkdtemp(prefix="bench-s3-"))
    server = MotoServer(work / "moto").start()
    try:
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        s3 = client(server)
        s3.create_bucket(Bucket=bucket)
        common_args = (str(source), server.endpoint, bucket, server.access_key, server.secret_key)

        def ours() -> ChildRun:
            try:
                child = run_python("bench_remotes_sftp_s3:s3_write", *common_args, "ours.bin")
                seconds, cpu_s = child.value
                return ChildRun(seconds, child.peak_rss_mib, cpu_s=cpu_s)
            finally:
                s3.delete_object(Bucket=bucket, Key="ours.bin")

        def reference() -> ChildRun:
            try:
                child = run_python(
                    "bench_remotes_sftp_s3:boto3_upload_file", *common_args, "boto3.bin"
                )
                seconds, cpu_s = child.value
                return ChildRun(seconds, child.peak_rss_mib, cpu_s=cpu_s)
            finally:
                s3.delete_object(Bucket=bucket, Key="boto3.bin")

        mine, theirs = compare(runs, ours, reference)
        entry = write_rate_result(
            f"s3 remote write {size_label(size)}",
            size,
            mine,
            theirs,
            "boto3 upload_file, default TransferConfig (same moto server)",
            min_ratio=MIN_RATE_RATIO,
            max_rss_mib=RSS_LIMIT_MIB,
        )
        print_result(entry)
        return [entry]
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


def run(quick: bool = False) -> list[dict[str, Any]]:
    """SFTP and S3 write results; ``quick`` uses 64 MiB instead of 1 GiB."""
    size = 64 * MIB if quick else GIB
    runs = 3  # best of 3 each: the servers share the 2 cores with the clients
    source = data_file("random", size)
    with open(source, "rb") as warm:  # both sides read from the page cache
        while warm.read(IO_CHUNK):
            pass
    return _sftp_results(size, source, runs) + _s3_results(size, source, runs)


if __name__ == "__main__":
    outcome = run(quick="--quick" in sys.argv[1:])
    sys.exit(0 if all(entry["passed"] for entry in outcome) else 1)
