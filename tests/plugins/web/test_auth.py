"""Who may use `xobackup serve`: nobody is asked on loopback, a token is needed elsewhere."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest
from xobackup_web.auth import COOKIE_NAME, host_is_loopback_name, is_loopback, parse_listen

from tests.plugins.web.conftest import (
    SECRETS,
    WEB_TOKEN,
    Site,
    free_port,
    start_server,
    stop_server,
)


def serve(site: Site, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("XOBACKUP_WEB_")}
    command = [sys.executable, "-m", "xobackup_core.cli", "--config", str(site.config_path)]
    return subprocess.run(
        [*command, "serve", *args],
        capture_output=True,
        text=True,
        env={**clean, **(env or {})},
        timeout=60,
    )


def test_refuses_a_public_address_without_a_token(site: Site):
    result = serve(site, "--listen", f"0.0.0.0:{free_port()}")
    assert result.returncode == 2
    assert "not a loopback address" in result.stderr and "XOBACKUP_WEB_TOKEN" in result.stderr
    assert "Traceback" not in result.stderr


def test_refuses_a_short_token_without_showing_it(site: Site):
    result = serve(site, "--listen", f"0.0.0.0:{free_port()}", env={"XOBACKUP_WEB_TOKEN": "abc123"})
    assert result.returncode == 2
    assert "too short" in result.stderr and "abc123" not in result.stderr


def test_refuses_a_bad_listen_address(site: Site):
    result = serve(site, "--listen", "localhost")
    assert result.returncode == 2 and "ADDRESS:PORT" in result.stderr


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.10", False),
    ],
)
def test_loopback_addresses(host: str, loopback: bool):
    assert is_loopback(host) is loopback


def test_host_header_names():
    assert host_is_loopback_name("127.0.0.1:8480")
    assert host_is_loopback_name("localhost:8480")
    assert host_is_loopback_name("[::1]:8480")
    assert not host_is_loopback_name("attacker.example:8480")
    assert not host_is_loopback_name(None)
    assert parse_listen("[::1]:8480") == ("::1", 8480)


@pytest.fixture(scope="module")
def guarded(site: Site):
    """A second server of the same site that requires a token, on loopback."""
    port = free_port()
    process = start_server(site.config_path, port, env={"XOBACKUP_WEB_TOKEN": WEB_TOKEN})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        output = stop_server(process)
        assert WEB_TOKEN not in output


def test_every_api_call_and_page_needs_the_token(guarded: str):
    with httpx.Client(base_url=guarded, timeout=30) as client:
        for path in ("/api/jobs", "/api/runs", "/api/events", "/fragments/runs"):
            answer = client.get(path)
            assert answer.status_code == 401, path
            assert answer.headers["www-authenticate"].startswith("Bearer")
        wrong = client.get("/api/jobs", headers={"Authorization": "Bearer " + "x" * 24})
        assert wrong.status_code == 401
        page = client.get("/", follow_redirects=False)
        assert page.status_code == 303 and page.headers["location"].startswith("/login")
        right = client.get("/api/jobs", headers={"Authorization": f"Bearer {WEB_TOKEN}"})
        assert right.status_code == 200 and {job["key"] for job in right.json()} >= {"nightly"}
        # a bearer client needs no CSRF header: this reaches the job lookup
        unknown = client.post(
            "/api/jobs/hourly/run", headers={"Authorization": f"Bearer {WEB_TOKEN}"}
        )
        assert unknown.status_code == 404


def test_browser_sign_in_sets_a_cookie_that_is_not_the_token(guarded: str):
    with httpx.Client(base_url=guarded, timeout=30) as client:
        failed = client.post("/login", data={"token": "not-the-token-at-all", "next": "/"})
        assert failed.status_code == 401 and "not the server" in failed.text
        signed = client.post(
            "/login", data={"token": WEB_TOKEN, "next": "//evil.example/"}, follow_redirects=False
        )
        assert signed.status_code == 303 and signed.headers["location"] == "/"
        cookie = client.cookies[COOKIE_NAME]
        assert cookie and WEB_TOKEN not in cookie
        assert "httponly" in signed.headers["set-cookie"].lower()
        overview = client.get("/")
        assert overview.status_code == 200 and "Sign out" in overview.text
        for secret in SECRETS:
            assert secret not in overview.text
        client.post("/logout")
        client.cookies.clear()
        assert client.get("/api/jobs").status_code == 401
