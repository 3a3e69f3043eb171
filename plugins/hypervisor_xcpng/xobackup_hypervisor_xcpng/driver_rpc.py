"""The XAPI session: JSON-RPC (or XML-RPC) calls over HTTP(S), with XAPI's failure handling.

One :class:`XapiSession` per configured server. It logs in, follows ``HOST_IS_SLAVE`` to the
pool master, logs in again on ``SESSION_INVALID``, retries the error codes XAPI documents as
transient (xapi-protocol.md §7), bounds every call with a timeout, and turns failures into
:class:`~xobackup_core.errors.HypervisorError` carrying XAPI's code. The session reference is
a credential (it also authenticates the HTTP transfers, §1.4), so it never appears in a message.

JSON-RPC is tried first because it carries int64 fields as numbers and needs no coercion;
hosts without it answer ``/jsonrpc`` with XML and the session switches to XML-RPC (§1.3), as
Xen Orchestra does. The official ``XenAPI`` SDK is not used: it has no per-call timeout, no
TLS fingerprint pinning and is XML-RPC only (§1.9).
"""

from __future__ import annotations

import hashlib
import http.client
import ipaddress
import json
import logging
import re
import select
import socket
import ssl
import threading
import time
import xmlrpc.client
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from xobackup_core.errors import HypervisorError

log = logging.getLogger(__name__)

NULL_REF = "OpaqueRef:NULL"
ORIGINATOR = "xobackup"

RETRYABLE_CODES = frozenset(
    {
        "OTHER_OPERATION_IN_PROGRESS",
        "VDI_IN_USE",
        "TOO_MANY_PENDING_TASKS",
        "TOO_MANY_STORAGE_MIGRATES",
        "SR_BACKEND_FAILURE_46",
        "SR_BACKEND_FAILURE_109",
        "SR_BACKEND_FAILURE_201",
    }
)
"""Codes after which the same call may succeed a little later (xapi-protocol.md §7)."""

_MAX_RPC_REPLY = 512 * 1024 * 1024
_XMLRPC_INT_LIMIT = 2**31


class XapiConnectionError(HypervisorError):
    """The host could not be reached, or closed the connection without an answer."""

    transient = True

    def __init__(self, message: str, *, refused: bool = False) -> None:
        super().__init__(message, code=None)
        self.refused = refused
        """Nothing listens there: the request was never delivered (safe to send elsewhere)."""


class XapiTimeoutError(XapiConnectionError):
    """A call, a task or a transfer did not finish within its timeout."""


class XapiFailure(Exception):
    """A ``Failure`` reply, before it becomes a :class:`HypervisorError` (internal)."""

    def __init__(self, description: list[str]) -> None:
        self.code = str(description[0]) if description else "UNKNOWN_ERROR"
        self.params = [str(p) for p in description[1:]]
        super().__init__(self.code)


def is_null(ref: Any) -> bool:
    """Whether a ref field is unset (``OpaqueRef:NULL``, empty, or a leaked ``Ref:`` id, §1.5)."""
    return not isinstance(ref, str) or ref in ("", NULL_REF) or ref.startswith("Ref:")


def normalize_fingerprint(value: str) -> str:
    """``AB:CD:...`` or ``abcd...`` (SHA-256, 64 hex digits) as lowercase hex."""
    text = value.strip().lower().replace(":", "").replace(" ", "")
    if text.startswith("sha256"):
        text = text[6:].lstrip("=/")
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise HypervisorError(
            f"fingerprint {value!r} is not a SHA-256 fingerprint (64 hex digits, colons allowed)"
        )
    return text


@dataclass(frozen=True)
class Endpoint:
    """Where a host's XAPI listens: scheme, host name or address, port."""

    scheme: str
    host: str
    port: int

    @classmethod
    def from_url(cls, url: str) -> Endpoint:
        """Parse ``https://host[:port]`` (a bare host name means HTTPS)."""
        if "://" not in url:
            url = f"https://{url}"
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise HypervisorError(f"server url {url!r} is not an http:// or https:// URL")
        default = 443 if parts.scheme == "https" else 80
        return cls(parts.scheme, parts.hostname, parts.port or default)

    def with_address(self, address: str) -> Endpoint:
        """The endpoint of another pool host, reached like this one (§1.4: IPv6 is bare)."""
        address = address.strip()
        try:
            ipaddress.ip_address(address.strip("[]"))
            return Endpoint(self.scheme, address.strip("[]"), self.port)
        except ValueError:
            pass
        if "://" in address:
            other = Endpoint.from_url(address)
            return Endpoint(self.scheme, other.host, other.port)
        parts = urlsplit(f"//{address}")
        return Endpoint(self.scheme, parts.hostname or address, parts.port or self.port)

    @property
    def netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.scheme}://{self.netloc}"


