"""The web application: HTML pages, their fragments, and the JSON API under ``/api/``.

Pages are rendered on the server (Jinja2); a small script in ``static/app.js`` expands runs,
refreshes what changed when the server sends an event (``/api/events``, server-sent events)
and starts runs. The API serves the same data as JSON; its OpenAPI document is
``/api/openapi.json`` and its interactive documentation ``/api/docs``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

import swagger_ui_bundle
from fastapi import FastAPI, Query, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, FileSystemLoader, select_autoescape
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.responses import StreamingResponse

from xobackup_core import __version__ as core_version
from xobackup_core.errors import UsageError, XobackupError
from xobackup_core.logs import RunFilter, RunRecord, Status, parse_since
from xobackup_core.logs.render import (
    STATUS_STYLES,
    format_duration,
    format_size,
    format_speed,
    format_time,
    short_id,
)
from xobackup_web.auth import COOKIE_NAME, CSRF_HEADER, Auth, host_is_loopback_name
from xobackup_web.overview import JobRunningError, Overview, UnknownError

HERE = Path(__file__).parent
EVENT_INTERVAL = 1.0
"""Seconds between two looks at the run log for the live view."""
KEEPALIVE_EVERY = 15
"""Send an SSE comment after this many quiet intervals, so proxies keep the stream open."""

PAGE_RUNS = 50
"""Runs listed on the overview (the newest matching the filters)."""
_TERMINAL_COLOURS = {"green": "green", "red": "red", "yellow": "orange", "magenta": "purple"}


def status_colour(status: Status | str) -> str:
    """The colour name of a status on the pages: the terminal's colours of ``xobackup logs``
    (:data:`~xobackup_core.logs.render.STATUS_STYLES`), with orange for unfinished runs."""
    style = STATUS_STYLES[Status(status)]
    return _TERMINAL_COLOURS.get(style.get("fg", ""), "grey")


# -- the API's documented shapes -----------------------------------------------------------------
class NextRun(BaseModel):
    local: str = Field(description="ISO 8601 in the schedule's timezone")
    utc: str
    ms: int = Field(description="milliseconds since the epoch")
    text: str = Field(description="for people: 'Fri 2026-11-27 03:00 CET'")


class ScheduleOut(BaseModel):
    schedule: str
    name: str
    job: str
    cron: str
    timezone: str
    enabled: bool
    next: list[NextRun] = Field(description="the next runs; empty when disabled")


class RunSummary(BaseModel):
    """A run without its tasks (as ``xobackup logs --json``)."""

    runId: str
    jobId: str
    jobName: str
    scheduleId: str | None
    start: int = Field(description="ms since the epoch")
    end: int | None
    duration: int | None = Field(description="ms; null while running")
    status: str = Field(description="pending, success, failure, skipped, interrupted, cancelled")
    colour: str = Field(description="green, red, orange (unfinished), grey, purple")
    size: int | None = Field(description="bytes moved")
    hostname: str | None
    pid: int | None
    result: Any = None


class RunDetail(RunSummary):
    """A run with its task tree (as ``xobackup logs show --json``) and live figures."""

    warnings: list[dict[str, Any]]
    infos: list[dict[str, Any]]
    tasks: list[dict[str, Any]] = Field(
        description="top-level tasks; each has id, name, data, status, start, end, duration, "
        "size, result, warnings, infos and its child tasks"
    )
    progress: dict[str, dict[str, Any]] | None = Field(
        description="per VM uuid: name, stage, bytes transferred, speed (bytes/s); only "
        "while the run is in progress (in any process), else null"
    )


class JobOut(BaseModel):
    key: str
    id: str
    name: str
    mode: str
    selection: dict[str, Any] = Field(description="explicit 'vms' or 'smart' rules")
    remotes: list[str]
    srs: list[str]
    schedules: list[ScheduleOut]
    lastRun: RunSummary | None
    runningRunId: str | None


class RunRequest(BaseModel):
    schedule: str | None = Field(None, description="run as this schedule of the job")


class RunStarted(BaseModel):
    runId: str
    job: str


class BackupRow(BaseModel):
    remote: str
    id: str = Field(description="the backup's metadata path on the remote")
    vm: str
    vmName: str
    timestamp: int
    mode: str
    size: int
    jobId: str
    scheduleId: str


class RemoteErrorOut(BaseModel):
    remote: str
    error: str


class BackupsOut(BaseModel):
    backups: list[BackupRow]
    errors: list[RemoteErrorOut] = Field(description="remotes that could not be read")


class VmBackupRow(BackupRow):
    jobName: str


class VmBackups(BaseModel):
    vm: str
    vmName: str
    remotes: dict[str, list[VmBackupRow]] = Field(description="remote name → its backups")


class BackupsByVmOut(BaseModel):
    vms: list[VmBackups]
    errors: list[RemoteErrorOut]


class RemoteOut(BaseModel):
    name: str
    type: str
    url: str = Field(description="without any password")
    enabled: bool


class ErrorOut(BaseModel):
    detail: str
    runId: str | None = None


# -- helpers -----------------------------------------------------------------------------------
def run_summary(run: RunRecord) -> dict[str, Any]:
    data = run.to_dict(tasks=False)
    data["colour"] = status_colour(run.status)
    return data


def _task_label(task: dict[str, Any] | Any) -> str:
    """What a task's data names: ``web01``, ``remote nas``, ``SR local``."""
    data = task if isinstance(task, dict) else {}
    kind = data.get("type")
    label = data.get("name_label") or data.get("name") or data.get("id")
    if kind == "VM":
        return str(label or "")
    if kind:
        return " ".join(str(part) for part in (kind, label) if part)
    return ""


