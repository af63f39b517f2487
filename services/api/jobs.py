"""`/v1/jobs`: create a job (upload, server-side path or inline rows), list, status, results, cancel."""

from __future__ import annotations

import io
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from services.api.deps import State, UserAuth
from shared.wire import FINISHED_STATES, DataPreview, JobCreated, JobList, JobRequest, JobSpec, JobStatus, RowError
from shared.config import StageParams
from shared.dataio import (
    DataError,
    FieldMap,
    ReadResult,
    iter_rows,
    parse_field_specs,
    parse_upload,
    preview,
    read_problems_from_rows,
    write_examples_parquet,
)

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=[UserAuth])

_JOB_ID = re.compile(r"[0-9a-f]{16}")
SHOWN_REJECTS = 5
PREVIEW_PROBLEMS = 5  # problems a dry run shows


def invalid(loc: tuple[str | int, ...], message: str) -> RequestValidationError:
    """A 422 that names the field (`loc`) like FastAPI's own validation errors."""
    return RequestValidationError([{"type": "value_error", "loc": loc, "msg": message, "input": None}])


def validation_error(exc: ValidationError, prefix: tuple[str, ...]) -> RequestValidationError:
    """A pydantic error as a 422 whose locations start with `prefix`."""
    return RequestValidationError(
        [
            {"type": e["type"], "loc": (*prefix, *e["loc"]), "msg": e["msg"], "input": None}
            for e in exc.errors(include_url=False, include_context=False)
        ]
    )


def stage_params(defaults: StageParams, overrides: dict[str, Any], prefix: tuple[str, ...]) -> StageParams:
    """The service's default stage parameters with a request's overrides (422 naming a bad one)."""
    try:
        return StageParams.model_validate({**defaults.model_dump(), **overrides})
    except ValidationError as exc:
        raise validation_error(exc, (*prefix, "params")) from None


def field_map(fields: dict[str, str], prefix: tuple[str, ...]) -> FieldMap:
    """A request's field mapping (422 naming a bad entry)."""
    try:
        return parse_field_specs([f"{name}={source}" for name, source in fields.items()])
    except DataError as exc:
        raise invalid((*prefix, "fields"), str(exc)) from None


def resolve_under_root(root: Path | None, path: str) -> Path:
    """`path` (relative to the root, or absolute) resolved with symlinks; 403 unless inside the root."""
    if root is None:
        raise HTTPException(403, "server-side paths are disabled: the service has no allowed_root")
    base = root.resolve()
    try:
        target = (base / path).resolve()  # an absolute `path` replaces `base`; `..` and symlinks are resolved
        if not target.is_relative_to(base):
            raise HTTPException(403, f"path {path!r} is outside the allowed root")
        exists = target.is_file()
    except (ValueError, OSError) as exc:  # NUL bytes, names too long for the filesystem, …
        raise invalid(("body", "path"), f"unusable path: {exc}") from None
    if not exists:
        raise invalid(("body", "path"), f"no such file under the allowed root: {path!r}")
    return target


def accepted(result: ReadResult) -> ReadResult:
    """`result` if it holds problems; else a 422 listing the first rejected rows."""
    if result.problems:
        return result
    shown = "; ".join(str(e) for e in result.errors[:SHOWN_REJECTS]) or "the input holds no rows"
    raise invalid(("body",), f"no usable problems: {shown}")


def read_rows(rows: Any, fields: FieldMap) -> ReadResult:
    """Problems from raw `(line, row)` items; a dataset-level error (unknown field…) is a 422."""
    try:
        return read_problems_from_rows(rows, fields)
    except DataError as exc:
        raise invalid(("body",), str(exc)) from None


def _job_id(job_id: str) -> str:
    if not _JOB_ID.fullmatch(job_id):
        raise HTTPException(404, f"unknown job {job_id!r}")
    return job_id


JobId = Annotated[str, PathParam(description="job id, as returned on creation")]

_JOB_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": JobRequest.model_json_schema(),
                "examples": {
                    "rows": {"value": {"rows": [{"question": "What is 2+3?", "answer": "5"}], "params": {"k": 2}}},
                    "path": {"value": {"path": "gsm8k/train.jsonl", "mode": "online", "epochs": 2}},
                },
            },
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary", "description": "JSONL, JSON or parquet"},
                        "spec": {
                            "type": "string",
                            "description": "JSON of a JobSpec: fields, params, mode, epochs, name",
                            "example": '{"fields": {"question": "problem"}, "params": {"k": 2}}',
                        },
                    },
                }
            },
        },
    }
}


