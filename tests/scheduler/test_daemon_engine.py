"""The daemon driving the real engine: a schedule fires, the XAPI simulator's VM is backed up
to a local remote, and the report is POSTed to a local HTTP server."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from xobackup_hypervisor_xcpng.sim.pytest_fixtures import xapi_sim  # noqa: F401 (fixture)
from xobackup_remote_local import LocalRemote

from tests.scheduler.conftest import wait_until
from xobackup_core.config import load_config
from xobackup_core.engine.repository import BackupRepository
from xobackup_core.logs.records import Status
from xobackup_core.logs.store import LogStore
from xobackup_core.plugins import Plugins
from xobackup_core.scheduler.clock import ManualClock
from xobackup_core.scheduler.daemon import Daemon


@pytest.fixture
def webhook(monkeypatch):
    received: list[dict] = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("XOBACKUP_WEBHOOK_URL", f"http://127.0.0.1:{server.server_address[1]}/")
    yield received
    server.shutdown()
    server.server_close()


def test_a_schedule_runs_a_real_backup_and_reports_it(tmp_path, xapi_sim, webhook):  # noqa: F811
    vm_uuid = next(record["uuid"] for _ref, record in xapi_sim.vms(0))
    path = tmp_path / "config.toml"
    path.write_text(
        f"""
log_db = "{tmp_path / "logs.sqlite"}"
[servers.pool]
url = "{xapi_sim.pools[0].url}"
username = "{xapi_sim.username}"
password = "{xapi_sim.password}"
allow_unauthorized = true
[remotes.nas]
url = "file://{tmp_path / "remote"}"
[jobs.nightly]
mode = "full"
remotes = ["nas"]
vms = ["{vm_uuid}"]
[schedules.night]
job = "nightly"
cron = "0 3 * * *"
timezone = "Europe/Paris"
reportWhen = "always"
exportRetention = 2
"""
    )
    plugins = Plugins(autoload=False, only=["hypervisor_xcpng", "remote_local", "report_webhook"])
    clock = ManualClock(datetime(2026, 5, 1, 0, 59, tzinfo=UTC).timestamp())
    with LogStore(tmp_path / "logs.sqlite") as store:
        daemon = Daemon(lambda: load_config(path), plugins, store, clock=clock)
        thread = threading.Thread(target=daemon.run, daemon=True)
        thread.start()
        try:
            assert clock.wait_until_idle()
            assert store.list_runs() == []
            clock.set(datetime(2026, 5, 1, 1, 0, tzinfo=UTC).timestamp())  # 03:00 in Paris
            assert clock.wait_until_idle()
            wait_until(lambda: not daemon.running_jobs, 60, what="the backup to end")
        finally:
            daemon.request_stop()
            thread.join(30)
        (run,) = store.list_runs()
        assert run.status is Status.SUCCESS, store.get_run(run.run_id).to_dict()
        assert run.schedule_id == "night"
    (backup,) = BackupRepository(LocalRemote(tmp_path / "remote")).list_backups(vm_uuid)
    assert (backup.mode, backup.schedule_id) == ("full", "night")
    wait_until(lambda: webhook, what="the report")
    (report,) = webhook
    assert report["run"]["runId"] == run.run_id and report["run"]["status"] == "success"
    assert [task["data"]["id"] for task in report["run"]["tasks"]] == [vm_uuid]
