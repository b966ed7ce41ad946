"""The dashboard's HTTP side: a Starlette app of JSON routes over zdni.dashboard.view, the live
page, and the operator's actions (roll back, stop) behind a bearer token.

Routes (JSON unless said otherwise; RUN is a run id):

    GET  /                              the live page (static/index.html)
    GET  /api/runs                      runs in this Redis, newest first, and the current one
    GET  /api/runs/RUN                  settings and state
    GET  /api/runs/RUN/stages           each stage's health, heartbeat, utilization, counters
    GET  /api/runs/RUN/counters         every process's message counters
    GET  /api/runs/RUN/backups          backed-up iterations per stage, and the common ones
    GET  /api/runs/RUN/metrics?since=ID metric records after ID (incremental), `last` to go on
    GET  /api/runs/RUN/events?since=ID  health changes and operator actions after ID
    POST /api/runs/RUN/rollback {"to": N}  every stage to the newest common backup <= N
    POST /api/runs/RUN/stop             ask the run's driver to stop it (202)

Errors are JSON {"error": "..."} with their status: 400 a bad parameter, 401 no token, 403 a
wrong token (or actions off), 404 an unknown run or path, 409 an action the run's state does
not allow, 503 Redis unreachable, 504 stages that did not confirm; never a traceback.
"""

from __future__ import annotations

import hmac
import logging
import os
import time
from typing import Any

import redis
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from zdni import health, keys
from zdni.dashboard import view
from zdni.security import Curve

__all__ = ["create_app"]

log = logging.getLogger("zdni.dashboard")
STATIC = os.path.join(os.path.dirname(__file__), "static")
ACTIVE = ("starting", "running")  # a run whose workers can still take an action