@router.post(
    "",
    status_code=201,
    response_model=JobCreated,
    openapi_extra=_JOB_BODY,
    summary="Create a job from an upload (multipart), a server-side path or inline rows (JSON)",
    responses={
        200: {"model": DataPreview, "description": "dry_run=true: how the rows read; nothing is queued"},
        403: {"description": "path outside the allowed root"},
        413: {"description": "body too large"},
    },
)
async def create_job(
    request: Request,
    state: State,
    dry_run: Annotated[
        bool, Query(description="read the rows as the job would and answer how they read (200); queue nothing")
    ] = False,
) -> JobCreated | Response:
    """Read the rows, reject bad ones with their line numbers, queue the good ones in chunks."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        spec, result = await _from_upload(request)
    elif content_type.startswith("application/json"):
        spec, result = _from_json(await request.body(), state.cfg.allowed_root)
    else:
        raise HTTPException(415, "send JSON (path or rows) or multipart/form-data (file, spec)")
    params = stage_params(state.cfg.stages, spec.params, ("body",))
    if dry_run:
        report = preview(result, field_map(spec.fields, ("body",)), shown=PREVIEW_PROBLEMS)
        return Response(report.model_dump_json(), media_type="application/json")
    errors = [RowError(line=e.line, message=e.message) for e in result.errors]
    created = await state.store.create(result.problems, errors, spec, params, state.cfg.chunk_size)
    state.metrics.jobs_submitted.labels(spec.mode).inc()
    state.worker.wake()
    return created


async def _from_upload(request: Request) -> tuple[JobSpec, ReadResult]:
    form = await request.form(max_files=1, max_fields=4)
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise invalid(("body", "file"), "missing file part 'file'")
    raw_spec = form.get("spec")
    try:
        spec = JobSpec.model_validate_json(raw_spec) if isinstance(raw_spec, str) else JobSpec()
    except ValidationError as exc:
        raise validation_error(exc, ("body", "spec")) from None
    fields = field_map(spec.fields, ("body", "spec"))
    data = await upload.read()
    try:
        rows = parse_upload(data, upload.filename or "upload.jsonl")
        return spec, accepted(read_rows(rows, fields))
    except (DataError, ValueError, OSError) as exc:  # pyarrow reports a damaged file lazily, as ValueError
        raise invalid(("body", "file"), f"{upload.filename}: {exc}") from None


def _from_json(body: bytes, root: Path | None) -> tuple[JobSpec, ReadResult]:
    try:
        req = JobRequest.model_validate_json(body)
    except ValidationError as exc:
        raise validation_error(exc, ("body",)) from None
    fields = field_map(req.fields, ("body",))
    spec = JobSpec.model_validate(req.model_dump(include=set(JobSpec.model_fields)))
    if req.rows is not None:
        return spec, accepted(read_rows(enumerate(req.rows, 1), fields))
    assert req.path is not None  # JobRequest validates that exactly one source is given
    target = resolve_under_root(root, req.path)
    try:
        return spec, accepted(read_rows(iter_rows(target), fields))
    except DataError as exc:
        raise invalid(("body", "path"), str(exc)) from None


@router.get("", response_model=JobList, summary="List jobs, newest first")
async def list_jobs(state: State, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> JobList:
    """The newest jobs with their status."""
    return JobList(jobs=await state.store.recent(limit))


async def _status(state: State, job_id: str) -> JobStatus:
    status = await state.store.status(_job_id(job_id))
    if status is None:
        raise HTTPException(404, f"unknown job {job_id!r}")
    return status


@router.get("/{job_id}", response_model=JobStatus, summary="A job's state, progress and counters")
async def get_job(job_id: JobId, state: State) -> JobStatus:
    """State, progress, counts per stage, rejected rows, policy versions seen."""
    return await _status(state, job_id)


@router.get(
    "/{job_id}/results",
    summary="A job's examples so far: JSONL (streamed) or parquet",
    responses={200: {"content": {"application/x-ndjson": {}, "application/vnd.apache.parquet": {}}}},
)
async def job_results(job_id: JobId, state: State, format: Literal["jsonl", "parquet"] = "jsonl") -> Response:
    """Every example recorded for the job, one JSON record per line."""
    await _status(state, job_id)
    if format == "parquet":
        rows = [json.loads(line) async for line in state.store.results(job_id)]
        return Response(_parquet(rows), media_type="application/vnd.apache.parquet")

    async def lines() -> AsyncIterator[bytes]:
        async for line in state.store.results(job_id):
            yield line.encode() + b"\n"

    return StreamingResponse(lines(), media_type="application/x-ndjson")


def _parquet(rows: list[dict[str, Any]]) -> bytes:
    buffer = io.BytesIO()
    write_examples_parquet(rows, buffer)
    return buffer.getvalue()


@router.post(
    "/{job_id}/cancel",
    response_model=JobStatus,
    summary="Cancel a queued or running job",
    responses={409: {"description": "the job already finished"}},
)
async def cancel_job(job_id: JobId, state: State) -> JobStatus:
    """Stop the job: no new chunks start; results so far stay available."""
    before = await state.store.cancel(_job_id(job_id))
    if before is None:
        raise HTTPException(404, f"unknown job {job_id!r}")
    if before in FINISHED_STATES:
        raise HTTPException(409, f"job {job_id} already finished ({before})")
    return await _status(state, job_id)
