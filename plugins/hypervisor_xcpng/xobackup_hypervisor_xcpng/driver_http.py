"""XAPI's streaming HTTP handlers from the client side: downloads and uploads (§4).

XAPI answers ``/export`` and ``/export_raw_vdi`` with ``200 OK``, no Content-Length, and a body
that ends when the host closes the socket, so a dropped connection looks like a normal end of
file at the HTTP level (xapi-protocol.md §4.1). A transfer is therefore only accepted when
(1) the task XAPI drove for it ended in ``success`` and (2) the payload is complete as far as
its own framing tells (the VHD's BAT and trailing footer, the raw size, the XVA's tar end
blocks). Memory stays bounded: bytes go straight from the socket into the caller's buffer.
"""

from __future__ import annotations

import http.client
import io
import logging
import socket
import time
import zlib
from collections.abc import Callable
from typing import Any, BinaryIO
from urllib.parse import urlencode, urlsplit

import zstandard

from xobackup_core.errors import FormatError, HypervisorError
from xobackup_core.formats.vhd_structs import (
    FOOTER_COOKIE,
    FOOTER_SIZE,
    HEADER_SIZE,
    SECTOR_SIZE,
    UNUSED_BAT_ENTRY,
    bitmap_size,
    parse_bat,
    parse_footer,
    parse_header,
)
from xobackup_hypervisor_xcpng.driver_rpc import (
    Endpoint,
    XapiConnectionError,
    XapiFailure,
    XapiSession,
    XapiTimeoutError,
    describe_os_error,
    parse_error_page,
)

log = logging.getLogger(__name__)

MAX_REDIRECTS = 5
UNKNOWN_LENGTH = 1125899906842624
"""1 PiB: the Content-Length XO announces for an upload of unknown size (§4.1)."""
_SETTLE_TIMEOUT = 60.0
_MAX_HEAD = 64 * 1024 * 1024


class XapiStreamError(XapiConnectionError):
    """A transfer ended before its payload was complete."""


# -- payload checks ----------------------------------------------------------------------------
class PayloadCheck:
    """Watches the bytes of a transfer and says, at the end, whether the payload is complete."""

    def __init__(self) -> None:
        self.total = 0

    def feed(self, data: memoryview) -> None:
        """Account for the next bytes of the stream."""
        self.total += len(data)

    def problem(self) -> str | None:
        """Why the stream is incomplete, or None when it is whole."""
        return None


