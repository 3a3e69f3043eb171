"""SMB2/3 shares as remotes: ``smb://user@host[:port]/share/sub/path``.

Files are committed with an atomic server-side replace. As on Windows, a server refuses to
replace a file that another client has open: such a commit is retried for a few seconds,
then fails with the old file intact.

Options (the remote's config table, or ``?key=value`` in the URL for the non-secret ones):

``username``
    Overrides the user in the URL.
``password``
    A secret (inline, ``{ env = "NAME" }`` or ``{ file = "/path" }``). When absent, the
    environment variable ``XOBACKUP_SMB_PASSWORD`` is used (handy with ``xobackup remote test
    smb://...``). A password written in the URL also works but is discouraged.
``domain``
    The NTLM domain (workgroup) of the user.
``encrypt``
    ``true`` requires SMB3 encryption for the whole session.
``signing``
    ``auto`` (default) signs what the protocol or the server requires, as smbclient, Windows
    and the Linux kernel client do; ``required`` signs every request (slower: signing runs in
    Python). Servers that require signing get it either way.
``timeout`` / ``connect_timeout``
    Seconds to wait for one operation (default 60) / for the connection (default 15).
``retries``
    Attempts after a transient failure of an idempotent operation (default 3), with
    exponential back-off.
``write_chunk`` / ``pipeline``
    Bytes per WRITE request (default 8 MiB, capped by the server's maximum) and WRITE
    requests in flight (default 4).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from xobackup_core.config import redact_url
from xobackup_core.errors import RemoteConfigError
from xobackup_core.hookspecs import hookimpl
from xobackup_core.plugins import Provided
from xobackup_remote_smb.remote import DEFAULT_PIPELINE, DEFAULT_WRITE_CHUNK, SmbRemote

__all__ = ["SmbRemote", "open_smb_remote"]

PASSWORD_ENV = "XOBACKUP_SMB_PASSWORD"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def _flag(value: Any, key: str, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise RemoteConfigError(f"option {key!r} must be true or false, not {value!r}", remote=name)


def _number(value: Any, key: str, name: str, kind: type = float) -> Any:
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise RemoteConfigError(
            f"option {key!r} must be a number, not {value!r}", remote=name
        ) from None
    if number < 0:
        raise RemoteConfigError(f"option {key!r} cannot be negative", remote=name)
    return number


def _signing(value: Any, name: str) -> str:
    text = str(value).strip().lower()
    if text not in ("auto", "required"):
        raise RemoteConfigError(
            f"option 'signing' must be 'auto' or 'required', not {value!r}", remote=name
        )
    return text


def _reveal(value: Any) -> str:
    reveal = getattr(value, "reveal", None)
    return reveal() if callable(reveal) else str(value)


_KNOWN = {
    "name",
    "username",
    "password",
    "domain",
    "encrypt",
    "signing",
    "timeout",
    "connect_timeout",
    "retries",
    "write_chunk",
    "pipeline",
}


def open_smb_remote(url: str, options: Mapping[str, Any]) -> SmbRemote:
    """Parse an ``smb://`` URL and its options and connect."""
    name = str(options.get("name") or redact_url(url))
    try:
        parts = urlsplit(url)
        port = parts.port or 445
    except ValueError as error:
        raise RemoteConfigError(f"invalid SMB URL: {error}", remote=name) from None
    merged: dict[str, Any] = dict(parse_qsl(parts.query))
    merged.update(options)
    unknown = sorted(set(merged) - _KNOWN)
    if unknown:
        raise RemoteConfigError(
            f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(_KNOWN))}",
            remote=name,
        )
    host = parts.hostname
    segments = [unquote(s) for s in parts.path.split("/") if s]
    if not host or not segments:
        raise RemoteConfigError(
            "an SMB URL names a host and a share: smb://user@host[:port]/share[/folder]",
            remote=name,
        )
    username = merged.get("username") or (unquote(parts.username) if parts.username else None)
    if not username:
        raise RemoteConfigError(
            "no user name: write smb://user@host/share or set the 'username' option", remote=name
        )
    password: str | None = None
    if merged.get("password") is not None:
        password = _reveal(merged["password"])
    elif parts.password is not None:
        password = unquote(parts.password)
    elif os.environ.get(PASSWORD_ENV) is not None:
        password = os.environ[PASSWORD_ENV]
    if password is None:
        raise RemoteConfigError(
            f"no password: set the remote's 'password' option or {PASSWORD_ENV}", remote=name
        )
    return SmbRemote(
        host,
        segments[0],
        "/".join(segments[1:]) or "/",
        username=str(username),
        password=password,
        port=port,
        domain=str(merged["domain"]) if merged.get("domain") else None,
        encrypt=_flag(merged.get("encrypt", False), "encrypt", name),
        signing=_signing(merged.get("signing", "auto"), name),
        timeout=_number(merged.get("timeout", 60), "timeout", name),
        connect_timeout=_number(merged.get("connect_timeout", 15), "connect_timeout", name),
        retries=_number(merged.get("retries", 3), "retries", name, int),
        write_chunk=_number(
            merged.get("write_chunk", DEFAULT_WRITE_CHUNK), "write_chunk", name, int
        ),
        pipeline=_number(merged.get("pipeline", DEFAULT_PIPELINE), "pipeline", name, int),
        name=name,
    )


@hookimpl
def xobackup_provides() -> list[Provided]:
    return [Provided("remote", "smb", "an SMB2/3 share: smb://user@host[:port]/share/path")]


@hookimpl
def xobackup_remote(url: str, options: Mapping[str, Any]) -> SmbRemote | None:
    if not url.lower().startswith("smb://"):
        return None
    return open_smb_remote(url, options)
