"""The training loop: rank 0 reads a global batch and shares it, every rank accumulates its micro-batches,
DeepSpeed steps, and every `checkpoint_every` steps a new policy version is written, announced and acked.

Gradient scaling, the one subtle part: the loss of the whole step is Σ(token losses) / (completion tokens
in the *global* batch). Each micro-batch contributes its sum divided by that global count; DeepSpeed would
additionally divide by the accumulation steps (disabled with `scale_wrt_gas=False`) and average gradients
over ranks (undone by multiplying by the world size), so any split of the same batch over ranks and
micro-batches gives the same gradient.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as torch_dist

from shared.keys import Keys
from shared.model_source import resolve_model
from trainer import checkpoint as ckpt
from trainer.config import TrainerConfig
from trainer.data import FileSource, RedisSource, Source, TrainItem, check_resume_order, collate, prepare_item
from trainer.losses import (
    GAP_FIELDS,
    STAGES,
    LossSpec,
    gap_metrics,
    gap_sums,
    micro_batch_terms,
    next_token_logprobs,
    normalised_ess,
    sampling_logprobs,
)
from trainer.publish import GAP_PREFIX, Announcer, gap_line
from trainer.zero import (
    Dist,
    build_engine,
    build_reference,
    effective_zero_stage,
    init_distributed,
    loop_clips,
    native_bf16,
    resolve_precision,
)

log = logging.getLogger("mindgap.trainer")

# Order of the summed statistics all-reduced after each step.
_SUMS = ("tokens", "loss_sum", "nll_sum", "kl_sum", "is_tokens", "is_weight_sum", "is_weight_sq_sum", "is_clipped")


def apply_staleness(items: list[TrainItem], version: int, cfg: TrainerConfig) -> tuple[list[TrainItem], int]:
    """Drop or down-weight items older than `version − max_staleness`; return the kept items and how many dropped."""
    if cfg.max_staleness is None:
        return items, 0
    kept: list[TrainItem] = []
    for it in items:
        lag = version - it.policy_version
        if lag <= cfg.max_staleness:
            kept.append(it)
        elif cfg.staleness_mode == "downweight":
            it.weight = cfg.staleness_decay ** (lag - cfg.max_staleness)
            kept.append(it)
    return kept, len(items) - len(kept)


def train_step(
    engine: Any, ref: Any, items: list[TrainItem], dist: Dist, cfg: TrainerConfig, spec: LossSpec, pad_id: int
) -> dict[str, float]:
    """One optimizer step on the global batch `items` (identical on every rank); returns global statistics.

    On a GPU this code does not wait for the device until the statistics are read at its end: the sums
    stay on the device, and the host-side reads (which rows need sampled log-probs) use the CPU copy of
    the batch. (DeepSpeed's step and the optimizer synchronise on their own.)
    """
    accum, micro = cfg.grad_accum_for(dist.world), cfg.micro_batch_size
    # Every rank holds the whole global batch, so the global token count needs no communication.
    global_tokens = sum(it.n_completion for it in items)
    mine = items[dist.rank :: dist.world]
    sums = torch.zeros(len(_SUMS), dtype=torch.float64, device=dist.device)
    gap = torch.zeros(len(STAGES), len(GAP_FIELDS), dtype=torch.float64, device=dist.device)
    weight_max = torch.zeros((), dtype=torch.float64, device=dist.device)
    grad_norm: torch.Tensor | None = None
    for k in range(accum):
        chunk = mine[k * micro : (k + 1) * micro]
        # A rank short of items still runs forward/backward (ZeRO's collectives need every rank) on a
        # zero-weight stand-in, so the step count stays aligned across ranks.
        host = collate(chunk or items[:1], pad_id, zero_weight=not chunk)
        batch = host.to(dist.device)
        logits = engine(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        logp = next_token_logprobs(logits, batch.targets)
        # log π_θ under each record's sampling distribution: the policy side of its importance ratio.
        ratio_logp = sampling_logprobs(
            logits, logp, batch.targets, host.mask, host.temperature, host.top_p, host.has_behavior
        )
        ref_logp = None
        if ref is not None:
            with torch.no_grad():
                ref_logits = ref(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
                ref_logp = next_token_logprobs(ref_logits, batch.targets)
        terms = micro_batch_terms(
            logp, batch.mask, batch.behavior, batch.has_behavior, batch.example_weight, spec, ref_logp, ratio_logp
        )
        engine.backward(terms.loss_sum / global_tokens * dist.world, scale_wrt_gas=False)
        if k == accum - 1 and loop_clips(cfg, dist.world):
            # The gradients are whole and reduced here; DeepSpeed's own clip is off (trainer.zero.loop_clips).
            params = [p for p in engine.module.parameters() if p.grad is not None]
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grads_with_norm_(params, cfg.grad_clip, grad_norm)
        engine.step()  # DeepSpeed applies the optimizer only at the accumulation boundary
        sums += torch.stack([getattr(terms, name).detach() for name in _SUMS]).double()
        weight_max = torch.maximum(weight_max, terms.is_weight_max.detach().double())
        gap += gap_sums(logp, ratio_logp, batch.behavior, batch.mask, batch.has_behavior, batch.stage)
    torch_dist.all_reduce(sums)
    torch_dist.all_reduce(gap)
    torch_dist.all_reduce(weight_max, op=torch_dist.ReduceOp.MAX)
    norm = grad_norm.double().reshape(1) if grad_norm is not None else torch.full((1,), math.nan, device=dist.device)
    # The one wait for the device in the step: every statistic comes back in one copy.
    flat = torch.cat([sums, weight_max.reshape(1), norm, gap.flatten()]).tolist()
    s = dict(zip(_SUMS, flat[: len(_SUMS)], strict=True))
    weight_max_value, norm_value = flat[len(_SUMS)], flat[len(_SUMS) + 1]
    gap_flat, width = flat[len(_SUMS) + 2 :], len(GAP_FIELDS)
    gap_rows = [gap_flat[r * width : (r + 1) * width] for r in range(len(STAGES))]
    if grad_norm is None:
        ds_norm = engine.get_global_grad_norm()
        norm_value = float(ds_norm) if ds_norm is not None else math.nan
    return {
        "loss": s["loss_sum"] / global_tokens,
        "nll": s["nll_sum"] / global_tokens,
        "kl": s["kl_sum"] / global_tokens,
        "grad_norm": norm_value,
        "lr": float(engine.get_lr()[0]),
        "tokens": float(sum(len(it.input_ids) for it in items)),
        "completion_tokens": float(global_tokens),
        "is_weight_mean": s["is_weight_sum"] / s["is_tokens"] if s["is_tokens"] else math.nan,
        "is_weight_max": weight_max_value if s["is_tokens"] else math.nan,
        "is_ess": normalised_ess(s["is_weight_sum"], s["is_weight_sq_sum"], s["is_tokens"]),
        "is_clip_frac": s["is_clipped"] / s["is_tokens"] if s["is_tokens"] else 0.0,
        # the policy gap per stage, from the log-probs computed above: `gap/<stage>/<metric>`
        **{
            f"gap/{stage}/{name}": value
            for stage, metrics in gap_metrics(gap_rows).items()
            for name, value in metrics.items()
        },
    }


@dataclass
class Segment:
    """What rank 0 consumed since the last checkpoint: acked once the next checkpoint is published."""

    entry_ids: list[str] = field(default_factory=list)
    trained_ids: list[str] = field(default_factory=list)
    dropped_ids: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.entry_ids)


class StopFlag:
    """SIGTERM/SIGINT ask for a graceful stop: finish the step, write a final checkpoint, exit."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGTERM, self._set)
        signal.signal(signal.SIGINT, self._set)

    def _set(self, signum: int, frame: FrameType | None) -> None:
        log.warning("signal %d: stopping after this step", signum)
        self.requested = True


class Metrics:
    """Console line, TensorBoard scalars, optional JSONL, and the Redis progress hash (rank 0)."""

    def __init__(self, cfg: TrainerConfig, announcer: Announcer | None) -> None:
        self.announcer = announcer
        self.jsonl = cfg.metrics_jsonl.open("a") if cfg.metrics_jsonl else None
        self.writer: Any = None
        if cfg.tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(cfg.tensorboard_dir))
        self.stages: Counter[str] = Counter()

    def record(self, step: int, version: int, stats: dict[str, float], items: list[TrainItem], dt: float) -> None:
        """Log one step's statistics everywhere they go."""
        self.stages.update(it.stage for it in items)
        lag = sum(version - it.policy_version for it in items) / max(1, len(items))
        row = stats | {"step": step, "version": version, "tokens_per_s": stats["tokens"] / dt, "policy_lag": lag}
        stages = " ".join(f"{s}={self.stages[s]}" for s in ("self", "guided", "expert"))
        log.info(
            "step %d v%d | loss %.4f nll %.4f | gnorm %.3f | lr %.2e | %.0f tok/s | "
            "is w mean %.3g max %.3g ess %.3f clip %.3f | kl %.4f | %s | lag %.2f | gap %s",
            step, version, row["loss"], row["nll"], row["grad_norm"], row["lr"], row["tokens_per_s"],
            row["is_weight_mean"], row["is_weight_max"], row["is_ess"], row["is_clip_frac"], row["kl"],
            stages, lag, gap_line(row),
        )  # fmt: skip
        if self.writer is not None:
            for name, value in row.items():
                if name not in ("step", "version"):
                    # gap/<stage>/<metric> gets its own TensorBoard section
                    self.writer.add_scalar(name if name.startswith(GAP_PREFIX) else f"train/{name}", value, step)
            for stage, n in self.stages.items():
                self.writer.add_scalar(f"examples/{stage}", n, step)
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(row | {"stages": dict(self.stages)}) + "\n")
            self.jsonl.flush()
        if self.announcer is not None:
            gap = {k: f"{v:.4g}" for k, v in row.items() if k.startswith(GAP_PREFIX)}
            self.announcer.progress({"step": step, "loss": f"{row['loss']:.4f}", "version": version, "lag": lag} | gap)

    def close(self) -> None:
        """Flush and close outputs."""
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()


