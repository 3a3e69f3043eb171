"""A folder on an SSH server as a remote, over SFTP: ``sftp://user@host[:port]/path``.

Options (the remote's config table) are documented on :class:`SftpRemote`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from xobackup_core.hookspecs import hookimpl
from xobackup_core.plugins import Provided
from xobackup_remote_sftp.remote import SftpRemote

__all__ = ["SftpRemote"]


@hookimpl
def xobackup_provides() -> list[Provided]:
    return [
        Provided(
            "remote",
            "sftp",
            "a folder on an SSH server: sftp://user@host[:port]/path (key or password, "
            "host key checked against a fingerprint or known_hosts)",
        )
    ]


@hookimpl
def xobackup_remote(url: str, options: Mapping[str, Any]) -> SftpRemote | None:
    if urlsplit(url).scheme != "sftp":
        return None
    return SftpRemote.from_url(url, options)
