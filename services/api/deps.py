"""Typed FastAPI dependencies: the process's resources (opened in the app lifespan), the auth scopes, and JSON
bodies read only once auth has passed."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import anyio
import redis.asyncio as aioredis
from fastapi import Depends, HTTPException, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ValidationError

from services.api.errors import validation_error
from services.auth import AuthError, Scope, authorize
from services.engine import Engine
from services.job_store import JobStore
from services.metrics import Metrics
from services.policy_watcher import PolicyWatcher
from services.scheduler import EngineGate
from services.settings import ServiceConfig
from services.worker import Worker
from shared.grading import Grader


@dataclass
class ServiceState:
    """Everything the routers use, created once per app in its lifespan."""

    cfg: ServiceConfig
    redis: aioredis.Redis
    store: JobStore
    engine: Engine
    grader: Grader
    gate: EngineGate
    metrics: Metrics
    policy: PolicyWatcher
    worker: Worker


def get_state(request: Request) -> ServiceState:
    """The app's resources."""
    state: ServiceState = request.app.state.mindgap
    return state


State = Annotated[ServiceState, Depends(get_state)]


def _check(scope: Scope, request: Request, authorization: str | None) -> None:
    try:
        authorize(request.app.state.mindgap.cfg, authorization, scope)
    except AuthError as exc:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        raise HTTPException(exc.status, str(exc), headers=headers) from None


# Declares the bearer scheme in the OpenAPI document (Swagger's Authorize button); `authorize` does the checking,
# so a missing or malformed header is our 401 with its message rather than the scheme's own error.
BEARER = HTTPBearer(
    scheme_name="bearer", description="an API key; POST /v1/policy/reload needs an admin key", auto_error=False
)
Credentials = Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)]


def require_user(request: Request, _: Credentials) -> None:
    """Any valid key (user or admin)."""
    _check(Scope.USER, request, request.headers.get("authorization"))


def require_admin(request: Request, _: Credentials) -> None:
    """An admin key."""
    _check(Scope.ADMIN, request, request.headers.get("authorization"))


UserAuth = Depends(require_user)
AdminAuth = Depends(require_admin)

M = TypeVar("M", bound=BaseModel)


def is_json(content_type: str | None) -> bool:
    """Whether a Content-Type header names JSON (`application/json`, maybe with a charset, or `…+json`)."""
    media = (content_type or "").partition(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def json_body(model: type[M]) -> Callable[[Request], Awaitable[M]]:
    """A dependency reading the body as `model`: 415 unless it is JSON, 422 naming the field.

    Listed after the auth dependency, it runs only for an authorized request (FastAPI's own body parameters
    are read and parsed before any dependency). Parsing runs in a worker thread, off the event loop.
    """

    async def read(request: Request) -> M:
        if not is_json(request.headers.get("content-type")):
            raise HTTPException(415, "send a JSON body with 'Content-Type: application/json'")
        body = await request.body()
        try:
            return await anyio.to_thread.run_sync(model.model_validate_json, body)
        except ValidationError as exc:
            raise validation_error(exc, ("body",)) from None

    return read


def json_request_body(model: type[BaseModel]) -> dict[str, Any]:
    """The `openapi_extra` documenting a body read by `json_body(model)` (its schema, with its examples)."""
    schema = model.model_json_schema()
    assert "$defs" not in schema, f"{model.__name__} nests models: register them as components instead"
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}
