"""Liveness, readiness and Prometheus metrics (no auth: probes and scrapers)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from redis.exceptions import RedisError

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is up")
async def healthz() -> dict[str, str]:
    """Always ok while the process serves requests."""
    return {"status": "ok"}


@router.get("/readyz", summary="The engine is loaded and Redis answers", responses={503: {"description": "not ready"}})
async def readyz(request: Request) -> JSONResponse:
    """200 when the engine is loaded and Redis is reachable, else 503 with the reason."""
    state = getattr(request.app.state, "mindgap", None)
    if state is None:
        return JSONResponse({"status": "starting", "engine": False, "redis": False}, status_code=503)
    try:
        redis_ok = bool(await state.redis.ping())
    except (RedisError, OSError):
        redis_ok = False
    # the state exists only once the lifespan has loaded the engine
    return JSONResponse(
        {
            "status": "ready" if redis_ok else "unavailable",
            "engine": True,
            "redis": redis_ok,
            "policy_version": state.policy.version,
        },
        status_code=200 if redis_ok else 503,
    )


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    """The Prometheus text exposition."""
    state = getattr(request.app.state, "mindgap", None)
    body = state.metrics.render() if state is not None else b""
    return Response(body, media_type=CONTENT_TYPE_LATEST)
