"""`/v1/jobs`: create a job (upload, server-side path or inline rows), list, status, results, cancel."""

from __future__ import annotations

import io
import json
import re
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import Response, StreamingResponse
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from services.api.deps import State, UserAuth, is_json
from services.api.errors import invalid, responses, shown, validation_error
from services.api.limits import bounded_rows, check_epochs, check_job_size, check_params, max_problems
from services.settings import RequestLimits, ServiceConfig
from shared.config import StageParams
from shared.dataio import (
    DataError,
    FieldMap,
    ReadResult,
    RowItem,
    iter_rows,
    parse_field_specs,
    parse_upload,
    preview,
    read_problems_from_rows,
    write_examples_parquet,
)
from shared.wire import FINISHED_STATES, DataPreview, JobCreated, JobList, JobRequest, JobSpec, JobStatus

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=[UserAuth], responses=responses(401, 422, 503))

_JOB_ID = re.compile(r"[0-9a-f]{16}")
SHOWN_REJECTS = 5
PREVIEW_PROBLEMS = 5  # problems a dry run shows


def stage_params(cfg: ServiceConfig, overrides: dict[str, Any], prefix: tuple[str, ...]) -> StageParams:
    """The service's default stage parameters with a request's overrides (422 naming a bad one or one over
    its limit)."""
    try:
        params = StageParams.model_validate({**cfg.stages.model_dump(), **overrides})
    except ValidationError as exc:
        raise validation_error(exc, (*prefix, "params")) from None
    check_params(params, cfg.limits, prefix)
    return params


def field_map(fields: dict[str, str], prefix: tuple[str, ...]) -> FieldMap:
    """A request's field mapping (422 naming a bad entry)."""
    try:
        return parse_field_specs([f"{name}={source}" for name, source in fields.items()])
    except DataError as exc:
        raise invalid((*prefix, "fields"), str(exc)) from None


def resolve_under_root(root: Path | None, path: str, max_bytes: int) -> Path:
    """`path` (relative to the root, or absolute) resolved with symlinks; 403 unless inside the root, 413 for a
    file over `max_bytes`. Messages name the path as the client gave it, never the server's absolute path."""
    if root is None:
        raise HTTPException(403, "server-side paths are disabled: the service has no allowed_root")
    base = root.resolve()
    try:
        target = (base / path).resolve()  # an absolute `path` replaces `base`; `..` and symlinks are resolved
        if not target.is_relative_to(base):
            raise HTTPException(403, f"path {shown(path)} is outside the allowed root")
        size = target.stat().st_size if target.is_file() else None
    except (ValueError, OSError) as exc:  # NUL bytes, names too long for the filesystem, …
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise invalid(("body", "path"), f"unusable path {shown(path)}: {reason}") from None
    if size is None:
        raise invalid(("body", "path"), f"no such file under the allowed root: {shown(path)}")
    if size > max_bytes:
        raise HTTPException(
            413, f"path: the file is {size} bytes, over the service's limit of {max_bytes} (limits.path_bytes)"
        )
    return target


def _rows_named(target: Path, name: str) -> Iterator[RowItem]:
    """The rows of the server-side file `target`; read errors name it `name`, as the client did."""
    try:
        yield from iter_rows(target)
    except (ValueError, OSError) as exc:  # a DataError, or pyarrow's errors for a damaged parquet file
        message = str(exc) if isinstance(exc, DataError) else f"{target.name}: not a readable dataset ({exc})"
        raise DataError(message.replace(str(target), name)) from None


def accepted(result: ReadResult) -> ReadResult:
    """`result` if it holds problems; else a 422 listing the first rejected rows."""
    if result.problems:
        return result
    rejects = "; ".join(str(e) for e in result.errors[:SHOWN_REJECTS]) or "the input holds no rows"
    raise invalid(("body",), f"no usable problems: {rejects}")


def read_rows(rows: Any, fields: FieldMap, limit: int | None = None) -> ReadResult:
    """Problems from raw `(line, row)` items (at most `limit`); a dataset-level error (unknown field…) is a 422."""
    try:
        return read_problems_from_rows(rows, fields, limit=limit)
    except DataError as exc:
        raise invalid(("body",), str(exc)) from None


def job_params(spec: JobSpec, cfg: ServiceConfig, prefix: tuple[str, ...]) -> StageParams:
    """A job's stage parameters and epochs checked against the limits (422 naming the field)."""
    check_epochs(spec.epochs, cfg.limits, prefix)
    return stage_params(cfg, spec.params, prefix)


