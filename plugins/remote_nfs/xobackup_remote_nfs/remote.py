"""An NFSv3 export as a remote, through a userspace client (libnfs): no kernel mount.

Each libnfs context is one TCP connection and is not thread-safe, so the remote keeps a small
pool: an operation borrows a context, a writer, reader or update handle keeps one for its
lifetime (file handles belong to their context). ctypes releases the GIL while libnfs waits,
so concurrent writers really run in parallel.

Writes go to ``.<name>.tmp-<random>`` in the target folder as 1 MiB WRITEs, a few in flight
at once (UNSTABLE writes, so the server does not sync each one), then COMMIT (``nfs_fsync``),
then RENAME over the final name. NFSv3 RENAME replaces the target atomically, and the server
makes namespace changes stable before replying, so no folder fsync is needed. While a large
file is written, a second connection COMMITs what is already written every
:data:`FLUSH_EVERY` bytes, so the server's disk works while the data still streams in and
the final COMMIT finds little left to flush.

Timeouts: every RPC is bounded by ``timeout`` (libnfs's own timer); a lost connection is
re-established a bounded number of times (NFSv3 is stateless, so a server restart is
survived), then the call fails. Idempotent operations are retried with back-off on a fresh
connection after a transient failure.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import threading
from collections.abc import Callable, Iterator
from typing import BinaryIO, TypeVar

from tenacity import retry, retry_if_exception, stop_after_attempt, wait_exponential

from xobackup_core.errors import (
    RemoteConfigError,
    RemoteConnectionError,
    RemoteError,
    RemoteNotFoundError,
    RemoteTimeoutError,
)
from xobackup_core.remote import (
    Remote,
    RemoteFile,
    RemoteStat,
    RemoteWriter,
    is_temp_name,
    join_path,
    make_temp_name,
    map_os_error,
    normalize_path,
    parent_path,
)
from xobackup_remote_nfs import libnfs

log = logging.getLogger(__name__)

T = TypeVar("T")

WRITE_BUFFER = 1024 * 1024
"""Bytes of one WRITE RPC (the usual server maximum; libnfs splits it if the server's is
smaller)."""
WRITES_IN_FLIGHT = 3
"""WRITEs sent before the oldest is answered. One at a time, the client waits while the
server stores each MiB and the server waits while the next one is prepared and sent. Against
ganesha on two cores a 1 GiB write took 0.95 s with three in flight, 1.0 s with two and
1.2 s with one; four measured no faster and hold more buffers."""
FLUSH_EVERY = 64 * 1024 * 1024
"""Bytes written between two background COMMITs of a file being written (one at a time: a
COMMIT still running when the next is due is not doubled). Against ganesha this hid the
final COMMIT (a quarter of a 1 GiB write) behind the WRITEs; several connections sharing
the WRITEs themselves measured no faster than one."""
READ_CHUNK = 1024 * 1024
"""Bytes per ``nfs_pread``: one READ RPC. libnfs's split of a larger pread into parallel RPCs
measured slower (700-900 MiB/s at 1 MiB, about 420 at 8 MiB)."""
IDLE_CONTEXTS = 4
"""Connections kept open between operations."""

_TRANSIENT_ERRNOS = {
    errno.ETIMEDOUT,
    errno.ECONNRESET,
    errno.ECONNREFUSED,
    errno.ECONNABORTED,
    errno.EPIPE,
    errno.ENOTCONN,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.EIO,
    errno.EAGAIN,
    errno.EINTR,
}


def _is_transient(error: BaseException) -> bool:
    return isinstance(error, RemoteError) and error.transient


class NfsRemote(Remote):
    """A folder on an NFS export, reached with libnfs. Thread-safe through a context pool."""

    supports_update = True

    def __init__(
        self,
        host: str,
        path: str,
        *,
        port: int | None = None,
        mount_port: int | None = None,
        version: int = 3,
        timeout: float = 60.0,
        connect_timeout: float = 15.0,
        retries: int = 3,
        name: str | None = None,
    ) -> None:
        if not libnfs.available():
            raise RemoteConfigError(str(_unavailable()), remote=name or host)
        if version not in (3, 4):
            raise RemoteConfigError(f"NFS version must be 3 or 4, not {version}", remote=name)
        if version == 4 and not libnfs.supports_v4_writes():
            raise RemoteConfigError(
                "the installed libnfs 4.0 cannot write over NFSv4 (fixed in libnfs 5); "
                "use version = 3 or the 'mount' mode",
                remote=name,
            )
        self.host = host
        self.path = normalize_path(path)
        self.port = port
        self.mount_port = mount_port
        self.version = version
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.retries = retries
        self.name = name or f"nfs://{host}{f':{port}' if port else ''}{self.path}"
        self._idle: list[libnfs.Context] = []
        self._lock = threading.Lock()
        self._export, self._root = self._find_export()
        self.makedirs("/")

    # -- connections ---------------------------------------------------------------------
    def _new_context(self, export: str) -> libnfs.Context:
        context = libnfs.Context(
            self.host,
            export,
            version=self.version,
            nfs_port=self.port,
            mount_port=self.mount_port,
            timeout=self.connect_timeout,
        )
        context.set_timeout(self.timeout)
        return context

    def _find_export(self) -> tuple[str, str]:
        """Mount the URL's path, or its longest existing ancestor (then the rest is a folder
        inside the export, created if missing)."""
        candidates = []
        path = self.path
        while True:
            candidates.append(path)
            if path == "/":
                break
            path = parent_path(path)
        first_error: OSError | None = None
        for export in candidates:
            try:
                context = self._retrying("connect", None, lambda e=export: self._new_context(e))
            except RemoteError as error:
                if isinstance(error.__cause__, OSError) and first_error is None:
                    first_error = error.__cause__
                if error.transient:
                    where = f"{self.host}:{self.port}" if self.port else self.host
                    raise type(error)(
                        f"cannot reach the NFS server {where} ({error.detail}); check the "
                        "host, that it serves NFSv3 and that its portmapper (port 111) or "
                        "the given ports are reachable",
                        remote=self.name,
                        operation="connect",
                    ) from None
                continue
            with self._lock:
                self._idle.append(context)
            root = self.path[len(export) :] if export != "/" else self.path
            return export, normalize_path(root)
        detail = first_error.strerror if first_error and first_error.strerror else "mount failed"
        raise RemoteConfigError(
            f"no NFS export of {self.host} contains {self.path} ({detail})", remote=self.name
        )

    def _acquire(self) -> libnfs.Context:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        try:
            return self._new_context(self._export)
        except OSError as error:
            if error.errno in (errno.EACCES, errno.EPERM):
                raise self.error(error, "connect", None) from None
            # The export was mounted when the remote was opened, so a failure now means the
            # server is away (restarting, unregistered from the portmapper): transient.
            raise RemoteConnectionError(
                error.strerror or str(error), remote=self.name, operation="connect"
            ) from None

    def _release(self, context: libnfs.Context, *, broken: bool = False) -> None:
        if not broken:
            with self._lock:
                if len(self._idle) < IDLE_CONTEXTS:
                    self._idle.append(context)
                    return
        context.destroy()

    @contextlib.contextmanager
    def _context(self) -> Iterator[libnfs.Context]:
        context = self._acquire()
        broken = False
        try:
            yield context
        except OSError as error:
            broken = error.errno in _TRANSIENT_ERRNOS
            raise
        finally:
            self._release(context, broken=broken)

    # -- errors and retries ----------------------------------------------------------------
    def nfs_path(self, path: str) -> str:
        """The path inside the mounted export of a remote path."""
        return join_path(self._root, path)

    def error(self, error: OSError, operation: str, path: str | None) -> RemoteError:
        """The core's error for a libnfs failure, naming the remote, operation and path."""
        code = error.errno or 0
        detail = error.strerror or str(error)
        if code == errno.ETIMEDOUT or "timed out" in detail.lower():
            return RemoteTimeoutError(detail, remote=self.name, operation=operation, path=path)
        if code in _TRANSIENT_ERRNOS:
            return RemoteConnectionError(detail, remote=self.name, operation=operation, path=path)
        return map_os_error(error, remote=self.name, operation=operation, path=path or "")

    def _retrying(self, operation: str, path: str | None, function: Callable[[], T]) -> T:
        def attempt() -> T:
            try:
                return function()
            except OSError as error:
                raise self.error(error, operation, path) from error

        if self.retries <= 0:
            return attempt()
        return retry(
            retry=retry_if_exception(_is_transient),
            stop=stop_after_attempt(self.retries + 1),
            wait=wait_exponential(multiplier=0.2, max=5),
            reraise=True,
            before_sleep=lambda state: log.info(
                "remote %r: %s %s failed, retrying", self.name, operation, path or ""
            ),
        )(attempt)()

    def _run(
        self,
        operation: str,
        path: str | None,
        function: Callable[[libnfs.Context], T],
        *,
        idempotent: bool = True,
    ) -> T:
        def once() -> T:
            with self._context() as context:
                return function(context)

        if idempotent:
            return self._retrying(operation, path, once)
        try:
            return once()
        except OSError as error:
            raise self.error(error, operation, path) from None

    # -- files -----------------------------------------------------------------------------
    def open_write(self, path: str) -> RemoteWriter:
        path = normalize_path(path)
        if path == "/":
            raise RemoteError("cannot write the root folder", remote=self.name, path=path)
        return _NfsWriter(self, path)

    def open_read(self, path: str, offset: int = 0, length: int | None = None) -> BinaryIO:
        path = normalize_path(path)
        if self.stat(path).is_dir:
            raise RemoteError("is a folder, not a file", remote=self.name, path=path)
        handle = _OpenFile(self, path, os.O_RDONLY, "open for read")
        return io.BufferedReader(  # type: ignore[return-value]
            _NfsRangeReader(handle, offset, length), READ_CHUNK
        )

    def open_update(self, path: str) -> RemoteFile:
        return _NfsFile(self, normalize_path(path))

    # -- namespace -------------------------------------------------------------------------
    def list(self, path: str = "/") -> list[str]:
        path = normalize_path(path)

        def listdir(context: libnfs.Context) -> list[str]:
            try:
                return context.listdir(self.nfs_path(path))
            except OSError as error:
                if error.errno in (errno.ENOENT, errno.ENOTDIR):
                    return []
                raise

        names = self._run("list", path, listdir)
        return sorted(name for name in names if not is_temp_name(name))

    def stat(self, path: str) -> RemoteStat:
        path = normalize_path(path)
        info = self._run("stat", path, lambda c: c.stat(self.nfs_path(path)))
        return RemoteStat(size=info.size, mtime=info.mtime, is_dir=info.is_dir)

    def _makedirs(self, context: libnfs.Context, path: str) -> None:
        target = self.nfs_path(path)
        missing = []
        probe = target
        while probe != "/":
            try:
                if not context.stat(probe).is_dir:
                    raise OSError(errno.ENOTDIR, f"{probe} is a file")
                break
            except OSError as error:
                if error.errno != errno.ENOENT:
                    raise
            missing.append(probe)
            probe = parent_path(probe)
        for folder in reversed(missing):
            try:
                context.mkdir(folder)
            except OSError as error:
                if error.errno != errno.EEXIST:  # created meanwhile by another writer
                    raise

    def makedirs(self, path: str) -> None:
        path = normalize_path(path)
        self._run("make folder", path, lambda c: self._makedirs(c, path))

    def rename(self, source: str, target: str) -> None:
        source, target = normalize_path(source), normalize_path(target)
        where = f"{source} -> {target}"

        def move(context: libnfs.Context) -> None:
            if context.stat(self.nfs_path(source)).is_dir:
                raise OSError(errno.EISDIR, "is a folder; only files are renamed")
            self._makedirs(context, parent_path(target))
            context.rename(self.nfs_path(source), self.nfs_path(target))

        self._run("rename", where, move, idempotent=False)

    def delete(self, path: str, *, missing_ok: bool = False) -> None:
        path = normalize_path(path)

        def remove(context: libnfs.Context) -> None:
            try:
                if context.stat(self.nfs_path(path)).is_dir:
                    raise RemoteError("is a folder; use delete_tree", remote=self.name, path=path)
                context.unlink(self.nfs_path(path))
            except OSError as error:
                if error.errno == errno.ENOENT:
                    if missing_ok:
                        return
                    raise RemoteNotFoundError(
                        "no such file", remote=self.name, operation="delete", path=path
                    ) from None
                raise

        self._run("delete", path, remove, idempotent=False)

    def _rmtree(self, context: libnfs.Context, folder: str) -> None:
        for name in context.listdir(folder):
            child = join_path(folder, name)
            if context.stat(child).is_dir:
                self._rmtree(context, child)
            else:
                with contextlib.suppress(FileNotFoundError):
                    context.unlink(child)
        context.rmdir(folder)

    def delete_tree(self, path: str) -> None:
        path = normalize_path(path)
        if path == "/":
            raise RemoteError("refusing to delete the remote's root", remote=self.name)

        def rmtree(context: libnfs.Context) -> None:
            try:
                info = context.stat(self.nfs_path(path))
            except OSError as error:
                if error.errno == errno.ENOENT:
                    return
                raise
            if info.is_dir:
                self._rmtree(context, self.nfs_path(path))
            else:
                context.unlink(self.nfs_path(path))

        self._run("delete tree", path, rmtree)

    def free_space(self) -> int | None:
        available, _total = self._run("free space", "/", lambda c: c.statvfs(self.nfs_path("/")))
        return available

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for context in idle:
            context.destroy()


