"""E-mail reports through a real SMTP server (aiosmtpd on 127.0.0.1)."""

from __future__ import annotations

import email
import email.policy
import json
import logging

import pytest

from tests.conftest import require_module
from tests.scheduler.reports import EXPECTED, record_run
from tests.servers.base import free_port
from xobackup_core.logs.store import LogStore
from xobackup_core.plugins import Plugins


class _Inbox:
    def __init__(self) -> None:
        self.messages: list[tuple[list[str], email.message.EmailMessage]] = []

    async def handle_DATA(self, server, session, envelope):
        parsed = email.message_from_bytes(envelope.content, policy=email.policy.default)
        self.messages.append((list(envelope.rcpt_tos), parsed))
        return "250 OK"


class _Auth:
    def __init__(self, user: str, password: str) -> None:
        self.user, self.password = user, password

    def __call__(self, server, session, envelope, mechanism, auth_data):
        from aiosmtpd.smtp import AuthResult

        ok = auth_data.login == self.user.encode() and auth_data.password == self.password.encode()
        return AuthResult(success=ok)


@pytest.fixture(scope="module")
def smtp():
    require_module("aiosmtpd")
    from aiosmtpd.controller import Controller

    inbox = _Inbox()
    controller = Controller(
        inbox,
        hostname="127.0.0.1",
        port=free_port(),
        authenticator=_Auth("backup", "s3cret-smtp"),
        auth_require_tls=False,
    )
    controller.start()
    yield controller, inbox
    controller.stop()


@pytest.fixture
def env(monkeypatch, smtp):
    controller, inbox = smtp
    inbox.messages.clear()
    monkeypatch.setenv("XOBACKUP_EMAIL_TO", "ops@example.org, boss@example.org")
    monkeypatch.setenv("XOBACKUP_EMAIL_FROM", "xobackup@example.org")
    monkeypatch.setenv("XOBACKUP_SMTP_HOST", "127.0.0.1")
    monkeypatch.setenv("XOBACKUP_SMTP_PORT", str(controller.port))
    monkeypatch.setenv("XOBACKUP_SMTP_USER", "backup")
    monkeypatch.setenv("XOBACKUP_SMTP_PASSWORD", "s3cret-smtp")
    monkeypatch.setenv("XOBACKUP_SMTP_TIMEOUT", "10")
    return inbox


@pytest.fixture
def plugins():
    return Plugins(autoload=False, only=["report_email"])


@pytest.mark.parametrize("report_when", ["always", "failure", "error", "never"])
def test_reports_arrive_per_report_when(tmp_path, env, plugins, report_when):
    with LogStore(tmp_path / "logs.sqlite") as store:
        runs = {
            status: record_run(store, plugins, status, report_when)
            for status in ("success", "failure", "skipped", "interrupted")
        }
    received = {mail["Subject"].split(": ")[1].split(" ")[0]: mail for _, mail in env.messages}
    assert set(received) == EXPECTED[report_when]
    for status, mail in received.items():
        run = runs[status]
        assert mail["Subject"] == f"[xobackup] nightly: {status} (run {run.run_id[:8]})"
        assert mail["From"] == "xobackup@example.org"
        body = mail.get_body(("plain",)).get_content()
        assert f"Run:      {run.run_id}" in body
        assert f"Status:   {status}" in body
        attachment = next(mail.iter_attachments())
        assert attachment.get_filename() == f"run-{run.run_id}.json"
        assert json.loads(attachment.get_content())["status"] == status
    for recipients, _ in env.messages:
        assert recipients == ["ops@example.org", "boss@example.org"]
    if "failure" in received:
        body = received["failure"].get_body(("plain",)).get_content()
        assert "- backup VM web-1: failure: remote 'nas': disk full" in body
        assert "  - export nas: failure: remote 'nas': disk full" in body
    if "success" in received:
        body = received["success"].get_body(("plain",)).get_content()
        assert "  - export nas: success 3.0 MiB" in body


def test_an_unreachable_server_is_logged_without_the_password(
    tmp_path, env, plugins, monkeypatch, caplog
):
    monkeypatch.setenv("XOBACKUP_SMTP_PORT", str(free_port()))
    with caplog.at_level(logging.WARNING), LogStore(tmp_path / "logs.sqlite") as store:
        run = record_run(store, plugins, "failure", "always")
    assert run.status.value == "failure"  # the run itself is unaffected
    assert env.messages == []
    assert f"could not e-mail the report of run {run.run_id}: ConnectionRefusedError" in caplog.text
    assert "s3cret-smtp" not in caplog.text


def test_nothing_is_sent_without_recipients(tmp_path, env, plugins, monkeypatch):
    monkeypatch.delenv("XOBACKUP_EMAIL_TO")
    with LogStore(tmp_path / "logs.sqlite") as store:
        record_run(store, plugins, "failure", "always")
    assert env.messages == []
