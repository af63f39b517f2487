"""Liveness, readiness and Prometheus metrics (no auth: probes and scrapers)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from redis.exceptions import RedisError

from shared.retry import deadline

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is up")
async def healthz() -> dict[str, str]:
    """Always ok while the process serves requests."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="The engine is loaded and Redis answers",
    responses={
        200: {
            "description": "ready; `status` is 'degraded' (still serving the weights it has) while the policy hash"
            " in Redis is unusable, with the reason in `policy_error`; `waiting` says why jobs are held back"
        },
        503: {"description": "not ready: starting, or Redis did not answer within `probe_timeout_s`"},
    },
)
async def readyz(request: Request) -> JSONResponse:
    """200 when the engine is loaded and Redis answers within `probe_timeout_s`, else 503 with the reason."""
    state = getattr(request.app.state, "mindgap", None)
    if state is None:
        return JSONResponse({"status": "starting", "engine": False, "redis": False}, status_code=503)
    waiting: str | None = None
    try:
        async with deadline(state.cfg.probe_timeout_s, "readiness probe"):
            redis_ok = bool(await state.redis.ping())
            waiting = await state.store.waiting()
    except (RedisError, OSError):
        redis_ok = False
    policy_error = state.policy.hash_error
    # An unusable policy hash does not make the replica unready: it keeps serving the weights it has, and
    # every replica reads the same hash, so failing readiness would take the whole service down for it.
    status = "unavailable" if not redis_ok else "degraded" if policy_error else "ready"
    body: dict[str, Any] = {
        "status": status,
        "engine": True,  # the state exists only once the lifespan has loaded the engine
        "redis": redis_ok,
        "policy_version": state.policy.version,
    }
    if policy_error:
        body["policy_error"] = policy_error
    if waiting:
        body["waiting"] = waiting
    return JSONResponse(body, status_code=200 if redis_ok else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    """The Prometheus text exposition."""
    state = getattr(request.app.state, "mindgap", None)
    body = state.metrics.render() if state is not None else b""
    return Response(body, media_type=CONTENT_TYPE_LATEST)
