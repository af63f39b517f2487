"""Request and response models of the `/v1` API, shared by the routers and the Python client (pydantic only)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.dataclasses import dataclass

from shared.config import StageParams
from shared.schema import Example

JobState = Literal["queued", "running", "completed", "failed", "cancelled"]
FINISHED_STATES: frozenset[str] = frozenset({"completed", "failed", "cancelled"})
JobMode = Literal["once", "online"]
# Policy versions are stored as signed 64-bit integers (parquet results, Redis counters): 0 … 2**63 - 1.
POLICY_VERSION_MAX = 2**63 - 1


class JobSpec(BaseModel):
    """How to read and rewrite a job's rows (the `spec` form field of an upload, or part of a JSON body)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"fields": {"question": "problem"}, "params": {"k": 2, "max_tokens": 256}, "mode": "once"}]
        },
    )

    fields: dict[str, str] = Field(
        default_factory=dict, description="field mapping: target field → column, e.g. {'question': 'problem'}"
    )
    params: dict[str, Any] = Field(
        default_factory=dict, description="stage parameters overriding the service defaults (see StageParams)"
    )
    mode: JobMode = Field("once", description="once: each problem once; online: cycle the dataset for `epochs`")
    epochs: int | None = Field(
        None, ge=1, description="online jobs: passes over the dataset (none: until cancelled); once: 1"
    )
    name: str | None = Field(None, max_length=200, description="free-form label shown in listings")

    @model_validator(mode="after")
    def _epochs_fit_mode(self) -> JobSpec:
        if self.mode == "once" and self.epochs not in (None, 1):
            raise ValueError("epochs: a 'once' job runs exactly one epoch; use mode 'online' to cycle")
        return self


class JobRequest(JobSpec):
    """A JSON job request: a server-side `path` under the allowed root, or inline `rows`."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"rows": [{"question": "What is 2+3?", "answer": "5"}], "params": {"k": 2}},
                {"path": "gsm8k/train.jsonl", "fields": {"question": "question"}, "mode": "online", "epochs": 3},
            ]
        },
    )

    path: str | None = Field(None, description="file under the service's allowed root (JSONL, JSON, parquet)")
    rows: list[dict[str, Any]] | None = Field(None, description="problems inline, one object per row")

    @model_validator(mode="after")
    def _one_source(self) -> JobRequest:
        if (self.path is None) == (self.rows is None):
            raise ValueError("give exactly one of 'path' and 'rows' (or upload a file as multipart)")
        return self


@dataclass(frozen=True)
class RowError:
    """A rejected input row: its line (JSONL) or row number (other formats) and why.

    The one definition: `shared.dataio` reports these when reading a dataset, the API returns them.
    """

    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


class JobCreated(BaseModel):
    """The answer to a job submission."""

    id: str
    state: JobState
    problems: int = Field(description="problems accepted")
    rows_rejected: int = Field(description="input rows rejected (see `errors` in the job status)")
    chunks: int
    errors: list[RowError] = Field(default_factory=list, description="the first rejected rows")


class JobStatus(BaseModel):
    """A job's state, progress and counters (over all epochs of an online job)."""

    id: str
    name: str | None = None
    state: JobState
    mode: JobMode
    epochs: int | None = Field(description="none: until cancelled")
    epoch: int = Field(description="the epoch being worked on (0-based)")
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    problems: int
    rows_rejected: int
    chunks: int = Field(description="chunks per epoch")
    chunks_done: int
    chunks_failed: int
    problems_done: int
    progress: float | None = Field(description="share of the work done; none for an open-ended online job")
    stages: dict[str, int] = Field(description="problems whose examples came from each stage")
    dropped: int = Field(description="problems that yielded no example")
    ungradable: int = Field(description="problems without a gold answer (expert fallback)")
    examples: dict[str, int] = Field(description="examples per stage")
    examples_total: int
    generated_tokens: int
    guidance_rejected: dict[str, int] = Field(
        default_factory=dict,
        description="correct guided responses rejected for leaning on the guidance, per reason (echo, copy,"
        " answer_first, arithmetic, unworked, addresses, other_answer, likelihood; docs/rewrite.md)",
    )
    policy_versions: list[int] = Field(description="policy versions that made this job's examples")
    errors: list[RowError] = Field(description="rejected rows with their line numbers (first 100)")
    error: str | None = Field(None, description="why chunks failed (dead-lettered), if any did")
    params: StageParams
    fields: dict[str, str]
    waiting: str | None = Field(
        None,
        description="why an unfinished job makes no progress now: 'trainer lag N > max_lag M' while the trainer"
        " group has more unread examples than the service's max_lag (backpressure; it resumes as the trainer reads)",
    )


