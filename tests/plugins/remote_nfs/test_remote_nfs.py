"""The NFS remote against a real nfs-ganesha (NFSv3, FSAL_VFS) in a private network namespace.

The test thread joins the server's namespace while it talks to it (``server.joined()``);
threads it starts inherit the namespace, so the concurrency tests work unchanged.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest

from tests.conftest import require, require_tool
from xobackup_core.errors import (
    RemoteConfigError,
    RemoteError,
    RemoteNoSpaceError,
    RemoteTimeoutError,
)
from xobackup_core.plugins import Plugins
from xobackup_core.testing import RemoteConformance
from xobackup_core.testing.remote_conformance import pattern

MiB = 1024 * 1024
CLI = [sys.executable, "-m", "xobackup_core.cli"]


def _small_filesystem(folder):
    """A 16 MiB ext4 filesystem loop-mounted on ``folder`` (to fill up), or None."""
    if not shutil.which("mkfs.ext4") or not os.path.exists("/dev/loop-control"):
        return None
    image = folder.parent / "small.img"
    with image.open("wb") as handle:
        handle.truncate(16 * MiB)
    folder.mkdir()
    made = subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], capture_output=True)
    mounted = (
        made.returncode == 0
        and (
            subprocess.run(["mount", "-o", "loop", str(image), str(folder)], capture_output=True)
        ).returncode
        == 0
    )
    return image if mounted else None


@pytest.fixture(scope="session")
def nfs_server(tmp_path_factory):
    from xobackup_remote_nfs import libnfs

    from tests.servers import nfs

    for tool in ("ganesha.nfsd", "rpcbind", "unshare", "nsenter"):
        require_tool(tool)
    require(nfs.available(), "ganesha with rpcbind in a network namespace (as root)")
    require(libnfs.available(), "libnfs (libnfs13)")
    root = tmp_path_factory.mktemp("ganesha")
    small = root / "small"
    image = _small_filesystem(small)
    extra = {"/small": small} if image else {}
    server = nfs.NfsServer(root, extra_exports=extra).start()
    server.small_dir = small if image else None
    yield server
    server.stop()
    if image:
        subprocess.run(["umount", str(small)], capture_output=True)


def _while_frozen(server, operation) -> list[BaseException]:
    """Run ``operation`` in a thread while ganesha is stopped (SIGSTOP); what it raised.

    It must end within 30 s, its timeouts being shorter: an operation that hangs on a
    server that stopped answering fails the test."""
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            operation()
        except BaseException as error:
            outcome.append(error)

    pid = server._ganesha.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        # kill() only queues the signal: start once the server is really stopped
        deadline = time.monotonic() + 5
        while _process_state(pid) not in ("T", "t") and time.monotonic() < deadline:
            time.sleep(0.01)
        thread = threading.Thread(target=run)
        thread.start()
        thread.join(30)
        assert not thread.is_alive(), "the operation hung past its timeout"
    finally:
        os.kill(pid, signal.SIGCONT)
    return outcome


def _process_state(pid: int) -> str:
    """The state letter of a process in /proc (T: stopped by a signal)."""
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0]


def _remote(server, sub: str = "", export=None, **options):
    from xobackup_remote_nfs import open_nfs_remote

    options.setdefault("name", "nfs-test")
    return open_nfs_remote(server.url(sub, export), options)


class TestNfsRemoteConformance(RemoteConformance):
    large_file_size = 32 * MiB

    @pytest.fixture
    def remote(self, nfs_server):
        with nfs_server.joined():
            remote = _remote(nfs_server, f"conformance/{uuid.uuid4().hex[:12]}")
            yield remote
            remote.close()


class TestNfsMountModeConformance(RemoteConformance):
    """The mount mode on a local folder: the kernel has no NFS client here, and the mode's
    file semantics are the local folder's, so the contract is checked on a plain folder."""

    @pytest.fixture
    def remote(self, tmp_path):
        from xobackup_remote_nfs import open_nfs_remote

        remote = open_nfs_remote(
            "nfs://server/export",
            {"mode": "mount", "mount_point": str(tmp_path / "mnt"), "check_mount": False},
        )
        yield remote
        remote.close()


def test_mount_mode_refuses_a_folder_that_is_not_nfs(tmp_path):
    from xobackup_remote_nfs import open_nfs_remote

    with pytest.raises(RemoteConfigError, match="not on a mounted NFS share"):
        open_nfs_remote(
            "nfs://server/export", {"mode": "mount", "mount_point": str(tmp_path), "name": "m"}
        )
    with pytest.raises(RemoteConfigError, match="does not exist"):
        open_nfs_remote("nfs://server/export", {"mode": "mount", "mount_point": "/nonexistent"})


