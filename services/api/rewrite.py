"""`POST /v1/rewrite`: a synchronous Guided Re-solving of a few rows (bounded), answered in the response."""

from __future__ import annotations

import uuid
from typing import Annotated

import anyio
from fastapi import APIRouter, Depends, HTTPException

from services.api.deps import State, UserAuth, json_body, json_request_body
from services.api.errors import invalid, responses
from services.api.jobs import accepted, field_map, read_rows, stage_params
from services.api.limits import bounded_rows, check_job_size
from services.pipeline import Summary, rewrite_batch
from shared.dataio import ReadResult
from shared.wire import RewriteRequest, RewriteResponse

router = APIRouter(prefix="/v1", tags=["rewrite"], dependencies=[UserAuth], responses=responses(401, 503))


@router.post(
    "/rewrite",
    response_model=RewriteResponse,
    summary="Rewrite a few rows now (not recorded in any job or stream)",
    openapi_extra=json_request_body(RewriteRequest),
    responses=responses(413, 415, 422),
)
async def rewrite(req: Annotated[RewriteRequest, Depends(json_body(RewriteRequest))], state: State) -> RewriteResponse:
    """Run the three stages on the rows under the current policy and return the examples."""
    if len(req.rows) > state.cfg.max_sync_rows:
        raise HTTPException(
            413, f"rows: {len(req.rows)} rows, at most {state.cfg.max_sync_rows} per synchronous rewrite"
        )
    params = stage_params(state.cfg, req.params, ("body",))
    fields = field_map(req.fields, ("body",))

    def read() -> ReadResult:
        return accepted(read_rows(bounded_rows(enumerate(req.rows, 1), state.cfg.limits), fields))

    result = await anyio.to_thread.run_sync(read)
    check_job_size(len(result.problems), params, None, state.cfg.limits)
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
