"""E-mail reports of backup runs over SMTP, sent per the job's ``reportWhen``.

Configured by environment variables (the config file's tables belong to the core, and a
reporter's settings, like its password, are the service's environment: a systemd
``EnvironmentFile``). Nothing is sent while ``XOBACKUP_EMAIL_TO`` is unset.

============================ ===================================================
``XOBACKUP_EMAIL_TO``         recipients, comma-separated (required)
``XOBACKUP_EMAIL_FROM``       sender (default ``xobackup@<host name>``)
``XOBACKUP_SMTP_HOST``        SMTP server (default ``localhost``)
``XOBACKUP_SMTP_PORT``        port (default 25; 465 with ``ssl``; 587 with ``starttls``)
``XOBACKUP_SMTP_SECURITY``    ``none`` (default), ``starttls`` or ``ssl``
``XOBACKUP_SMTP_USER``        login, if the server wants one
``XOBACKUP_SMTP_PASSWORD``    its password (or ``XOBACKUP_SMTP_PASSWORD_FILE``: a file)
``XOBACKUP_SMTP_TIMEOUT``     seconds (default 30)
============================ ===================================================

The mail has the run as text (its task tree with statuses, sizes and errors) and the run's
full JSON record attached (``run-<id>.json``).
"""

from __future__ import annotations

import json
import logging
import os
import smtplib
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from xobackup_core.errors import UsageError
from xobackup_core.hookspecs import hookimpl
from xobackup_core.plugins import Provided
from xobackup_core.scheduler.reporting import render_text, should_report, subject

_log = logging.getLogger(__name__)

_DEFAULT_PORTS = {"none": 25, "starttls": 587, "ssl": 465}


@dataclass(frozen=True)
class EmailSettings:
    """Where and how reports are sent (see the module doc for the variables)."""

    recipients: tuple[str, ...]
    sender: str
    host: str = "localhost"
    port: int = 25
    security: str = "none"
    user: str | None = None
    password: str | None = None
    timeout: float = 30.0

    def __repr__(self) -> str:  # the password never shows
        return f"EmailSettings(host={self.host!r}, port={self.port}, to={self.recipients!r})"

    @classmethod
    def from_environment(cls, env: Mapping[str, str] | None = None) -> EmailSettings | None:
        """The settings, or None when reports by e-mail are not configured."""
        env = os.environ if env is None else env
        recipients = tuple(
            a.strip() for a in env.get("XOBACKUP_EMAIL_TO", "").split(",") if a.strip()
        )
        if not recipients:
            return None
        security = env.get("XOBACKUP_SMTP_SECURITY", "none").strip().lower() or "none"
        if security not in _DEFAULT_PORTS:
            raise UsageError(f"XOBACKUP_SMTP_SECURITY={security!r}: use none, starttls or ssl")
        port_text = env.get("XOBACKUP_SMTP_PORT", "").strip()
        try:
            port = int(port_text) if port_text else _DEFAULT_PORTS[security]
            timeout = float(env.get("XOBACKUP_SMTP_TIMEOUT", "30"))
        except ValueError:
            raise UsageError("XOBACKUP_SMTP_PORT and XOBACKUP_SMTP_TIMEOUT are numbers") from None
        password = env.get("XOBACKUP_SMTP_PASSWORD")
        password_file = env.get("XOBACKUP_SMTP_PASSWORD_FILE")
        if password is None and password_file:
            try:
                password = Path(password_file).read_text().rstrip("\r\n")
            except OSError as error:
                raise UsageError(
                    f"XOBACKUP_SMTP_PASSWORD_FILE: cannot read {password_file}: {error.strerror}"
                ) from None
        return cls(
            recipients=recipients,
            sender=env.get("XOBACKUP_EMAIL_FROM") or f"xobackup@{socket.getfqdn()}",
            host=env.get("XOBACKUP_SMTP_HOST", "localhost"),
            port=port,
            security=security,
            user=env.get("XOBACKUP_SMTP_USER") or None,
            password=password,
            timeout=timeout,
        )


def build_message(run: Mapping[str, Any], settings: EmailSettings) -> EmailMessage:
    """The report mail of ``run``."""
    message = EmailMessage()
    message["Subject"] = subject(run)
    message["From"] = settings.sender
    message["To"] = ", ".join(settings.recipients)
    message.set_content(render_text(run))
    message.add_attachment(
        json.dumps(run, indent=2, default=str).encode(),
        maintype="application",
        subtype="json",
        filename=f"run-{run.get('runId', 'unknown')}.json",
    )
    return message


def send(message: EmailMessage, settings: EmailSettings) -> None:
    """Deliver ``message`` through the configured SMTP server."""
    context = ssl.create_default_context()
    smtp: smtplib.SMTP
    if settings.security == "ssl":
        smtp = smtplib.SMTP_SSL(
            settings.host, settings.port, timeout=settings.timeout, context=context
        )
    else:
        smtp = smtplib.SMTP(settings.host, settings.port, timeout=settings.timeout)
    with smtp:
        if settings.security == "starttls":
            smtp.starttls(context=context)
        if settings.user:
            smtp.login(settings.user, settings.password or "")
        smtp.send_message(message)


def report(run: Mapping[str, Any], env: Mapping[str, str] | None = None) -> bool:
    """Send the report of ``run`` if its ``reportWhen`` asks for one; True when sent."""
    if not should_report(run):
        return False
    settings = EmailSettings.from_environment(env)
    if settings is None:
        return False
    send(build_message(run, settings), settings)
    return True


@hookimpl
def xobackup_provides() -> list[Provided]:
    return [Provided("reporter", "email", "e-mails run reports over SMTP (XOBACKUP_EMAIL_TO)")]


@hookimpl
def xobackup_run_finished(run: Mapping[str, Any]) -> None:
    try:
        report(run)
    except (OSError, smtplib.SMTPException, UsageError) as error:
        # a report that cannot be sent must not fail the backup; the error text of smtplib
        # holds the server's answer, never our password
        _log.warning(
            "could not e-mail the report of run %s: %s: %s",
            run.get("runId"),
            type(error).__name__,
            error,
        )