def test_mount_mode_recognises_nfs_in_mountinfo(tmp_path):
    from xobackup_remote_nfs.mount import filesystem_type

    info = tmp_path / "mountinfo"
    info.write_text(
        "22 1 0:21 / / rw - ext4 /dev/vda rw\n"
        "40 22 0:40 / /mnt/back\\040ups rw,relatime - nfs srv:/export rw,vers=3\n"
    )
    assert filesystem_type("/mnt/back ups/xo", str(info)) == "nfs"
    assert filesystem_type("/mnt/other", str(info)) == "ext4"


def test_files_land_in_the_export_under_the_final_name_only(nfs_server):
    data = pattern(9 * MiB + 5, seed=4)
    folder = nfs_server.export_dir / "layout/deep/vm"
    with nfs_server.joined(), _remote(nfs_server, "layout/deep") as remote:
        with remote.open_write("/vm/disk.vhd") as writer:
            writer.write(data)
            names = os.listdir(folder)
            assert len(names) == 1 and names[0].startswith(".disk.vhd.tmp-")
    assert (folder / "disk.vhd").read_bytes() == data
    assert os.listdir(folder) == ["disk.vhd"]


def test_writable_buffers_are_written_without_a_copy_and_correctly(nfs_server):
    data = pattern(5 * MiB + 77, seed=6)
    with nfs_server.joined(), _remote(nfs_server, "direct") as remote:
        buffer = bytearray(3 * MiB + 11)
        with remote.open_write("/f") as writer:
            for offset in range(0, len(data), len(buffer)):
                piece = data[offset : offset + len(buffer)]
                buffer[: len(piece)] = piece
                writer.write(memoryview(buffer)[: len(piece)])
                buffer[:] = bytes(len(buffer))  # reusing the buffer must not alter the file
        assert remote.read_bytes("/f") == data


def test_large_caller_buffers_are_lent_then_reused_safely(nfs_server, monkeypatch):
    """Several WRITEs are in flight, some reading the caller's buffer: none of those is left
    when write() returns, and refilling the buffer then does not change the file."""
    import ctypes

    from xobackup_remote_nfs import libnfs
    from xobackup_remote_nfs import remote as nfs_remote

    started = []  # [address, in flight] of every WRITE
    start = libnfs.Context.start_pwrite

    def recording_start(context, handle, offset, buffer, done):
        record = [ctypes.addressof(ctypes.c_char.from_buffer(buffer)), True]
        started.append((context.writes_in_flight + 1, record))

        def ended(status):
            record[1] = False
            done(status)

        start(context, handle, offset, buffer, ended)

    monkeypatch.setattr(libnfs.Context, "start_pwrite", recording_start)
    size = (nfs_remote.WRITES_IN_FLIGHT + 4) * MiB + 11
    data = pattern(3 * size + 5, seed=12)
    with nfs_server.joined(), _remote(nfs_server, "lent") as remote:
        buffer = bytearray(size)
        low = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
        with remote.open_write("/f") as writer:
            for offset in range(0, len(data), size):
                piece = data[offset : offset + size]
                buffer[: len(piece)] = piece
                writer.write(memoryview(buffer)[: len(piece)])
                lent = [r for _, r in started if low <= r[0] < low + size]
                assert lent and not any(in_flight for _, in_flight in lent)
                buffer[:] = bytes(size)
        assert remote.read_bytes("/f") == data
    assert 2 <= max(depth for depth, _ in started) <= nfs_remote.WRITES_IN_FLIGHT


def test_a_server_that_stops_answering_fails_a_stream(nfs_server):
    """WRITEs in flight to a frozen server (SIGSTOP) end in an error after the timeout, and the
    file is never published."""
    with nfs_server.joined():
        remote = _remote(nfs_server, "frozen-write", timeout=2, retries=0)
        writer = remote.open_write("/disk.vhd")
        writer.write(pattern(8 * MiB))

        def stream() -> None:
            for _ in range(256):
                writer.write(pattern(MiB))

        outcome = _while_frozen(nfs_server, stream)
        assert outcome and isinstance(outcome[0], RemoteError) and outcome[0].transient
        assert "/disk.vhd" in str(outcome[0])
        writer.abort()
        assert remote.list("/") == []
        remote.write_bytes("/disk.vhd", b"next")
        assert remote.read_bytes("/disk.vhd") == b"next"
        remote.close()


