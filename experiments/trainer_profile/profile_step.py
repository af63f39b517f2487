"""Where a training step's time goes: `mindgap train`'s step against the bench's bare PyTorch loop.

Runs both on the same batches in one process (the bare loop first, then DeepSpeed), times each step with
the device synchronised, and profiles a few steps of each with the torch profiler (CPU and, on a GPU,
CUDA): the operators with the most self time, and per step the device's busy time against the wall time.
A step whose wall time exceeds its busy time by much is waiting on the host (launches, syncs, Python).

    .venv/bin/python experiments/trainer_profile/profile_step.py --model DIR --data-dir ../shared/data \
        --out /tmp/profile --batch 8 --seq-len 512

Writes `profile.json` and `profile.md` to `--out`. What the trainer bench line measured on an H100 and this
profile's reading of it are in docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mindgap.bench.lines.trainer import make_data
from mindgap.bench.train_worker import bare_step
from trainer.config import TrainerConfig
from trainer.data import TrainItem, prepare_item
from trainer.losses import LossSpec
from trainer.train import train_step
from trainer.zero import build_engine, init_distributed


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _time_steps(step: Callable[[int], None], n: int) -> list[float]:
    seconds = []
    for i in range(n):
        _sync()
        t0 = time.perf_counter()
        step(i)
        _sync()
        seconds.append(time.perf_counter() - t0)
    return seconds


def _profile(step: Callable[[int], None], n: int, top: int) -> dict[str, Any]:
    activities = [torch.profiler.ProfilerActivity.CPU]
    cuda = torch.cuda.is_available()
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    _sync()
    with torch.profiler.profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for i in range(n):
            step(i)
        _sync()
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    # Operators run on the host and own their kernels' time as self device time; kernels are their own
    # (device-type) events, each counted once: the busy time is theirs.
    ops = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]
    kernels = [e for e in events if e.device_type != torch.autograd.DeviceType.CPU]

    def rows(key: str) -> list[dict[str, Any]]:
        ordered = sorted(ops, key=lambda e: getattr(e, key), reverse=True)[:top]
        return [
            {
                "op": e.key,
                "calls": e.count,
                "self_cpu_ms": e.self_cpu_time_total / 1e3 / n,
                "self_device_ms": e.self_device_time_total / 1e3 / n,
            }
            for e in ordered
        ]

    device_busy = sum(e.self_device_time_total for e in kernels) / 1e3 / n if cuda else None
    return {
        "wall_ms_per_step": wall * 1e3 / n,
        "device_busy_ms_per_step": device_busy,
        "syncs_per_step": sum(e.count for e in events if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize"))
        / n,
        "launches_per_step": sum(e.count for e in events if e.key == "cudaLaunchKernel") / n,
        "top_by_device": rows("self_device_time_total") if cuda else [],
        "top_by_cpu": rows("self_cpu_time_total"),
    }


def main() -> None:
    """Time and profile both steps; write profile.json and profile.md."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--data-dir", required=True, type=Path, help="folder holding gsm8k/train.jsonl")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per side, after 2 warm-up steps")
    ap.add_argument("--profiled", type=int, default=4, help="profiled steps per side")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    n_batches = 2 + args.steps
    gsm8k = args.data_dir / "gsm8k" / "train.jsonl"
    examples, items = make_data(args.model, gsm8k, args.batch * n_batches, args.seq_len)
    batches = [items[i * args.batch : (i + 1) * args.batch] for i in range(n_batches)]
    dist = init_distributed()
    device = dist.device
    report: dict[str, Any] = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    report["shape"] = {"batch": args.batch, "seq_len": args.seq_len, "steps": args.steps}

    # The bare loop, as the bench's baseline runs it; its model is freed before DeepSpeed's is built.
    def bare_side() -> dict[str, Any]:
        bare = bare_step(str(args.model))

        def step(i: int) -> None:
            bare(batches[i % n_batches])

        _time_steps(step, 2)
        return {"seconds": _time_steps(step, args.steps), **_profile(step, args.profiled, args.top)}

    report["bare"] = bare_side()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # mindgap's step: DeepSpeed engine, DFT loss, fp32, --zero-stage 2 (stage 0 on one rank), as the bench runs it.
    data = Path(tempfile.mkdtemp()) / "examples.jsonl"
    data.write_text("".join(e.model_dump_json() + "\n" for e in examples))
    cfg = TrainerConfig(
        source=str(data), model=str(args.model), loss="dft", precision="fp32", zero_stage=2,
        batch_size=args.batch, micro_batch_size=args.batch, max_steps=1000, warmup_steps=0,
        max_seq_len=args.seq_len, checkpoint_dir=data.parent / "ckpt", publish=False,
    )  # fmt: skip
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(args.model))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_items: list[TrainItem] = [prepare_item(e, tokenizer, args.seq_len, f"x:{i}") for i, e in enumerate(examples)]
    engine = build_engine(cfg, str(args.model), dist)
    spec = LossSpec.from_config(cfg)

    def mindgap_step(i: int) -> None:
        k = i % n_batches
        shared: list[Any] = [train_items[k * args.batch : (k + 1) * args.batch]]
        torch.distributed.broadcast_object_list(shared, src=0)  # as the loop shares rank 0's batch
        train_step(engine, None, shared[0], dist, cfg, spec, pad_id)

    _time_steps(mindgap_step, 2)
    report["mindgap"] = {
        "seconds": _time_steps(mindgap_step, args.steps),
        **_profile(mindgap_step, args.profiled, args.top),
    }
    for side in ("bare", "mindgap"):
        s = sorted(report[side]["seconds"])
        report[side]["median_ms"] = s[len(s) // 2] * 1e3
    report["ratio_median"] = report["bare"]["median_ms"] / report["mindgap"]["median_ms"]
    (args.out / "profile.json").write_text(json.dumps(report, indent=1))
    (args.out / "profile.md").write_text(_markdown(report))
    print(_markdown(report))
    torch.distributed.destroy_process_group()


def _markdown(report: dict[str, Any]) -> str:
    lines = [
        f"device {report['device']}, batch {report['shape']['batch']} × {report['shape']['seq_len']} tokens",
        f"median step: bare {report['bare']['median_ms']:.1f} ms, mindgap {report['mindgap']['median_ms']:.1f} ms"
        f" (bare/mindgap {report['ratio_median']:.3f})",
    ]
    for side in ("bare", "mindgap"):
        r = report[side]
        busy = r["device_busy_ms_per_step"]
        lines += [
            "",
            f"## {side}: profiled wall {r['wall_ms_per_step']:.1f} ms/step, device busy "
            + (f"{busy:.1f} ms/step" if busy is not None else "n/a")
            + f", {r['syncs_per_step']:.0f} syncs and {r['launches_per_step']:.0f} kernel launches per step",
        ]
        for key, title in (("top_by_device", "self device ms/step"), ("top_by_cpu", "self CPU ms/step")):
            if not r[key]:
                continue
            lines += ["", f"| op | calls | {title} | other |", "|---|---|---|---|"]
            field, other = ("self_device_ms", "self_cpu_ms")
            if key == "top_by_cpu":
                field, other = other, field
            lines += [f"| {e['op'][:70]} | {e['calls']} | {e[field]:.2f} | {e[other]:.2f} |" for e in r[key]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
