"""Bench child processes for the trainer line's baselines: a bare PyTorch loop and TRL's SFTTrainer.

Run as `python -m shared.bench.train_worker KIND SPEC.json RESULT.json`. Both read the same token ids
(prompt + completion, every sequence exactly `seq_len` long, so no padding anywhere) that `mindgap train`
reads from its JSONL, and report per-step wall times; the first step is the warm-up.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _batches(spec: dict[str, Any]) -> list[list[dict[str, Any]]]:
    items: list[dict[str, Any]] = spec["items"]
    b = int(spec["batch"])
    return [items[i : i + b] for i in range(0, int(spec["steps"]) * b, b)]


def bare(spec: dict[str, Any]) -> dict[str, Any]:
    """Forward, cross-entropy on the completion tokens, backward, AdamW step: nothing else."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    model.config.use_cache = False
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    seconds: list[float] = []
    tokens: list[int] = []
    for batch in _batches(spec):
        t0 = time.monotonic()
        ids = torch.tensor([it["input_ids"] for it in batch])
        labels = ids.clone()
        for row, it in enumerate(batch):
            labels[row, : it["n_prompt"]] = -100  # the loss is on the completion only, as in mindgap
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        seconds.append(time.monotonic() - t0)
        tokens.append(ids.numel())
    return {"seconds": seconds, "tokens": tokens, "torch_threads": torch.get_num_threads()}


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

    class StepClock(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            ends.append(time.monotonic())

    overrides: dict[str, Any] = {}
    if matched:
        overrides = {"bf16": False, "gradient_checkpointing": False, "model_init_kwargs": {"dtype": torch.float32}}
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
    }


def main(argv: Sequence[str]) -> None:
    """Entry point: KIND SPEC RESULT."""
    kind, spec_path, result_path = argv
    spec = json.loads(Path(spec_path).read_text())
    result = {"bare": bare, "trl": trl}[kind](spec)
    tmp = Path(result_path).with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, result_path)


if __name__ == "__main__":
    main(sys.argv[1:])