def _unavailable() -> Exception:
    try:
        libnfs._library()
    except libnfs.LibnfsUnavailable as error:
        return error
    return RuntimeError("libnfs unavailable")


class _OpenFile:
    """An open NFS file holding its own context until closed."""

    def __init__(
        self,
        remote: NfsRemote,
        path: str,
        flags: int,
        operation: str,
        *,
        create: bool = False,
        label: str | None = None,
    ) -> None:
        self.remote = remote
        self.path = label or path  # what errors name: the final path, not a temp name
        self.context = remote._acquire()
        try:
            target = remote.nfs_path(path)
            if create:
                try:
                    self.handle = self.context.create(target, exclusive=True)
                except OSError as error:
                    if error.errno != errno.ENOENT:
                        raise
                    remote._makedirs(self.context, parent_path(path))
                    self.handle = self.context.create(target, exclusive=True)
            else:
                self.handle = self.context.open(target, flags)
        except OSError as error:
            self.remote._release(self.context, broken=error.errno in _TRANSIENT_ERRNOS)
            raise remote.error(error, operation, self.path) from None
        self.broken = False

    def call(self, operation: str, function: Callable[..., T], *args: object) -> T:
        try:
            return function(*args)
        except OSError as error:
            if error.errno in _TRANSIENT_ERRNOS:
                self.broken = True
            raise self.remote.error(error, operation, self.path) from None

    def close_handle(self) -> None:
        """Close the file but keep the context for namespace calls."""
        assert self.context is not None
        self.call("close", self.context.close, self.handle)

    def close(self, *, quiet: bool = False) -> None:
        if self.context is None:
            return
        context, self.context = self.context, None
        try:
            context.close(self.handle)
        except OSError as error:
            self.broken = self.broken or error.errno in _TRANSIENT_ERRNOS
            if not quiet:
                self.remote._release(context, broken=self.broken)
                raise self.remote.error(error, "close", self.path) from None
        self.remote._release(context, broken=self.broken)