class RawCheck(PayloadCheck):
    """A raw disk: exactly ``size`` bytes."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def problem(self) -> str | None:
        if self.total != self.size:
            return f"received {self.total} bytes of a {self.size}-byte raw disk"
        return None


class VhdCheck(PayloadCheck):
    """A dynamic/differencing VHD: the BAT says where the last block ends, then the footer."""

    def __init__(self) -> None:
        super().__init__()
        self._head = bytearray()
        self._tail = b""
        self.expected: int | None = None
        self._error: str | None = None
        self._need = FOOTER_SIZE

    def feed(self, data: memoryview) -> None:
        used = 0
        # keep only the stream's prefix that the headers and the BAT need (not whole reads)
        while self.expected is None and self._error is None and used < len(data):
            take = min(len(data) - used, max(0, self._need - len(self._head)))
            if take == 0:
                break
            self._head += data[used : used + take]
            used += take
            self._parse()
        self.total += len(data)
        if len(data) >= FOOTER_SIZE:
            self._tail = bytes(data[-FOOTER_SIZE:])
        else:
            self._tail = (self._tail + bytes(data))[-FOOTER_SIZE:]

    def _parse(self) -> None:
        head = bytes(self._head)
        try:
            if len(head) < FOOTER_SIZE:
                self._need = FOOTER_SIZE
                return
            footer = parse_footer(head[:FOOTER_SIZE], path="VHD stream")
            if footer.disk_type == 2:  # fixed: data then footer
                self.expected = footer.current_size + FOOTER_SIZE
                self._head = bytearray()
                return
            start = footer.data_offset
            if start + HEADER_SIZE > _MAX_HEAD:
                self._error = f"dynamic header at {start} is too far in the stream"
                return
            if len(head) < start + HEADER_SIZE:
                self._need = start + HEADER_SIZE
                return
            header = parse_header(head[start : start + HEADER_SIZE], path="VHD stream")
            entries = header.max_table_entries
            bat_end = header.table_offset + entries * 4
            if bat_end > _MAX_HEAD:
                self._error = f"BAT ending at {bat_end} is too far in the stream"
                return
            if len(head) < bat_end:
                self._need = bat_end
                return
            bat = parse_bat(head[header.table_offset : bat_end], entries, path="VHD stream")
        except FormatError as error:
            self._error = str(error)
            return
        block_bytes = bitmap_size(header.block_size) + header.block_size
        ends = [sector * SECTOR_SIZE + block_bytes for sector in bat if sector != UNUSED_BAT_ENTRY]
        bat_bytes = -(-entries * 4 // SECTOR_SIZE) * SECTOR_SIZE
        self.expected = max([header.table_offset + bat_bytes, *ends]) + FOOTER_SIZE
        self._head = bytearray()

    def problem(self) -> str | None:
        if self._error is not None:
            return self._error
        if self.expected is None:
            return f"the stream ended after {self.total} bytes, inside the VHD headers"
        if self.total < self.expected:
            return f"received {self.total} bytes of a {self.expected}-byte VHD"
        if not self._tail.startswith(FOOTER_COOKIE):
            return "the VHD does not end with its footer"
        return None


class XvaCheck(PayloadCheck):
    """An XVA (tar) ends with two zero blocks; compressed, its gzip/zstd frame must end too."""

    def __init__(self, compression: str) -> None:
        super().__init__()
        self.compression = compression
        self._tail = b""
        self._decoder: Any = None
        if compression == "zstd":
            self._decoder = zstandard.ZstdDecompressor().decompressobj()
        elif compression == "gzip":
            self._decoder = zlib.decompressobj(wbits=31)
        self._error: str | None = None

    def feed(self, data: memoryview) -> None:
        self.total += len(data)
        if self._decoder is not None:
            if self._error is not None or self._decoder.eof:
                return
            try:
                plain = self._decoder.decompress(bytes(data))
            except (zlib.error, zstandard.ZstdError) as error:
                self._error = f"the {self.compression} stream is corrupt: {error}"
                return
            self._keep(plain)
        else:
            self._keep(data)

    def _keep(self, data: bytes | memoryview) -> None:
        if len(data) >= 1024:
            self._tail = bytes(data[-1024:])
        elif data:
            self._tail = (self._tail + bytes(data))[-1024:]

    def problem(self) -> str | None:
        if self._error is not None:
            return self._error
        if self._decoder is not None and not self._decoder.eof:
            return f"the {self.compression} stream ended early ({self.total} bytes received)"
        if len(self._tail) < 1024 or any(self._tail):
            return f"the XVA does not end with the tar end blocks ({self.total} bytes received)"
        return None


# -- requests ------------------------------------------------------------------------------------
def _target(location: str, fallback: Endpoint) -> tuple[Endpoint, str]:
    parts = urlsplit(location)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    if not parts.hostname:
        return fallback, path
    scheme = parts.scheme or fallback.scheme
    port = parts.port or (443 if scheme == "https" else 80)
    return Endpoint(scheme, parts.hostname, port), path


def _read_small(response: http.client.HTTPResponse) -> bytes:
    try:
        return response.read(65536)
    except (OSError, http.client.HTTPException):
        return b""


def _settled_error(
    session: XapiSession, task: str, what: str, wait: float
) -> HypervisorError | None:
    """The task's error if it failed (waiting up to ``wait`` s for it to settle)."""
    deadline = time.monotonic() + wait
    while True:
        record = session.task_status(task)
        if record is None:
            return None
        status = record.get("status")
        if status in ("failure", "cancelled"):
            info = list(record.get("error_info") or []) or ["TASK_CANCELLED", task]
            return session.error(what, XapiFailure(info))
        if status == "success" or time.monotonic() >= deadline:
            return None
        time.sleep(0.05)


