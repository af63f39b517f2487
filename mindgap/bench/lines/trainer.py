"""Trainer line: tokens/s of `mindgap train` against a bare PyTorch loop, TRL's SFTTrainer, and 2 ranks vs 1.

Every contender trains SmolLM2 (the real model: its speed is the point) on the same token ids: GSM8K
prompts through the chat template plus the reference solution, each sequence exactly `seq_len` tokens,
so there is no padding and tokens/s means the same thing everywhere (batch × seq_len per step).
`mindgap train` runs as the real command on a JSONL of expert records (DFT loss, fp32, `--zero-stage 2`,
one process, which runs as ZeRO stage 0: one rank has nothing to partition) and reports each step's time in
its metrics JSONL; the baselines run in their own processes. Against TRL's defaults it runs with its own
(`--precision auto`: bf16 where the device runs it natively, else fp32); the 2-rank run really is ZeRO-2.
The first step of every run is the warm-up and is dropped. Peak RSS of `mindgap train` and of the bare
loop feeds the memory line.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

from mindgap.bench.context import BenchContext
from mindgap.bench.procs import run_worker
from mindgap.bench.report import LineResult
from mindgap.bench.timings import Row, rate_stat, summarize
from shared.dataio import atomic_write_jsonl, read_problems
from shared.schema import ChatMessage, Example, Stage, example_id

TIMEOUT_S = 3600
# what `mindgap train`'s two precisions run, for the row that compares each tool out of the box
_PRECISION = {
    "bf16": "DeepSpeed bf16: bf16 weights and activations, fp32 master weights",
    "fp32": "fp32 weights and activations",
}
WARMUP_S = 20  # seconds of matmuls on a GPU before the first contender


def make_data(model_dir: Path, gsm8k: Path, n: int, seq_len: int) -> tuple[list[Example], list[dict[str, Any]]]:
    """`n` expert records of exactly `seq_len` tokens (prompt + solution, repeated to fill) and their id lists."""
    from transformers import AutoTokenizer

    from shared.prompts import render_prompt_ids, solve_messages

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    examples: list[Example] = []
    items: list[dict[str, Any]] = []
    for p in read_problems(gsm8k, limit=4 * n).problems:
        if len(examples) == n:
            break
        prompt = solve_messages(p.question)
        prompt_ids = render_prompt_ids(tokenizer, prompt)
        room = seq_len - len(prompt_ids)
        if room < 16 or not p.solution:
            continue
        solution_ids = tokenizer(p.solution, add_special_tokens=False)["input_ids"]
        completion = (solution_ids * (room // len(solution_ids) + 1))[:room]
        examples.append(
            Example(
                id=example_id("bench-train", p.id),
                problem_id=p.id,
                prompt=prompt,
                completion=[ChatMessage(role="assistant", content=tokenizer.decode(completion))],
                completion_token_ids=completion,
                stage=Stage.EXPERT,
                policy_version=0,
                behavior_logprobs=None,
                target_logprobs=[0.0] * room,
                answer=p.answer,
                grade="reference",
            )
        )
        items.append({"input_ids": prompt_ids + completion, "n_prompt": len(prompt_ids)})
    if len(examples) < n:
        raise RuntimeError(f"only {len(examples)} GSM8K problems fit {seq_len} tokens; {n} needed")
    return examples, items


def mindgap_train(
    work: Path,
    name: str,
    data: Path,
    model_dir: Path,
    batch: int,
    steps: int,
    seq_len: int,
    nproc: int,
    precision: str = "fp32",
) -> tuple[dict[str, Any], float]:
    """Run `mindgap train` on `data`; its per-step seconds and tokens from the metrics JSONL, and peak RSS (GiB)."""
    metrics = work / f"{name}.metrics.jsonl"
    metrics.unlink(missing_ok=True)
    args = [
        sys.executable, "-m", "mindgap", "train",
        "--source", str(data), "--model", str(model_dir), "--loss", "dft", "--precision", precision,
        "--zero-stage", "2", "--nproc", str(nproc), "--batch-size", str(batch),
        "--micro-batch-size", str(batch // nproc), "--max-steps", str(steps), "--max-seq-len", str(seq_len),
        "--checkpoint-dir", str(work / f"{name}.ckpt"), "--checkpoint-every", str(10 * steps),
        "--no-resume", "--no-publish", "--metrics-jsonl", str(metrics), "--warmup-steps", "0",
    ]  # fmt: skip
    result_path = work / f"{name}.result.json"

    # `mindgap train` writes no result file of its own: its metrics JSONL is turned into one afterwards.
    def collect() -> None:
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        seconds = [r["tokens"] / r["tokens_per_s"] for r in rows]
        result_path.write_text(json.dumps({"seconds": seconds, "tokens": [r["tokens"] for r in rows]}))

    env = {"DS_ACCELERATOR": "cpu"} if not _gpus() else {}
    return run_worker(args, result_path, work / f"{name}.log", TIMEOUT_S, env=env, python_module=False, after=collect)


def _gpus() -> int:
    import torch

    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


def _why_slow(bare: dict[str, Any], trl: dict[str, Any]) -> str:
    g = bare["matmul_gflops"]
    top = ", ".join(f"{op['op']} {op['share']:.0%}" for op in trl["profile_top_ops"][:3])
    return (
        f"On this device a SmolLM2-shaped matmul runs at {g['float32']:.1f} GFLOP/s in float32 and"
        f" {g['bfloat16']:.1f} in bfloat16 ({g['bfloat16_autocast']:.1f} under autocast, as TRL's bf16=True runs);"
        f" TRL's profiled step spends its CPU time in {top}."
    )


def timed(result: dict[str, Any]) -> tuple[list[float], list[float]]:
    """Tokens and seconds of every step but the first (the warm-up)."""
    tokens, seconds = result["tokens"][1:], result["seconds"][1:]
    if not seconds:
        raise RuntimeError("a trainer run reported fewer than two steps; nothing is left after the warm-up")
    return [float(t) for t in tokens], [float(s) for s in seconds]


def run(
    ctx: BenchContext,
    parts: frozenset[str] = frozenset({"trainer"}),
    seq_len: int | None = None,
    batch: int | None = None,
) -> LineResult:
    """Measure the trainer line and the trainer half of the memory line (sizes default by `ctx.quick`)."""
    import torch

    from shared.model_source import resolve_model
    from trainer.zero import effective_zero_stage, native_bf16, resolve_precision

    work = ctx.scratch("trainer")
    model_dir = Path(resolve_model(ctx.model))
    model_name = model_dir.name
    cuda = _gpus() > 0
    # a GPU needs a larger step than a 2-core CPU before it measures more than launch overhead
    seq_len = seq_len or (512 if cuda else 192 if ctx.quick else 256)
    batch = batch or (8 if cuda else 2 if ctx.quick else 4)
    steps = ctx.repeat + 1
    examples, items = make_data(model_dir, ctx.gsm8k, batch * steps, seq_len)
    data = work / "examples.jsonl"
    atomic_write_jsonl(data, examples)
    base_spec = {"model": str(model_dir), "items": items, "batch": batch, "steps": steps, "seq_len": seq_len}

    def worker(kind: str, name: str, **extra: Any) -> tuple[dict[str, Any], float]:
        spec_path = work / f"{name}.json"
        spec_path.write_text(json.dumps({**base_spec, "output_dir": str(work / f"{name}.out"), **extra}))
        result = work / f"{name}.result.json"
        return run_worker(
            ["mindgap.bench.train_worker", kind, str(spec_path), str(result)], result, work / f"{name}.log", TIMEOUT_S
        )

    warm: dict[str, Any] | None = None
    if cuda:
        # mindgap runs first: on a GPU that has been idle its clocks may still be ramping up, which the one
        # dropped warm-up step does not cover (seen once: its first 8 of 10 steps at 0.89 of the bare
        # loop, the last 2 at 1.0). The warm-up's GFLOP/s over time show whether the device ramped.
        warm, _ = worker("warmup", "warmup", seconds=WARMUP_S)
    ours, ours_rss = mindgap_train(work, "mindgap-1", data, model_dir, batch, steps, seq_len, nproc=1)
    bare, bare_rss = worker("bare", "bare")
    mine = rate_stat(*timed(ours))
    device = f"{_gpus()} GPU" if cuda else f"{os.cpu_count()} CPU cores"
    shape = f"batch {batch} × {seq_len} tokens, DFT loss, AdamW, fp32, one process on {device}"
    rows = [
        Row(line="trainer", metric="training tokens/s", unit="tokens/s", model=model_name, mindgap=mine,
            baseline=rate_stat(*timed(bare)), baseline_name="bare PyTorch loop (forward, CE, backward, AdamW)",
            target=0.9, note=f"{shape}; mindgap reading a JSONL source, with its metrics, through DeepSpeed: "
            "--zero-stage 2 on 1 rank runs as stage 0 (nothing to partition)."),
        Row(line="memory", metric="peak RSS, trainer process tree", unit="GiB", model=model_name,
            mindgap=summarize([ours_rss]), baseline=summarize([bare_rss]), baseline_name="bare PyTorch loop",
            higher_is_better=False, note="host memory, one sample each over the whole run (model load included)."),
    ]  # fmt: skip
    info: dict[str, Any] = {
        "seq_len": seq_len,
        "batch": batch,
        "steps": steps,
        "device": device,
        "torch_threads": bare["torch_threads"],
        "matmul_gflops": bare["matmul_gflops"],
        "rss_gib": {"mindgap_1": ours_rss, "bare": bare_rss},
        # what `--zero-stage 2` runs as on 1 rank and on 2 (trainer.zero.effective_zero_stage)
        "zero_stage": {"1_rank": effective_zero_stage(2, 1), "2_ranks": effective_zero_stage(2, 2)},
        "skipped": [],
        "gpu_warmup_gflops": warm["gflops"] if warm else None,
    }
    if importlib.util.find_spec("trl") is None:
        info["skipped"].append("TRL: not installed")
    else:
        # bf16 (TRL's defaults) runs ~10-80× slower on a CPU without bf16 matmul units: there --quick times one
        # bf16 step; where bf16 is native, as many as the others.
        gflops = bare["matmul_gflops"]
        slow_steps = 2 if ctx.quick and gflops["bfloat16_autocast"] < gflops["float32"] / 2 else steps
        trl_matched, _ = worker("trl", "trl-matched", variant="matched")
        trl_default, _ = worker("trl", "trl-default", variant="defaults", steps=slow_steps)
        # Each side with its own defaults: mindgap's precision default is auto (no grad checkpointing).
        own = resolve_precision("auto", native_bf16(torch.device("cuda" if cuda else "cpu")))
        own_steps = slow_steps if own == "bf16" else steps
        ours_default, _ = mindgap_train(
            work, "mindgap-1-default", data, model_dir, batch, own_steps, seq_len, nproc=1, precision="auto"
        )
        rows[1:1] = [
            Row(line="trainer", metric="training tokens/s", unit="tokens/s", model=model_name, mindgap=mine,
                baseline=rate_stat(*timed(trl_matched)), baseline_name="TRL SFTTrainer, fp32, no grad checkpointing",
                target=1.0, note="TRL with the precision and activation settings mindgap runs with."),
            Row(line="trainer", metric="training tokens/s", unit="tokens/s", model=model_name,
                mindgap=rate_stat(*timed(ours_default)), baseline=rate_stat(*timed(trl_default)),
                baseline_name="TRL SFTTrainer, its defaults (bf16, grad ckpt)", target=1.0,
                note=f"each out of the box: mindgap train, whose --precision auto ran {own} here ({_PRECISION[own]};"
                " no grad checkpointing; 1 rank, stage 0) vs TRL bf16=True"
                f" (autocast over float32 weights) with gradient checkpointing; {own_steps - 1} and"
                f" {slow_steps - 1} timed step(s). {_why_slow(bare, trl_default)}"),
        ]  # fmt: skip
        for name, result in (("trl_defaults", trl_default), ("trl_matched", trl_matched)):
            info[name] = {k: result[k] for k in ("bf16", "gradient_checkpointing", "model_dtype", "profile_top_ops")}
        info["mindgap_default"] = {
            "precision": own,
            "gradient_checkpointing": False,
            "zero_stage": effective_zero_stage(2, 1),
        }
    if cuda and _gpus() < 2:
        info["skipped"].append("2 ranks: one GPU")
    elif batch % 2:
        info["skipped"].append(f"2 ranks: batch {batch} does not split over 2 ranks")
    else:
        two, two_rss = mindgap_train(work, "mindgap-2", data, model_dir, batch, steps, seq_len, nproc=2)
        info["rss_gib"]["mindgap_2"] = two_rss
        rows.insert(-1, Row(
            line="trainer", metric="ZeRO-2 tokens/s, 2 ranks vs 1", unit="tokens/s", model=model_name,
            mindgap=rate_stat(*timed(two)), baseline=mine, baseline_name="mindgap train, 1 rank (stage 0)",
            note=f"same global batch {batch}; the 2 ranks really run ZeRO-2 (gradients and optimizer state"
            " partitioned), the 1 rank asked for it runs as stage 0; torchrun"
            f" ({'NCCL' if cuda else 'gloo'}), ranks share the {device}.",
        ))  # fmt: skip
    return LineResult(name="trainer", rows=rows, info=info)
