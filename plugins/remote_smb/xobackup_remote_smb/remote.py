"""An SMB2/3 share as a remote, through smbprotocol (pure Python, no kernel mount).

Namespace operations use smbprotocol's high-level ``smbclient`` functions on a connection
private to this remote. The data path talks to the SMB ``Open`` directly:

* writes go out in chunks of the negotiated maximum write size (capped by ``write_chunk``)
  with several WRITE requests in flight at once, as many as the granted credits allow, so
  the server's disk work and the network overlap; on unsigned, unencrypted sessions they
  are packed without copying the payload (:mod:`xobackup_remote_smb.fastwrite`);
* streaming reads keep several READ requests ahead of the consumer;
* every request waits for its response with the per-operation timeout; an operation through
  the high-level functions is bounded by a watchdog that closes the connection when the
  timeout passes (smbclient itself would wait forever on a silent server).

A file is written as ``.<name>.tmp-<random>`` in the target folder, flushed (SMB2 FLUSH, the
server's fsync), then renamed over the final name with ``FileRenameInformation`` and
``ReplaceIfExists``: one atomic server-side operation, so readers see the old file or the
whole new one. A write cut short leaves only the hidden temp name, which listings skip.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import io
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO, TypeVar

import smbclient
import smbclient.shutil
from smbprotocol.exceptions import (
    SMBAuthenticationError,
    SMBConnectionClosed,
    SMBException,
    SMBOSError,
    SMBResponseException,
)
from smbprotocol.header import NtStatus
from smbprotocol.open import SMB2ReadResponse, SMB2WriteResponse
from smbprotocol.tree import TreeConnect
from tenacity import (
    retry,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
)

from xobackup_core.errors import (
    RemoteConfigError,
    RemoteConnectionError,
    RemoteError,
    RemoteExistsError,
    RemoteNoSpaceError,
    RemoteNotFoundError,
    RemotePermissionError,
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
from xobackup_remote_smb.fastwrite import WriteConnection

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_WRITE_CHUNK = 8 * 1024 * 1024
"""Bytes per WRITE request: the negotiated maximum caps it (8 MiB on Samba and recent
Windows). With the copy-free WRITE path, bigger requests measured fastest."""
DEFAULT_PIPELINE = 4
"""WRITE requests in flight at once (fewer when the server grants fewer credits)."""
READ_CHUNK = 1024 * 1024
"""Bytes per READ request (the negotiated maximum caps it)."""
READ_AHEAD = 8
"""READ requests kept in flight ahead of a streaming reader (1 MiB x 8 read fastest here)."""
CREDIT_UNIT = 65536
"""SMB2 multi-credit unit: one credit per 64 KiB of payload."""

_STATUS_ERRORS: dict[int, type[RemoteError]] = {
    NtStatus.STATUS_OBJECT_NAME_NOT_FOUND: RemoteNotFoundError,
    NtStatus.STATUS_OBJECT_PATH_NOT_FOUND: RemoteNotFoundError,
    NtStatus.STATUS_NO_SUCH_FILE: RemoteNotFoundError,
    NtStatus.STATUS_OBJECT_NAME_COLLISION: RemoteExistsError,
    NtStatus.STATUS_ACCESS_DENIED: RemotePermissionError,
    NtStatus.STATUS_LOGON_FAILURE: RemotePermissionError,
    NtStatus.STATUS_DISK_FULL: RemoteNoSpaceError,
    0xC0000044: RemoteNoSpaceError,  # STATUS_QUOTA_EXCEEDED
    NtStatus.STATUS_NETWORK_NAME_DELETED: RemoteConnectionError,
    NtStatus.STATUS_USER_SESSION_DELETED: RemoteConnectionError,
    0xC0000203: RemoteConnectionError,  # STATUS_USER_SESSION_DELETED (older servers)
}


_STATUS_NOT_FOUND = 0xC0000225
"""What Samba answers to a tree connect on a share that does not exist (SMB 3.1.1)."""
_BUSY_STATUSES = (NtStatus.STATUS_ACCESS_DENIED, NtStatus.STATUS_SHARING_VIOLATION)


def _is_transient(error: BaseException) -> bool:
    return isinstance(error, RemoteError) and error.transient


def _status_of(error: BaseException) -> int | None:
    status = getattr(error, "ntstatus", None) or getattr(error, "status", None)
    return int(status) if isinstance(status, int) else None


class SmbRemote(Remote):
    """A folder on an SMB share. Thread-safe: smbprotocol multiplexes one connection."""

    supports_update = True

    def __init__(
        self,
        host: str,
        share: str,
        root: str = "/",
        *,
        username: str,
        password: str,
        port: int = 445,
        domain: str | None = None,
        encrypt: bool = False,
        signing: str = "auto",
        timeout: float = 60.0,
        connect_timeout: float = 15.0,
        retries: int = 3,
        write_chunk: int = DEFAULT_WRITE_CHUNK,
        pipeline: int = DEFAULT_PIPELINE,
        name: str | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.share = share
        self.root = normalize_path(root)
        self.timeout = timeout
        self.retries = retries
        self.write_chunk = write_chunk
        self.pipeline = max(1, pipeline)
        tail = "" if self.root == "/" else self.root
        self.name = name or f"smb://{username}@{host}:{port}/{share}{tail}"
        self._cache: dict[str, Any] = {}
        user = f"{domain}\\{username}" if domain else username
        # Passed to every smbclient call so that a dropped connection is re-established
        # transparently; never formatted into a message or a log line.
        self._kwargs: dict[str, Any] = {
            "username": user,
            "password": password,
            "port": port,
            "encrypt": True if encrypt else None,
            "connection_timeout": connect_timeout,
            "connection_cache": self._cache,
            # "auto" signs only what the protocol or the server demands, like smbclient,
            # Windows and the Linux kernel client by default; signing every WRITE in Python
            # costs more CPU than the rest of the data path together.
            "require_signing": signing == "required",
        }
        self._username = user
        self._tree_lock = threading.Lock()
        self._connect()

    # -- plumbing ------------------------------------------------------------------------
    def unc(self, path: str) -> str:
        """The UNC path (``\\\\host\\share\\root\\path``) of a remote path."""
        full = join_path(self.root, path)
        base = f"\\\\{self.host}\\{self.share}"
        return base if full == "/" else base + full.replace("/", "\\")

    def _connection(self) -> Any:
        return self._cache.get(f"{self.host.lower()}:{self.port}")

    def _drop_connection(self) -> None:
        """Close the socket: every waiter wakes with SMBConnectionClosed; the next call
        reconnects."""
        connection = self._connection()
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.disconnect(False)

    @contextlib.contextmanager
    def _watchdog(self) -> Iterator[threading.Event]:
        fired = threading.Event()

        def expire() -> None:
            fired.set()
            self._drop_connection()

        timer = threading.Timer(self.timeout, expire)
        timer.daemon = True
        timer.start()
        try:
            yield fired
        finally:
            timer.cancel()

    def error(self, error: BaseException, operation: str, path: str | None) -> RemoteError:
        """The core's error for an smbprotocol/socket error, naming remote, operation, path."""
        if isinstance(error, RemoteError):
            return error
        status = _status_of(error)
        if isinstance(error, SMBAuthenticationError) or status == NtStatus.STATUS_LOGON_FAILURE:
            return RemotePermissionError(
                f"authentication failed for user {self._username!r} "
                "(wrong user name, password or domain)",
                remote=self.name,
                operation=operation,
                path=path,
            )
        if status == NtStatus.STATUS_BAD_NETWORK_NAME or (
            operation == "connect" and status == _STATUS_NOT_FOUND
        ):
            return RemoteConfigError(
                f"the share {self.share!r} does not exist on {self.host}",
                remote=self.name,
                operation=operation,
            )
        if isinstance(error, SMBConnectionClosed):
            return RemoteConnectionError(
                "the connection to the server was lost",
                remote=self.name,
                operation=operation,
                path=path,
            )
        if status is not None and status in _STATUS_ERRORS:
            detail = getattr(error, "strerror", None) or _short(error)
            return _STATUS_ERRORS[status](detail, remote=self.name, operation=operation, path=path)
        if isinstance(error, SMBOSError | OSError) and getattr(error, "errno", None):
            return map_os_error(error, remote=self.name, operation=operation, path=path)
        cause = error.__cause__
        if isinstance(error, ValueError) and isinstance(cause, OSError):
            # smbprotocol reports a failed TCP connect as ValueError from the socket error.
            kind = RemoteTimeoutError if isinstance(cause, TimeoutError) else RemoteConnectionError
            return kind(_short(error), remote=self.name, operation=operation, path=path)
        if isinstance(error, TimeoutError | ConnectionError | OSError):
            kind = RemoteTimeoutError if isinstance(error, TimeoutError) else RemoteConnectionError
            return kind(_short(error), remote=self.name, operation=operation, path=path)
        if isinstance(error, SMBException) and "timeout" in str(error).lower():
            return RemoteTimeoutError(
                f"no answer within {self.timeout:g} s",
                remote=self.name,
                operation=operation,
                path=path,
            )
        return RemoteError(_short(error), remote=self.name, operation=operation, path=path)

    def _ensure_tree(self) -> None:
        """(Re)connect the session and the share when needed.

        SMB 3.1.1 requires a signed TREE_CONNECT even when the session does not sign its
        other requests, and smbclient only signs it when the whole session is signed, so
        the share is connected here, signed, before smbclient looks for it.
        """
        key = f"{self.host.lower()}:{self.port}"
        share = rf"\\{self.host}\{self.share}"
        connection = self._cache.get(key)
        if connection is not None and connection.transport.connected:
            for session in connection.session_table.values():
                if any(tree.share_name == share for tree in session.tree_connect_table.values()):
                    return
        with self._tree_lock:  # one thread (re)connects; the others then find it done
            connection = self._cache.get(key)
            if connection is None or not connection.transport.connected:
                # Our connection class, which smbclient then reuses for the session and shares.
                connection = WriteConnection(
                    smbclient.ClientConfig().client_guid,
                    self.host,
                    self.port,
                    require_signing=self._kwargs["require_signing"],
                )
                connection.connect(timeout=self._kwargs["connection_timeout"])
                self._cache[key] = connection
            session = smbclient.register_session(
                self.host,
                username=self._kwargs["username"],
                password=self._kwargs["password"],
                port=self.port,
                encrypt=self._kwargs["encrypt"],
                connection_timeout=self._kwargs["connection_timeout"],
                connection_cache=self._cache,
                require_signing=self._kwargs["require_signing"],
            )
            if any(tree.share_name == share for tree in session.tree_connect_table.values()):
                return
            sign_now = not session.signing_required and session.signing_key is not None
            if sign_now:
                session.signing_required = True
            try:
                TreeConnect(session, share).connect()
            finally:
                if sign_now:
                    session.signing_required = False

    def _call(
        self, operation: str, path: str | None, function: Callable[[], T], *, idempotent: bool
    ) -> T:
        """Run ``function`` under the watchdog, map its errors, retry transient ones."""

        def attempt() -> T:
            with self._watchdog() as fired:
                try:
                    self._ensure_tree()
                    return function()
                except Exception as error:
                    if fired.is_set():
                        raise RemoteTimeoutError(
                            f"no answer within {self.timeout:g} s",
                            remote=self.name,
                            operation=operation,
                            path=path,
                        ) from None
                    raise self.error(error, operation, path) from None

        if not idempotent or self.retries <= 0:
            return attempt()
        retrying = retry(
            retry=retry_if_exception(_is_transient),
            stop=stop_after_attempt(self.retries + 1),
            wait=wait_exponential(multiplier=0.2, max=5),
            reraise=True,
            before_sleep=lambda state: log.info(
                "remote %r: %s %s failed (%s), retrying",
                self.name,
                operation,
                path,
                state.outcome.exception() if state.outcome else "?",
            ),
        )
        return retrying(attempt)()

    def _connect(self) -> None:
        def connect() -> None:
            # _call has connected the session and the share: a wrong share name fails there.
            base = f"\\\\{self.host}\\{self.share}"
            smbclient.stat(base, **self._kwargs)
            if self.root != "/":
                smbclient.makedirs(self.unc("/"), exist_ok=True, **self._kwargs)

        self._call("connect", None, connect, idempotent=True)

    # -- files ---------------------------------------------------------------------------
    def open_write(self, path: str) -> RemoteWriter:
        path = normalize_path(path)
        if path == "/":
            raise RemoteError("cannot write the root folder", remote=self.name, path=path)
        return _SmbWriter(self, path)

    def open_read(self, path: str, offset: int = 0, length: int | None = None) -> BinaryIO:
        path = normalize_path(path)
        # Sharing read, write and delete lets a commit replace a file someone is reading,
        # as on POSIX (the reader keeps the old data).
        handle = _SmbHandle(self, path, "r", share_access="rwd")
        return io.BufferedReader(  # type: ignore[return-value]
            _SmbRangeReader(handle, offset, length), READ_CHUNK
        )

    def open_update(self, path: str) -> RemoteFile:
        return _SmbFile(self, normalize_path(path))

    # -- namespace -----------------------------------------------------------------------
    def list(self, path: str = "/") -> list[str]:
        def listdir() -> list[str]:
            try:
                return smbclient.listdir(self.unc(path), **self._kwargs)
            except SMBOSError as error:
                if error.errno in (errno.ENOENT, errno.ENOTDIR):
                    return []
                raise

        names = self._call("list", path, listdir, idempotent=True)
        return sorted(name for name in names if not is_temp_name(name))

    def stat(self, path: str) -> RemoteStat:
        def stat() -> RemoteStat:
            info = smbclient.stat(self.unc(path), **self._kwargs)
            is_dir = (info.st_mode & 0o170000) == 0o040000
            return RemoteStat(
                size=0 if is_dir else info.st_size, mtime=info.st_mtime, is_dir=is_dir
            )

        return self._call("stat", path, stat, idempotent=True)

    def _makedirs_unc(self, path: str) -> None:
        smbclient.makedirs(self.unc(path), exist_ok=True, **self._kwargs)

    def makedirs(self, path: str) -> None:
        self._call("make folder", path, lambda: self._makedirs_unc(path), idempotent=True)

    def rename(self, source: str, target: str) -> None:
        source, target = normalize_path(source), normalize_path(target)
        where = f"{source} -> {target}"
        if self.stat(source).is_dir:
            # ReplaceIfExists does not apply to folders; refuse rather than half-do it.
            raise RemoteError(
                "is a folder; only files are renamed",
                remote=self.name,
                operation="rename",
                path=where,
            )
        self._call(
            "make folder", target, lambda: self._makedirs_unc(parent_path(target)), idempotent=True
        )
        self._call("rename", where, lambda: self._replace(source, target), idempotent=False)

    def _replace(self, source: str, target: str) -> None:
        """Rename with ReplaceIfExists, retrying briefly while another client has the target
        open without delete sharing (Windows semantics: the server refuses for that moment)."""
        delay = 0.01
        for _ in range(12):
            try:
                smbclient.replace(self.unc(source), self.unc(target), **self._kwargs)
                return
            except SMBOSError as error:
                if _status_of(error) not in _BUSY_STATUSES:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
        smbclient.replace(self.unc(source), self.unc(target), **self._kwargs)

    def delete(self, path: str, *, missing_ok: bool = False) -> None:
        path = normalize_path(path)
        try:
            info = self.stat(path)
        except RemoteNotFoundError:
            if missing_ok:
                return
            raise RemoteNotFoundError(
                "no such file", remote=self.name, operation="delete", path=path
            ) from None
        if info.is_dir:
            raise RemoteError("is a folder; use delete_tree", remote=self.name, path=path)

        def remove() -> None:
            try:
                smbclient.remove(self.unc(path), **self._kwargs)
            except SMBOSError as error:
                if not (missing_ok and error.errno == errno.ENOENT):
                    raise

        self._call("delete", path, remove, idempotent=False)

    def delete_tree(self, path: str) -> None:
        path = normalize_path(path)
        if path == "/":
            raise RemoteError("refusing to delete the remote's root", remote=self.name)

        def rmtree() -> None:
            try:
                smbclient.shutil.rmtree(self.unc(path), **self._kwargs)
            except SMBOSError as error:
                if error.errno != errno.ENOENT:
                    raise

        self._call("delete tree", path, rmtree, idempotent=True)

    def free_space(self) -> int | None:
        # FileFsFullSizeInformation: the space available to this user (quotas included).
        result = self._call(
            "free space",
            "/",
            lambda: smbclient.stat_volume(self.unc("/"), **self._kwargs),
            idempotent=True,
        )
        return int(result.caller_available_size)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            smbclient.reset_connection_cache(connection_cache=self._cache)


