"""The storage contract: what every remote (local folder, NFS, SMB, S3, SFTP...) provides.

A :class:`Remote` is small and blocking. It knows nothing of backups: the backup repository
layout, chains, retention and merges are core code written against this contract, so they work
on any remote. Every remote plugin passes the conformance suite in
:mod:`xobackup_core.testing.remote_conformance`.

Paths are always relative to the remote's root and normalised by :func:`normalize_path`: a
leading ``/`` is added, ``.`` and empty segments are dropped, and ``..`` is refused, so no path
can escape the root whatever the user or a corrupt metadata file says.
"""

from __future__ import annotations

import errno
import io
import os
import re
import secrets
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from xobackup_core.errors import (
    RemoteConnectionError,
    RemoteError,
    RemoteExistsError,
    RemoteNoSpaceError,
    RemoteNotFoundError,
    RemotePathError,
    RemotePermissionError,
    RemoteTimeoutError,
)

TEST_FILE_SIZE = 10 * 1024 * 1024
"""Bytes written, read back and deleted by :meth:`Remote.test` (the same as XO's remote test)."""


def normalize_path(path: str) -> str:
    """Return ``path`` as an absolute path inside the remote, or raise :class:`RemotePathError`.

    ``"a//b/./c"`` becomes ``"/a/b/c"``; ``""`` and ``"/"`` are the root. Any ``..`` segment is
    refused rather than resolved, because a path that climbs is either a bug or an attack (a
    crafted alias file or metadata JSON) and must never reach the storage backend.
    """
    if "\x00" in path:
        raise RemotePathError("path contains a NUL byte", path=repr(path))
    parts = []
    for segment in path.replace("\\", "/").split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            raise RemotePathError("'..' is not allowed in remote paths", path=path)
        parts.append(segment)
    return "/" + "/".join(parts)


_TEMP_NAME = re.compile(r"^\..+\.tmp-[0-9a-f]{12}$")


def make_temp_name(final_name: str) -> str:
    """The hidden name a file is written under before its atomic commit: ``.<name>.tmp-<hex>``."""
    return f".{final_name}.tmp-{secrets.token_hex(6)}"


def is_temp_name(name: str) -> bool:
    """True for names made by :func:`make_temp_name`: in-progress or abandoned writes."""
    return bool(_TEMP_NAME.match(name))


_ERRNO_TO_ERROR: dict[int, type[RemoteError]] = {
    errno.ENOENT: RemoteNotFoundError,
    errno.ENOTDIR: RemoteNotFoundError,
    errno.EEXIST: RemoteExistsError,
    errno.ENOTEMPTY: RemoteExistsError,
    errno.EACCES: RemotePermissionError,
    errno.EPERM: RemotePermissionError,
    errno.EROFS: RemotePermissionError,
    errno.ENOSPC: RemoteNoSpaceError,
    errno.EDQUOT: RemoteNoSpaceError,
    errno.EFBIG: RemoteNoSpaceError,
    errno.ETIMEDOUT: RemoteTimeoutError,
    errno.ECONNRESET: RemoteConnectionError,
    errno.ECONNREFUSED: RemoteConnectionError,
    errno.ECONNABORTED: RemoteConnectionError,
    errno.EPIPE: RemoteConnectionError,
    errno.EHOSTUNREACH: RemoteConnectionError,
    errno.ENETUNREACH: RemoteConnectionError,
    errno.ESTALE: RemoteConnectionError,
    errno.EIO: RemoteConnectionError,
}


def map_os_error(error: OSError, *, remote: str, operation: str, path: str) -> RemoteError:
    """The core's error for an ``OSError`` (by errno), naming the remote, operation and path."""
    kind = _ERRNO_TO_ERROR.get(error.errno or 0, RemoteError)
    detail = error.strerror or str(error) or type(error).__name__
    return kind(detail, remote=remote, operation=operation, path=path)


def join_path(*segments: str) -> str:
    """Join remote path segments and normalise the result."""
    return normalize_path("/".join(segments))


def parent_path(path: str) -> str:
    """The folder holding ``path`` (the root's parent is the root)."""
    path = normalize_path(path)
    return path.rsplit("/", 1)[0] or "/"


