"""The FastAPI app factory: routers, error handling, and the lifespan that owns every resource.

The lifespan opens Redis, the engine and the grader, syncs the policy version, and starts the worker
and the policy watcher; on shutdown (uvicorn's SIGTERM handling included) the worker stops taking
chunks and drains, then everything is closed in reverse order.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from pydantic import ValidationError
from redis.exceptions import RedisError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.api import health, jobs, policy, rewrite
from services.api.deps import ServiceState
from services.engine import Engine, create_engine
from services.job_store import JobStore
from services.metrics import Metrics
from services.policy_watcher import STOP_CHECK_S, PolicyWatcher
from services.scheduler import EngineGate
from services.settings import ServiceConfig
from services.worker import Worker
from shared.dataio import DataError
from shared.grading import Grader
from shared.keys import TRAINER_GROUP, Keys
from shared.retry import async_redis
from shared.streams import ensure_group

log = logging.getLogger("mindgap.service")

EngineFactory = Callable[[ServiceConfig], Awaitable[Engine]]


async def default_engine(cfg: ServiceConfig) -> Engine:
    """The engine `cfg.backend` names, with the service's fake delay for tests."""
    return await create_engine(cfg.backend, cfg.engine, cfg.fake_delay_s)


class BodyLimit:
    """413 for a request body over `limit` bytes: by Content-Length up front, else while it streams in."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                await _too_large(self.limit)(scope, receive, send)
                return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    # raised inside the endpoint's body read; FastAPI re-raises HTTPExceptions from there
                    raise HTTPException(413, f"request body over the {self.limit}-byte limit")
            return message

        await self.app(scope, limited, send)


def _too_large(limit: int) -> JSONResponse:
    return JSONResponse({"detail": f"request body over the {limit}-byte limit"}, status_code=413)


def _install_error_handlers(app: FastAPI) -> None:
    async def data_error(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    async def pydantic_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ValidationError)
        return JSONResponse(
            {"detail": exc.errors(include_url=False, include_context=False, include_input=False)}, status_code=422
        )

    async def redis_down(_: Request, exc: Exception) -> JSONResponse:
        log.warning("Redis unavailable: %s", exc)
        return JSONResponse({"detail": "Redis is unavailable, retry later"}, status_code=503)

    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.error("internal error", exc_info=exc)
        return JSONResponse({"detail": "internal error"}, status_code=500)

    app.add_exception_handler(DataError, data_error)
    app.add_exception_handler(ValidationError, pydantic_error)
    app.add_exception_handler(RedisError, redis_down)
    app.add_exception_handler(Exception, unexpected)

    async def request_validation(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        # inputs are left out: they can be large uploads, and they are the client's own
        detail = [{k: v for k, v in e.items() if k in ("type", "loc", "msg")} for e in exc.errors()]
        return JSONResponse({"detail": detail}, status_code=422)

    app.add_exception_handler(RequestValidationError, request_validation)


def create_app(cfg: ServiceConfig, engine_factory: EngineFactory = default_engine) -> FastAPI:
    """The service app for `cfg`; `engine_factory` builds the engine in the lifespan (tests pass a fake)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        cfg.log_resolved(log)
        keys = Keys(cfg.key_prefix)
        r = async_redis(cfg.redis_url, cfg.redis_timeout_s)
        await r.ping()  # fail at start, with the URL's error, rather than on the first request
        await ensure_group(r, keys.examples, TRAINER_GROUP)
        engine = await engine_factory(cfg)
        grader = Grader(workers=cfg.grader_workers, timeout=cfg.grade_timeout)
        gate = EngineGate()
        metrics = Metrics(gate.busy_seconds)
        store = JobStore(r, keys, cfg.job_ttl_s, max_lag=cfg.max_lag, read_timeout_s=cfg.probe_timeout_s)
        watcher = PolicyWatcher(r, keys, engine, gate, metrics, cfg.policy_poll_s)
        await watcher.check("startup")
        consumer = cfg.consumer_name or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        worker = Worker(cfg, r, store, engine, grader, gate, lambda: watcher.version, metrics, consumer)
        app.state.mindgap = ServiceState(cfg, r, store, engine, grader, gate, metrics, watcher, worker)
        worker_task = asyncio.create_task(worker.run(), name="mindgap-worker")
        watcher_task = asyncio.create_task(watcher.run(), name="mindgap-policy")
        if cfg.gc_freeze:
            # A full collection walks every tracked object while holding the GIL, whichever thread
            # triggers it: with torch, vLLM and the model loaded that stalls the event loop (and /healthz)
            # for tenths of a second whenever parsing a big upload allocates enough. Start-up objects
            # live as long as the process, so they leave the collector's view.
            gc.collect()
            gc.freeze()
        log.info("service ready: consumer %s, policy v%d", consumer, watcher.version)
        try:
            yield
        finally:
            if cfg.gc_freeze:
                gc.unfreeze()  # an app started in a longer-lived process (tests, embedding) leaves it as it was
            await worker.stop()
            await worker_task
            watcher.stop()
            _, late = await asyncio.wait({watcher_task}, timeout=STOP_CHECK_S + 5)
            for task in late:
                task.cancel()
            grader.close()
            await engine.shutdown()
            await r.aclose()
            del app.state.mindgap

    # The docs pages load Swagger UI and ReDoc from files installed with the package (no CDN): they work offline.
    app = FastAPIOffline(
        title="mindgap rewrite service",
        version="1",
        summary="Guided Re-solving over REST: jobs, synchronous rewrites, policy reloads, Redis streams.",
        lifespan=lifespan,
        swagger_ui_parameters={"persistAuthorization": True, "validatorUrl": None},
    )
    app.add_middleware(BodyLimit, limit=cfg.max_upload_bytes)
    _install_error_handlers(app)
    for module in (jobs, rewrite, policy, health):
        app.include_router(module.router)
    return app


def openapi_schema(cfg: ServiceConfig | None = None) -> dict[str, Any]:
    """The OpenAPI document, without starting anything."""
    return create_app(cfg or ServiceConfig()).openapi()