def _details(data: Any) -> list[tuple[str, str]]:
    """Flat key/value pairs of a task's data and result, for its detail panel."""
    if not isinstance(data, dict):
        return []
    pairs = []
    for key, value in data.items():
        if key in ("message", "size", "stack", "type", "name_label"):
            continue
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        pairs.append((str(key), text))
    return pairs


def _time_until(ms: int) -> str:
    """``in 3h 05m`` from now."""
    return "in " + format_duration(max(0, ms - int(time.time() * 1000)))


def _filter_from(
    job: str | None,
    vm: str | None,
    status: list[str],
    search: str | None,
    since: str | None,
    limit: int,
) -> RunFilter:
    statuses = [s for value in status for s in value.split(",") if s.strip()]
    return RunFilter(
        job=job or None,
        statuses=statuses,
        vm=vm or None,
        since=parse_since(since) if since else None,
        search=search or None,
        limit=limit or None,
    )


def _templates(overview: Overview) -> Jinja2Templates:
    scrub = overview.scrubber

    def finalize(value: Any) -> Any:
        # every value a template prints goes through here: a config secret never shows
        return scrub.text(value) if isinstance(value, str) else value

    environment = Environment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=select_autoescape(["html"]),
        finalize=finalize,
    )
    environment.filters.update(
        size=format_size,
        duration=format_duration,
        speed=format_speed,
        time=format_time,
        short_id=short_id,
        colour=status_colour,
        label=_task_label,
        details=_details,
        until=_time_until,
    )
    environment.globals.update(version=core_version, statuses=[s.value for s in Status])
    return Jinja2Templates(env=environment)