@dataclass(frozen=True)
class RemoteStat:
    """What :meth:`Remote.stat` knows about an entry."""

    size: int
    """Size in bytes (0 for folders)."""
    mtime: float
    """Last modification, seconds since the epoch (UTC)."""
    is_dir: bool


@dataclass(frozen=True)
class RemoteTestResult:
    """Result of :meth:`Remote.test`: rates in bytes per second, or the step that failed."""

    success: bool
    write_rate: float = 0.0
    read_rate: float = 0.0
    step: str | None = None
    error: str | None = None


class RemoteWriter(io.RawIOBase):
    """A file being written to a remote, invisible under its final name until committed.

    ``close()`` commits: the data becomes visible atomically under the final name (temp name +
    fsync + rename, an S3 multipart completion...). ``abort()`` discards everything written so
    far, and nothing appears. Used as a context manager, a clean exit commits and an exception
    aborts, so a failed stream can never leave a partial file that looks like a backup.
    """

    def __init__(self) -> None:
        super().__init__()
        self._finished = False

    def writable(self) -> bool:
        return True

    @abstractmethod
    def _write(self, data: memoryview) -> None:
        """Write all of ``data`` (the subclass may buffer)."""

    @abstractmethod
    def _commit(self) -> None:
        """Make everything written visible under the final name, atomically."""

    @abstractmethod
    def _abort(self) -> None:
        """Discard everything written; the final name is left as it was."""

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        if self._finished:
            raise ValueError("write to a closed remote file")
        view = memoryview(data).cast("B")
        self._write(view)
        return len(view)

    def commit(self) -> None:
        """Publish the file. Called by ``close()``; idempotent."""
        if self._finished:
            return
        self._finished = True
        try:
            self._commit()
        except BaseException:
            self._abort()
            raise
        finally:
            super().close()

    def abort(self) -> None:
        """Discard the file. Idempotent; does nothing after a commit."""
        if self._finished:
            return
        self._finished = True
        try:
            self._abort()
        finally:
            super().close()

    def close(self) -> None:
        self.commit()

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def __del__(self) -> None:
        # A writer dropped without close() is an interrupted stream: never publish it.
        if not getattr(self, "_finished", True):
            try:
                self.abort()
            except Exception:
                pass


