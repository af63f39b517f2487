"""The trainer's one config: TOML file + env (MINDGAP_…) + `mindgap train` flags, resolved once per process."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal, Self

from pydantic import Field, model_validator

from shared.config import MindgapSettings

LossName = Literal["sft", "dft", "is"]
IsLevel = Literal["token", "sequence"]
Fallback = Literal["dft", "sft"]
StalenessMode = Literal["drop", "downweight"]
Precision = Literal["auto", "bf16", "fp32"]


class TrainerConfig(MindgapSettings):
    """Everything one trainer run needs; `mindgap train --help` lists the same fields as flags."""

    # `prefix` (TOML key, MINDGAP_PREFIX, --prefix) was this setting's name before the processes agreed on one
    deprecated_keys: ClassVar[dict[str, str]] = {"prefix": "key_prefix"}

    # data
    source: str = Field("redis", description="'redis' (consumer group on the examples stream) or a JSONL/parquet path")
    epochs: int = Field(1, ge=1, description="passes over a file source (ignored for redis)")
    shuffle: bool = Field(
        True,
        description="file source: each epoch in a fresh order drawn from seed and epoch (records held in"
        " memory); false streams the file in file order",
    )
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis holding the examples stream")
    key_prefix: str = Field("mindgap", min_length=1, description="prefix of every Redis key")
    consumer: str = Field("trainer-0", min_length=1, description="consumer name in the 'trainer' group")
    run_name: str = Field(
        "default", min_length=1, description="progress is published to <key_prefix>:trainer:<run_name>"
    )
    publish: bool | None = Field(
        None, description="announce checkpoints and progress in Redis; None: only when the source is redis"
    )
    idle_exit_s: float | None = Field(
        None, gt=0, description="redis: finish (final checkpoint) after this long without new entries; None waits"
    )
    # model
    model: str = Field("default", description="HF id, local path, or 'default' (SmolLM2-135M-Instruct)")
    ref_model: str | None = Field(None, description="frozen KL reference; None means the base --model")
    max_seq_len: int = Field(2048, ge=8, description="prompt+completion longer than this is rejected")
    precision: Precision = Field(
        "auto",
        description="bf16 (bf16 weights and activations, fp32 master weights), fp32, or auto: bf16 where the"
        " device multiplies bfloat16 natively (a CUDA GPU that supports it, a CPU with AVX512-BF16 or AMX),"
        " else fp32",
    )
    grad_checkpointing: bool = False
    # loss
    loss: LossName = "dft"
    is_level: IsLevel = "token"
    is_geometric: bool = Field(False, description="sequence level: per-token geometric mean of the ratio")
    is_clip: float = Field(2.0, gt=0, description="importance weights are truncated above at this value")
    is_clip_min: float | None = Field(
        None,
        ge=0,
        description="importance weights are truncated below at this value; None: 1/is_clip at"
        " sequence level, 0 (none) at token level",
    )
    expert_fallback: Fallback = Field("dft", description="loss for expert records (no behaviour log-probs) under is")
    kl_coef: float = Field(0.0, ge=0, description="β of the k3 KL penalty to the frozen reference (0: no reference)")
    max_staleness: int | None = Field(None, ge=0, description="examples older than current version − S are affected")
    staleness_mode: StalenessMode = "drop"
    staleness_decay: float = Field(
        0.5, gt=0, le=1, description="downweight: weight = decay ** (lag − max_staleness) for stale examples"
    )
    # optimisation
    lr: float = Field(1e-5, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine schedule floor as a fraction of lr")
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = Field(1.0, ge=0, description="global grad-norm clip (0 disables)")
    batch_size: int | None = Field(None, ge=1, description="examples per optimizer step over all ranks")
    micro_batch_size: int = Field(1, ge=1, description="examples per forward pass per rank")
    grad_accum: int | None = Field(None, ge=1, description="micro-batches per rank per step")
    max_steps: int = Field(1000, ge=1, description="optimizer steps of this run (counted from step 0, across resumes)")
    zero_stage: int = Field(2, ge=0, le=3)
    seed: int = 0
    # processes
    nproc: int = Field(1, ge=1, description="ranks on this machine: relaunches through torchrun when > 1")
    # checkpoints
    checkpoint_dir: Path = Path("checkpoints")
    checkpoint_every: int = Field(50, ge=1, description="optimizer steps between published checkpoints")
    keep_checkpoints: int = Field(3, ge=1, description="newest checkpoints kept (weights and training state)")
    resume: bool = Field(True, description="continue from the newest complete checkpoint in checkpoint_dir")
    # metrics
    log_every: int = Field(1, ge=1)
    tensorboard_dir: Path | None = None
    metrics_jsonl: Path | None = Field(None, description="append one JSON line of metrics per logged step")

    @model_validator(mode="after")
    def _batch_shape(self) -> Self:
        if self.is_clip_min is not None and self.is_clip_min >= self.is_clip:
            raise ValueError(f"is_clip_min {self.is_clip_min} must be below is_clip {self.is_clip}")
        if self.batch_size is not None and self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"batch_size {self.batch_size} is not a multiple of micro_batch_size {self.micro_batch_size}"
            )
        if self.source != "redis" and not Path(self.source).exists():
            raise ValueError(f"source: no such file {self.source!r} (use 'redis' or a JSONL/parquet path)")
        return self

    @property
    def announces(self) -> bool:
        """Whether checkpoints and progress go to Redis."""
        return self.source == "redis" if self.publish is None else self.publish

    def grad_accum_for(self, world: int) -> int:
        """Micro-batches per rank per optimizer step for `world` ranks (batch_size wins over grad_accum)."""
        if self.batch_size is None:
            return self.grad_accum or 1
        per_pass = self.micro_batch_size * world
        if self.batch_size % per_pass:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by micro_batch_size × ranks = {per_pass}")
        accum = self.batch_size // per_pass
        if self.grad_accum is not None and self.grad_accum != accum:
            raise ValueError(
                f"grad_accum {self.grad_accum} contradicts batch_size {self.batch_size} / "
                f"(micro_batch_size {self.micro_batch_size} × {world} ranks) = {accum}"
            )
        return accum

    def global_batch(self, world: int) -> int:
        """Examples per optimizer step over all ranks."""
        return self.micro_batch_size * self.grad_accum_for(world) * world