def _short(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]


class _SmbHandle:
    """An open file with raw, timed READ/WRITE requests on its smbprotocol ``Open``."""

    def __init__(
        self, remote: SmbRemote, path: str, mode: str, label: str | None = None, **open_kwargs: Any
    ) -> None:
        self.remote = remote
        self.path = label or path  # what errors name: the final path, not a temp name
        operation = {"r": "open for read", "r+": "open for update"}.get(mode, "open for write")

        def open_raw() -> Any:
            return smbclient.open_file(
                remote.unc(path), mode=mode + "b", buffering=0, **open_kwargs, **remote._kwargs
            )

        self.raw = remote._call(operation, self.path, open_raw, idempotent=mode == "r")
        self.open = self.raw.fd
        self.connection = self.open.connection
        self.session_id = self.open.tree_connect.session.session_id
        self.tree_id = self.open.tree_connect.tree_connect_id
        self.fast_writes = isinstance(
            self.connection, WriteConnection
        ) and self.connection.can_send_write(self.open.tree_connect.session, self.open.tree_connect)

    def fail(self, error: BaseException, operation: str) -> RemoteError:
        return self.remote.error(error, operation, self.path)

    def send(self, message: Any, charge: int) -> Any:
        """Send a request (see :meth:`_send_with_credits`)."""
        return self._send_with_credits(
            lambda extra: self.connection.send(
                message, self.session_id, self.tree_id, credit_request=extra
            ),
            charge,
        )

    def _send_with_credits(self, send: Callable[[int], Any], charge: int) -> Any:
        """Call ``send(credit_request)``, asking for extra credits while the window is too
        small to keep :attr:`SmbRemote.pipeline` requests in flight."""
        window = self.connection.sequence_window
        for _ in range(8):
            self.ensure_credits(charge)
            wanted = charge * self.remote.pipeline * 2
            extra = charge * 2 if window["high"] - window["low"] < wanted else charge
            try:
                return send(min(extra, 512))
            except SMBException as error:
                # Another thread took the credits between our check and the send.
                if "credits" not in str(error):
                    raise
        raise RemoteConnectionError(
            "the server does not grant enough credits",
            remote=self.remote.name,
            operation="send",
            path=self.path,
        )

    def credits_available(self) -> int:
        window = self.connection.sequence_window
        return window["high"] - window["low"]

    def ensure_credits(self, charge: int) -> None:
        """Ask for credits (an ECHO) until a request of ``charge`` credits fits."""
        for _ in range(8):
            if self.credits_available() >= charge:
                return
            try:
                self.connection.echo(
                    sid=self.session_id, timeout=self.remote.timeout, credit_request=charge
                )
            except Exception as error:
                raise self.fail(error, "request credits") from None
        raise RemoteConnectionError(
            f"the server grants too few credits for {charge * CREDIT_UNIT} byte requests",
            remote=self.remote.name,
            operation="write",
            path=self.path,
        )

    def receive(self, request: Any, operation: str) -> Any:
        try:
            return self.connection.receive(request, timeout=self.remote.timeout)
        except Exception as error:
            raise self.fail(error, operation) from None

    def read_request(self, offset: int, length: int) -> Any:
        """Send a READ of up to ``length`` bytes (at most the negotiated read size)."""
        length = min(length, self.connection.max_read_size)
        try:
            message, _ = self.open.read(offset, length, send=False)
            return self.send(message, _charge(length))
        except RemoteError:
            raise
        except Exception as error:
            raise self.fail(error, "read") from None

    def read_result(self, request: Any) -> bytes:
        """The data of a READ sent by :meth:`read_request` (empty at end of file)."""
        try:
            response = self.connection.receive(request, timeout=self.remote.timeout)
        except SMBResponseException as error:
            if error.status == NtStatus.STATUS_END_OF_FILE:
                return b""
            raise self.fail(error, "read") from None
        except Exception as error:
            raise self.fail(error, "read") from None
        result = SMB2ReadResponse()
        result.unpack(response["data"].get_value())
        return result["buffer"].get_value()

    def read_at(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes (at most the negotiated read size) at ``offset``."""
        return self.read_result(self.read_request(offset, length))

    def write_request(self, offset: int, data: memoryview | bytes) -> Any:
        try:
            if self.fast_writes:
                connection = self.connection
                return self._send_with_credits(
                    lambda extra: connection.send_write(
                        self.session_id,
                        self.tree_id,
                        self.open.file_id,
                        offset,
                        data,
                        _charge(len(data)),
                        extra,
                    ),
                    _charge(len(data)),
                )
            message, _ = self.open.write(data, offset, send=False)
            return self.send(message, _charge(len(data)))
        except RemoteError:
            raise
        except Exception as error:
            raise self.fail(error, "write") from None

    def write_result(self, request: Any, expected: int) -> None:
        response = self.receive(request, "write")
        result = SMB2WriteResponse()
        result.unpack(response["data"].get_value())
        written = result["count"].get_value()
        if written != expected:
            raise RemoteNoSpaceError(
                f"the server stored {written} of {expected} bytes",
                remote=self.remote.name,
                operation="write",
                path=self.path,
            )

    def flush(self) -> None:
        self.remote._call("flush", self.path, self.open.flush, idempotent=True)

    def close(self) -> None:
        self.remote._call("close", self.path, self.raw.close, idempotent=False)

    def close_quietly(self) -> None:
        with contextlib.suppress(Exception), self.remote._watchdog():
            self.raw.close()


def _charge(length: int) -> int:
    return max(1, (length + CREDIT_UNIT - 1) // CREDIT_UNIT)


class _SmbWriter(RemoteWriter):
    """Streams to a hidden temp file with pipelined WRITEs, then replaces the final name."""

    def __init__(self, remote: SmbRemote, path: str) -> None:
        super().__init__()
        self._remote = remote
        self._path = path
        folder, name = parent_path(path), path.rsplit("/", 1)[1]
        self._temp = join_path(folder, make_temp_name(name))
        try:
            self._handle = _SmbHandle(remote, self._temp, "x", path, share_access="")
        except RemoteNotFoundError:
            remote.makedirs(folder)
            self._handle = _SmbHandle(remote, self._temp, "x", path, share_access="")
        connection = self._handle.connection
        self._chunk = max(CREDIT_UNIT, min(remote.write_chunk, connection.max_write_size))
        self._buffer = bytearray(self._chunk)
        self._filled = 0
        self._offset = 0
        self._in_flight: collections.deque[tuple[Any, int]] = collections.deque()

    def _send(self, data: memoryview) -> None:
        charge = _charge(len(data))
        while self._in_flight and (
            len(self._in_flight) >= self._remote.pipeline
            or self._handle.credits_available() < charge
        ):
            self._handle.write_result(*self._in_flight.popleft())
        self._handle.ensure_credits(charge)
        self._in_flight.append((self._handle.write_request(self._offset, data), len(data)))
        self._offset += len(data)

    def _write(self, data: memoryview) -> None:
        while data:
            if self._filled == 0 and len(data) >= self._chunk:
                # Whole chunks go straight from the caller's buffer: smbprotocol copies the
                # payload into the request when it is sent.
                self._send(data[: self._chunk])
                data = data[self._chunk :]
                continue
            take = min(len(data), self._chunk - self._filled)
            self._buffer[self._filled : self._filled + take] = data[:take]
            self._filled += take
            data = data[take:]
            if self._filled == self._chunk:
                self._send(memoryview(self._buffer))
                self._filled = 0

    def _drain(self) -> None:
        while self._in_flight:
            self._handle.write_result(*self._in_flight.popleft())

    def _commit(self) -> None:
        if self._filled:
            self._send(memoryview(self._buffer)[: self._filled])
            self._filled = 0
        self._drain()
        self._handle.flush()
        self._handle.close()
        remote = self._remote
        remote._call(
            "commit",
            self._path,
            lambda: remote._replace(self._temp, self._path),
            idempotent=False,
        )

    def _abort(self) -> None:
        self._in_flight.clear()
        self._handle.close_quietly()
        remote = self._remote
        with contextlib.suppress(Exception), remote._watchdog():
            smbclient.remove(remote.unc(self._temp), **remote._kwargs)


class _SmbRangeReader(io.RawIOBase):
    """Reads ``[offset, offset+length)`` with positional READs (no shared cursor), keeping
    :data:`READ_AHEAD` READ requests ahead of the consumer."""

    def __init__(self, handle: _SmbHandle, offset: int, length: int | None) -> None:
        super().__init__()
        self._handle = handle
        self._end = None if length is None else offset + length
        self._next = offset  # where the next READ request starts
        self._chunk = min(handle.connection.max_read_size, READ_CHUNK)
        self._pending: collections.deque[tuple[Any, int]] = collections.deque()
        self._data = memoryview(b"")
        self._at_end = False

    def readable(self) -> bool:
        return True

    def _request_ahead(self) -> None:
        while not self._at_end and len(self._pending) < READ_AHEAD:
            length = self._chunk
            if self._end is not None:
                length = min(length, self._end - self._next)
            if length <= 0:
                return
            if self._pending and self._handle.credits_available() < _charge(length) + 1:
                return  # wait for answers (and their credits) before asking for more
            self._pending.append((self._handle.read_request(self._next, length), length))
            self._next += length

    def _next_block(self) -> bool:
        """Load the next answered READ into ``_data``; False at the end of the range."""
        self._request_ahead()
        if self._at_end or not self._pending:
            return False
        request, wanted = self._pending.popleft()
        data = self._handle.read_result(request)
        if len(data) < wanted:  # a short read is the end of the file
            self._at_end = True
        self._request_ahead()
        self._data = memoryview(data)
        return bool(data)

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        if not self._data and not self._next_block():
            return 0
        count = min(len(buffer), len(self._data))
        buffer[:count] = self._data[:count]
        self._data = self._data[count:]
        return count

    def readall(self) -> bytes:
        # io's default reads 8 KiB at a time; take whole answered READs instead.
        chunks = [bytes(self._data)]
        self._data = memoryview(b"")
        while self._next_block():
            chunks.append(bytes(self._data))
            self._data = memoryview(b"")
        return b"".join(chunks)

    def close(self) -> None:
        if not self.closed:
            # Collect the answers to READs sent ahead, so they do not linger in the
            # connection's table of outstanding requests.
            while self._pending:
                request, _ = self._pending.popleft()
                with contextlib.suppress(RemoteError):
                    self._handle.read_result(request)
            self._handle.close_quietly()
        super().close()


class _SmbFile(RemoteFile):
    """An existing file opened read/write for in-place updates."""

    def __init__(self, remote: SmbRemote, path: str) -> None:
        self._remote = remote
        self._path = path
        self._handle = _SmbHandle(remote, path, "r+", share_access="rwd")
        self._closed = False

    def read_at(self, offset: int, length: int) -> bytes:
        chunks = []
        while length > 0:
            data = self._handle.read_at(offset, length)
            if not data:
                break
            chunks.append(data)
            offset += len(data)
            length -= len(data)
        return b"".join(chunks)

    def write_at(self, offset: int, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        step = self._handle.connection.max_write_size
        in_flight: collections.deque[tuple[Any, int]] = collections.deque()
        for start in range(0, len(view), step):
            piece = view[start : start + step]
            while in_flight and (
                len(in_flight) >= self._remote.pipeline
                or self._handle.credits_available() < _charge(len(piece))
            ):
                self._handle.write_result(*in_flight.popleft())
            self._handle.ensure_credits(_charge(len(piece)))
            in_flight.append((self._handle.write_request(offset + start, piece), len(piece)))
        while in_flight:
            self._handle.write_result(*in_flight.popleft())

    def size(self) -> int:
        # The open handle caches the size it had when opened; ask the server.
        return self._remote._call(
            "stat",
            self._path,
            lambda: smbclient.stat(self._remote.unc(self._path), **self._remote._kwargs).st_size,
            idempotent=True,
        )

    def truncate(self, size: int) -> None:
        self._remote._call(
            "truncate", self._path, lambda: self._handle.raw.truncate(size), idempotent=True
        )

    def flush(self) -> None:
        self._handle.flush()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.flush()
        finally:
            self._handle.close()
