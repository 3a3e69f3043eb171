"""The JSON API of `xobackup serve`, against a real server over a log of real runs."""

from __future__ import annotations

import re
import time

from tests.plugins.web.conftest import REMOTE_SECRET, SECRETS, SERVER_SECRET, Site
from xobackup_core.logs import Status

REMOTE_URL = f"smb://backup:{REMOTE_SECRET}@127.0.0.1:1/share"


def test_runs_list_every_outcome_with_its_colour(site: Site):
    with site.client() as client:
        runs = client.get("/api/runs", params={"limit": 0}).json()
    by_id = {run["runId"]: run for run in runs}
    assert by_id[site.runs["success"]]["status"] == "success"
    assert by_id[site.runs["success"]]["colour"] == "green"
    assert by_id[site.runs["failure"]]["status"] == "failure"
    assert by_id[site.runs["failure"]]["colour"] == "red"
    assert by_id[site.runs["interrupted"]]["status"] == "interrupted"
    assert by_id[site.runs["interrupted"]]["colour"] == "orange"
    assert by_id[site.runs["failure"]]["jobName"] == "weekly full"
    assert by_id[site.runs["success"]]["size"] > 0


def test_filters_by_job_status_vm_and_text(site: Site):
    with site.client() as client:

        def ids(**params: object) -> set[str]:
            answer = client.get("/api/runs", params={"limit": 0, **params})
            assert answer.status_code == 200, answer.text
            return {run["runId"] for run in answer.json()}

        assert site.runs["failure"] in ids(job="weekly full")
        assert site.runs["success"] not in ids(job="weekly full")
        assert ids(status="failure") >= {site.runs["failure"]}
        assert site.runs["success"] not in ids(status="failure,interrupted")
        assert site.runs["interrupted"] in ids(status="failure,interrupted")
        last_vm = list(site.vms.values())[-1]  # not in weekly-full's explicit list
        assert site.runs["success"] in ids(vm=last_vm)
        assert site.runs["failure"] not in ids(vm=last_vm)
        assert ids(search="SR_BACKEND_FAILURE_44") == {site.runs["failure"]}
        bad = client.get("/api/runs", params={"status": "exploded"})
        assert bad.status_code == 400
        assert "valid statuses" in bad.json()["detail"]


def test_run_detail_has_the_task_tree_sizes_and_warnings(site: Site):
    with site.client() as client:
        run = client.get(f"/api/runs/{site.runs['success'][:8]}").json()
        missing = client.get("/api/runs/ffffffff")
    assert run["runId"] == site.runs["success"]
    vms = {task["data"]["name_label"] for task in run["tasks"] if task["name"] == "backup VM"}
    assert vms == set(site.vms.values())
    exports = [t for vm in run["tasks"] for t in vm["tasks"] if t["name"] == "export"]
    assert exports and all(task["size"] > 0 and task["duration"] is not None for task in exports)
    warnings = [w["message"] for w in run["warnings"]]
    assert any("offsite" in message for message in warnings), warnings
    assert run["progress"] is None  # the run has ended: no live figures
    assert missing.status_code == 404


def test_jobs_show_schedules_next_runs_and_last_run(site: Site):
    with site.client() as client:
        jobs = {job["key"]: job for job in client.get("/api/jobs").json()}
        schedules = client.get("/api/schedules", params={"count": 2}).json()
    nightly = jobs["nightly"]
    assert nightly["mode"] == "delta"
    assert nightly["remotes"] == ["nas", "offsite"]
    (schedule,) = nightly["schedules"]
    assert schedule["cron"] == "0 3 * * *" and schedule["timezone"] == "Europe/Paris"
    next_ms = schedule["next"][0]["ms"]
    assert 0 < next_ms - time.time() * 1000 <= 24 * 3600 * 1000
    assert (
        schedule["next"][0]["local"].endswith(("+01:00", "+02:00"))
        and "T03:00:00" in (schedule["next"][0]["local"])
    )
    assert jobs["weekly-full"]["lastRun"]["runId"] == site.runs["interrupted"]
    assert jobs["weekly-full"]["lastRun"]["colour"] == "orange"
    assert jobs["weekly-full"]["selection"] == {"vms": [next(iter(site.vms))]}
    assert len(next(s for s in schedules if s["schedule"] == "sundays")["next"]) == 2


def test_backups_per_remote_and_unreachable_remote(site: Site):
    with site.client() as client:
        listing = client.get("/api/backups").json()
        one_vm = client.get("/api/backups", params={"vm": next(iter(site.vms.values()))}).json()
        remotes = client.get("/api/remotes").json()
        by_vm = client.get("/api/backups/by-vm").json()
    assert {row["vm"] for row in listing["backups"]} == set(site.vms)
    assert {row["remote"] for row in listing["backups"]} == {"nas"}
    assert all(row["mode"] == "delta" and row["size"] > 0 for row in listing["backups"])
    assert {row["vm"] for row in one_vm["backups"]} == {next(iter(site.vms))}
    (problem,) = listing["errors"]
    assert problem["remote"] == "offsite" and "127.0.0.1:1" in problem["error"]
    assert {vm["vm"]: vm["vmName"] for vm in by_vm["vms"]} == site.vms
    for vm in by_vm["vms"]:
        rows = vm["remotes"]["nas"]
        assert rows == sorted(rows, key=lambda row: -row["timestamp"])
        assert {row["jobName"] for row in rows} == {"nightly"}
    offsite = next(remote for remote in remotes if remote["name"] == "offsite")
    assert offsite["url"] == "smb://backup:***@127.0.0.1:1/share"