def read_job_rows(
    rows: Iterable[RowItem], fields: FieldMap, params: StageParams, epochs: int | None, limits: RequestLimits
) -> ReadResult:
    """A job's problems, rows over the depth or size limit rejected; 422 when they would be more samples than
    `limits.samples_per_job` (reading stops one problem past that). Blocking: run it in a worker thread."""
    most = max_problems(params, epochs, limits)
    result = accepted(read_rows(bounded_rows(rows, limits), fields, limit=most + 1))
    check_job_size(len(result.problems), params, epochs, limits)
    return result


def _job_id(job_id: str) -> str:
    if not _JOB_ID.fullmatch(job_id):
        raise HTTPException(404, f"unknown job {shown(job_id)}")
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
        **responses(403, 413, 415),
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
        spec, params, result = await _from_upload(request, state.cfg)
    elif is_json(content_type):
        spec, params, result = await _from_json(await request.body(), state.cfg)
    else:
        raise HTTPException(415, "send JSON (path or rows) or multipart/form-data (file, spec)")
    if dry_run:
        report = preview(result, field_map(spec.fields, ("body",)), shown=PREVIEW_PROBLEMS)
        return Response(report.model_dump_json(), media_type="application/json")
    created = await state.store.create(result.problems, result.errors, spec, params, state.cfg.chunk_size)
    state.metrics.jobs_submitted.labels(spec.mode).inc()
    state.worker.wake()
    return created


# Parsing and reading rows run in worker threads: a 100k-row upload must not stall the event loop
# (health probes, other requests). Stage parameters are checked before any row is read.


async def _from_upload(request: Request, cfg: ServiceConfig) -> tuple[JobSpec, StageParams, ReadResult]:
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
    params = job_params(spec, cfg, ("body", "spec"))
    data = await upload.read()
    name = upload.filename or "upload.jsonl"

    def read() -> ReadResult:
        try:
            return read_job_rows(parse_upload(data, name), fields, params, spec.epochs, cfg.limits)
        except (DataError, ValueError, OSError) as exc:  # pyarrow reports a damaged file lazily, as ValueError
            raise invalid(("body", "file"), f"{name}: {exc}") from None

    return spec, params, await anyio.to_thread.run_sync(read)


async def _from_json(body: bytes, cfg: ServiceConfig) -> tuple[JobSpec, StageParams, ReadResult]:
    try:
        req = await anyio.to_thread.run_sync(JobRequest.model_validate_json, body)
    except ValidationError as exc:
        raise validation_error(exc, ("body",)) from None
    fields = field_map(req.fields, ("body",))
    spec = JobSpec.model_validate(req.model_dump(include=set(JobSpec.model_fields)))
    params = job_params(spec, cfg, ("body",))
    if req.rows is not None:
        rows: Iterable[RowItem] = enumerate(req.rows, 1)
    else:
        assert req.path is not None  # JobRequest validates that exactly one source is given
        path = req.path
        rows = _rows_named(resolve_under_root(cfg.allowed_root, path, cfg.limits.path_bytes), path)
    result = await anyio.to_thread.run_sync(read_job_rows, rows, fields, params, spec.epochs, cfg.limits)
    return spec, params, result


@router.get("", response_model=JobList, summary="List jobs, newest first")
async def list_jobs(state: State, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> JobList:
    """The newest jobs with their status."""
    return JobList(jobs=await state.store.recent(limit))


async def _status(state: State, job_id: str) -> JobStatus:
    status = await state.store.status(_job_id(job_id))
    if status is None:
        raise HTTPException(404, f"unknown job {shown(job_id)}")
    return status


@router.get(
    "/{job_id}", response_model=JobStatus, summary="A job's state, progress and counters", responses=responses(404)
)
async def get_job(job_id: JobId, state: State) -> JobStatus:
    """State, progress, counts per stage, rejected rows, policy versions seen."""
    return await _status(state, job_id)


@router.get(
    "/{job_id}/results",
    summary="A job's examples so far: JSONL (streamed) or parquet",
    responses={
        200: {"content": {"application/x-ndjson": {}, "application/vnd.apache.parquet": {}}},
        **responses(404),
    },
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
    responses=responses(404, 409),
)
async def cancel_job(job_id: JobId, state: State) -> JobStatus:
    """Stop the job: no new chunks start; results so far stay available."""
    before = await state.store.cancel(_job_id(job_id))
    if before is None:
        raise HTTPException(404, f"unknown job {shown(job_id)}")
    if before in FINISHED_STATES:
        raise HTTPException(409, f"job {job_id} already finished ({before})")
    return await _status(state, job_id)
