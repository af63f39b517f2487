"""Typed FastAPI dependencies: the process's resources (opened in the app lifespan) and the auth scopes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import redis.asyncio as aioredis
from fastapi import Depends, Header, HTTPException, Request

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


def require_user(request: Request, authorization: Annotated[str | None, Header()] = None) -> None:
    """Any valid key (user or admin)."""
    _check(Scope.USER, request, authorization)


def require_admin(request: Request, authorization: Annotated[str | None, Header()] = None) -> None:
    """An admin key."""
    _check(Scope.ADMIN, request, authorization)


UserAuth = Depends(require_user)
AdminAuth = Depends(require_admin)
