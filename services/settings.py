"""`ServiceConfig`: everything one `mindgap serve` process needs (TOML file, MINDGAP_… env, CLI flags)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import NoDecode

from shared.config import EngineConfig, MindgapSettings, StageParams

KeyList = Annotated[list[str], NoDecode]

# the stage parameters that `RequestLimits` bounds from above, by field name
BOUNDED_PARAMS = ("k", "resolve_attempts", "keep", "rounds", "max_tokens")


class RequestLimits(BaseModel):
    """Upper bounds on what one request may ask of the service; above them it answers 4xx naming the limit.

    They are checked before any work starts (the `[limits]` table of the config, env MINDGAP_LIMITS__K…).
    """

    model_config = ConfigDict(extra="forbid")

    k: int = Field(64, ge=0, description="stage parameter k (self-samples per problem) at most")
    resolve_attempts: int = Field(64, ge=0, description="stage parameter resolve_attempts at most")
    keep: int = Field(64, ge=1, description="stage parameter keep at most")
    rounds: int = Field(16, ge=1, description="stage parameter rounds at most")
    max_tokens: int = Field(8192, ge=1, description="stage parameter max_tokens at most")
    epochs: int = Field(10_000, ge=1, description="epochs of an online job at most")
    samples_per_job: int = Field(
        2_000_000,
        ge=1,
        description="problems × max(1, k + resolve_attempts) × epochs at most (per epoch for an open-ended job)",
    )
    json_depth: int = Field(32, ge=2, description="nesting of objects and lists in one input row at most")
    row_chars: int = Field(1_000_000, ge=1, description="text in one input row (keys and values) at most")
    path_bytes: int = Field(256 * 1024 * 1024, ge=1, description="size of a server-side `path` file at most")

    def param_violations(self, params: StageParams) -> dict[str, str]:
        """The stage parameters of `params` above their limit, each with the message naming it."""
        return {
            name: f"{name} = {value} is over the service's limit of {limit} (limits.{name})"
            for name in BOUNDED_PARAMS
            if (value := getattr(params, name)) > (limit := getattr(self, name))
        }


class ServiceConfig(MindgapSettings):
    """Resolved configuration of the rewrite service."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    backend: Literal["vllm", "fake"] = Field("vllm", description="inference engine: vllm, or fake for tests")
    engine: EngineConfig = Field(default_factory=EngineConfig)
    fake_delay_s: float = Field(0.0, ge=0.0, description="fake backend only: seconds per engine call")
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="env MINDGAP_REDIS_URL")
    redis_timeout_s: float = Field(5.0, gt=0, description="socket timeout of each Redis call (see shared.retry)")
    probe_timeout_s: float = Field(
        1.5, gt=0, description="/readyz and job status answer 503 when Redis has not answered within this"
    )
    key_prefix: str = Field("mindgap", min_length=1, description="prefix of every Redis key")
    api_keys: KeyList = Field(default_factory=list, description="bearer keys (env: comma-separated)")
    admin_keys: KeyList = Field(default_factory=list, description="bearer keys with the admin scope")
    insecure: bool = Field(False, description="allow binding a non-loopback host without any key")
    allowed_root: Path | None = Field(None, description="server-side job paths must resolve under this folder")
    max_upload_bytes: int = Field(64 * 1024 * 1024, ge=1, description="request body limit (413 above it)")
    max_sync_rows: int = Field(16, ge=1, description="rows accepted by POST /v1/rewrite (413 above it)")
    limits: RequestLimits = Field(default_factory=RequestLimits, description="bounds on what one request may ask")
    chunk_size: int = Field(8, ge=1, description="problems per task-stream entry")
    max_inflight_chunks: int = Field(4, ge=1, description="chunks sent to the engine at once by one replica")
    max_lag: int = Field(10_000, ge=0, description="pause while the trainer group lags more (0: never)")
    max_deliveries: int = Field(3, ge=1, description="deliveries of a chunk before it is dead-lettered")
    claim_idle_ms: int = Field(30_000, ge=100, description="reclaim chunks idle this long (dead replica)")
    job_ttl_s: int = Field(7 * 24 * 3600, ge=1, description="finished jobs are removed after this")
    policy_poll_s: float = Field(5.0, gt=0, description="policy polling interval besides pub/sub events")
    gc_freeze: bool = Field(
        True,
        description="after start-up, move every object alive to the garbage collector's permanent generation:"
        " full collections then skip the engine's and libraries' millions of objects instead of holding the"
        " event loop for tenths of a second (a big upload triggers them)",
    )
    grader_workers: int = Field(1, ge=1)
    grade_timeout: float = Field(5.0, gt=0)
    stages: StageParams = Field(default_factory=StageParams, description="default stage parameters of jobs")
    consumer_name: str | None = Field(None, description="stream consumer name (default: host-pid-random)")

    @field_validator("api_keys", "admin_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        # env vars and CLI flags give one comma-separated string
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @model_validator(mode="after")
    def _defaults_within_limits(self) -> ServiceConfig:
        # a job that asks for nothing gets the defaults, so they must pass the limits themselves
        if over := self.limits.param_violations(self.stages):
            raise ValueError(f"the default stage parameters exceed the limits: {'; '.join(over.values())}")
        return self

    @property
    def auth_enabled(self) -> bool:
        """Whether any bearer key is configured."""
        return bool(self.api_keys or self.admin_keys)