def test_openapi_documents_the_api(site: Site):
    with site.client() as client:
        document = client.get("/api/openapi.json").json()
        docs = client.get("/api/docs")
    paths = document["paths"]
    for path in ("/api/jobs", "/api/runs", "/api/runs/{run_id}", "/api/backups", "/api/events"):
        assert path in paths, path
    assert "post" in paths["/api/jobs/{job}/run"]
    assert "409" in paths["/api/jobs/{job}/run"]["post"]["responses"]
    assert docs.status_code == 200 and "openapi.json" in docs.text


def test_the_api_page_needs_nothing_from_the_internet(site: Site):
    """Swagger UI's script and style come from this server: backup servers are often offline."""
    with site.client() as client:
        page = client.get("/api/docs").text
        sources = re.findall(r'(?:src|href)="([^"]+)"', page)
        assert sources and not [s for s in sources if "://" in s or s.startswith("//")], sources
        for source in sources:
            if source.endswith((".js", ".css")):
                served = client.get(source)
                assert served.status_code == 200 and len(served.content) > 10_000, source


def test_no_secret_in_any_page_or_answer(site: Site):
    # a careless plugin logged the pool's password and a remote URL with its password: the
    # pages must still not show them (the config's secrets are scrubbed from every answer)
    with site.store() as store:
        recorder = store.start_run("f" * 8, "leaky", heartbeat_interval=None)
        recorder.warning(f"login root:{SERVER_SECRET} refused", {"url": REMOTE_URL})
        leaky = recorder.finish(f"could not open {REMOTE_URL}", status=Status.SKIPPED).run_id
    paths = [
        "/",
        "/backups",
        f"/runs/{site.runs['success']}",
        f"/fragments/runs/{site.runs['success']}",
        "/fragments/runs",
        "/fragments/jobs",
        "/api/jobs",
        "/api/runs?limit=0",
        f"/api/runs/{site.runs['success']}",
        "/api/backups",
        "/api/remotes",
        "/api/schedules",
        "/api/openapi.json",
        f"/api/runs/{leaky}",
        f"/runs/{leaky}",
        f"/fragments/runs/{leaky}",
    ]
    with site.client() as client:
        for path in paths:
            answer = client.get(path)
            assert answer.status_code == 200, (path, answer.status_code)
            for secret in SECRETS:
                assert secret not in answer.text, f"{path} shows a secret"
    with site.client() as client:
        shown = client.get(f"/api/runs/{leaky}").json()
    assert shown["warnings"][0]["message"] == "login root:*** refused"
    assert shown["result"]["message"] == "could not open smb://backup:***@127.0.0.1:1/share"


def test_post_needs_the_csrf_header_and_a_known_job(site: Site):
    with site.client() as client:
        forged = client.post("/api/jobs/nightly/run")
        unknown = client.post("/api/jobs/hourly/run", headers={"X-Requested-With": "xobackup"})
        rebound = client.get("/api/jobs", headers={"Host": "evil.example:8480"})
    assert forged.status_code == 403
    assert unknown.status_code == 404 and "nightly" in unknown.json()["detail"]
    assert rebound.status_code == 421


def test_run_now_answers_at_once_and_never_runs_a_job_twice(site: Site):
    fault = site.sim.arm("VM.snapshot", "delay", seconds=1.5, times=None)
    headers = {"X-Requested-With": "xobackup"}
    try:
        with site.client() as client:
            started = client.post("/api/jobs/nightly/run", headers=headers, json={})
            assert started.status_code == 202, started.text
            run_id = started.json()["runId"]
            running = client.get(f"/api/runs/{run_id}").json()
            assert running["status"] == "pending" and running["colour"] == "orange"
            again = client.post("/api/jobs/nightly/run", headers=headers)
            assert again.status_code == 409
            assert again.json()["runId"] == run_id
            jobs = {job["key"]: job for job in client.get("/api/jobs").json()}
            assert jobs["nightly"]["runningRunId"] == run_id
            deadline = time.monotonic() + 60
            seen_progress = False
            while time.monotonic() < deadline:
                run = client.get(f"/api/runs/{run_id}").json()
                if run["status"] != "pending":
                    break
                if run["progress"]:
                    seen_progress = True
                    assert set(run["progress"]) <= set(site.vms)
                time.sleep(0.2)
            assert run["status"] == "success", run
            assert seen_progress, "live figures were never served while the run went on"
            assert run["progress"] is None
            assert run["scheduleId"] == "nightly-3am"  # the job's first schedule, as `run`
            with site.store() as store:
                assert store.get_run(run_id).status.value == "success"
    finally:
        site.sim.faults.clear()
        fault.release()
