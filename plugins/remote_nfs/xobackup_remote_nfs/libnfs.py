"""A small ctypes binding over the system's libnfs (a userspace NFS client library).

Why ctypes rather than the PyPI ``libnfs`` SWIG package: that package dates from 2016, its
file objects ignore write errors, it has no rename, and it holds the GIL during every call.
ctypes needs no compiler, releases the GIL while libnfs waits on the network (so several
contexts run in parallel), and passes our buffers to libnfs without copying them.

The synchronous API serves everything but streamed writes: one call, one RPC of up to the
server's maximum size. Streamed writes use the asynchronous ``nfs_pwrite_async`` and drive
libnfs's event loop here (:meth:`Context.start_pwrite`, :meth:`Context.service`), so that a few
WRITEs are in flight: the server stores one while the next travels. The prototypes are those
of libnfs 4.x and 5.x (``libnfs.so.13``/``.so.14``); libnfs 6 changed the argument order of
``nfs_pread``/``nfs_pwrite``, so other versions are refused rather than called with the wrong
layout. A context is not thread-safe: callers serialise.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import itertools
import os
import select
import time
from collections.abc import Callable
from dataclasses import dataclass

_SONAMES = ("libnfs.so.13", "libnfs.so.14")
"""libnfs 4.0 (Debian 12, Ubuntu 22.04) and 5.0 (Debian 13, Ubuntu 24.04)."""

_c_void_p = ctypes.c_void_p
_c_char_p = ctypes.c_char_p
_c_int = ctypes.c_int
_c_uint64 = ctypes.c_uint64


class _NfsUrl(ctypes.Structure):
    _fields_ = [("server", _c_char_p), ("path", _c_char_p), ("file", _c_char_p)]


class _Stat64(ctypes.Structure):
    _fields_ = [
        (name, _c_uint64)
        for name in (
            "dev",
            "ino",
            "mode",
            "nlink",
            "uid",
            "gid",
            "rdev",
            "size",
            "blksize",
            "blocks",
            "atime",
            "mtime",
            "ctime",
            "atime_nsec",
            "mtime_nsec",
            "ctime_nsec",
            "used",
        )
    ]


class _StatVfs64(ctypes.Structure):
    _fields_ = [
        (name, _c_uint64)
        for name in (
            "bsize",
            "frsize",
            "blocks",
            "bfree",
            "bavail",
            "files",
            "ffree",
            "favail",
            "fsid",
            "flag",
            "namemax",
        )
    ]


class _DirEntry(ctypes.Structure):
    pass


_NfsCallback = ctypes.CFUNCTYPE(None, _c_int, _c_void_p, _c_void_p, _c_void_p)
"""``void (*nfs_cb)(int status, struct nfs_context *, void *data, void *private_data)``."""

SERVICE_POLL = 0.1
"""Seconds between two runs of libnfs's timeout scan while waiting (its own sync calls use the
same period), so a silent server fails after the context's timeout instead of hanging."""


_DirEntry._fields_ = [("next", ctypes.POINTER(_DirEntry)), ("name", _c_char_p)]


class LibnfsUnavailable(ImportError):
    """The system has no libnfs of a supported version."""


def _load() -> ctypes.CDLL:
    for soname in _SONAMES:
        try:
            return ctypes.CDLL(soname, use_errno=True)
        except OSError:
            continue
    found = ctypes.util.find_library("nfs")
    raise LibnfsUnavailable(
        "libnfs 4.x or 5.x (libnfs.so.13 or .so.14) is required for nfs:// remotes "
        f"(found: {found or 'none'}); install it (Debian: apt-get install libnfs13) "
        "or use the 'mount' mode on a kernel-mounted share"
    )


_lib: ctypes.CDLL | None = None