class _NfsWriter(RemoteWriter):
    """Streams a hidden temp file with pipelined WRITEs; commit = COMMIT + RENAME.

    Data goes out in :data:`WRITE_BUFFER` slices, up to :data:`WRITES_IN_FLIGHT` at once.
    libnfs reads a slice's memory until that WRITE is answered, so a slice is either the
    writer's own buffer (a small ring the data is copied into) or the caller's writable
    buffer, lent without a copy only until :meth:`write` returns: the last slices of a large
    write are copied to the ring instead, so that they can stay in flight while the caller
    prepares the next data.
    """

    def __init__(self, remote: NfsRemote, path: str) -> None:
        super().__init__()
        self._remote = remote
        self._path = path
        folder, name = parent_path(path), path.rsplit("/", 1)[1]
        self._temp = join_path(folder, make_temp_name(name))
        self._file = _OpenFile(
            remote, self._temp, os.O_WRONLY, "open for write", create=True, label=path
        )
        # The writer's own buffers, made when first needed (a small file needs one): up to
        # one more than can be in flight, to fill meanwhile. Views, because assigning a
        # slice of a bytearray from a memoryview copies the data twice, a view's once.
        self._ring: list[memoryview] = []
        self._free: list[int] = []  # ring buffers libnfs does not read
        self._current: int | None = None  # the ring buffer being filled
        self._filled = 0
        self._offset = 0  # file offset of the next slice sent
        self._lent = 0  # WRITEs in flight reading the caller's memory
        self._failed: tuple[int, int] | None = None  # (status, size) of the first failed WRITE
        self._flusher = _FlushBehind(remote, self._temp, path)

    # -- the event loop ----------------------------------------------------------------------
    def _context(self) -> libnfs.Context:
        context = self._file.context
        if context is None:
            raise RemoteConnectionError(
                "the connection was lost", remote=self._remote.name, path=self._path
            )
        return context

    def _wait(self, until: Callable[[], bool]) -> None:
        """Serve the connection until ``until()``; raise a failed WRITE once all have ended."""
        context = self._context()
        try:
            context.service(lambda: until() or self._failed is not None)
            if self._failed is not None:
                context.service(lambda: context.writes_in_flight == 0)
        except OSError as error:
            self._drop_connection()
            raise self._remote.error(error, "write", self._path) from None
        if self._failed is not None:
            status, size = self._failed
            error = context.write_error(status, size)
            if error.errno in _TRANSIENT_ERRNOS:
                self._file.broken = True
            raise self._remote.error(error, "write", self._path) from None

    def _drop_connection(self) -> None:
        """Destroy a connection that failed with WRITEs pending: nothing may be sent from a
        caller's buffer after the call that lent it has returned."""
        self._file.broken = True
        context, self._file.context = self._file.context, None
        if context is not None:
            self._remote._release(context, broken=True)

    def _send(self, view: memoryview, ring: int | None) -> None:
        """Start the WRITE of ``view`` (ring buffer ``ring``, or the caller's memory)."""
        context = self._context()
        self._wait(lambda: context.writes_in_flight < WRITES_IN_FLIGHT)
        size = len(view)

        def done(status: int) -> None:
            if ring is None:
                self._lent -= 1
            else:
                self._free.append(ring)
            if status != size and self._failed is None:
                self._failed = (status, size)

        if ring is None:
            self._lent += 1
        try:
            context.start_pwrite(self._file.handle, self._offset, view, done)
        except OSError as error:
            done(size)  # never queued: nothing reads the buffer
            raise self._remote.error(error, "write", self._path) from None
        self._offset += size
        # Hand the request to the socket now, so the server works while the caller does.
        self._wait(lambda: not context.sending())
        self._flusher.written(self._offset)

    def _write(self, data: memoryview) -> None:
        # Slices of a writable caller buffer are lent while enough data follows them to keep
        # the pipeline full from the ring.
        keep = (WRITES_IN_FLIGHT + 1) * WRITE_BUFFER
        while data:
            if self._filled == 0 and len(data) >= keep and not data.readonly:
                self._send(data[:WRITE_BUFFER], None)
                data = data[WRITE_BUFFER:]
                continue
            if self._current is None:
                if not self._free and len(self._ring) <= WRITES_IN_FLIGHT:
                    self._free.append(len(self._ring))
                    self._ring.append(memoryview(bytearray(WRITE_BUFFER)))
                self._wait(lambda: bool(self._free))
                self._current = self._free.pop()
            take = min(len(data), WRITE_BUFFER - self._filled)
            self._ring[self._current][self._filled : self._filled + take] = data[:take]
            self._filled += take
            data = data[take:]
            if self._filled == WRITE_BUFFER:
                self._send_current()
        if self._lent:
            self._wait(lambda: self._lent == 0)

    def _send_current(self) -> None:
        assert self._current is not None
        ring, filled = self._current, self._filled
        self._current, self._filled = None, 0
        self._send(self._ring[ring][:filled], ring)

    def _commit(self) -> None:
        if self._filled:
            self._send_current()
        context = self._context()
        self._wait(lambda: context.writes_in_flight == 0)
        # A failed background COMMIT fails the file: the server may report a lost write
        # only once.
        self._flusher.finish()
        self._file.call("commit", context.fsync, self._file.handle)
        # Close before the rename: once renamed, another writer may replace the final name
        # and a later close (which COMMITs) would hit a stale handle.
        self._file.close_handle()
        try:
            self._file.call(
                "commit",
                context.rename,
                self._remote.nfs_path(self._temp),
                self._remote.nfs_path(self._path),
            )
        finally:
            self._file.close()

    def _abort(self) -> None:
        self._flusher.finish(quiet=True)
        context = self._file.context
        if context is not None and context.writes_in_flight:
            try:  # the WRITEs in flight end before the connection is used again
                context.service(lambda: context.writes_in_flight == 0)
            except OSError:
                self._drop_connection()
        context = self._file.context
        if context is not None and not self._file.broken:
            with contextlib.suppress(OSError):
                context.unlink(self._remote.nfs_path(self._temp))
        self._file.close(quiet=True)


