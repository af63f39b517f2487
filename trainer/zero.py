"""DeepSpeed set-up: process group, ZeRO config from TrainerConfig, model + AdamW + warm-up/cosine schedule.

On CPU DeepSpeed runs with `DS_ACCELERATOR=cpu` over gloo; on GPUs over NCCL, one rank per device. The
optimizer is torch's AdamW handed to DeepSpeed (ZeRO wraps and partitions it), so the same code runs
where DeepSpeed's fused/CPU-Adam extensions cannot be built.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainer.config import Precision, TrainerConfig

log = logging.getLogger("mindgap.trainer.engine")


@dataclass(frozen=True)
class Dist:
    """This process's place in the job."""

    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 reads data, writes checkpoints and talks to Redis."""
        return self.rank == 0


def init_distributed() -> Dist:
    """Join the torchrun process group (or make a one-rank group when started without torchrun)."""
    if "RANK" not in os.environ:
        # A plain `python -m trainer` run: a group of one, so the code path is the same as under torchrun.
        os.environ.update(
            RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port())
        )
    cuda = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"
    if not cuda:
        # DeepSpeed picks its accelerator at import; it must not probe for GPUs that are not there.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.ops

    if not cuda:
        # On CPU, DeepSpeed JIT-builds a shared-memory all-reduce op at init (minutes the first time) under
        # a lock file that a process killed mid-build leaves behind, so every later start waits forever.
        # The op only serves inference_all_reduce; training's collectives go through gloo, so skip it.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

    local_rank = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local_rank)
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), local_rank, device)


# /proc/cpuinfo flags of CPUs whose bfloat16 matmuls run natively (x86 AVX512-BF16 or AMX, Arm's BF16
# extension). Without them oneDNN emulates bf16: a SmolLM2-shaped matmul measured 1.2 GFLOP/s in bf16 against
# 97 in fp32 on a 2-core AVX2 EPYC, so a bf16 run there is dozens of times slower than fp32.
_NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU feature flags the kernel lists (x86 `flags`, Arm `Features`); empty where it lists none."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    flags: set[str] = set()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            flags.update(value.split())
    return frozenset(flags)


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bfloat16 natively (fast), not by emulation."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return bool(_NATIVE_BF16_FLAGS & cpu_flags())


def resolve_precision(requested: Precision, native: bool) -> Precision:
    """The precision a run asking for `requested` gets: `auto` is bf16 where bf16 is `native`, else fp32."""
    if requested != "auto":
        return requested
    return "bf16" if native else "fp32"


def effective_zero_stage(stage: int, world: int) -> int:
    """The ZeRO stage a run asking for `stage` on `world` ranks gets: 1 and 2 on one rank run as stage 0."""
    # One rank has nothing to partition, so ZeRO-1/2 save no memory there, yet their gradient bucket copies,
    # averaging, flattening and flat-partition optimizer step cost ~1.5 s a step on SmolLM2-135M on CPU
    # (1.6x slower than stage 0, which does the same update). ZeRO-3 stays: it changes how the model is
    # loaded (partitioned at init) and gathered for checkpoints.
    return 0 if world == 1 and stage in (1, 2) else stage


def loop_clips(cfg: TrainerConfig, world: int) -> bool:
    """Whether the training loop, not DeepSpeed, measures and clips the gradient norm: fp32 at stage 0.

    There DeepSpeed's clip keeps no norm and runs two kernels per parameter (a norm, a scale); the loop
    does both in one foreach pass and keeps the norm. bf16 and ZeRO 1-3 clip inside DeepSpeed's optimizer
    wrappers, which report the norm.
    """
    return cfg.precision == "fp32" and effective_zero_stage(cfg.zero_stage, world) == 0


def ds_config(cfg: TrainerConfig, world: int, inference: bool = False) -> dict[str, Any]:
    """The DeepSpeed config for `cfg` on `world` ranks (`inference`: a frozen model, no optimizer)."""
    if cfg.precision == "auto":
        raise ValueError("precision 'auto' must be resolved for the device first (resolve_precision)")
    accum = cfg.grad_accum_for(world)
    stage = effective_zero_stage(cfg.zero_stage, world)
    zero: dict[str, Any] = {"stage": stage}
    if stage == 3:
        # Lets the checkpoint writer gather full weights on rank 0 for the HF folder.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if inference:
        # Only ZeRO-3 changes anything for a model without an optimizer: its weights are partitioned too.
        zero = {"stage": 3 if cfg.zero_stage == 3 else 0}
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "train_batch_size": cfg.micro_batch_size * accum * world,
        "gradient_clipping": 0.0 if loop_clips(cfg, world) else cfg.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.precision == "bf16"},
        # torch's AdamW is not on DeepSpeed's list of ZeRO-tested optimizers, but ZeRO wraps any torch optimizer.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1 over `warmup` steps, then cosine decay to `min_ratio` at `total` steps."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def load_model(path: str, cfg: TrainerConfig, config: dict[str, Any]) -> Any:
    """The HF causal LM at `path` in float32 (DeepSpeed casts to bf16); partitioned at load under ZeRO-3."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig  # type: ignore[attr-defined]

    # While this object lives, from_pretrained builds the model inside deepspeed.zero.Init under ZeRO-3,
    # so no rank ever holds the whole model.
    hf_ds = HfDeepSpeedConfig(config) if config["zero_optimization"]["stage"] == 3 else None  # type: ignore[no-untyped-call]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    del hf_ds
    return model


def build_engine(cfg: TrainerConfig, path: str, dist: Dist) -> Any:
    """The DeepSpeed engine training the model at `path` with AdamW and the warm-up/cosine schedule."""
    import deepspeed

    config = ds_config(cfg, dist.world)
    stage = config["zero_optimization"]["stage"]
    if dist.is_main and stage != cfg.zero_stage:
        log.info("ZeRO-%d on %d rank runs as stage %d: nothing to partition", cfg.zero_stage, dist.world, stage)
    model = load_model(path, cfg, config)
    model.config.use_cache = False
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
    )
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
    if dist.world == 1 and stage == 0:
        # One rank has nothing to all-reduce, but stage 0 would still flatten every gradient into a bucket,
        # reduce it over the group of one and copy it back: a full copy of the gradients each step.
        engine.enable_backward_allreduce = False
    return engine


def build_reference(cfg: TrainerConfig, path: str, dist: Dist) -> Any:
    """The frozen KL reference: a DeepSpeed engine without optimizer (ZeRO-3 partitions it like the policy)."""
    import deepspeed

    config = ds_config(cfg, dist.world, inference=True)
    model = load_model(path, cfg, config)
    model.requires_grad_(False)
    model.eval()
    engine, _, _, _ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