def _library() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        lib = _load()
        for name, restype, argtypes in (
            ("nfs_init_context", _c_void_p, []),
            ("nfs_destroy_context", None, [_c_void_p]),
            ("nfs_get_error", _c_char_p, [_c_void_p]),
            ("nfs_parse_url_dir", ctypes.POINTER(_NfsUrl), [_c_void_p, _c_char_p]),
            ("nfs_destroy_url", None, [ctypes.POINTER(_NfsUrl)]),
            ("nfs_set_timeout", None, [_c_void_p, _c_int]),
            ("nfs_set_autoreconnect", None, [_c_void_p, _c_int]),
            ("nfs_set_tcp_syncnt", None, [_c_void_p, _c_int]),
            ("nfs_mount", _c_int, [_c_void_p, _c_char_p, _c_char_p]),
            ("nfs_umount", _c_int, [_c_void_p]),
            ("nfs_get_writemax", _c_uint64, [_c_void_p]),
            ("nfs_get_readmax", _c_uint64, [_c_void_p]),
            ("nfs_open", _c_int, [_c_void_p, _c_char_p, _c_int, ctypes.POINTER(_c_void_p)]),
            (
                "nfs_create",
                _c_int,
                [_c_void_p, _c_char_p, _c_int, _c_int, ctypes.POINTER(_c_void_p)],
            ),
            ("nfs_pwrite", _c_int, [_c_void_p, _c_void_p, _c_uint64, _c_uint64, _c_void_p]),
            (
                "nfs_pwrite_async",
                _c_int,
                [_c_void_p, _c_void_p, _c_uint64, _c_uint64, _c_void_p, _NfsCallback, _c_void_p],
            ),
            ("nfs_get_fd", _c_int, [_c_void_p]),
            ("nfs_which_events", _c_int, [_c_void_p]),
            ("nfs_service", _c_int, [_c_void_p, _c_int]),
            ("nfs_pread", _c_int, [_c_void_p, _c_void_p, _c_uint64, _c_uint64, _c_void_p]),
            ("nfs_fsync", _c_int, [_c_void_p, _c_void_p]),
            ("nfs_ftruncate", _c_int, [_c_void_p, _c_void_p, _c_uint64]),
            ("nfs_fstat64", _c_int, [_c_void_p, _c_void_p, ctypes.POINTER(_Stat64)]),
            ("nfs_close", _c_int, [_c_void_p, _c_void_p]),
            ("nfs_stat64", _c_int, [_c_void_p, _c_char_p, ctypes.POINTER(_Stat64)]),
            ("nfs_statvfs64", _c_int, [_c_void_p, _c_char_p, ctypes.POINTER(_StatVfs64)]),
            ("nfs_rename", _c_int, [_c_void_p, _c_char_p, _c_char_p]),
            ("nfs_unlink", _c_int, [_c_void_p, _c_char_p]),
            ("nfs_mkdir", _c_int, [_c_void_p, _c_char_p]),
            ("nfs_rmdir", _c_int, [_c_void_p, _c_char_p]),
            ("nfs_opendir", _c_int, [_c_void_p, _c_char_p, ctypes.POINTER(_c_void_p)]),
            ("nfs_readdir", ctypes.POINTER(_DirEntry), [_c_void_p, _c_void_p]),
            ("nfs_closedir", None, [_c_void_p, _c_void_p]),
        ):
            function = getattr(lib, name)
            function.restype = restype
            function.argtypes = argtypes
        _lib = lib
    return _lib


def available() -> bool:
    """True when a supported libnfs can be loaded."""
    try:
        _library()
    except LibnfsUnavailable:
        return False
    return True


def supports_v4_writes() -> bool:
    """False for libnfs 4.0: its NFSv4 WRITE encoding fails above a few KiB (fixed in 5.0)."""
    try:
        ctypes.CDLL("libnfs.so.13")
    except OSError:
        return True
    return False


@dataclass(frozen=True)
class Stat:
    """The fields of an NFS stat that remotes need."""

    size: int
    mtime: float
    is_dir: bool


