"""A folder as a remote: ``file:///srv/backups`` (or a kernel-mounted NFS/SMB share)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

from xobackup_core.errors import RemoteConfigError
from xobackup_core.hookspecs import hookimpl
from xobackup_core.plugins import Provided
from xobackup_remote_local.remote import LocalRemote

__all__ = ["LocalRemote"]


@hookimpl
def xobackup_provides() -> list[Provided]:
    return [Provided("remote", "file", "a local folder: file:///path")]


@hookimpl
def xobackup_remote(url: str, options: Mapping[str, Any]) -> LocalRemote | None:
    parts = urlsplit(url)
    if parts.scheme != "file":
        return None
    if parts.netloc not in ("", "localhost"):
        raise RemoteConfigError(
            f"file URLs name a local folder: write file:///path, not file://{parts.netloc}/...",
            remote=str(options.get("name", url)),
        )
    return LocalRemote(unquote(parts.path), name=str(options.get("name", url)))