def _http_error(
    session: XapiSession, task: str, what: str, status: int, body: bytes
) -> HypervisorError:
    error = _settled_error(session, task, what, 2.0)
    if error is not None:
        return error
    description = parse_error_page(body)
    if description:
        return session.error(what, XapiFailure(description))
    if status == 401:
        return HypervisorError(f"{session.endpoint}: {what}: the host refused the session (401)")
    return HypervisorError(f"{session.endpoint}: {what}: HTTP {status}")


class XapiDownload(io.RawIOBase):
    """A streaming download from a XAPI HTTP handler, read by the engine like a file.

    Reading past the end waits for the task and checks the payload: a failed task or an
    incomplete payload raises :class:`HypervisorError`. Closing before the end cancels the
    task and closes the connection.
    """

    def __init__(
        self,
        session: XapiSession,
        path: str,
        query: dict[str, str],
        *,
        what: str,
        check: PayloadCheck,
        endpoint: Endpoint | None = None,
        detect_embedded_error: bool = False,
        read_timeout: float | None = None,
    ) -> None:
        super().__init__()
        self.session = session
        self.what = what
        self.check = check
        self.bytes_read = 0
        self._read_timeout = read_timeout or session.timeout
        self._pending = b""
        self._settled = False
        self._error: BaseException | None = None
        self._sock: socket.socket | None = None
        self._response: http.client.HTTPResponse | None = None
        self._conn: http.client.HTTPConnection | None = None
        self.task = session.call("task.create", f"xobackup {what}", "")
        try:
            self._open(path, query, endpoint or session.endpoint)
            if detect_embedded_error:
                self._detect_embedded_error()
        except BaseException:
            self._abort()
            raise

    # -- opening --------------------------------------------------------------------------------
    def _open(self, path: str, query: dict[str, str], endpoint: Endpoint) -> None:
        session = self.session
        relogged = False
        target = f"{path}?{urlencode({**query, 'task_id': self.task})}"
        for _ in range(MAX_REDIRECTS):
            url = f"{target}&{urlencode({'session_id': session.ref})}"
            conn = session.connection(endpoint, self._read_timeout)
            try:
                conn.putrequest("GET", url, skip_accept_encoding=True)
                conn.endheaders()
                sock = conn.sock
                response = conn.getresponse()
            except (OSError, http.client.HTTPException) as error:
                conn.close()
                raise describe_os_error(error, endpoint, self._read_timeout) from None
            if response.status in (301, 302, 303, 307, 308):
                location = response.getheader("Location", "")
                conn.close()
                # the host that sees the SR serves the transfer; keep the same query (§4.1)
                endpoint, moved = _target(location, endpoint)
                target = _strip_session(moved) if moved else target
                continue
            if response.status == 401 and not relogged:
                conn.close()
                relogged = True
                session._relogin(session._generation)
                continue
            if response.status != 200:
                body = _read_small(response)
                conn.close()
                raise _http_error(session, self.task, self.what, response.status, body)
            self._conn, self._response, self._sock = conn, response, sock
            return
        raise HypervisorError(f"{session.endpoint}: {self.what}: too many redirects")

    def _detect_embedded_error(self) -> None:
        # xen-api #4603: the 200 header goes out before the VDI is attached; an attach failure
        # then arrives as a whole "HTTP/1.1 500" response inside the body (§4.1)
        head = b""
        while len(head) < 5:
            piece = self._raw_read(5 - len(head))
            if not piece:
                break
            head += piece
        if head.startswith(b"HTTP/"):
            rest = _read_small(self._response) if self._response else b""  # type: ignore[arg-type]
            raise _http_error(self.session, self.task, self.what, 500, head + rest)
        self._pending = head

    def _raw_read(self, size: int) -> bytes:
        assert self._response is not None
        try:
            return self._response.read(size)
        except (OSError, http.client.HTTPException) as error:
            raise describe_os_error(error, self.session.endpoint, self._read_timeout) from None

    # -- reading --------------------------------------------------------------------------------
    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:  # type: ignore[override]
        if self._error is not None:
            raise self._error
        if self._settled or self._response is None:
            return 0
        view = memoryview(buffer).cast("B")
        count = 0
        if self._pending:
            count = min(len(view), len(self._pending))
            view[:count] = self._pending[:count]
            self._pending = self._pending[count:]
        if count < len(view):
            try:
                got = self._response.readinto(view[count:])
            except (OSError, http.client.HTTPException) as error:
                self._fail(error)
            if got == 0 and count == 0:
                self._finish()
                return 0
            count += got
        self.check.feed(view[:count])
        self.bytes_read += count
        return count

    def read(self, size: int | None = -1) -> bytes:
        """Up to ``size`` bytes (one allocation, straight from the socket); b"" at the end."""
        if size is None or size < 0:
            return self.readall()
        if self._error is not None:
            raise self._error
        if self._settled or self._response is None or size == 0:
            return b""
        head = b""
        if self._pending:
            head, self._pending = self._pending[:size], self._pending[size:]
        data = b""
        if len(head) < size:
            try:
                data = self._response.read(size - len(head))
            except (OSError, http.client.HTTPException) as error:
                self._fail(error)
            if not data and not head:
                self._finish()
                return b""
        data = head + data if head else data
        self.check.feed(memoryview(data))
        self.bytes_read += len(data)
        return data

    def _fail(self, error: BaseException) -> None:
        reason = describe_os_error(error, self.session.endpoint, self._read_timeout)
        if isinstance(reason, XapiTimeoutError):
            message = f"{self.what}: no data for {self._read_timeout:g} s"
        else:
            message = f"{self.what}: the connection broke after {self.bytes_read} bytes"
        task_error = None
        if not isinstance(reason, XapiTimeoutError):
            task_error = _settled_error(self.session, self.task, self.what, 2.0)
        self._abort()
        if task_error is not None:
            failure = HypervisorError(
                f"{message}: {task_error}", code=task_error.code, params=task_error.params
            )
        else:
            failure = type(reason)(f"{self.session.endpoint}: {message}")
        self._error = failure
        raise failure

    def _finish(self) -> None:
        self._close_connection()
        try:
            self.session.wait_task(self.task, timeout=_SETTLE_TIMEOUT, what=self.what)
        except HypervisorError as error:
            self._error = error
            self._forget_task()
            raise
        problem = self.check.problem()
        self._forget_task()
        if problem is not None:
            self._error = XapiStreamError(
                f"{self.session.endpoint}: {self.what}: incomplete transfer: {problem}"
            )
            raise self._error
        self._settled = True

    def task_progress(self) -> float:
        """The task's progress (0..1) as XAPI reports it."""
        record = self.session.task_status(self.task)
        return float(record.get("progress") or 0.0) if record else 0.0

    # -- closing --------------------------------------------------------------------------------
    def _close_connection(self) -> None:
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for item in (self._response, self._conn, self._sock):
            if item is not None:
                try:
                    item.close()
                except OSError:
                    pass
        self._response = self._conn = self._sock = None

    def _forget_task(self) -> None:
        if self.task:
            self.session.destroy_task(self.task)
            self.task = ""

    def _abort(self) -> None:
        if self.task:
            self.session.cancel_task(self.task)
        self._close_connection()
        self._forget_task()

    def close(self) -> None:
        """Stop the transfer (cancelling the task when the end was not reached)."""
        if not self.closed:
            if not self._settled and self._error is None:
                self._abort()
            else:
                self._close_connection()
        super().close()