class JobList(BaseModel):
    """Jobs, newest first."""

    jobs: list[JobStatus]


class PreviewProblem(BaseModel):
    """One problem as a job reads it."""

    line: int = Field(description="the line (JSONL) or row number it was read from")
    id: str
    question: str
    solution: str | None
    answer: str | None = Field(description="the gold answer; null: ungradable (no answer field, none in the solution)")
    meta: dict[str, Any] = Field(
        description="answer_text: the gold as the dataset wrote it, when normalised; system: a system turn, kept apart"
    )


class DataPreview(BaseModel):
    """How a dataset reads — the mapping chosen, the first problems, the counts — with nothing sampled."""

    fields: dict[str, str] = Field(description="the mapping asked for (CANONICAL → SOURCE, and turn)")
    mapping: dict[str, dict[str, int]] = Field(
        description="per field (question, solution, gold, system): where the values came from → rows, e.g. "
        "{'question': {\"'messages' user turn\": 120}}; 'none': rows without one"
    )
    rows: int = Field(description="rows read")
    readable: int = Field(description="rows read as problems")
    ungradable: int = Field(description="problems without a gold answer (they would fall back to the expert stage)")
    skipped: int = Field(description="rows rejected")
    skipped_reasons: dict[str, int] = Field(description="rejected rows by kind of failure")
    errors: list[RowError] = Field(description="the first rejected rows with their line numbers")
    problems: list[PreviewProblem] = Field(description="the first problems")


class RewriteRequest(BaseModel):
    """A synchronous rewrite of a few rows."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"rows": [{"question": "What is 4+4?", "answer": "8"}], "params": {"k": 2}}]},
    )

    rows: list[dict[str, Any]] = Field(min_length=1)
    fields: dict[str, str] = Field(default_factory=dict)
    params: dict[str, Any] = Field(default_factory=dict)


class RewriteResponse(BaseModel):
    """Examples made from a synchronous rewrite, with per-stage counts."""

    policy_version: int
    examples: list[Example]
    stages: dict[str, int]
    dropped: int


class ReloadRecord(BaseModel):
    """One weight reload attempt."""

    time: float
    version: int
    path: str
    duration_s: float
    outcome: Literal["loaded", "refused", "failed"]
    error: str | None = None
    source: Literal["startup", "event", "poll", "admin"]


class PolicyStatus(BaseModel):
    """The policy this replica serves and its reload history (newest last)."""

    version: int
    path: str | None
    reloading: bool
    history: list[ReloadRecord]
    error: str | None = Field(
        None, description="why the policy hash in Redis is unusable (the served weights stay), if it is"
    )


class ReloadRequest(BaseModel):
    """Force a reload of a checkpoint folder (admin)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"path": "/ckpt/v3", "version": 3}]})

    path: str = Field(min_length=1, description="checkpoint folder with a READY marker")
    version: int | None = Field(
        None, ge=0, le=POLICY_VERSION_MAX, description="default: from a 'v<N>' folder name, else current + 1"
    )
    allow_rollback: bool = Field(
        False, description="allow a version not above the served one (a rollback); refused with 409 otherwise"
    )
