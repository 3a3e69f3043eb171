import os
import subprocess

import pytest
from xobackup_remote_local import LocalRemote
from xobackup_remote_local import remote as local

from tests.conftest import require, require_tool
from xobackup_core.errors import RemoteConfigError, RemoteNoSpaceError, RemotePermissionError
from xobackup_core.testing import RemoteConformance


class TestLocalRemoteConformance(RemoteConformance):
    @pytest.fixture
    def remote(self, tmp_path):
        remote = LocalRemote(tmp_path / "remote", name="local-test")
        yield remote
        remote.close()


def test_partial_write_is_hidden_and_removed_on_abort(tmp_path):
    remote = LocalRemote(tmp_path, name="r")
    writer = remote.open_write("/vm/backup.xva")
    writer.write(b"x" * 1000)
    on_disk = os.listdir(tmp_path / "vm")
    assert len(on_disk) == 1 and on_disk[0].startswith(".backup.xva.tmp-")
    assert remote.list("/vm") == []
    writer.abort()
    assert os.listdir(tmp_path / "vm") == []


def test_dropped_writer_is_never_published(tmp_path):
    remote = LocalRemote(tmp_path, name="r")
    writer = remote.open_write("/dropped.bin")
    writer.write(b"data")
    del writer
    assert not (tmp_path / "dropped.bin").exists()
    assert os.listdir(tmp_path) == []


def test_root_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(RemoteConfigError) as caught:
        LocalRemote(blocker / "sub", name="nas")
    assert "nas" in str(caught.value) and str(blocker / "sub") in str(caught.value)


def test_immutable_folder_maps_to_permission_error(tmp_path):
    chattr = require_tool("chattr")
    remote = LocalRemote(tmp_path, name="locked")
    remote.makedirs("/vm")
    subprocess.run([chattr, "+i", str(tmp_path / "vm")], check=True)
    try:
        with pytest.raises(RemotePermissionError) as caught:
            remote.write_bytes("/vm/new.json", b"x")
        assert "locked" in str(caught.value) and "/vm/new.json" in str(caught.value)
    finally:
        subprocess.run([chattr, "-i", str(tmp_path / "vm")], check=True)


@pytest.fixture
def small_filesystem(tmp_path):
    """A real 2 MiB filesystem (tmpfs), so writes past it fail with ENOSPC as on a full disk."""
    mount = require_tool("mount")
    target = tmp_path / "small"
    target.mkdir()
    result = subprocess.run(
        [mount, "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(target)], capture_output=True
    )
    require(result.returncode == 0, f"a tmpfs mount (needs root): {result.stderr.decode()}")
    yield target
    subprocess.run(["umount", str(target)], check=True)


def test_full_filesystem_maps_to_no_space_and_leaves_nothing(small_filesystem):
    remote = LocalRemote(small_filesystem, name="tiny")
    remote.write_bytes("/earlier-backup.json", b"{}")
    with pytest.raises(RemoteNoSpaceError) as caught:
        with remote.open_write("/vm/big.xva") as writer:
            for _ in range(8):
                writer.write(b"x" * 1024 * 1024)
    assert "tiny" in str(caught.value) and "/vm/big.xva" in str(caught.value)
    assert remote.list("/vm") == []
    assert os.listdir(small_filesystem / "vm") == [], "the partial temp file must be removed"
    assert remote.read_bytes("/earlier-backup.json") == b"{}"


def test_a_stream_starts_its_disk_writes_as_it_goes(tmp_path, monkeypatch):
    """Every window of a long stream is handed to the kernel for writing (and its pages let
    go) while the stream goes on, so the commit's fsync has little left to write."""
    advice = []
    real_fadvise = os.posix_fadvise

    def recording_fadvise(fd, offset, length, how):
        advice.append((offset, length, how))
        real_fadvise(fd, offset, length, how)

    monkeypatch.setattr(os, "posix_fadvise", recording_fadvise)
    window = local._WRITEBACK_WINDOW
    data = os.urandom(1024 * 1024) * (3 * window // (1024 * 1024) + 5)
    remote = LocalRemote(tmp_path, name="r")
    with remote.open_write("/vm/backup.xva") as writer:
        for start in range(0, len(data), 1024 * 1024):
            writer.write(data[start : start + 1024 * 1024])
    assert (tmp_path / "vm" / "backup.xva").read_bytes() == data
    assert {how for _, _, how in advice} == {os.POSIX_FADV_DONTNEED}
    assert len(advice) == 3
    covered = 0
    for offset, length, _ in advice:
        assert offset <= covered  # no gap: every byte's write was started
        assert length <= 2 * window  # the newest window and the one before it
        covered = offset + length
    assert covered >= 3 * window


def test_a_filesystem_that_refuses_the_advice_still_gets_the_file(tmp_path, monkeypatch):
    def refusing_fadvise(fd, offset, length, how):
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(os, "posix_fadvise", refusing_fadvise)
    data = os.urandom(1024 * 1024) * (local._WRITEBACK_WINDOW // (1024 * 1024) + 1)
    remote = LocalRemote(tmp_path, name="r")
    with remote.open_write("/big.bin") as writer:
        writer.write(data)
    assert (tmp_path / "big.bin").read_bytes() == data
