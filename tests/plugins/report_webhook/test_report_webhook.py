"""Webhook reports POSTed to a real local HTTP server."""

from __future__ import annotations

import json
import logging
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from tests.scheduler.reports import EXPECTED, record_run
from xobackup_core.logs.store import LogStore
from xobackup_core.plugins import Plugins


class _Receiver(BaseHTTPRequestHandler):
    received: ClassVar[list[tuple[str, dict, dict]]] = []
    status = 204

    def do_POST(self):
        length = int(self.headers["Content-Length"])
        body = json.loads(self.rfile.read(length))
        type(self).received.append((self.path, dict(self.headers), body))
        self.send_response(type(self).status)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def received(server, monkeypatch):
    _Receiver.received = []
    _Receiver.status = 204
    port = server.server_address[1]
    monkeypatch.setenv("XOBACKUP_WEBHOOK_URL", f"http://127.0.0.1:{port}/hooks/backup")
    monkeypatch.setenv("XOBACKUP_WEBHOOK_TOKEN", "tok-abc-123")
    return _Receiver.received


@pytest.fixture
def plugins():
    return Plugins(autoload=False, only=["report_webhook"])


@pytest.mark.parametrize("report_when", ["always", "failure", "error", "never"])
def test_reports_are_posted_per_report_when(tmp_path, received, plugins, report_when):
    with LogStore(tmp_path / "logs.sqlite") as store:
        runs = {
            status: record_run(store, plugins, status, report_when)
            for status in ("success", "failure", "skipped", "interrupted")
        }
    by_status = {body["run"]["status"]: (path, headers, body) for path, headers, body in received}
    assert set(by_status) == EXPECTED[report_when]
    for status, (path, headers, body) in by_status.items():
        run = runs[status]
        assert path == "/hooks/backup"
        assert headers["Content-Type"] == "application/json"
        assert headers["Authorization"] == "Bearer tok-abc-123"
        assert body["event"] == "run_finished"
        assert body["reportWhen"] == report_when
        assert body["summary"] == f"[xobackup] nightly: {status} (run {run.run_id[:8]})"
        assert body["run"]["runId"] == run.run_id
        assert body["run"]["scheduleId"] == "night"
        assert f"Status:   {status}" in body["text"]
    if "failure" in by_status:
        tree = by_status["failure"][2]["run"]["tasks"]
        assert tree[0]["name"] == "backup VM" and tree[0]["status"] == "failure"
        assert tree[0]["tasks"][0]["result"]["message"] == "remote 'nas': disk full"


def test_a_refusing_endpoint_is_logged_and_the_run_is_unaffected(
    tmp_path, received, plugins, caplog, monkeypatch
):
    _Receiver.status = 500
    url = os.environ["XOBACKUP_WEBHOOK_URL"]
    monkeypatch.setenv("XOBACKUP_WEBHOOK_URL", url.replace("http://", "http://user:pw-xyz@"))
    monkeypatch.delenv("XOBACKUP_WEBHOOK_TOKEN")
    with caplog.at_level(logging.WARNING), LogStore(tmp_path / "logs.sqlite") as store:
        run = record_run(store, plugins, "failure", "always")
    assert len(received) == 1
    assert received[0][1]["Authorization"] == "Basic dXNlcjpwdy14eXo="  # user:pw-xyz
    assert f"webhook report of run {run.run_id} refused: HTTP 500" in caplog.text
    assert "tok-abc-123" not in caplog.text and "pw-xyz" not in caplog.text


def test_an_unreachable_endpoint_is_logged_without_secrets(tmp_path, plugins, caplog, monkeypatch):
    monkeypatch.setenv("XOBACKUP_WEBHOOK_URL", "http://user:pw-xyz@127.0.0.1:9/hook")
    with caplog.at_level(logging.WARNING), LogStore(tmp_path / "logs.sqlite") as store:
        record_run(store, plugins, "failure", "always")
    assert "could not POST the report" in caplog.text
    assert "http://user:***@127.0.0.1:9/hook" in caplog.text
    assert "pw-xyz" not in caplog.text