def create_app(client: redis.Redis, token: str | None = None, curve: Curve | None = None,
               default_run: str | None = None, rollback_timeout_s: float = 30.0) -> Starlette:
    """The dashboard over `client`'s Redis. Without a `token` the operator's actions answer 403.
    `default_run` is the run the page opens on (else the current one)."""

    def api(handler: Any) -> Any:
        """A route reading one run: view's errors become HTTP errors."""
        def endpoint(request: Request) -> Response:
            try:
                return JSONResponse(handler(request))
            except view.RunNotFound as exc:
                raise HTTPException(404, str(exc)) from None
            except view.BadParameter as exc:
                raise HTTPException(400, str(exc)) from None
        return endpoint

    def arg(request: Request, name: str, default: int, low: int, high: int) -> int:
        raw = request.query_params.get(name)
        if raw is None:
            return default
        if not raw.isdigit() or not low <= int(raw) <= high:
            raise view.BadParameter(f"{name}={raw[:20]!r} must be an integer in {low}..{high}")
        return int(raw)

    def authorize(request: Request) -> None:
        if not token:
            raise HTTPException(403, "operator actions are off: start `zdni dashboard` with "
                                     "ZDNI_DASHBOARD_TOKEN set (or --token-file)")
        given = request.headers.get("authorization", "")
        if not given.lower().startswith("bearer ") or not given[7:].strip():
            raise HTTPException(401, "this action needs the dashboard's token: "
                                     "Authorization: Bearer TOKEN",
                                headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given[7:].strip().encode(), token.encode()):
            raise HTTPException(403, "wrong token")

    def active(run_id: str) -> dict[str, Any]:
        info = view.run(client, run_id)
        status = info["state"].get("status")
        if status not in ACTIVE:
            raise HTTPException(409, f"run {run_id} is {status}: its workers are gone")
        return info

    async def rollback(request: Request) -> Response:
        authorize(request)
        run_id = request.path_params["run"]
        try:
            body = await request.json()
        except ValueError:
            body = None
        target = body.get("to") if isinstance(body, dict) else None
        if not isinstance(target, int) or isinstance(target, bool) or target < 0:
            raise HTTPException(400, 'expected a JSON body {"to": ITERATION}, ITERATION >= 0')
        from starlette.concurrency import run_in_threadpool

        chosen = await run_in_threadpool(_rollback, run_id, target)
        return JSONResponse({"run": run_id, "rolled_back_to": chosen})

    def _rollback(run_id: str, target: int) -> int:
        from zdni.rollback import RollbackError, common_iteration, rollback_run

        try:
            info = active(run_id)
        except view.RunNotFound as exc:
            raise HTTPException(404, str(exc)) from None
        broker = info["state"].get("broker")
        if not broker:
            raise HTTPException(409, f"run {run_id} published no broker address")
        try:
            common_iteration({int(s): v for s, v in view.backups(client, run_id)["stages"]
                              .items()}, target)
        except RollbackError as exc:
            raise HTTPException(409, str(exc)) from None
        health.publish(client, run_id, {"event": "rollback requested", "to": target,
                                        "time": time.time()})
        try:
            chosen = rollback_run(client, str(broker), run_id, target, rollback_timeout_s, curve)
        except RollbackError as exc:
            raise HTTPException(504, str(exc)) from None
        health.publish(client, run_id, {"event": "rolled back", "to": chosen,
                                        "time": time.time()})
        log.warning("[dashboard] run %s: every stage rolled back to iteration %d", run_id, chosen)
        return chosen

    def stop(request: Request) -> Response:
        authorize(request)
        run_id = request.path_params["run"]
        try:
            active(run_id)
        except view.RunNotFound as exc:
            raise HTTPException(404, str(exc)) from None
        client.hset(keys.state(run_id), "stop_requested", str(time.time()))
        health.publish(client, run_id, {"event": "stop requested", "time": time.time()})
        log.warning("[dashboard] run %s: stop requested", run_id)
        return JSONResponse({"run": run_id, "stopping": True}, status_code=202)

    def page(request: Request) -> Response:
        return FileResponse(os.path.join(STATIC, "index.html"),
                            headers={"Cache-Control": "no-store"})

    def run_list(request: Request) -> dict[str, Any]:
        found = view.runs(client, arg(request, "limit", 100, 1, 1000))
        return {**found, "default": default_run or found["current"],
                "actions": bool(token)}

    routes = [
        Route("/", page),
        Route("/api/runs", api(run_list)),
        Route("/api/runs/{run}", api(lambda r: view.run(client, r.path_params["run"]))),
        Route("/api/runs/{run}/stages", api(lambda r: view.stages(client, r.path_params["run"]))),
        Route("/api/runs/{run}/counters",
              api(lambda r: view.counters(client, r.path_params["run"]))),
        Route("/api/runs/{run}/backups",
              api(lambda r: view.backups(client, r.path_params["run"]))),
        Route("/api/runs/{run}/metrics", api(lambda r: view.metrics(
            client, r.path_params["run"], r.query_params.get("since"),
            arg(r, "limit", 2000, 1, 10_000)))),
        Route("/api/runs/{run}/events", api(lambda r: view.events(
            client, r.path_params["run"], r.query_params.get("since"),
            arg(r, "limit", 500, 1, 5000)))),
        Route("/api/runs/{run}/rollback", rollback, methods=["POST"]),
        Route("/api/runs/{run}/stop", stop, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    handlers = {HTTPException: _http_error, redis.RedisError: _redis_error, Exception: _crash}
    return Starlette(routes=routes, exception_handlers=handlers)  # type: ignore[arg-type]


def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return JSONResponse({"error": exc.detail}, status_code=exc.status_code,
                        headers=dict(exc.headers or {}))


def _redis_error(request: Request, exc: Exception) -> Response:
    text = " ".join(str(exc).split())[:200]
    log.error("[dashboard] Redis: %s", text)
    return JSONResponse({"error": f"Redis unreachable or refusing: {text}"}, status_code=503)


def _crash(request: Request, exc: Exception) -> Response:
    log.exception("[dashboard] %s %s failed", request.method, request.url.path)
    return JSONResponse({"error": f"internal error ({type(exc).__name__}); see the dashboard's "
                                  "log"}, status_code=500)
