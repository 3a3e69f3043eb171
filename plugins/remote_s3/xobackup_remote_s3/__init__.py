"""An S3 bucket as a remote: ``s3://bucket/prefix`` or ``s3+http(s)://host[:port]/bucket/prefix``.

Options (the remote's config table) are documented on :class:`S3Remote`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from xobackup_core.hookspecs import hookimpl
from xobackup_core.plugins import Provided
from xobackup_remote_s3.remote import SCHEMES, S3Remote

__all__ = ["S3Remote"]


@hookimpl
def xobackup_provides() -> list[Provided]:
    return [
        Provided("remote", "s3", "an S3 bucket: s3://bucket/prefix (option endpoint for non-AWS)"),
        Provided(
            "remote",
            "s3+http",
            "an S3-compatible server over plain HTTP: s3+http://host:port/bucket/prefix",
        ),
        Provided(
            "remote", "s3+https", "an S3-compatible server: s3+https://host[:port]/bucket/prefix"
        ),
    ]


@hookimpl
def xobackup_remote(url: str, options: Mapping[str, Any]) -> S3Remote | None:
    if urlsplit(url).scheme not in SCHEMES:
        return None
    return S3Remote.from_url(url, options)