def run(cfg: TrainerConfig) -> None:
    """Train until `max_steps` or the source is exhausted (or a stop signal), checkpointing as configured."""
    dist = init_distributed()
    # Rank 0 decides `auto` for all ranks: DeepSpeed needs one precision across the group.
    choice: list[Any] = [resolve_precision(cfg.precision, native_bf16(dist.device)) if dist.is_main else None]
    torch_dist.broadcast_object_list(choice, src=0)
    cfg = cfg.model_copy(update={"precision": choice[0]})
    if dist.is_main:
        cfg.log_resolved(log)
    torch.manual_seed(cfg.seed)
    from transformers import AutoTokenizer

    # Rank 0 resolves first: 'default' converts the model once, the other ranks then find it ready.
    holder: list[Any] = [resolve_model(cfg.model) if dist.is_main else None]
    torch_dist.broadcast_object_list(holder, src=0)
    path = str(holder[0])
    tokenizer = AutoTokenizer.from_pretrained(path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    root = cfg.checkpoint_dir
    versions = ckpt.ready_versions(root)
    if versions and not cfg.resume:
        # Starting again at version 1 would overwrite and interleave with the versions already there.
        raise ValueError(f"{root} already holds checkpoints v{versions[0]}..v{versions[-1]}: resume or use another dir")
    zero_stage = effective_zero_stage(cfg.zero_stage, dist.world)
    version, step, resumed = 0, 0, {}
    if versions:
        version = versions[-1]
        resumed = ckpt.read_state(root, version)
        # Before the model loads: every rank reads the same file, so all of them stop here together.
        ckpt.check_layout(root, version, resumed, dist.world, zero_stage, cfg.precision)
        if cfg.source != "redis":
            check_resume_order(resumed.get("source") or {}, _shuffle_seed(cfg))
    engine = build_engine(cfg, path, dist)
    if versions:
        engine.load_checkpoint(str(ckpt.state_root(root)), tag=f"v{version}")
        step = int(resumed["step"])
        if dist.is_main:
            log.info("resumed from %s at step %d", ckpt.weights_dir(root, version), step)
    ref = None
    if cfg.kl_coef > 0:
        ref_path = path if cfg.ref_model is None else resolve_model(cfg.ref_model)
        ref = build_reference(cfg, ref_path, dist)
    spec = LossSpec.from_config(cfg)
    stop = StopFlag()
    source: Source | None = None
    announcer: Announcer | None = None
    keys = Keys(cfg.key_prefix)
    if dist.is_main:
        source = _open_source(cfg, tokenizer, keys, resumed, stop)
        announcer = Announcer(cfg.redis_url, keys, cfg.run_name) if cfg.announces else None
        if announcer is not None and version > 0:
            # The crash may have come between READY and the announcement; announcing again is harmless.
            announcer.policy(version, ckpt.weights_dir(root, version))
    metrics = Metrics(cfg, announcer) if dist.is_main else None
    segment = Segment()
    global_batch = cfg.global_batch(dist.world)
    last_ckpt_step, resumed_from = step, version

    def checkpoint() -> None:
        nonlocal version, last_ckpt_step, segment
        version += 1
        state = {
            "version": version,
            "step": step,
            "resumed_from": resumed_from,
            "source": source.position() if source is not None else {},
            "entry_ids": segment.entry_ids,
            "trained_ids": segment.trained_ids,
            "dropped_ids": segment.dropped_ids,
            # The layout of the DeepSpeed state under state/: a resume must match it (ckpt.check_layout).
            "world_size": dist.world,
            "zero_stage": zero_stage,
            "precision": cfg.precision,
            "time": time.time(),
        }
        written = ckpt.save(engine, tokenizer, root, version, state, dist.is_main)
        if dist.is_main:
            if announcer is not None:
                announcer.policy(version, written)
            # Acknowledge only now: the published checkpoint contains these entries' updates.
            assert source is not None
            source.commit(segment.entry_ids)
            ckpt.prune(root, cfg.keep_checkpoints)
        segment = Segment()
        last_ckpt_step = step

    exhausted = False
    while step < cfg.max_steps and not exhausted:
        t0 = time.perf_counter()
        shared: list[Any] = [None]
        if dist.is_main:
            assert source is not None
            items, exhausted = source.next_items(global_batch)
            kept, _ = apply_staleness(items, version, cfg)
            kept_ids = {id(it) for it in kept}
            segment.entry_ids += [it.entry_id for it in items]
            segment.trained_ids += [it.example_id for it in kept]
            segment.dropped_ids += [it.example_id for it in items if id(it) not in kept_ids]
            shared = [(kept, exhausted or stop.requested)]
        if dist.world > 1:
            torch_dist.broadcast_object_list(shared, src=0)
        kept, exhausted = shared[0]
        if not kept:
            continue
        stats = train_step(engine, ref, kept, dist, cfg, spec, pad_id)
        step += 1
        if metrics is not None and (step % cfg.log_every == 0 or exhausted):
            metrics.record(step, version, stats, kept, time.perf_counter() - t0)
        if step % cfg.checkpoint_every == 0:
            checkpoint()
    # Rank 0 alone knows whether entries were consumed without a step (all dropped as stale).
    pending = [step > last_ckpt_step or bool(segment)]
    torch_dist.broadcast_object_list(pending, src=0)
    if pending[0]:
        checkpoint()
    if dist.is_main:
        log.info("finished at step %d, policy version %d", step, version)
        assert metrics is not None and source is not None
        metrics.close()
        source.close()
        if announcer is not None:
            announcer.close()
    torch_dist.barrier()
    torch_dist.destroy_process_group()


def _open_source(cfg: TrainerConfig, tokenizer: Any, keys: Keys, resumed: dict[str, Any], stop: StopFlag) -> Source:
    def prepare(example: Any, entry_id: str) -> TrainItem:
        return prepare_item(example, tokenizer, cfg.max_seq_len, entry_id)

    if cfg.source == "redis":
        return RedisSource(
            cfg.redis_url,
            keys,
            cfg.consumer,
            prepare,
            idle_exit_s=cfg.idle_exit_s,
            already_trained=resumed.get("entry_ids", []),
            should_stop=lambda: stop.requested,
        )
    return FileSource(Path(cfg.source), prepare, cfg.epochs, resumed.get("source"), _shuffle_seed(cfg))


def _shuffle_seed(cfg: TrainerConfig) -> int | None:
    return cfg.seed if cfg.shuffle else None
