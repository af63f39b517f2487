"""`/v1/policy`: the served policy version and reload history; an admin-forced reload."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException

from services.api.deps import AdminAuth, State, UserAuth, json_body, json_request_body
from services.api.errors import invalid, responses, shown
from services.policy_watcher import StaleVersion, version_from_path
from shared.wire import POLICY_VERSION_MAX, PolicyStatus, ReloadRecord, ReloadRequest

router = APIRouter(prefix="/v1/policy", tags=["policy"], responses=responses(401, 503))


@router.get("", response_model=PolicyStatus, dependencies=[UserAuth], summary="Served policy and reload history")
async def get_policy(state: State) -> PolicyStatus:
    """The version stamped on new examples, its checkpoint path, and past reloads."""
    return state.policy.status()


@router.post(
    "/reload",
    response_model=ReloadRecord,
    dependencies=[AdminAuth],
    summary="Reload the weights from a checkpoint folder now (admin)",
    openapi_extra=json_request_body(ReloadRequest),
    responses={
        **responses(403, 415),
        409: {
            **responses(409)[409],
            "description": "the version is not above the served one, and allow_rollback is not set",
        },
        422: {
            **responses(422)[422],
            "description": "invalid request, or the checkpoint was refused (no READY"
            " marker) or failed to load; the old weights keep serving",
        },
    },
)
async def reload_policy(req: Annotated[ReloadRequest, Depends(json_body(ReloadRequest))], state: State) -> ReloadRecord:
    """Finish running batches, load the checkpoint, stamp its version on later examples."""
    try:
        is_dir = Path(req.path).is_dir()
    except (ValueError, OSError) as exc:  # NUL bytes, names too long for the filesystem, …
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise invalid(("body", "path"), f"unusable path {shown(req.path)}: {reason}") from None
    if not is_dir:
        raise invalid(("body", "path"), f"no checkpoint folder at {shown(req.path)}")
    named = version_from_path(req.path)
    if req.version is None and named is not None and named > POLICY_VERSION_MAX:
        raise invalid(
            ("body", "path"), f"the folder names version {named}, over {POLICY_VERSION_MAX}: pass a smaller 'version'"
        )
    try:
        record = await state.policy.reload(req.path, req.version, "admin", allow_rollback=req.allow_rollback)
    except StaleVersion as exc:
        raise HTTPException(409, str(exc)) from None
    if record.outcome != "loaded":
        raise HTTPException(422, f"checkpoint {record.outcome}: {record.error}; still serving v{state.policy.version}")
    return record