def _strip_session(path: str) -> str:
    parts = urlsplit(path)
    query = "&".join(p for p in parts.query.split("&") if not p.startswith("session_id="))
    return parts.path + (f"?{query}" if query else "")


# -- uploads -------------------------------------------------------------------------------------
class _Prefixed:
    """A stream with some bytes already read from it put back in front."""

    def __init__(self, head: bytes, rest: BinaryIO) -> None:
        self.head = head
        self.rest = rest

    def read(self, size: int) -> bytes:
        if self.head:
            piece, self.head = self.head[:size], self.head[size:]
            return piece
        return self.rest.read(size)


def vhd_length_from_head(stream: BinaryIO) -> tuple[int, _Prefixed]:
    """The total length of a VHD stream, found from its headers and BAT (read ahead)."""
    check = VhdCheck()
    head = bytearray()
    while check.expected is None:
        piece = stream.read(1024 * 1024)
        if not piece:
            break
        head += piece
        check.feed(memoryview(piece))
        if check._error is not None:
            break
    if check.expected is None:
        raise HypervisorError(
            "the VHD to upload is not valid: " + (check.problem() or "headers not found")
        )
    return check.expected, _Prefixed(bytes(head), stream)


def upload(
    session: XapiSession,
    path: str,
    query: dict[str, str],
    stream: Any,
    length: int | None,
    *,
    what: str,
    endpoint: Endpoint | None = None,
    task_timeout: float,
    progress: Callable[[int], None] | None = None,
) -> Any:
    """PUT ``stream`` to a XAPI handler and return the task's result.

    XAPI refuses chunked uploads, so the body has an exact Content-Length; when ``length`` is
    None the upload announces 1 PiB and shuts its side of the socket after the last byte, as
    XO does (§4.1) — only usable where the payload frames itself (an XVA).
    """
    task = session.call("task.create", f"xobackup {what}", "")
    endpoint = endpoint or session.endpoint
    try:
        return _upload(
            session,
            task,
            path,
            query,
            stream,
            length,
            what=what,
            endpoint=endpoint,
            task_timeout=task_timeout,
            progress=progress,
        )
    except BaseException:
        session.cancel_task(task)
        raise
    finally:
        session.destroy_task(task)


