"""The remote conformance suite: what every :class:`~xobackup_core.remote.Remote` must do.

A remote plugin, bundled or third-party, proves itself by inheriting this class in its tests
and giving a ``remote`` fixture that returns a fresh, empty remote::

    import pytest
    from xobackup_core.testing import RemoteConformance

    class TestMyRemote(RemoteConformance):
        @pytest.fixture
        def remote(self, tmp_path):
            remote = MyRemote(...)
            yield remote
            remote.close()

Class attributes tune the suite for slow backends: ``large_file_size`` (bytes streamed by the
large-file test) and ``concurrent_writers``. Every test asserts an outcome that would be wrong
if the remote broke the contract (atomic visibility, ranges, listing, replace semantics,
error types), so a green run means the engine can rely on the remote.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator

import pytest

from xobackup_core.errors import (
    RemoteError,
    RemoteNotFoundError,
    RemotePathError,
)
from xobackup_core.remote import Remote

MiB = 1024 * 1024


def _pattern(size: int, seed: int = 0) -> bytes:
    """Deterministic bytes that differ at every offset (so a misplaced range is caught)."""
    block = hashlib.sha256(str(seed).encode()).digest() * 2048  # 64 KiB
    counter = bytearray()
    index = 0
    while len(counter) < size:
        counter += index.to_bytes(4, "big") + block[: 64 * 1024 - 4]
        index += 1
    return bytes(counter[:size])


class RemoteConformance:
    """Inherit me and provide a ``remote`` fixture returning an empty :class:`Remote`."""

    large_file_size: int = 64 * MiB
    concurrent_writers: int = 8

    @pytest.fixture
    def remote(self) -> Iterator[Remote]:  # pragma: no cover - overridden by every subclass
        raise NotImplementedError("the test class must define a 'remote' fixture")

    # -- writing and atomic visibility -------------------------------------------------------
    def test_write_then_read_back(self, remote: Remote) -> None:
        data = _pattern(3 * MiB + 17)
        with remote.open_write("/backups/vm/file.bin") as writer:
            for offset in range(0, len(data), 700_000):
                writer.write(data[offset : offset + 700_000])
        assert remote.read_bytes("/backups/vm/file.bin") == data
        assert remote.stat("backups/vm/file.bin").size == len(data)

    def test_write_is_invisible_until_commit(self, remote: Remote) -> None:
        remote.write_bytes("/dir/other", b"x")
        before = remote.list("/dir")
        writer = remote.open_write("/dir/new.bin")
        writer.write(_pattern(2 * MiB))
        assert not remote.exists("/dir/new.bin")
        assert remote.list("/dir") == before, "an in-progress write must not be listed"
        writer.commit()
        assert remote.exists("/dir/new.bin")
        assert remote.list("/dir") == sorted([*before, "new.bin"])

    def test_abort_leaves_nothing(self, remote: Remote) -> None:
        remote.write_bytes("/dir/keep", b"keep")
        writer = remote.open_write("/dir/aborted.bin")
        writer.write(_pattern(MiB))
        writer.abort()
        assert remote.list("/dir") == ["keep"]
        with pytest.raises(RemoteNotFoundError):
            remote.stat("/dir/aborted.bin")

    def test_exception_in_with_block_aborts(self, remote: Remote) -> None:
        with pytest.raises(RuntimeError), remote.open_write("/failed.bin") as writer:
            writer.write(b"partial data")
            raise RuntimeError("the source stream broke")
        assert not remote.exists("/failed.bin")
        assert remote.list("/") == []

    def test_overwrite_keeps_old_content_until_commit(self, remote: Remote) -> None:
        remote.write_bytes("/a.json", b"old")
        writer = remote.open_write("/a.json")
        writer.write(b"new content")
        assert remote.read_bytes("/a.json") == b"old"
        writer.commit()
        assert remote.read_bytes("/a.json") == b"new content"

    def test_empty_file(self, remote: Remote) -> None:
        remote.write_bytes("/empty", b"")
        assert remote.read_bytes("/empty") == b""
        assert remote.stat("/empty").size == 0

    # -- reads -------------------------------------------------------------------------------
    def test_range_reads(self, remote: Remote) -> None:
        data = _pattern(5 * MiB + 3)
        remote.write_bytes("/disk.vhd", data)
        for offset, length in [(0, 512), (1, 1), (2 * MiB - 7, 4 * MiB), (len(data) - 10, 10)]:
            assert remote.read_range("/disk.vhd", offset, length) == data[offset : offset + length]
        assert remote.read_range("/disk.vhd", len(data) - 5, 100) == data[-5:]
        assert remote.read_range("/disk.vhd", len(data) + 10, 100) == b""
        with remote.open_read("/disk.vhd", MiB, 2 * MiB) as stream:
            streamed = b"".join(iter(lambda: stream.read(300_000), b""))
        assert streamed == data[MiB : 3 * MiB]
        with remote.open_read("/disk.vhd", 4 * MiB) as stream:
            assert stream.read() == data[4 * MiB :]

    def test_large_file_streams(self, remote: Remote) -> None:
        chunk = _pattern(4 * MiB, seed=7)
        expected = hashlib.sha256()
        with remote.open_write("/large.bin") as writer:
            for index in range(self.large_file_size // len(chunk)):
                piece = chunk[index % 7 :] + chunk[: index % 7]
                writer.write(piece)
                expected.update(piece)
        size = (self.large_file_size // len(chunk)) * len(chunk)
        assert remote.stat("/large.bin").size == size
        actual = hashlib.sha256()
        with remote.open_read("/large.bin") as stream:
            for block in iter(lambda: stream.read(MiB), b""):
                actual.update(block)
        assert actual.hexdigest() == expected.hexdigest()

    # -- namespace ---------------------------------------------------------------------------
    def test_listing(self, remote: Remote) -> None:
        for path in ["/vm/b.json", "/vm/a.json", "/vm/vdis/x/1.vhd", "/top"]:
            remote.write_bytes(path, path.encode())
        assert remote.list("/vm") == ["a.json", "b.json", "vdis"]
        assert remote.list("/") == ["top", "vm"]
        assert remote.list("/vm/vdis/x") == ["1.vhd"]
        assert remote.list("/missing") == []
        assert remote.stat("/vm").is_dir
        assert not remote.stat("/vm/a.json").is_dir
        assert sorted(remote.walk("/vm")) == ["/vm/a.json", "/vm/b.json", "/vm/vdis/x/1.vhd"]

    def test_stat_missing(self, remote: Remote) -> None:
        with pytest.raises(RemoteNotFoundError) as caught:
            remote.stat("/nope.json")
        assert "nope.json" in str(caught.value)
        assert not remote.exists("/nope.json")

    def test_rename_replaces_existing(self, remote: Remote) -> None:
        remote.write_bytes("/src.bin", b"source")
        remote.write_bytes("/dst.bin", b"old target")
        remote.rename("/src.bin", "/dst.bin")
        assert remote.read_bytes("/dst.bin") == b"source"
        assert not remote.exists("/src.bin")
        remote.rename("/dst.bin", "/new/folder/moved.bin")
        assert remote.read_bytes("/new/folder/moved.bin") == b"source"

    def test_rename_missing(self, remote: Remote) -> None:
        with pytest.raises(RemoteNotFoundError):
            remote.rename("/missing.bin", "/target.bin")
        assert not remote.exists("/target.bin")

    def test_delete(self, remote: Remote) -> None:
        remote.write_bytes("/x/a", b"a")
        remote.delete("/x/a")
        assert not remote.exists("/x/a")
        with pytest.raises(RemoteNotFoundError):
            remote.delete("/x/a")
        remote.delete("/x/a", missing_ok=True)

    def test_delete_tree(self, remote: Remote) -> None:
        for path in ["/t/a", "/t/sub/b", "/t/sub/deeper/c", "/keep"]:
            remote.write_bytes(path, b"data")
        remote.delete_tree("/t")
        assert remote.list("/") == ["keep"]
        remote.delete_tree("/t")  # missing: no error

    def test_makedirs(self, remote: Remote) -> None:
        remote.makedirs("/a/b/c")
        remote.makedirs("/a/b/c")
        remote.write_bytes("/a/b/c/f", b"f")
        assert remote.list("/a/b/c") == ["f"]

    def test_unicode_names(self, remote: Remote) -> None:
        path = "/été/日本語 disk ✓/[XO Backup] vm (1).json"
        remote.write_bytes(path, "données".encode())
        assert remote.read_bytes(path) == "données".encode()
        assert remote.list("/été") == ["日本語 disk ✓"]
        assert remote.list("/été/日本語 disk ✓") == ["[XO Backup] vm (1).json"]

    # -- paths and errors --------------------------------------------------------------------
    def test_paths_are_normalised(self, remote: Remote) -> None:
        remote.write_bytes("a//b/./c.txt", b"c")
        assert remote.read_bytes("/a/b/c.txt") == b"c"

    @pytest.mark.parametrize("bad", ["../etc/passwd", "/a/../../b", "a/..", "/x/\x00y"])
    def test_escaping_paths_are_refused(self, remote: Remote, bad: str) -> None:
        with pytest.raises(RemotePathError):
            remote.write_bytes(bad, b"x")
        with pytest.raises(RemotePathError):
            remote.read_bytes(bad)
        with pytest.raises(RemotePathError):
            remote.list(bad)

    def test_errors_name_the_remote(self, remote: Remote) -> None:
        with pytest.raises(RemoteNotFoundError) as caught:
            remote.read_bytes("/missing/file.xva")
        error = caught.value
        assert isinstance(error, RemoteError)
        assert remote.name in str(error)
        assert "/missing/file.xva" in str(error)

    # -- concurrency -------------------------------------------------------------------------
    def test_concurrent_writers_to_different_files(self, remote: Remote) -> None:
        payloads = {
            f"/c/{n}.bin": _pattern(MiB + n, seed=n) for n in range(self.concurrent_writers)
        }
        errors: list[BaseException] = []

        def write(path: str, data: bytes) -> None:
            try:
                with remote.open_write(path) as writer:
                    for offset in range(0, len(data), 100_000):
                        writer.write(data[offset : offset + 100_000])
            except BaseException as error:
                errors.append(error)

        threads = [threading.Thread(target=write, args=item) for item in payloads.items()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors
        for path, data in payloads.items():
            assert remote.read_bytes(path) == data

    def test_concurrent_writers_to_the_same_file(self, remote: Remote) -> None:
        candidates = [_pattern(MiB, seed=100 + n) for n in range(4)]
        barrier = threading.Barrier(len(candidates))

        def write(data: bytes) -> None:
            with remote.open_write("/same.bin") as writer:
                barrier.wait()
                for offset in range(0, len(data), 64 * 1024):
                    writer.write(data[offset : offset + 64 * 1024])

        threads = [threading.Thread(target=write, args=(data,)) for data in candidates]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert remote.read_bytes("/same.bin") in candidates, "writes must never interleave"
        assert remote.list("/") == ["same.bin"]

    # -- space, health, updates --------------------------------------------------------------
    def test_free_space(self, remote: Remote) -> None:
        free = remote.free_space()
        assert free is None or free > 0

    def test_remote_test_cleans_up(self, remote: Remote) -> None:
        result = remote.test(2 * MiB)
        assert result.success, result.error
        assert result.write_rate > 0 and result.read_rate > 0
        assert remote.list("/") == []

    def test_in_place_updates(self, remote: Remote) -> None:
        if not remote.supports_update:
            with pytest.raises(RemoteError):
                remote.open_update("/any")
            return
        remote.write_bytes("/u.vhd", b"A" * 1000)
        with remote.open_update("/u.vhd") as handle:
            handle.write_at(10, b"BBBB")
            handle.write_at(1200, b"tail")
            assert handle.size() == 1204
            assert handle.read_at(8, 8) == b"AABBBBAA"
            handle.truncate(1100)
            handle.flush()
        data = remote.read_bytes("/u.vhd")
        assert len(data) == 1100
        assert data[10:14] == b"BBBB"
        assert data[1000:1100] == b"\0" * 100
        with pytest.raises(RemoteNotFoundError):
            remote.open_update("/missing.vhd")


def pattern(size: int, seed: int = 0) -> bytes:
    """The deterministic test data the suite writes (for plugins' own extra tests)."""
    return _pattern(size, seed)


__all__ = ["RemoteConformance", "pattern"]