class TlsPolicy:
    """How certificates are checked: a CA (system or ``ca_file``), a pinned SHA-256, or not."""

    def __init__(
        self, *, ca_file: str | None, fingerprint: str | None, allow_unauthorized: bool
    ) -> None:
        self.fingerprint = normalize_fingerprint(fingerprint) if fingerprint else None
        self.allow_unauthorized = allow_unauthorized
        self.ca_file = ca_file
        if ca_file is not None and not self.fingerprint and not allow_unauthorized:
            self._load()  # a wrong ca_file is a configuration error: say so at once
        self._context: ssl.SSLContext | None = None

    def _load(self) -> ssl.SSLContext:
        if self.fingerprint or self.allow_unauthorized:
            # the pin replaces the CA check; XAPI hosts normally present self-signed certs
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            return context
        try:
            return ssl.create_default_context(cafile=self.ca_file)
        except (OSError, ssl.SSLError) as error:
            raise HypervisorError(f"cannot load ca_file {self.ca_file!r}: {error}") from None

    @property
    def context(self) -> ssl.SSLContext:
        """The TLS context (made on first use: plain-HTTP pools never need one)."""
        if self._context is None:
            self._context = self._load()
        return self._context

    def connection(self, endpoint: Endpoint, timeout: float) -> http.client.HTTPConnection:
        """A new (not yet connected) connection to ``endpoint``."""
        if endpoint.scheme == "https":
            return _PinnedHTTPSConnection(
                endpoint.host,
                endpoint.port,
                timeout=timeout,
                context=self.context,
                fingerprint=self.fingerprint,
            )
        return http.client.HTTPConnection(endpoint.host, endpoint.port, timeout=timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS that also compares the peer certificate with a pinned SHA-256 fingerprint."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        timeout: float,
        context: ssl.SSLContext,
        fingerprint: str | None,
    ) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self._fingerprint = fingerprint

    def connect(self) -> None:
        super().connect()
        if self._fingerprint is None:
            return
        der = self.sock.getpeercert(binary_form=True) or b""  # type: ignore[union-attr]
        seen = hashlib.sha256(der).hexdigest()
        if seen != self._fingerprint:
            self.close()
            raise HypervisorError(
                f"the certificate of {self.host}:{self.port} has SHA-256 fingerprint "
                f"{_colon(seen)}, not the configured {_colon(self._fingerprint)}",
                code="CERTIFICATE_MISMATCH",
            )


def _colon(hexdigest: str) -> str:
    return ":".join(hexdigest[i : i + 2] for i in range(0, len(hexdigest), 2)).upper()


