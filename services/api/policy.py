"""`/v1/policy`: the served policy version and reload history; an admin-forced reload."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException

from services.api.deps import AdminAuth, State, UserAuth
from services.api.jobs import invalid
from shared.wire import PolicyStatus, ReloadRecord, ReloadRequest

router = APIRouter(prefix="/v1/policy", tags=["policy"])


@router.get("", response_model=PolicyStatus, dependencies=[UserAuth], summary="Served policy and reload history")
async def get_policy(state: State) -> PolicyStatus:
    """The version stamped on new examples, its checkpoint path, and past reloads."""
    return state.policy.status()


@router.post(
    "/reload",
    response_model=ReloadRecord,
    dependencies=[AdminAuth],
    summary="Reload the weights from a checkpoint folder now (admin)",
    responses={422: {"description": "checkpoint refused (no READY marker) or failed to load; old weights serve"}},
)
async def reload_policy(req: ReloadRequest, state: State) -> ReloadRecord:
    """Finish running batches, load the checkpoint, stamp its version on later examples."""
    if not Path(req.path).is_dir():
        raise invalid(("body", "path"), f"no checkpoint folder at {req.path!r}")
    record = await state.policy.reload(req.path, req.version, "admin")
    if record.outcome != "loaded":
        raise HTTPException(422, f"checkpoint {record.outcome}: {record.error}; still serving v{state.policy.version}")
    return record
