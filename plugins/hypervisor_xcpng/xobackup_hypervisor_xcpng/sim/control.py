"""The simulator's control endpoint, ``POST /sim/<action>`` (never part of XAPI's namespace).

It exposes the Python control API to another process (a simulator started with
``xobackup sim serve``): arm faults, read in-flight counters, change disk content. The body is
a JSON object; the reply is JSON. Authentication as for the HTTP handlers: ``session_id`` in
the query (or the body), or HTTP Basic with the pool's credentials. Actions act on the pool
that received the request unless said otherwise.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from xobackup_hypervisor_xcpng.sim.codec import XapiError

if TYPE_CHECKING:
    from xobackup_hypervisor_xcpng.sim.server import RequestHandler
    from xobackup_hypervisor_xcpng.sim.simulator import Simulator
    from xobackup_hypervisor_xcpng.sim.xapi import PoolXapi


def _fault(sim: Simulator, xapi: PoolXapi, body: dict[str, Any]) -> Any:
    options = {k: v for k, v in body.items() if k not in ("target", "kind", "session_id")}
    options.setdefault("pool", xapi.index)
    fault = sim.arm(str(body["target"]), str(body.get("kind", "error")), **options)
    return {"target": fault.target, "kind": fault.kind}


def _counters(sim: Simulator, xapi: PoolXapi, body: dict[str, Any]) -> Any:
    return {"current": dict(xapi.in_flight.current), "maximum": dict(xapi.in_flight.maximum)}


def _reset_counters(sim: Simulator, xapi: PoolXapi, body: dict[str, Any]) -> Any:
    xapi.in_flight.reset()
    return _counters(sim, xapi, body)


def _clear_faults(sim: Simulator, xapi: PoolXapi, body: dict[str, Any]) -> Any:
    sim.faults.clear()
    return {}


def _write(sim: Simulator, xapi: PoolXapi, body: dict[str, Any]) -> Any:
    sim.write(str(body["vdi"]), int(body["offset"]), base64.b64decode(body["data"]))
    return {}


def _randomize(sim: Simulator, xapi: PoolXapi, body: dict[str, Any]) -> Any:
    blocks = sim.randomize_blocks(str(body["vdi"]), float(body["fraction"]), int(body["seed"]))
    return {"blocks": blocks}


def _quiesce(sim: Simulator, xapi: PoolXapi, body: dict[str, Any]) -> Any:
    sim.set_quiesce_mode(str(body["mode"]), xapi.index)
    return {}


def _host_cpu(sim: Simulator, xapi: PoolXapi, body: dict[str, Any]) -> Any:
    sim.set_host_cpu(str(body["host"]), str(body["vendor"]), body.get("features"))
    return {}


def _restart(sim: Simulator, xapi: PoolXapi, body: dict[str, Any]) -> Any:
    sim.restart_xapi(xapi.index)
    return {}


ACTIONS: dict[str, Callable[[Simulator, PoolXapi, dict[str, Any]], Any]] = {
    "fault": _fault,
    "clear_faults": _clear_faults,
    "counters": _counters,
    "reset_counters": _reset_counters,
    "write": _write,
    "randomize_blocks": _randomize,
    "quiesce_mode": _quiesce,
    "host_cpu": _host_cpu,
    "restart_xapi": _restart,
}
"""Action name -> handler; see docs/simulator.md."""


def handle(handler: RequestHandler, body: bytes) -> None:
    """Run one control action and answer JSON (400 on a bad request, 401 without auth)."""
    xapi = handler.server.xapi
    action = urlsplit(handler.path).path.removeprefix("/sim/")
    try:
        request = json.loads(body or b"{}")
        if not isinstance(request, dict):
            raise ValueError("the body must be a JSON object")
    except ValueError as error:
        handler.reply(400, "application/json", json.dumps({"error": str(error)}).encode())
        return
    query = {k: v[0] for k, v in parse_qs(urlsplit(handler.path).query).items()}
    session = query.get("session_id") or request.get("session_id")
    authorised = session in xapi.sessions
    auth = handler.headers.get("Authorization", "")
    if not authorised and auth.lower().startswith("basic "):
        try:
            user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
        except ValueError:
            user = password = ""
        authorised = (user, password) == (xapi.sim.username, xapi.sim.password)
    if not authorised:
        handler.reply(
            401,
            "application/json",
            b'{"error": "session or credentials required"}',
            WWW_Authenticate='Basic realm="xapi"',
        )
        return
    func = ACTIONS.get(action)
    if func is None:
        known = ", ".join(sorted(ACTIONS))
        message = {"error": f"unknown action {action!r}; known: {known}"}
        handler.reply(404, "application/json", json.dumps(message).encode())
        return
    try:
        result = func(xapi.sim, xapi, request)
    except (KeyError, ValueError, TypeError, XapiError) as error:
        handler.reply(400, "application/json", json.dumps({"error": repr(error)}).encode())
        return
    handler.reply(200, "application/json", json.dumps(result).encode())