def _upload(
    session: XapiSession,
    task: str,
    path: str,
    query: dict[str, str],
    stream: Any,
    length: int | None,
    *,
    what: str,
    endpoint: Endpoint,
    task_timeout: float,
    progress: Callable[[int], None] | None,
) -> Any:
    url = f"{path}?{urlencode({**query, 'task_id': task, 'session_id': session.ref})}"
    conn = session.connection(endpoint, session.timeout)
    sent = 0
    send_error: BaseException | None = None
    try:
        try:
            conn.putrequest("PUT", url, skip_accept_encoding=True)
            conn.putheader("Content-Length", str(length if length is not None else UNKNOWN_LENGTH))
            conn.putheader("Content-Type", "application/octet-stream")
            conn.endheaders()
        except (OSError, http.client.HTTPException) as error:
            raise describe_os_error(error, endpoint, session.timeout) from None
        sock = conn.sock
        assert sock is not None
        limit = length if length is not None else UNKNOWN_LENGTH
        while sent < limit:
            data = stream.read(min(1024 * 1024, limit - sent))
            if not data:
                break
            try:
                sock.sendall(data)
            except OSError as error:
                send_error = error
                break
            sent += len(data)
            if progress is not None:
                progress(sent)
        if send_error is None and length is not None and sent < length:
            conn.close()
            raise HypervisorError(
                f"{what}: the data ended after {sent} of {length} bytes; nothing was imported"
            )
        if length is None and send_error is None:
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        status, body = 0, b""
        if not isinstance(send_error, (socket.timeout, TimeoutError)):
            try:
                response = conn.getresponse()
                status = response.status
                body = _read_small(response)
            except (OSError, http.client.HTTPException) as error:
                if send_error is None:
                    send_error = error
    finally:
        conn.close()
    if status in (301, 302, 303, 307, 308):
        raise HypervisorError(
            f"{session.endpoint}: {what}: the host redirected the upload to another host "
            "after the data was sent"
        )
    if status not in (0, 200):
        raise _http_error(session, task, what, status, body)
    if send_error is not None:
        detail = describe_os_error(send_error, endpoint, session.timeout)
        task_error = None
        if not isinstance(detail, XapiTimeoutError):  # a stuck host will not settle it either
            task_error = _settled_error(session, task, what, 5.0)
        if task_error is not None:
            raise HypervisorError(
                f"{what}: the upload stopped after {sent} bytes: {task_error}",
                code=task_error.code,
                params=task_error.params,
            )
        raise type(detail)(f"{what}: the upload stopped after {sent} bytes: {detail}")
    return session.wait_task(task, timeout=task_timeout, what=what)