class _FlushBehind:
    """COMMITs a file being written from a second connection, every :data:`FLUSH_EVERY`
    bytes, in a thread: the server flushes earlier data while later data arrives.

    Only an optimisation: without a second connection the final COMMIT does all the work.
    A COMMIT that fails is raised by :meth:`finish`.
    """

    def __init__(self, remote: NfsRemote, temp: str, label: str) -> None:
        self._remote = remote
        self._temp = temp
        self._label = label
        self._file: _OpenFile | None = None
        self._thread: threading.Thread | None = None
        self._error: RemoteError | None = None
        self._next = FLUSH_EVERY
        self._disabled = False

    def written(self, offset: int) -> None:
        """The file now holds ``offset`` bytes: start a COMMIT if one is due and none runs.

        Due once more than :data:`FLUSH_EVERY` bytes are uncommitted: a file of exactly that
        size is left to the final COMMIT, which a second connection would not speed up."""
        if offset <= self._next or self._disabled:
            return
        if self._thread is not None:
            if self._thread.is_alive():
                return
            self._thread.join()
        if self._error is not None:
            raise self._error
        if self._file is None:
            try:
                self._file = _OpenFile(
                    self._remote, self._temp, os.O_WRONLY, "open for write", label=self._label
                )
            except RemoteError as error:
                log.debug("remote %r: no second connection (%s)", self._remote.name, error)
                self._disabled = True
                return
        self._next = offset + FLUSH_EVERY
        self._thread = threading.Thread(target=self._commit, name="nfs-flush-behind", daemon=True)
        self._thread.start()

    def _commit(self) -> None:
        file = self._file
        assert file is not None and file.context is not None
        try:
            file.call("commit", file.context.fsync, file.handle)
        except RemoteError as error:
            self._error = error

    def finish(self, *, quiet: bool = False) -> None:
        """Wait for a running COMMIT, close the second connection's handle; raise a failed
        COMMIT's error unless ``quiet``."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._file is not None:
            file, self._file = self._file, None
            file.broken = file.broken or self._error is not None
            file.close(quiet=True)
        if self._error is not None and not quiet:
            raise self._error


class _NfsRangeReader(io.RawIOBase):
    """Reads ``[offset, offset+length)`` with positional READs."""

    def __init__(self, file: _OpenFile, offset: int, length: int | None) -> None:
        super().__init__()
        self._file = file
        self._position = offset
        self._end = None if length is None else offset + length

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        want = min(len(view), READ_CHUNK)
        if self._end is not None:
            want = min(want, self._end - self._position)
        if want <= 0:
            return 0
        context = self._file.context
        assert context is not None
        count = self._file.call(
            "read", context.pread_into, self._file.handle, self._position, view[:want]
        )
        self._position += count
        return count

    def readall(self) -> bytes:
        # io's default reads 8 KiB at a time, one round trip each.
        chunks = []
        while True:
            block = bytearray(READ_CHUNK)
            count = self.readinto(memoryview(block))
            if not count:
                break
            del block[count:]
            chunks.append(block)
        return b"".join(chunks)

    def close(self) -> None:
        if not self.closed:
            self._file.close(quiet=True)
        super().close()


class _NfsFile(RemoteFile):
    """An existing file opened read/write for in-place updates."""

    def __init__(self, remote: NfsRemote, path: str) -> None:
        self._file = _OpenFile(remote, path, os.O_RDWR, "open for update")

    def _context(self) -> libnfs.Context:
        context = self._file.context
        if context is None:
            raise ValueError("I/O on a closed remote file")
        return context

    def read_at(self, offset: int, length: int) -> bytes:
        buffer = bytearray(length)
        view = memoryview(buffer)
        done = 0
        while done < length:
            count = self._file.call(
                "read",
                self._context().pread_into,
                self._file.handle,
                offset + done,
                view[done : done + READ_CHUNK],
            )
            if not count:
                break
            done += count
        del view
        del buffer[done:]
        return bytes(buffer)

    def write_at(self, offset: int, data: bytes | memoryview) -> None:
        # libnfs needs a writable buffer to pass without copying; one copy here is cheap
        # next to the network.
        buffer = bytearray(data)
        self._file.call("write", self._context().pwrite, self._file.handle, offset, buffer)

    def size(self) -> int:
        return self._file.call("stat", self._context().fstat, self._file.handle).size

    def truncate(self, size: int) -> None:
        self._file.call("truncate", self._context().ftruncate, self._file.handle, size)

    def flush(self) -> None:
        self._file.call("fsync", self._context().fsync, self._file.handle)

    def close(self) -> None:
        if self._file.context is None:
            return
        try:
            self.flush()
        finally:
            self._file.close()