def test_large_files_are_committed_behind_the_writes(nfs_server, monkeypatch):
    from xobackup_remote_nfs import libnfs
    from xobackup_remote_nfs import remote as nfs_remote

    monkeypatch.setattr(nfs_remote, "FLUSH_EVERY", 2 * MiB)
    commits = []
    fsync = libnfs.Context.fsync

    def counting_fsync(context, handle):
        commits.append(threading.current_thread().name)
        fsync(context, handle)

    monkeypatch.setattr(libnfs.Context, "fsync", counting_fsync)
    data = pattern(9 * MiB + 3, seed=8)
    with nfs_server.joined(), _remote(nfs_server, "behind") as remote:
        with remote.open_write("/disk.vhd") as writer:
            for offset in range(0, len(data), MiB):
                writer.write(data[offset : offset + MiB])
        assert remote.read_bytes("/disk.vhd") == data
    assert "nfs-flush-behind" in commits  # COMMITs while the data was still streaming
    assert commits[-1] == threading.current_thread().name  # then the final one


def test_a_failed_background_commit_fails_the_file(nfs_server, monkeypatch):
    import errno

    from xobackup_remote_nfs import libnfs
    from xobackup_remote_nfs import remote as nfs_remote

    monkeypatch.setattr(nfs_remote, "FLUSH_EVERY", 2 * MiB)
    fsync = libnfs.Context.fsync

    def failing_in_background(context, handle):
        if threading.current_thread().name == "nfs-flush-behind":
            raise OSError(errno.EIO, "commit: the server lost the data")
        fsync(context, handle)

    monkeypatch.setattr(libnfs.Context, "fsync", failing_in_background)
    with nfs_server.joined(), _remote(nfs_server, "behind-failed") as remote:
        with pytest.raises(RemoteError) as caught, remote.open_write("/disk.vhd") as writer:
            for _ in range(4):
                writer.write(pattern(MiB))
        assert "lost the data" in str(caught.value) and "/disk.vhd" in str(caught.value)
        assert remote.list("/") == []
        assert [n for n in os.listdir(nfs_server.export_dir / "behind-failed")] == []


def test_subfolder_of_an_export_that_does_not_exist_yet_is_created(nfs_server):
    sub = f"new-{uuid.uuid4().hex[:8]}/inner"
    with nfs_server.joined(), _remote(nfs_server, sub) as remote:
        remote.write_bytes("/f", b"f")
    assert (nfs_server.export_dir / sub / "f").read_bytes() == b"f"


def test_free_space_matches_the_server_filesystem(nfs_server):
    with nfs_server.joined(), _remote(nfs_server, "space") as remote:
        free = remote.free_space()
    stat = os.statvfs(nfs_server.export_dir)
    assert free is not None and abs(free - stat.f_bavail * stat.f_frsize) < 512 * MiB


def test_missing_export_is_a_config_error(nfs_server):
    from xobackup_remote_nfs import open_nfs_remote

    with nfs_server.joined(), pytest.raises(RemoteConfigError) as caught:
        open_nfs_remote("nfs://127.0.0.1/no/such/export", {"name": "nfs-test", "retries": 0})
    assert "no NFS export" in str(caught.value) and "/no/such/export" in str(caught.value)


def test_nobody_listening_is_a_connection_error(nfs_server):
    from xobackup_remote_nfs import open_nfs_remote

    # In the host namespace nothing serves NFS or the portmapper.
    with pytest.raises(RemoteError) as caught:
        open_nfs_remote(
            "nfs://127.0.0.1/export", {"name": "nfs-x", "retries": 1, "connect_timeout": 3}
        )
    assert caught.value.transient
    assert "nfs-x" in str(caught.value) and "connect" in str(caught.value)


def test_version_4_is_refused_with_libnfs_4_0(nfs_server, monkeypatch):
    from xobackup_remote_nfs import libnfs, open_nfs_remote

    monkeypatch.setattr(libnfs, "supports_v4_writes", lambda: False)
    with pytest.raises(RemoteConfigError, match="NFSv4"):
        open_nfs_remote(nfs_server.url() + "?version=4", {})
    with pytest.raises(RemoteConfigError, match="3 or 4"):
        open_nfs_remote(nfs_server.url() + "?version=2", {})