# -- the application -------------------------------------------------------------------------
def create_app(overview: Overview, auth: Auth) -> FastAPI:
    """The ASGI application over ``overview``, guarded by ``auth``."""
    app = FastAPI(
        title="xobackup",
        version=core_version,
        description="Backup jobs, schedules, runs with their task trees, and backups per VM. "
        "Every call needs `Authorization: Bearer <token>` unless the server listens on "
        "loopback without a token. POST calls also need the header "
        f"`{CSRF_HEADER}: xobackup` unless they carry the bearer token.",
        docs_url=None,  # served below, from this package's files rather than a CDN
        redoc_url=None,
        openapi_url="/api/openapi.json",
    )
    app.state.overview = overview
    templates = _templates(overview)
    scrub = overview.scrubber
    # Swagger UI's files come with the swagger-ui-bundle package: backup servers often have no
    # way out to the internet, and the API page must work there too.
    app.mount(
        "/static/swagger-ui",
        StaticFiles(directory=swagger_ui_bundle.swagger_ui_path),
        name="swagger-ui",
    )
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    @app.get("/api/docs", include_in_schema=False)
    def api_docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/api/openapi.json",
            title="xobackup API",
            swagger_js_url="/static/swagger-ui/swagger-ui-bundle.js",
            swagger_css_url="/static/swagger-ui/swagger-ui.css",
            swagger_favicon_url="/favicon.ico",
        )

    # -- guard -------------------------------------------------------------------------------
    @app.middleware("http")
    async def guard(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        path = request.url.path
        bearer = auth.bearer_ok(request.headers.get("authorization"))
        if not auth.required and not host_is_loopback_name(request.headers.get("host")):
            return JSONResponse(
                {"detail": "this server answers loopback names only (no token is configured)"},
                status_code=421,
            )
        open_path = path in ("/login", "/favicon.ico") or path.startswith("/static/")
        if auth.required and not open_path:
            if not (bearer or auth.cookie_ok(request.cookies.get(COOKIE_NAME))):
                if path.startswith("/api/") or path.startswith("/fragments/"):
                    return JSONResponse(
                        {"detail": "sign in: send Authorization: Bearer <token>"},
                        status_code=401,
                        headers={"WWW-Authenticate": 'Bearer realm="xobackup"'},
                    )
                return RedirectResponse(f"/login?next={quote(path)}", status_code=303)
        if request.method == "POST" and path not in ("/login", "/logout") and not bearer:
            if request.headers.get(CSRF_HEADER) != "xobackup":
                return JSONResponse(
                    {"detail": f"POST needs the header '{CSRF_HEADER}: xobackup'"},
                    status_code=403,
                )
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        return response

    # -- JSON API ----------------------------------------------------------------------------
    @app.get("/api/jobs", response_model=list[JobOut], tags=["jobs"])
    def api_jobs() -> Any:
        """Every job with its schedules (next runs), last run and running run."""
        return scrub.data(_jobs(overview))

    @app.post(
        "/api/jobs/{job}/run",
        response_model=RunStarted,
        status_code=202,
        tags=["jobs"],
        responses={404: {"model": ErrorOut}, 409: {"model": ErrorOut}},
    )
    def api_run_job(job: str, body: RunRequest | None = None) -> Any:
        """Start a run of the job now (as `xobackup run`); answers once the run exists.

        409 with the running run's id when the job is already running anywhere.
        """
        run_id = overview.start_run(job, body.schedule if body else None)
        return {"runId": run_id, "job": overview.job_key(job)}

    @app.get("/api/schedules", response_model=list[ScheduleOut], tags=["jobs"])
    def api_schedules(count: int = Query(3, ge=1, le=100)) -> Any:
        """Every schedule with its next `count` runs (as `xobackup schedules --json`)."""
        return scrub.data(overview.schedules(count))

    @app.get("/api/runs", response_model=list[RunSummary], tags=["runs"])
    def api_runs(
        job: str | None = Query(None, description="job id or name"),
        vm: str | None = Query(None, description="VM uuid or name"),
        status: list[str] = Query([], description="repeatable, or comma-separated"),
        search: str | None = Query(None, description="free text in tasks, messages, data"),
        since: str | None = Query(None, description="12h, 2d, 1w or a date"),
        limit: int = Query(50, ge=0, description="0: no limit"),
    ) -> Any:
        """Runs, newest first, filtered as `xobackup logs` filters them."""
        runs = overview.runs(_filter_from(job, vm, status, search, since, limit))
        return scrub.data([run_summary(run) for run in runs])

    @app.get(
        "/api/runs/{run_id}",
        response_model=RunDetail,
        tags=["runs"],
        responses={404: {"model": ErrorOut}},
    )
    def api_run(run_id: str) -> Any:
        """One run (full id or prefix) with its task tree, and live figures while running."""
        run = overview.run(run_id)
        data = run.to_dict()
        data["colour"] = status_colour(run.status)
        data["progress"] = overview.progress(run.run_id)
        return scrub.data(data)

    @app.get("/api/remotes", response_model=list[RemoteOut], tags=["backups"])
    def api_remotes() -> Any:
        """The configured remotes (URLs without passwords)."""
        return overview.remotes()

    @app.get("/api/backups", response_model=BackupsOut, tags=["backups"])
    def api_backups(
        vm: str | None = Query(None, description="VM uuid or name"),
        remote: str | None = Query(None, description="only this remote"),
    ) -> Any:
        """Every backup on the remotes (as `xobackup backups list --json`)."""
        return scrub.data(overview.backups(vm=vm, remote=remote))

    @app.get("/api/backups/by-vm", response_model=BackupsByVmOut, tags=["backups"])
    def api_backups_by_vm(vm: str | None = Query(None, description="VM uuid or name")) -> Any:
        """The backups page's data: per VM, per remote, newest first (rows with `jobName`)."""
        return scrub.data(overview.backups_per_vm(vm=vm))

    @app.get(
        "/api/events",
        tags=["runs"],
        response_class=StreamingResponse,
        responses={200: {"content": {"text/event-stream": {}}}},
    )
    async def api_events(request: Request) -> StreamingResponse:
        """Server-sent events: a `change` event (data: `{"fingerprint", "running"}`) each
        time runs or their tasks change, checked every second."""

        async def stream() -> AsyncIterator[str]:
            last = None
            quiet = 0
            while not await request.is_disconnected():
                fingerprint, running = await run_in_threadpool(
                    lambda: (overview.fingerprint(), overview.running())
                )
                if fingerprint != last:
                    last = fingerprint
                    quiet = 0
                    payload = json.dumps({"fingerprint": fingerprint, "running": running})
                    yield f"event: change\ndata: {payload}\n\n"
                else:
                    quiet += 1
                    if quiet % KEEPALIVE_EVERY == 0:
                        yield ": keep-alive\n\n"
                await asyncio.sleep(EVENT_INTERVAL)

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    # -- pages -------------------------------------------------------------------------------
    def page(request: Request, name: str, **context: Any) -> HTMLResponse:
        context.setdefault("auth_required", auth.required)
        return templates.TemplateResponse(request, name, context)

    @app.exception_handler(XobackupError)
    async def xobackup_error(request: Request, error: XobackupError) -> Response:
        status = 500
        body: dict[str, Any] = {"detail": scrub.text(str(error))}
        if isinstance(error, JobRunningError):
            status = 409
            body["runId"] = error.run_id
        elif isinstance(error, UnknownError):
            status = 404
        elif isinstance(error, UsageError):
            status = 400
        path = request.url.path
        if path.startswith("/api/") or path.startswith("/fragments/"):
            return JSONResponse(body, status_code=status)
        titles = {404: "Not found", 400: "Bad request", 409: "Already running"}
        response = page(
            request,
            "error.html",
            status=status,
            title=titles.get(status, "Error"),
            detail=body["detail"],
        )
        response.status_code = status
        return response

    def run_rows(request: Request, run_filter: RunFilter) -> HTMLResponse:
        runs = overview.runs(run_filter)
        return page(request, "_runs.html", runs=runs, notes=overview.notes(runs))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def overview_page(
        request: Request,
        job: str | None = None,
        vm: str | None = None,
        status: str | None = None,
        q: str | None = None,
    ) -> HTMLResponse:
        error = None
        try:
            runs = overview.runs(_filter_from(job, vm, [status or ""], q, None, PAGE_RUNS))
        except UsageError as problem:
            runs, error = [], str(problem)
        return page(
            request,
            "overview.html",
            jobs=_jobs(overview),
            runs=runs,
            notes=overview.notes(runs),
            filters={"job": job or "", "vm": vm or "", "status": status or "", "q": q or ""},
            error=error,
        )

    @app.get("/fragments/jobs", response_class=HTMLResponse, include_in_schema=False)
    def jobs_fragment(request: Request) -> HTMLResponse:
        return page(request, "_jobs.html", jobs=_jobs(overview))

    @app.get("/fragments/runs", response_class=HTMLResponse, include_in_schema=False)
    def runs_fragment(
        request: Request,
        job: str | None = None,
        vm: str | None = None,
        status: str | None = None,
        q: str | None = None,
    ) -> HTMLResponse:
        return run_rows(request, _filter_from(job, vm, [status or ""], q, None, PAGE_RUNS))

    @app.get("/fragments/runs/{run_id}", response_class=HTMLResponse, include_in_schema=False)
    def run_fragment(request: Request, run_id: str) -> HTMLResponse:
        run = overview.run(run_id)
        return page(request, "_run.html", run=run, progress=overview.progress(run.run_id))

    @app.get("/runs/{run_id}", response_class=HTMLResponse, include_in_schema=False)
    def run_page(request: Request, run_id: str) -> HTMLResponse:
        run = overview.run(run_id)
        return page(request, "run.html", run=run, progress=overview.progress(run.run_id))

    @app.get("/backups", response_class=HTMLResponse, include_in_schema=False)
    def backups_page(request: Request, vm: str | None = None) -> HTMLResponse:
        listing = overview.backups_per_vm(vm=vm or None)
        return page(
            request,
            "backups.html",
            vms=listing["vms"],
            errors=listing["errors"],
            remotes=overview.remotes(),
            vm_filter=vm or "",
        )

    @app.get("/login", response_class=HTMLResponse, include_in_schema=False)
    def login_page(request: Request, next: str = "/") -> Response:
        if not auth.required:
            return RedirectResponse("/", status_code=303)
        return page(request, "login.html", next=_safe_next(next), failed=False)

    @app.post("/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        if not auth.required:
            return RedirectResponse("/", status_code=303)
        form = parse_qs((await request.body()).decode("utf-8", "replace"))
        token = (form.get("token") or [""])[0]
        target = _safe_next((form.get("next") or ["/"])[0])
        if not auth.token_matches(token):
            response = page(request, "login.html", next=target, failed=True)
            response.status_code = 401
            return response
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(
            COOKIE_NAME,
            auth.session_cookie(),
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return response

    @app.post("/logout", include_in_schema=False)
    def logout() -> Response:
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE_NAME)
        return response

    return app


def _jobs(overview: Overview) -> list[dict[str, Any]]:
    jobs = overview.jobs()
    for job in jobs:
        if job["lastRun"] is not None:
            job["lastRun"]["colour"] = status_colour(job["lastRun"]["status"])
    return jobs


def _safe_next(target: str) -> str:
    """Only a path of this server (no ``//host`` or scheme): no open redirect after sign-in."""
    if not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target