def peer_fingerprint(endpoint: Endpoint, timeout: float) -> str | None:
    """The SHA-256 fingerprint of the certificate a host presents (for error messages)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((endpoint.host, endpoint.port), timeout=timeout) as raw:
            with context.wrap_socket(raw, server_hostname=endpoint.host) as tls:
                der = tls.getpeercert(binary_form=True) or b""
    except OSError:
        return None
    return _colon(hashlib.sha256(der).hexdigest())


def describe_os_error(error: BaseException, endpoint: Endpoint, timeout: float) -> HypervisorError:
    """A transport exception as a clear error naming the host (never the session)."""
    if isinstance(error, HypervisorError):
        return error
    if isinstance(error, ssl.SSLCertVerificationError):
        seen = peer_fingerprint(endpoint, timeout)
        hint = f" (its SHA-256 fingerprint is {seen})" if seen else ""
        return HypervisorError(
            f"{endpoint}: the TLS certificate is not trusted: {error.verify_message}{hint}; "
            "set ca_file, or fingerprint to pin this certificate, or allow_unauthorized = true "
            "to skip the check",
            code="CERTIFICATE_UNTRUSTED",
        )
    if isinstance(error, (socket.timeout, TimeoutError)):
        return XapiTimeoutError(f"{endpoint}: no answer within {timeout:g} s")
    if isinstance(error, ssl.SSLError):
        return XapiConnectionError(f"{endpoint}: TLS error: {error}")
    if isinstance(error, http.client.RemoteDisconnected):
        return XapiConnectionError(f"{endpoint}: the host closed the connection without an answer")
    if isinstance(error, (http.client.HTTPException, OSError)):
        detail = getattr(error, "strerror", None) or str(error) or type(error).__name__
        return XapiConnectionError(
            f"{endpoint}: connection failed: {detail}",
            refused=isinstance(error, ConnectionRefusedError),
        )
    return XapiConnectionError(f"{endpoint}: {type(error).__name__}: {error}")


def _dropped(conn: http.client.HTTPConnection) -> bool:
    """Whether an idle kept-alive connection was closed by the host (readable = EOF)."""
    sock = conn.sock
    if sock is None:
        return True
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


def _quick_ack(conn: http.client.HTTPConnection) -> None:
    """Acknowledge the reply's first segment at once (Linux ``TCP_QUICKACK``).

    A server that writes a reply's header and body in two sends, with Nagle's algorithm on,
    holds the body until the header is acknowledged; the client's delayed ACK then costs
    ~40 ms per call. Quick ACKs remove that stall; elsewhere this is a no-op.
    """
    option = getattr(socket, "TCP_QUICKACK", None)
    if option is not None and conn.sock is not None:
        try:
            conn.sock.setsockopt(socket.IPPROTO_TCP, option, 1)
        except OSError:
            pass


def _json_default(value: Any) -> Any:
    if isinstance(value, xmlrpc.client.DateTime):
        return value.value
    raise TypeError(f"cannot send {type(value).__name__}")


def _from_xmlrpc(value: Any) -> Any:
    """XML-RPC values as JSON-RPC would give them (dates as XAPI's strings)."""
    if isinstance(value, xmlrpc.client.DateTime):
        text = value.value
        return text if text.endswith("Z") else text + "Z"
    if isinstance(value, list):
        return [_from_xmlrpc(v) for v in value]
    if isinstance(value, dict):
        return {k: _from_xmlrpc(v) for k, v in value.items()}
    return value


def _to_xmlrpc(value: Any) -> Any:
    # XML-RPC ints are 32-bit; XAPI parses int64 arguments sent as digit strings (§1.2)
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and not -_XMLRPC_INT_LIMIT <= value < _XMLRPC_INT_LIMIT:
        return str(value)
    if isinstance(value, dict):
        return {str(k): _to_xmlrpc(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_xmlrpc(v) for v in value]
    return value


def parse_task_result(text: str) -> Any:
    """A task's ``result``: an XML-RPC ``<value>`` fragment, even over JSON-RPC (§1.7)."""
    if not text:
        return ""
    try:
        params, _ = xmlrpc.client.loads(
            "<methodResponse><params><param>" + text + "</param></params></methodResponse>"
        )
    except Exception:  # expat raises several types; a plain string result is kept as-is
        return text
    return _from_xmlrpc(params[0])


def _idempotent(method: str) -> bool:
    name = method.rsplit(".", 1)[-1]
    return name.startswith("get_") or method in ("system.listMethods", "event.from")


class XapiSession:
    """A logged-in XAPI session on a pool master (thread-safe)."""

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        username: str,
        password: str,
        tls: TlsPolicy,
        timeout: float = 300.0,
        retries: int = 10,
        retry_delay: float = 5.0,
        protocol: str = "auto",
        task_poll: float = 0.5,
    ) -> None:
        if protocol not in ("auto", "jsonrpc", "xmlrpc"):
            raise HypervisorError(f"protocol {protocol!r} is not one of auto, jsonrpc, xmlrpc")
        self.endpoint = endpoint
        self.username = username
        self._password = password
        self.tls = tls
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.retry_delay = float(retry_delay)
        self.task_poll = float(task_poll)
        self.protocol = protocol
        self._ref: str | None = None
        self._generation = 0
        self._login_lock = threading.Lock()
        self._idle: list[tuple[Endpoint, http.client.HTTPConnection]] = []
        self._idle_lock = threading.Lock()
        self._rpc_id = 0
        self.host_addresses: list[str] = []
        """Addresses of the pool's hosts, to find the master again if it moves (§1.4)."""

    # -- public ---------------------------------------------------------------------------------
    @property
    def generation(self) -> int:
        """How many times this session logged in: refs read before a new login (XAPI
        restarted, the master moved) may no longer be valid."""
        return self._generation

    @property
    def ref(self) -> str:
        """The session reference (a credential: never log it)."""
        if self._ref is None:
            self.login()
        assert self._ref is not None
        return self._ref

    def login(self) -> None:
        """Log in, following ``HOST_IS_SLAVE`` to the master (and other pool hosts if needed)."""
        with self._login_lock:
            self._login_locked()

    def call(self, method: str, *args: Any) -> Any:
        """Call ``method`` with the session prepended; HypervisorError on failure."""
        relogged = False
        redirects = 0
        attempt = 0
        stale_retry = True
        failed_over = False
        while True:
            generation = self._generation
            try:
                return self._rpc(method, [self.ref, *args])
            except XapiFailure as failure:
                if failure.code == "SESSION_INVALID" and not relogged:
                    # expired, or XAPI restarted: one fresh login, then the same call (§1.4)
                    relogged = True
                    self._relogin(generation)
                    continue
                if failure.code == "HOST_IS_SLAVE" and redirects < 3 and failure.params:
                    redirects += 1
                    self._move_to(failure.params[0], generation)
                    continue
                if failure.code in RETRYABLE_CODES and attempt < self.retries:
                    attempt += 1
                    self._backoff(method, failure.code, attempt)
                    continue
                raise self.error(method, failure) from None
            except XapiConnectionError as error:
                if error.refused and not failed_over and self.host_addresses:
                    # the master is gone: another pool host names the new one (§1.4); the
                    # call never reached anyone, so it is sent again whatever it does
                    failed_over = True
                    self._relogin(generation)
                    continue
                if isinstance(error, XapiTimeoutError) or not _idempotent(method):
                    raise
                if stale_retry:
                    stale_retry = False
                    continue
                if attempt < min(self.retries, 3):
                    attempt += 1
                    self._backoff(method, "connection lost", attempt)
                    continue
                raise

    def call_async(
        self,
        method: str,
        *args: Any,
        timeout: float | None = None,
        progress: Callable[[float], None] | None = None,
    ) -> Any:
        """Run ``Async.<method>`` and wait for its task; the decoded result."""
        attempt = 0
        while True:
            task = self.call(f"Async.{method}", *args)
            try:
                return self.wait_task(task, timeout=timeout, progress=progress, what=method)
            except HypervisorError as error:
                if error.code in RETRYABLE_CODES and attempt < self.retries:
                    attempt += 1
                    self._backoff(method, error.code or "", attempt)
                    continue
                raise
            finally:
                self.destroy_task(task)

    def wait_task(
        self,
        task: str,
        *,
        timeout: float | None = None,
        progress: Callable[[float], None] | None = None,
        what: str = "task",
    ) -> Any:
        """Poll a task until it settles; its decoded result, or HypervisorError with its error."""
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        delay = min(0.02, self.task_poll)
        last = -1.0
        while True:
            record = self.call("task.get_record", task)
            status = record.get("status")
            fraction = float(record.get("progress") or 0.0)
            if progress is not None and fraction != last:
                last = fraction
                progress(fraction)
            if status == "success":
                return parse_task_result(str(record.get("result") or ""))
            if status in ("failure", "cancelled"):
                info = list(record.get("error_info") or []) or ["TASK_CANCELLED", task]
                raise self.error(what, XapiFailure(info))
            if time.monotonic() >= deadline:
                self.cancel_task(task)
                raise XapiTimeoutError(
                    f"{self.endpoint}: {what} did not finish within "
                    f"{(timeout if timeout is not None else self.timeout):g} s (task cancelled)"
                )
            time.sleep(delay)
            delay = min(delay * 2, self.task_poll)

    def task_status(self, task: str) -> dict[str, Any] | None:
        """A task's record, or None when it is gone."""
        try:
            return self.call("task.get_record", task)
        except HypervisorError:
            return None

    def cancel_task(self, task: str) -> None:
        """Ask XAPI to cancel a task (best effort)."""
        try:
            self._rpc("task.cancel", [self.ref, task], timeout=min(self.timeout, 10.0))
        except (XapiFailure, HypervisorError):
            pass

    def destroy_task(self, task: str) -> None:
        """Forget a settled task (best effort; XAPI would collect it after 65 min, §1.7)."""
        try:
            self._rpc("task.destroy", [self.ref, task], timeout=min(self.timeout, 10.0))
        except (XapiFailure, HypervisorError):
            pass

    def error(self, what: str, failure: XapiFailure) -> HypervisorError:
        """A HypervisorError for a XAPI failure, with the session ref redacted."""
        params = ["<session>" if p == self._ref else p for p in failure.params]
        shown = f" [{', '.join(params)}]" if params else ""
        return HypervisorError(
            f"{self.endpoint}: {what} failed: {failure.code}{shown}",
            code=failure.code,
            params=params,
        )

    def connection(
        self, endpoint: Endpoint | None = None, timeout: float | None = None
    ) -> http.client.HTTPConnection:
        """A fresh HTTP connection (for the streaming handlers) to the master or ``endpoint``."""
        return self.tls.connection(endpoint or self.endpoint, timeout or self.timeout)

    def logout(self) -> None:
        """Log out (best effort) and close pooled connections."""
        ref, self._ref = self._ref, None
        if ref is not None:
            try:
                self._rpc("session.logout", [ref], timeout=min(self.timeout, 10.0))
            except (XapiFailure, HypervisorError):
                pass
        with self._idle_lock:
            idle, self._idle = self._idle, []
        for _, conn in idle:
            conn.close()

    # -- login ------------------------------------------------------------------------------------
    def _login_locked(self) -> None:
        tried: set[Endpoint] = set()
        candidates = [self.endpoint] + [self.endpoint.with_address(a) for a in self.host_addresses]
        last_error: HypervisorError | None = None
        hops = 0
        while candidates:
            endpoint = candidates.pop(0)
            if endpoint in tried:
                continue
            tried.add(endpoint)
            try:
                ref = self._rpc(
                    "session.login_with_password",
                    [self.username, self._password, "1.1", ORIGINATOR],
                    endpoint=endpoint,
                )
            except XapiFailure as failure:
                if failure.code == "HOST_IS_SLAVE" and failure.params and hops < 3:
                    hops += 1
                    candidates.insert(0, endpoint.with_address(failure.params[0]))
                    continue
                if failure.code == "SESSION_AUTHENTICATION_FAILED":
                    raise HypervisorError(
                        f"{endpoint}: login as {self.username!r} refused: wrong user name or "
                        "password",
                        code=failure.code,
                        params=[self.username],
                    ) from None
                raise self.error("login", failure) from None
            except XapiConnectionError as error:
                # the master may be gone: another pool host will name the new one (§1.4)
                last_error = error
                continue
            if endpoint != self.endpoint:
                log.info("XAPI master of %s is now %s", self.endpoint, endpoint)
                self.endpoint = endpoint
            self._ref = ref
            self._generation += 1
            return
        assert last_error is not None
        raise last_error

    def _relogin(self, generation: int) -> None:
        with self._login_lock:
            if self._generation == generation:
                self._login_locked()

    def _move_to(self, address: str, generation: int) -> None:
        with self._login_lock:
            if self._generation != generation:
                return
            self.endpoint = self.endpoint.with_address(address)
            self._login_locked()

    def _backoff(self, method: str, reason: str, attempt: int) -> None:
        delay = min(self.retry_delay * attempt, self.retry_delay * 4)
        log.info("%s: %s, retry %d/%d in %.1f s", method, reason, attempt, self.retries, delay)
        time.sleep(delay)

    # -- transport --------------------------------------------------------------------------------
    def _take(self, endpoint: Endpoint, timeout: float) -> tuple[http.client.HTTPConnection, bool]:
        with self._idle_lock:
            for index, (where, conn) in enumerate(self._idle):
                if where == endpoint:
                    del self._idle[index]
                    if _dropped(conn):
                        conn.close()
                        continue
                    if conn.timeout != timeout:  # a system call: only when it changes
                        conn.timeout = timeout
                        if conn.sock is not None:
                            conn.sock.settimeout(timeout)
                    return conn, True
        return self.tls.connection(endpoint, timeout), False

    def _give_back(self, endpoint: Endpoint, conn: http.client.HTTPConnection) -> None:
        with self._idle_lock:
            if len(self._idle) < 16:
                self._idle.append((endpoint, conn))
                return
        conn.close()

    def _rpc(
        self,
        method: str,
        params: list[Any],
        *,
        endpoint: Endpoint | None = None,
        timeout: float | None = None,
    ) -> Any:
        """One call, no retry logic; XapiFailure or XapiConnectionError on failure."""
        endpoint = endpoint or self.endpoint
        timeout = timeout or self.timeout
        for fresh_only in (False, True):
            conn, reused = (
                self._take(endpoint, timeout)
                if not fresh_only
                else (self.tls.connection(endpoint, timeout), False)
            )
            try:
                status, ctype, body = self._post(conn, method, params)
            except (OSError, http.client.HTTPException) as error:
                conn.close()
                if (
                    reused
                    and (_idempotent(method) or method == "session.login_with_password")
                    and isinstance(
                        error,
                        (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError),
                    )
                ):
                    # a kept-alive connection the host closed meanwhile; only calls that are
                    # safe to repeat are sent again (a closed connection could also mean the
                    # host processed the call and died before answering)
                    continue
                raise describe_os_error(error, endpoint, timeout) from None
            except HypervisorError:
                conn.close()
                raise
            self._give_back(endpoint, conn)
            return self._decode(method, endpoint, status, ctype, body, params)
        raise XapiConnectionError(f"{endpoint}: the host keeps closing the connection")

    def _post(
        self, conn: http.client.HTTPConnection, method: str, params: list[Any]
    ) -> tuple[int, str, bytes]:
        if self.protocol == "xmlrpc":
            body = xmlrpc.client.dumps(
                tuple(_to_xmlrpc(p) for p in params), method, allow_none=True
            ).encode()
            conn.request("POST", "/", body, {"Content-Type": "text/xml"})
        else:
            self._rpc_id += 1
            payload = {"jsonrpc": "2.0", "method": method, "params": params, "id": self._rpc_id}
            body = json.dumps(payload, default=_json_default).encode()
            conn.request("POST", "/jsonrpc", body, {"Content-Type": "application/json"})
        _quick_ack(conn)
        response = conn.getresponse()
        data = response.read(_MAX_RPC_REPLY)
        if response.will_close:
            conn.close()
        return response.status, response.getheader("Content-Type", ""), data

    def _decode(
        self,
        method: str,
        endpoint: Endpoint,
        status: int,
        ctype: str,
        body: bytes,
        params: list[Any],
    ) -> Any:
        if self.protocol == "auto" and "json" not in ctype.lower():
            # a host without JSON-RPC answers /jsonrpc with XML or an error page (§1.3)
            log.info("%s has no JSON-RPC, using XML-RPC", endpoint)
            self.protocol = "xmlrpc"
            return self._rpc(method, params, endpoint=endpoint)
        if status != 200:
            raise _html_failure(endpoint, method, status, body)
        if self.protocol != "xmlrpc" and "json" not in ctype.lower():
            if self.protocol == "auto":
                # a host without JSON-RPC answers /jsonrpc with XML (§1.3): speak XML-RPC
                log.info("%s has no JSON-RPC, using XML-RPC", endpoint)
                self.protocol = "xmlrpc"
                return self._rpc(method, params, endpoint=endpoint)
            raise XapiConnectionError(f"{endpoint}: /jsonrpc answered {ctype!r}, not JSON")
        if self.protocol == "auto":
            self.protocol = "jsonrpc"
        if self.protocol == "jsonrpc":
            try:
                reply = json.loads(body)
            except ValueError:
                raise XapiConnectionError(
                    f"{endpoint}: {method}: the host sent malformed JSON"
                ) from None
            error = reply.get("error")
            if error:
                if isinstance(error, dict):
                    raise XapiFailure([str(error.get("message")), *(error.get("data") or [])])
                raise XapiFailure(list(error))
            return reply.get("result")
        try:
            (reply,), _ = xmlrpc.client.loads(body)
        except Exception as error:  # expat/xmlrpc raise several types on garbage
            raise XapiConnectionError(
                f"{endpoint}: {method}: the host sent malformed XML-RPC ({error})"
            ) from None
        if reply.get("Status") == "Success":
            return _from_xmlrpc(reply.get("Value"))
        raise XapiFailure([str(x) for x in reply.get("ErrorDescription") or ["UNKNOWN_ERROR"]])


def _html_failure(endpoint: Endpoint, what: str, status: int, body: bytes) -> Exception:
    """An HTTP error page (``CODE: [ p1; p2 ]`` in XAPI's 500 pages, §4.1) as an exception."""
    description = parse_error_page(body)
    if description:
        return XapiFailure(description)
    return XapiConnectionError(f"{endpoint}: {what}: HTTP {status}")


def parse_error_page(body: bytes) -> list[str] | None:
    """``[CODE, params...]`` from XAPI's HTML error page, when it carries one."""
    text = body[:65536].decode("utf-8", "replace")
    marker = "Additional information </h1>"
    if marker in text:
        text = text.split(marker, 1)[1]
    match = _ERROR_IN_PAGE.search(text)
    if match is None:
        return None
    params = [p.strip() for p in match.group(2).split(";") if p.strip()]
    return [match.group(1), *params]


_ERROR_IN_PAGE = re.compile(r"\b([A-Z][A-Z0-9_]{2,}): \[(.*?)\]", re.S)
