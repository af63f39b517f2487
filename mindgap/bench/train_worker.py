"""Bench child processes for the trainer line's baselines: a bare PyTorch loop and TRL's SFTTrainer.

Run as `python -m mindgap.bench.train_worker KIND SPEC.json RESULT.json`. Both read the same token ids
(prompt + completion, every sequence exactly `seq_len` long, so no padding anywhere) that `mindgap train`
reads from its JSONL, and report per-step wall times; the first step is the warm-up.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def _batches(spec: dict[str, Any]) -> list[list[dict[str, Any]]]:
    items: list[dict[str, Any]] = spec["items"]
    b = int(spec["batch"])
    return [items[i : i + b] for i in range(0, int(spec["steps"]) * b, b)]


def matmul_gflops(
    dtype_name: str, autocast: bool = False, shape: tuple[int, int, int] = (256, 576, 1536), repeats: int = 30
) -> float:
    """GFLOP/s of an `m × k → n` matmul (default SmolLM2-shaped: 256 tokens × 576 → 1536) in `dtype_name`,
    on this device, over `repeats` products after 3 warm-up ones."""
    import torch

    m, k, n = shape
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, dtype_name)
    x = torch.randn(m, k, device=device)
    w = torch.randn(k, n, device=device)
    if not autocast:
        x, w = x.to(dtype), w.to(dtype)
    with torch.autocast(device, dtype=dtype, enabled=autocast):
        for _ in range(3):
            x @ w
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.monotonic()
        for _ in range(repeats):
            x @ w
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = (time.monotonic() - start) / repeats
    return 2 * m * k * n / seconds / 1e9


def bare_step(model_path: str) -> Callable[[list[dict[str, Any]]], int]:
    """The bare loop's step on a fresh float32 copy of the model: forward, cross-entropy on the completion
    tokens, backward, AdamW step, nothing else. Each call trains one batch and returns its token count."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model: Any = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.to(device)
    model.config.use_cache = False
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step(batch: list[dict[str, Any]]) -> int:
        ids = torch.tensor([it["input_ids"] for it in batch])
        labels = ids.clone()
        for row, it in enumerate(batch):
            labels[row, : it["n_prompt"]] = -100  # the loss is on the completion only, as in mindgap
        loss = model(input_ids=ids.to(device), labels=labels.to(device)).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return ids.numel()

    return step


def bare(spec: dict[str, Any]) -> dict[str, Any]:
    """The bare loop over the spec's batches, each step timed until the device is done."""
    import torch

    step = bare_step(spec["model"])
    seconds: list[float] = []
    tokens: list[int] = []
    for batch in _batches(spec):
        t0 = time.monotonic()
        tokens.append(step(batch))
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the step is done when the GPU is, not when Python is
        seconds.append(time.monotonic() - t0)
    gflops = {
        "float32": matmul_gflops("float32"),
        "bfloat16": matmul_gflops("bfloat16"),
        "bfloat16_autocast": matmul_gflops("bfloat16", autocast=True),
    }
    return {"seconds": seconds, "tokens": tokens, "torch_threads": torch.get_num_threads(), "matmul_gflops": gflops}


def warm_up(spec: dict[str, Any]) -> dict[str, Any]:
    """Float32 `size³` matmuls (default 4096) for `spec["seconds"]` on the device, so the first contender does
    not start on an idle GPU's clocks; the GFLOP/s of each measurement in order, which show whether (and
    how long) the device ramped up."""
    size = int(spec.get("size", 4096))
    gflops: list[float] = []
    start = time.monotonic()
    while time.monotonic() - start < float(spec["seconds"]):
        gflops.append(matmul_gflops("float32", shape=(size, size, size)))
    return {"gflops": gflops}


def trl(spec: dict[str, Any]) -> dict[str, Any]:
    """TRL 1.16 `SFTTrainer`, `loss_type="dft"`, on the same pre-tokenized rows; `matched` overrides two defaults.

    TRL's own defaults are `bf16=True` and `gradient_checkpointing=True`; `variant="matched"` turns both
    off and loads the model in float32, as the bare loop and `mindgap train --precision fp32` run.
    """
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer  # type: ignore[attr-defined]

    matched = spec["variant"] == "matched"
    rows = [
        {
            "input_ids": it["input_ids"],
            "completion_mask": [0] * it["n_prompt"] + [1] * (len(it["input_ids"]) - it["n_prompt"]),
        }
        for batch in _batches(spec)
        for it in batch
    ]
    ends: list[float] = []
    # The warm-up step (dropped from the timings anyway) runs under the profiler: where TRL's time goes.
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])

    class StepClock(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == 0:
                profiler.start()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == 1:
                profiler.stop()
            ends.append(time.monotonic())

    overrides: dict[str, Any] = {}
    if matched:
        overrides = {"bf16": False, "gradient_checkpointing": False, "model_init_kwargs": {"dtype": "float32"}}
    config = SFTConfig(
        output_dir=spec["output_dir"],
        per_device_train_batch_size=int(spec["batch"]),
        gradient_accumulation_steps=1,
        max_steps=int(spec["steps"]),
        learning_rate=1e-5,
        lr_scheduler_type="constant",
        loss_type="dft",
        max_length=int(spec["seq_len"]),
        packing=False,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        save_strategy="no",
        logging_steps=10_000,
        report_to=[],
        seed=0,
        **overrides,
    )
    trainer = SFTTrainer(model=spec["model"], args=config, train_dataset=Dataset.from_list(rows))
    trainer.add_callback(StepClock())
    start = time.monotonic()
    trainer.train()
    # one interval per step: the first runs from the start of train() (warm-up, dropped by the caller)
    marks = [start, *ends]
    seconds = [b - a for a, b in itertools.pairwise(marks)]
    effective = trainer.args
    return {
        "seconds": seconds,
        "tokens": [int(spec["batch"]) * int(spec["seq_len"])] * len(seconds),
        "bf16": bool(effective.bf16),
        "gradient_checkpointing": bool(effective.gradient_checkpointing),
        "model_dtype": str(next(trainer.model_wrapped.parameters()).dtype),
        "torch_threads": torch.get_num_threads(),
        "profile_top_ops": top_ops(profiler),
    }


def top_ops(profiler: Any, n: int = 8) -> list[dict[str, Any]]:
    """The `n` operators with the most self CPU time in a finished profile, with their share of it."""
    events = sorted(profiler.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return [
        {
            "op": e.key,
            "self_cpu_s": e.self_cpu_time_total / 1e6,
            "share": e.self_cpu_time_total / total,
            "calls": e.count,
        }
        for e in events[:n]
    ]


def main(argv: Sequence[str]) -> None:
    """Entry point: KIND SPEC RESULT."""
    kind, spec_path, result_path = argv
    spec = json.loads(Path(spec_path).read_text())
    result = {"bare": bare, "trl": trl, "warmup": warm_up}[kind](spec)
    tmp = Path(result_path).with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, result_path)


if __name__ == "__main__":
    main(sys.argv[1:])
