"""Who may use the server: nobody is asked on loopback, a token is required anywhere else.

The token comes from ``XOBACKUP_WEB_TOKEN`` or a file (``serve --token-file``), never from the
command line (other users see it in ``ps``). A client sends it as ``Authorization: Bearer
<token>``; a browser signs in once on ``/login`` and then carries a cookie holding an HMAC of
the token, so the token itself is not stored in the browser. Every comparison is constant-time.

Two browser attacks are closed even on loopback: another web site cannot make the browser
start a run (a POST needs the ``X-Requested-With`` header, which a cross-site form cannot
send and a cross-site script cannot send without the server's CORS consent, never given), and
a DNS-rebinding site cannot read the pages (without a token, only loopback ``Host`` names are
answered).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import socket
from pathlib import Path

from xobackup_core.config import Secret
from xobackup_core.errors import UsageError

TOKEN_ENV = "XOBACKUP_WEB_TOKEN"
COOKIE_NAME = "xobackup_session"
CSRF_HEADER = "X-Requested-With"
MIN_TOKEN_LENGTH = 16
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) only ever means this machine."""
    host = host.strip("[]")
    if host.lower() == "localhost" or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:  # a name: loopback only if every address it has is
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def parse_listen(listen: str) -> tuple[str, int]:
    """``127.0.0.1:8480``, ``[::1]:8480``, ``0.0.0.0:80`` → (host, port); UsageError if bad."""
    host, sep, port_text = listen.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise UsageError(
            f"--listen {listen!r}: give ADDRESS:PORT, e.g. 127.0.0.1:8480 or [::1]:8480"
        )
    return host, int(port_text)


def load_token(token_file: Path | None, environ: dict[str, str]) -> Secret | None:
    """The token from ``token_file`` or ``XOBACKUP_WEB_TOKEN``; None when neither is set."""
    if token_file is not None:
        try:
            value = token_file.read_text().strip()
        except OSError as error:
            raise UsageError(
                f"--token-file {token_file}: cannot read it ({error.strerror})"
            ) from None
        origin = f"file:{token_file}"
        if not value:
            raise UsageError(f"--token-file {token_file} is empty")
    elif environ.get(TOKEN_ENV, "").strip():
        value = environ[TOKEN_ENV].strip()
        origin = f"env:{TOKEN_ENV}"
    else:
        return None
    if len(value) < MIN_TOKEN_LENGTH:
        raise UsageError(
            f"the web token ({origin}) is too short: use at least {MIN_TOKEN_LENGTH} characters, "
            "e.g. from `openssl rand -hex 24`"
        )
    return Secret(value, origin=origin)


class Auth:
    """Checks requests against the token; with no token, only loopback clients get here."""

    def __init__(self, token: Secret | None) -> None:
        self.token = token
        self._session = (
            hmac.new(token.reveal().encode(), b"xobackup-web-session", hashlib.sha256).hexdigest()
            if token is not None
            else None
        )

    @property
    def required(self) -> bool:
        return self.token is not None

    def token_matches(self, candidate: str) -> bool:
        """Constant-time comparison with the configured token."""
        if self.token is None:
            return False
        return hmac.compare_digest(candidate.encode(), self.token.reveal().encode())

    def session_cookie(self) -> str:
        """The cookie value a signed-in browser carries (an HMAC of the token, not the token)."""
        assert self._session is not None, "no token, no sign-in"
        return self._session

    def bearer_ok(self, authorization: str | None) -> bool:
        if not authorization:
            return False
        scheme, _, value = authorization.partition(" ")
        return scheme.lower() == "bearer" and self.token_matches(value.strip())

    def cookie_ok(self, cookie: str | None) -> bool:
        if not cookie or self._session is None:
            return False
        return hmac.compare_digest(cookie.encode(), self._session.encode())


def host_is_loopback_name(host_header: str | None) -> bool:
    """Whether a ``Host`` header names this machine by a loopback name or address."""
    if not host_header:
        return False
    host = host_header.strip()
    if host.startswith("["):
        host = host[1 : host.find("]")] if "]" in host else host
    else:
        host = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    host = host.lower()
    if host in LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
