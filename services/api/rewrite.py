"""`POST /v1/rewrite`: a synchronous Guided Re-solving of a few rows (bounded), answered in the response."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, HTTPException

from services.api.deps import State, UserAuth
from services.api.jobs import accepted, field_map, invalid, read_rows, stage_params
from shared.wire import RewriteRequest, RewriteResponse
from services.pipeline import Summary, rewrite_batch

router = APIRouter(prefix="/v1", tags=["rewrite"], dependencies=[UserAuth])


@router.post(
    "/rewrite",
    response_model=RewriteResponse,
    summary="Rewrite a few rows now (not recorded in any job or stream)",
    responses={413: {"description": "more rows than max_sync_rows: submit a job instead"}},
)
async def rewrite(req: RewriteRequest, state: State) -> RewriteResponse:
    """Run the three stages on the rows under the current policy and return the examples."""
    if len(req.rows) > state.cfg.max_sync_rows:
        raise HTTPException(
            413, f"rows: {len(req.rows)} rows, at most {state.cfg.max_sync_rows} per synchronous rewrite"
        )
    params = stage_params(state.cfg.stages, req.params, ("body",))
    result = accepted(read_rows(enumerate(req.rows, 1), field_map(req.fields, ("body",))))
    if result.errors:
        first = result.errors[0]
        raise invalid(("body", "rows", first.line - 1), f"line {first.line}: {first.message}")
    async with state.gate.batch():
        version = state.policy.version
        state.metrics.batch_size.observe(len(result.problems))
        outcomes = await rewrite_batch(
            result.problems, state.engine, state.grader, params, version, f"sync:{uuid.uuid4().hex}"
        )
    summary = Summary.from_outcomes(outcomes)
    return RewriteResponse(
        policy_version=version,
        examples=[ex for out in outcomes for ex in out.examples],
        stages=summary.stage_problems,
        dropped=summary.dropped,
    )