def test_bad_options():
    from xobackup_remote_nfs import open_nfs_remote

    with pytest.raises(RemoteConfigError, match="bogus"):
        open_nfs_remote("nfs://h/e", {"bogus": 1})
    with pytest.raises(RemoteConfigError, match="mode"):
        open_nfs_remote("nfs://h/e", {"mode": "fuse"})
    with pytest.raises(RemoteConfigError, match="mount_point"):
        open_nfs_remote("nfs://h/e", {"mode": "mount"})


def test_disk_full_is_a_no_space_error(nfs_server):
    require(nfs_server.small_dir is not None, "a loop-mounted ext4 filesystem")
    with nfs_server.joined(), _remote(nfs_server, export=nfs_server.small_dir) as remote:
        remote.write_bytes("/keep", b"previous")
        with pytest.raises(RemoteNoSpaceError) as caught, remote.open_write("/big") as writer:
            for _ in range(64):
                writer.write(pattern(MiB))
        assert "nfs-test" in str(caught.value) and "/big" in str(caught.value)
        assert remote.list("/") == ["keep", "lost+found"]
        assert [n for n in os.listdir(nfs_server.small_dir) if n != "lost+found"] == ["keep"]
        remote.write_bytes("/after", b"space is back")
        assert remote.read_bytes("/after") == b"space is back"


def test_plugin_hook(nfs_server):
    plugins = Plugins()
    assert "nfs" in plugins.provided_names("remote")
    with nfs_server.joined():
        remote = plugins.remote(nfs_server.url("hooked"), {"name": "cfg-name"})
        try:
            assert remote.name == "cfg-name"
            remote.write_bytes("/x", b"y")
        finally:
            remote.close()
    assert (nfs_server.export_dir / "hooked/x").read_bytes() == b"y"


def test_cli_remote_test(nfs_server):
    result = subprocess.run(
        nfs_server.client_argv([*CLI, "remote", "test", nfs_server.url("cli"), "--size", "2"]),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout
    assert os.listdir(nfs_server.export_dir / "cli") == []


def test_server_stopped_mid_upload(nfs_server):
    """A write cut by a dead server never appears under its final name; the next one works."""
    folder = nfs_server.export_dir / "cut/vm"
    with nfs_server.joined():
        remote = _remote(nfs_server, "cut", timeout=5, retries=0)
        remote.write_bytes("/vm/backup.xva", b"previous backup")
        writer = remote.open_write("/vm/backup.xva")
        writer.write(pattern(8 * MiB))
        nfs_server.stop_nfs()
        try:
            started = time.monotonic()
            with pytest.raises(RemoteError) as caught:
                for _ in range(64):
                    writer.write(pattern(MiB))
                writer.commit()
            assert time.monotonic() - started < 60
            assert caught.value.transient
            writer.abort()
            assert writer.closed
        finally:
            nfs_server.start()
        assert (folder / "backup.xva").read_bytes() == b"previous backup"
        remote.close()
        remote = _remote(nfs_server, "cut")
        assert remote.list("/vm") == ["backup.xva"]
        remote.write_bytes("/vm/backup.xva", b"next backup")
        assert remote.read_bytes("/vm/backup.xva") == b"next backup"
        remote.close()


def test_silent_server_times_out(nfs_server):
    """A server that stops answering (SIGSTOP) makes an operation fail after its timeout."""
    with nfs_server.joined():
        remote = _remote(nfs_server, "frozen", timeout=2, retries=0)
        remote.write_bytes("/a", b"a")
        outcome = _while_frozen(nfs_server, lambda: remote.stat("/a"))
        assert outcome and isinstance(outcome[0], RemoteTimeoutError)
        assert "stat" in str(outcome[0]) and "/a" in str(outcome[0])
        assert remote.read_bytes("/a") == b"a"  # usable again once the server answers
        remote.close()


def test_server_restart_between_operations_is_survived(nfs_server):
    """NFSv3 is stateless: pooled connections reconnect after a server restart."""
    with nfs_server.joined():
        remote = _remote(nfs_server, "restart", retries=6)
        remote.write_bytes("/a", b"a")
        nfs_server.stop_nfs()
        restarter = threading.Timer(1.0, nfs_server.start)
        restarter.start()
        try:
            assert remote.read_bytes("/a") == b"a"
            remote.write_bytes("/b", b"b")
        finally:
            restarter.join()
            with contextlib.suppress(RemoteError):
                remote.close()
    assert (nfs_server.export_dir / "restart/b").read_bytes() == b"b"
