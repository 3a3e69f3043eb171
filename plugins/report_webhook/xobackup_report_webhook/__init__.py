"""Webhook reports: each backup run POSTed as JSON, per the job's ``reportWhen``.

Configured by environment variables (like the e-mail reporter); nothing is sent while
``XOBACKUP_WEBHOOK_URL`` is unset.

=============================== ==================================================
``XOBACKUP_WEBHOOK_URL``         where to POST (``http://`` or ``https://``; required)
``XOBACKUP_WEBHOOK_TOKEN``       sent as ``Authorization: Bearer <token>`` (optional;
                                 user-info in the URL is sent as Basic authentication)
``XOBACKUP_WEBHOOK_TIMEOUT``     seconds (default 10)
=============================== ==================================================

The body (``Content-Type: application/json``)::

    {"event": "run_finished", "reportWhen": "failure", "summary": "[xobackup] nightly: ...",
     "text": "<the run as text>", "run": {<the run record with its task tree>}}

Any 2xx answer is success; anything else is logged as a warning (the URL without its
user-info, never the token).
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from xobackup_core.config import redact_url
from xobackup_core.errors import UsageError
from xobackup_core.hookspecs import hookimpl
from xobackup_core.plugins import Provided
from xobackup_core.scheduler.reporting import render_text, report_when, should_report, subject

_log = logging.getLogger(__name__)


def payload(run: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON document POSTed for ``run``."""
    return {
        "event": "run_finished",
        "reportWhen": report_when(run),
        "summary": subject(run),
        "text": render_text(run),
        "run": dict(run),
    }


def post(run: Mapping[str, Any], env: Mapping[str, str] | None = None) -> int | None:
    """POST the report of ``run`` if configured and due; the HTTP status, or None if not sent."""
    env = os.environ if env is None else env
    url = env.get("XOBACKUP_WEBHOOK_URL", "").strip()
    if not url or not should_report(run):
        return None
    if urlsplit(url).scheme not in ("http", "https"):
        raise UsageError(f"XOBACKUP_WEBHOOK_URL {redact_url(url)!r} is not an http(s) URL")
    try:
        timeout = float(env.get("XOBACKUP_WEBHOOK_TIMEOUT", "10"))
    except ValueError:
        raise UsageError("XOBACKUP_WEBHOOK_TIMEOUT is a number of seconds") from None
    body = json.dumps(payload(run), default=str).encode()
    headers = {"Content-Type": "application/json", "User-Agent": "xobackup"}
    parts = urlsplit(url)
    if parts.username is not None:
        # urllib does not send user-info itself: turn it into Basic authentication
        pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
        url = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    token = env.get("XOBACKUP_WEBHOOK_TOKEN")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return int(answer.status)
    except (ValueError, http.client.InvalidURL):
        raise UsageError(f"XOBACKUP_WEBHOOK_URL {redact_url(url)!r} is not a valid URL") from None


@hookimpl
def xobackup_provides() -> list[Provided]:
    return [Provided("reporter", "webhook", "POSTs run reports as JSON (XOBACKUP_WEBHOOK_URL)")]


@hookimpl
def xobackup_run_finished(run: Mapping[str, Any]) -> None:
    try:
        post(run)
    except urllib.error.HTTPError as error:
        _log.warning(
            "webhook report of run %s refused: HTTP %s %s",
            run.get("runId"),
            error.code,
            error.reason,
        )
    except (OSError, UsageError) as error:
        url = redact_url(os.environ.get("XOBACKUP_WEBHOOK_URL", ""))
        _log.warning("could not POST the report of run %s to %s: %s", run.get("runId"), url, error)