class RemoteFile(ABC):
    """An existing file opened for positional reads and in-place writes (merges, repairs).

    Only remotes with :attr:`Remote.supports_update` provide it (files on a local folder, NFS,
    SMB, SFTP); object stores do not, which is why delta backups use VhdDirectory there.
    Writes are durable once :meth:`flush` returns.
    """

    @abstractmethod
    def read_at(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes from ``offset`` (fewer only at end of file)."""

    @abstractmethod
    def write_at(self, offset: int, data: bytes | memoryview) -> None:
        """Write all of ``data`` at ``offset``, growing the file if needed."""

    @abstractmethod
    def size(self) -> int:
        """Current size in bytes."""

    @abstractmethod
    def truncate(self, size: int) -> None:
        """Cut or extend the file to ``size`` bytes."""

    @abstractmethod
    def flush(self) -> None:
        """Make every write so far durable (fsync or the protocol's equivalent)."""

    @abstractmethod
    def close(self) -> None:
        """Flush and release the file."""

    def __enter__(self) -> RemoteFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Remote(ABC):
    """A place where backups are stored. Blocking, thread-safe, paths per :func:`normalize_path`.

    Errors are raised as :class:`~xobackup_core.errors.RemoteError` subclasses, naming the
    remote, the operation and the path: :class:`~xobackup_core.errors.RemoteNotFoundError` for
    a missing entry, :class:`~xobackup_core.errors.RemotePermissionError`,
    :class:`~xobackup_core.errors.RemoteNoSpaceError`,
    :class:`~xobackup_core.errors.RemoteConnectionError` (transient) and so on.
    """

    #: Short display name (the config name, or the URL with any secret removed).
    name: str = "remote"
    #: True when :meth:`open_update` works (in-place writes: VHD file merges).
    supports_update: bool = False

    # -- files -------------------------------------------------------------------------------
    @abstractmethod
    def open_write(self, path: str) -> RemoteWriter:
        """Start writing ``path``; it replaces any existing file when committed.

        Missing parent folders are created. The file is invisible under ``path`` until the
        writer is committed (see :class:`RemoteWriter`).
        """

    @abstractmethod
    def open_read(self, path: str, offset: int = 0, length: int | None = None) -> BinaryIO:
        """Open ``path`` for streaming reads of ``length`` bytes from ``offset`` (None: to EOF)."""

    def open_update(self, path: str) -> RemoteFile:
        """Open an existing file for positional reads and in-place writes.

        Raises :class:`~xobackup_core.errors.RemoteError` on remotes without
        :attr:`supports_update`.
        """
        raise RemoteError(
            "this remote cannot modify files in place", remote=self.name, operation="open_update"
        )

    def read_range(self, path: str, offset: int, length: int) -> bytes:
        """Return exactly the bytes ``[offset, offset+length)``, fewer only at end of file."""
        with self.open_read(path, offset, length) as stream:
            chunks = []
            remaining = length
            while remaining > 0:
                chunk = stream.read(remaining)
                if not chunk:
                    break
                chunks.append(chunk)
                remaining -= len(chunk)
            return b"".join(chunks)

    def read_bytes(self, path: str) -> bytes:
        """Return a whole (small) file."""
        with self.open_read(path) as stream:
            return stream.read()

    def write_bytes(self, path: str, data: bytes) -> None:
        """Atomically write a whole (small) file."""
        with self.open_write(path) as writer:
            writer.write(data)

    # -- namespace ---------------------------------------------------------------------------
    @abstractmethod
    def list(self, path: str = "/") -> list[str]:
        """Names (not paths) of the entries of folder ``path``, sorted. Missing folder: ``[]``.

        In-progress writes (temporary names) are never listed.
        """

    @abstractmethod
    def stat(self, path: str) -> RemoteStat:
        """Size, mtime and kind of ``path``; raises RemoteNotFoundError when missing."""

    def exists(self, path: str) -> bool:
        """True when ``path`` is a file or a folder."""
        from xobackup_core.errors import RemoteNotFoundError

        try:
            self.stat(path)
        except RemoteNotFoundError:
            return False
        return True

    @abstractmethod
    def rename(self, source: str, target: str) -> None:
        """Move a file, replacing ``target`` if it exists. Missing target folders are created."""

    @abstractmethod
    def delete(self, path: str, *, missing_ok: bool = False) -> None:
        """Delete a file. A missing file raises RemoteNotFoundError unless ``missing_ok``."""

    @abstractmethod
    def delete_tree(self, path: str) -> None:
        """Delete a folder and everything under it; a missing folder is not an error."""

    @abstractmethod
    def makedirs(self, path: str) -> None:
        """Create folder ``path`` and its parents; an existing folder is not an error.

        Object stores, which have no folders, may do nothing.
        """

    def walk(self, path: str = "/") -> Iterator[str]:
        """Every file path under ``path``, recursively (folders themselves are not yielded)."""
        base = normalize_path(path)
        for name in self.list(base):
            child = join_path(base, name)
            if self.stat(child).is_dir:
                yield from self.walk(child)
            else:
                yield child

    def free_space(self) -> int | None:
        """Bytes available for new data, or None when the remote cannot tell (S3...)."""
        return None

    def close(self) -> None:
        """Release connections. The remote is not used after this."""

    def __enter__(self) -> Remote:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- health ------------------------------------------------------------------------------
    def test(self, size: int = TEST_FILE_SIZE) -> RemoteTestResult:
        """Write ``size`` random bytes, read them back, compare and delete them (XO's test).

        Never raises for a remote failure: the result names the step that failed.
        """
        path = f"/{int(time.time() * 1000)}.test"
        data = os.urandom(size)
        step = "write"
        try:
            start = time.perf_counter()
            with self.open_write(path) as writer:
                for offset in range(0, size, 1024 * 1024):
                    writer.write(data[offset : offset + 1024 * 1024])
            write_rate = size / max(time.perf_counter() - start, 1e-9)
            step = "read"
            start = time.perf_counter()
            read_back = self.read_bytes(path)
            read_rate = size / max(time.perf_counter() - start, 1e-9)
            if read_back != data:
                return RemoteTestResult(False, step="read", error="data read back differs")
            step = "delete"
            self.delete(path)
            return RemoteTestResult(True, write_rate=write_rate, read_rate=read_rate)
        except RemoteError as error:
            try:
                self.delete(path, missing_ok=True)
            except RemoteError:
                pass
            return RemoteTestResult(False, step=step, error=str(error))
