"""Random-access byte sources and in-place files for the format code.

Format readers never open files themselves: they take a :class:`RandomAccessSource` (anything
with ``name``, ``size()`` and ``read_at(offset, length)``), so the same VHD code reads a local
file, a file on any :class:`~xobackup_core.remote.Remote`, or a file being merged in place.
Writers that patch a file in place take a :class:`~xobackup_core.remote.RemoteFile`;
:class:`LocalFile` is that contract for a plain local path.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol, TypeVar, runtime_checkable

from xobackup_core.remote import Remote, RemoteFile

T = TypeVar("T")
R = TypeVar("R")


@runtime_checkable
class RandomAccessSource(Protocol):
    """Read-only random access to a file: what every format reader takes."""

    name: str
    """Shown in error messages (a path, or ``remote:path``)."""

    def size(self) -> int:
        """Size of the file in bytes."""
        ...

    def read_at(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes from ``offset``; fewer only at end of file."""
        ...

    def close(self) -> None:
        """Release the source."""
        ...


class LocalFileSource:
    """A local file read with ``pread`` (no shared file position, so thread-safe)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.name = os.fspath(path)
        self._fd = os.open(self.name, os.O_RDONLY)
        self._size = os.fstat(self._fd).st_size

    def size(self) -> int:
        return self._size

    def read_at(self, offset: int, length: int) -> bytes:
        if length <= 0 or offset >= self._size:
            return b""
        data = os.pread(self._fd, length, offset)
        if len(data) < length and offset + len(data) < self._size:
            # pread may return short on some filesystems; finish the read.
            parts = [data]
            done = len(data)
            while done < length:
                more = os.pread(self._fd, length - done, offset + done)
                if not more:
                    break
                parts.append(more)
                done += len(more)
            data = b"".join(parts)
        return data

    def advise_sequential(self) -> None:
        """Tell the kernel the file will be read front to back (bigger read-ahead)."""
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> LocalFileSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RemoteSource:
    """A file on a :class:`~xobackup_core.remote.Remote`, read with ``read_range``."""

    def __init__(self, remote: Remote, path: str) -> None:
        self.remote = remote
        self.path = path
        self.name = f"{remote.name}:{path}"
        self._size = remote.stat(path).size

    def size(self) -> int:
        return self._size

    def read_at(self, offset: int, length: int) -> bytes:
        if length <= 0 or offset >= self._size:
            return b""
        return self.remote.read_range(self.path, offset, min(length, self._size - offset))

    def close(self) -> None:
        """Nothing to release: the remote belongs to the caller."""


class RemoteFileSource:
    """A :class:`~xobackup_core.remote.RemoteFile` seen as a source (reads follow its writes)."""

    def __init__(self, file: RemoteFile, name: str) -> None:
        self.file = file
        self.name = name

    def size(self) -> int:
        return self.file.size()

    def read_at(self, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        return self.file.read_at(offset, length)

    def close(self) -> None:
        self.file.close()


class LocalFile(RemoteFile):
    """A local file opened for positional reads and in-place writes (the RemoteFile contract)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.name = os.fspath(path)
        self._fd = os.open(self.name, os.O_RDWR)

    def read_at(self, offset: int, length: int) -> bytes:
        parts = []
        done = 0
        while done < length:
            chunk = os.pread(self._fd, length - done, offset + done)
            if not chunk:
                break
            parts.append(chunk)
            done += len(chunk)
        return b"".join(parts)

    def write_at(self, offset: int, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        while view:
            written = os.pwrite(self._fd, view, offset)
            view = view[written:]
            offset += written

    def size(self) -> int:
        return os.fstat(self._fd).st_size

    def truncate(self, size: int) -> None:
        os.ftruncate(self._fd, size)

    def flush(self) -> None:
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def read_ahead(
    function: Callable[[T], R], items: Iterable[T], depth: int = 2
) -> Iterator[tuple[T, R]]:
    """``(item, function(item))`` in order, computing up to ``depth`` items ahead in a thread.

    Reads release the GIL, so reading the next block overlaps writing the current one; at most
    ``depth + 1`` results exist at once, so memory stays bounded.
    """
    pending: deque[tuple[T, Future[R]]] = deque()
    with ThreadPoolExecutor(max_workers=1) as pool:
        try:
            for item in items:
                pending.append((item, pool.submit(function, item)))
                if len(pending) > depth:
                    done_item, future = pending.popleft()
                    yield done_item, future.result()
            while pending:
                done_item, future = pending.popleft()
                yield done_item, future.result()
        finally:
            for _, future in pending:
                future.cancel()