class Handle:
    """An open NFS file; only valid with the :class:`Context` that opened it."""

    __slots__ = ("pointer",)

    def __init__(self, pointer: ctypes.c_void_p) -> None:
        self.pointer = pointer


class Context:
    """One mounted NFS export (an ``nfs_context``): one TCP connection, not thread-safe.

    Every failing call raises ``OSError(errno, libnfs's message)``.
    """

    def __init__(
        self,
        server: str,
        export: str,
        *,
        version: int = 3,
        nfs_port: int | None = None,
        mount_port: int | None = None,
        timeout: float = 30.0,
        reconnect_attempts: int = 2,
    ) -> None:
        self._lib = _library()
        # Writes started with start_pwrite, by key (libnfs hands the key back as private data).
        self._writes: dict[int, Callable[[int], None]] = {}
        self._keys = itertools.count(1)
        self._write_done = _NfsCallback(self._on_write_done)
        self._ctx = self._lib.nfs_init_context()
        if not self._ctx:
            raise OSError(errno.ENOMEM, "cannot create an NFS context")
        try:
            # The URL form is the only way libnfs 4 takes version and ports (no setters).
            args = [f"version={version}"]
            if nfs_port:
                args.append(f"nfsport={nfs_port}")
            if mount_port:
                args.append(f"mountport={mount_port}")
            url = self._lib.nfs_parse_url_dir(
                self._ctx, f"nfs://{server}{export}?{'&'.join(args)}".encode()
            )
            if not url:
                raise OSError(errno.EINVAL, self.error_message() or "invalid NFS address")
            self._lib.nfs_destroy_url(url)
            self._lib.nfs_set_timeout(self._ctx, max(1, int(timeout * 1000)))
            # A bounded number of reconnections: NFSv3 is stateless, so a server restart
            # is survived transparently, while a dead server fails instead of hanging.
            self._lib.nfs_set_autoreconnect(self._ctx, reconnect_attempts)
            self._lib.nfs_set_tcp_syncnt(self._ctx, 3)
            self._check(self._lib.nfs_mount(self._ctx, server.encode(), export.encode()), "mount")
        except BaseException:
            self._lib.nfs_destroy_context(self._ctx)
            self._ctx = None
            raise

    # -- helpers -------------------------------------------------------------------------
    def error_message(self) -> str:
        message = self._lib.nfs_get_error(self._ctx) if self._ctx else None
        return (message or b"").decode(errors="replace")

    def _check(self, result: int, operation: str) -> int:
        if result < 0:
            code = -result
            message = self.error_message() or os.strerror(code)
            raise OSError(code, f"{operation}: {message}")
        return result

    def set_timeout(self, seconds: float) -> None:
        """Bound every later RPC to ``seconds``."""
        self._lib.nfs_set_timeout(self._ctx, max(1, int(seconds * 1000)))

    @property
    def write_max(self) -> int:
        """Largest WRITE the server accepts in one RPC."""
        return int(self._lib.nfs_get_writemax(self._ctx))

    # -- files ---------------------------------------------------------------------------
    def create(self, path: str, mode: int = 0o644, *, exclusive: bool = False) -> Handle:
        flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | (os.O_EXCL if exclusive else 0)
        pointer = _c_void_p()
        self._check(
            self._lib.nfs_create(self._ctx, path.encode(), flags, mode, ctypes.byref(pointer)),
            "create",
        )
        return Handle(pointer)

    def open(self, path: str, flags: int = os.O_RDONLY) -> Handle:
        pointer = _c_void_p()
        self._check(
            self._lib.nfs_open(self._ctx, path.encode(), flags, ctypes.byref(pointer)), "open"
        )
        return Handle(pointer)

    def pwrite(self, handle: Handle, offset: int, buffer: bytearray | memoryview) -> None:
        """Write all of ``buffer`` (writable, contiguous: no copy is made) at ``offset``."""
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view):
            chunk = view[done:]
            address = ctypes.addressof(ctypes.c_char.from_buffer(chunk))
            result = self._lib.nfs_pwrite(
                self._ctx, handle.pointer, offset + done, len(chunk), address
            )
            if result == -errno.EFAULT:
                raise self._write_failure(len(chunk))
            written = self._check(result, "write")
            if written == 0:
                raise OSError(errno.EIO, "write: the server accepted no data")
            done += written

    def start_pwrite(
        self,
        handle: Handle,
        offset: int,
        buffer: bytearray | memoryview,
        done: Callable[[int], None],
    ) -> None:
        """Queue one WRITE of ``buffer`` (writable, contiguous) at ``offset`` and return.

        libnfs may read ``buffer`` until ``done(status)`` is called from :meth:`service`
        (libnfs 5 sends from it directly, and both versions resend from it after a short
        write), so it must stay alive and unchanged until then. ``status`` is the number of
        bytes written, or ``-errno``; turn a failure into an exception with
        :meth:`write_error`. ``done`` must not call into this context.
        """
        view = memoryview(buffer).cast("B")
        address = ctypes.addressof(ctypes.c_char.from_buffer(view))
        key = next(self._keys)
        self._writes[key] = done
        result = self._lib.nfs_pwrite_async(
            self._ctx, handle.pointer, offset, len(view), address, self._write_done, key
        )
        if result != 0:
            del self._writes[key]
            raise OSError(errno.ENOMEM, f"write: {self.error_message() or 'cannot queue'}")

    def _on_write_done(self, status: int, _nfs: object, _data: object, key: int | None) -> None:
        done = self._writes.pop(key or 0, None)
        if done is not None:
            done(status)

    @property
    def writes_in_flight(self) -> int:
        """Writes started with :meth:`start_pwrite` whose ``done`` has not been called."""
        return len(self._writes)

    def service(self, until: Callable[[], bool]) -> None:
        """Run libnfs's event loop (send, receive, callbacks, timeouts) until ``until()``.

        Raises ``OSError(EIO)`` when the connection is lost for good; the context must then
        be destroyed, not reused.
        """
        while not until():
            fd = self._lib.nfs_get_fd(self._ctx)
            revents = 0
            if fd >= 0:
                poller = select.poll()
                poller.register(fd, self._lib.nfs_which_events(self._ctx))
                ready = poller.poll(SERVICE_POLL * 1000)
                revents = ready[0][1] if ready else 0
            else:  # reconnecting: only the timeout scan has work
                time.sleep(SERVICE_POLL)
            if self._lib.nfs_service(self._ctx, revents) < 0:
                message = self.error_message() or "connection lost"
                raise OSError(errno.EIO, f"write: {message}")

    def sending(self) -> bool:
        """True while queued requests are not all handed to the socket yet."""
        return bool(self._lib.nfs_which_events(self._ctx) & select.POLLOUT)

    def write_error(self, status: int, wanted: int) -> OSError:
        """The error for a write that ended with ``status`` (see :meth:`start_pwrite`)."""
        if status == -errno.EFAULT:
            return self._write_failure(wanted)
        if status < 0:
            return OSError(-status, f"write: {self.error_message() or os.strerror(-status)}")
        return OSError(errno.EIO, f"write: the server took {status} of {wanted} bytes")

    def _write_failure(self, wanted: int) -> OSError:
        """libnfs 4/5 report any failed WRITE RPC as EFAULT and lose the server's status
        (the message is garbage too), so tell a full filesystem from other failures."""
        try:
            available, _total = self.statvfs("/")
        except OSError as error:
            return OSError(error.errno, f"write failed, then {error.strerror}")
        if available < wanted:
            return OSError(
                errno.ENOSPC, f"write failed: no space left on the server ({available} bytes free)"
            )
        return OSError(errno.EIO, "write failed: the server refused the data")

    def pread_into(self, handle: Handle, offset: int, buffer: bytearray | memoryview) -> int:
        """Read up to ``len(buffer)`` bytes at ``offset`` into ``buffer``; 0 at end of file."""
        view = memoryview(buffer).cast("B")
        if not len(view):
            return 0
        address = ctypes.addressof(ctypes.c_char.from_buffer(view))
        return self._check(
            self._lib.nfs_pread(self._ctx, handle.pointer, offset, len(view), address), "read"
        )

    def fsync(self, handle: Handle) -> None:
        self._check(self._lib.nfs_fsync(self._ctx, handle.pointer), "fsync")

    def ftruncate(self, handle: Handle, size: int) -> None:
        self._check(self._lib.nfs_ftruncate(self._ctx, handle.pointer, size), "truncate")

    def fstat(self, handle: Handle) -> Stat:
        info = _Stat64()
        self._check(self._lib.nfs_fstat64(self._ctx, handle.pointer, ctypes.byref(info)), "stat")
        return _to_stat(info)

    def close(self, handle: Handle) -> None:
        if handle.pointer:
            pointer, handle.pointer = handle.pointer, _c_void_p()
            self._check(self._lib.nfs_close(self._ctx, pointer), "close")

    # -- namespace -----------------------------------------------------------------------
    def stat(self, path: str) -> Stat:
        info = _Stat64()
        self._check(self._lib.nfs_stat64(self._ctx, path.encode(), ctypes.byref(info)), "stat")
        return _to_stat(info)

    def statvfs(self, path: str) -> tuple[int, int]:
        """(available bytes, total bytes) of the filesystem holding ``path``."""
        info = _StatVfs64()
        self._check(
            self._lib.nfs_statvfs64(self._ctx, path.encode(), ctypes.byref(info)), "statvfs"
        )
        unit = info.frsize or info.bsize
        return info.bavail * unit, info.blocks * unit

    def listdir(self, path: str) -> list[str]:
        directory = _c_void_p()
        self._check(
            self._lib.nfs_opendir(self._ctx, path.encode(), ctypes.byref(directory)), "list"
        )
        names = []
        try:
            while True:
                entry = self._lib.nfs_readdir(self._ctx, directory)
                if not entry:
                    break
                name = entry.contents.name.decode("utf-8", errors="surrogateescape")
                if name not in (".", ".."):
                    names.append(name)
        finally:
            self._lib.nfs_closedir(self._ctx, directory)
        return names

    def rename(self, source: str, target: str) -> None:
        self._check(self._lib.nfs_rename(self._ctx, source.encode(), target.encode()), "rename")

    def unlink(self, path: str) -> None:
        self._check(self._lib.nfs_unlink(self._ctx, path.encode()), "delete")

    def mkdir(self, path: str) -> None:
        self._check(self._lib.nfs_mkdir(self._ctx, path.encode()), "make folder")

    def rmdir(self, path: str) -> None:
        self._check(self._lib.nfs_rmdir(self._ctx, path.encode()), "delete folder")

    def destroy(self) -> None:
        """Unmount and free the context (idempotent; errors are irrelevant at this point)."""
        if self._ctx:
            ctx, self._ctx = self._ctx, None
            # UMNT is a courtesy to the server, and its wait would send queued WRITEs whose
            # buffers may be gone: skipped while any is pending.
            if not self._writes:
                self._lib.nfs_umount(ctx)
            # Cancels what is still queued: the callbacks run now, while _write_done lives.
            self._lib.nfs_destroy_context(ctx)
            self._writes.clear()


def _to_stat(info: _Stat64) -> Stat:
    is_dir = (info.mode & 0o170000) == 0o040000
    return Stat(
        size=0 if is_dir else int(info.size),
        mtime=info.mtime + info.mtime_nsec / 1e9,
        is_dir=is_dir,
    )
