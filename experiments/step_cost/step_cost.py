"""What one decoding step costs at the batch widths the rewrite line's two schedules run at, measured directly.

The rewrite bench line's GSM8K wall-time floor (docs/performance.md) rests on a step-cost model `a + b·n`
for `n` sequences decoding together: the pipeline runs an unsolved batch in phases of 12 sequences (2
rounds of 2 self samples, then 2 of 2 guided, for 6 problems) or, at best, 24, where the naive schedule
sends all 48 at once. The bench derived `a / b` from its own phase timings; this script times the
steps themselves: `n` requests on the GSM8K plain prompts the line uses, every one decoding exactly
`max_tokens` tokens (`ignore_eos`), on the engine the bench builds (`VLLMEngine`, the same config), at
the bench's sampling temperature with log-probs, so a step is the same work the line's steps do.

Per width: a warm-up, then `--repeat` timed runs; per-step time is the median wall time over
`max_tokens`. Prints the widths' step times, the least-squares `a` and `b`, and the floors they give on
the line's workload: any schedule that keeps the method's rule needs two phases (self, then guided) of
24 at best; the pipeline's four phases of 12. Writes the same as JSON to `--out`.

From the repository root, on an idle machine (one heavy job at a time):

    VLLM_CPU_NUM_OF_RESERVED_CPU=0 .venv/bin/python -m experiments.step_cost.step_cost \
        --out experiments/step_cost/<machine>.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mindgap.bench.machine import cpu_model
from shared.config import EngineConfig
from shared.dataio import read_problems
from shared.logs import setup_logging
from shared.prompts import solve_messages

if TYPE_CHECKING:
    from services.vllm_engine import VLLMEngine

GSM8K = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "gsm8k" / "train.jsonl"
WIDTHS = (6, 12, 24, 48)


async def step_seconds(
    engine: VLLMEngine, prompts: list[list[int]], n: int, max_tokens: int, repeat: int
) -> list[float]:
    """Per-step wall time of `n` sequences (the prompts round-robin), each decoding `max_tokens` tokens."""
    from vllm import SamplingParams  # here: `fit` is importable without vLLM
    from vllm.sampling_params import RequestOutputKind

    sampling = SamplingParams(
        n=1,
        temperature=0.7,
        max_tokens=max_tokens,
        ignore_eos=True,
        logprobs=0,
        output_kind=RequestOutputKind.FINAL_ONLY,
    )
    times = []
    for i in range(repeat + 1):  # the first is the warm-up
        started = time.perf_counter()
        await asyncio.gather(*(engine._run(prompts[j % len(prompts)], sampling) for j in range(n)))
        if i:
            times.append((time.perf_counter() - started) / max_tokens)
    return times


def fit(median: dict[int, float]) -> dict[str, float]:
    """`a + b·n` fitted by least squares to the median step time per width `n` (it needs 12, 24 and 48),
    and what it gives on the line's workload: the step ratios to 48 sequences, the rule-keeping floor (two
    phases of 24) and the pipeline's four phases of 12, each from the measured medians."""
    widths = sorted(median)
    b, a = statistics.linear_regression(widths, [median[n] for n in widths])
    return {
        "a_ms": round(1000 * a, 3),
        "b_ms": round(1000 * b, 4),
        "a_over_b": round(a / b, 1),
        "step_12_over_48": round(median[12] / median[48], 3),
        "step_24_over_48": round(median[24] / median[48], 3),
        "floor_two_phases_of_24": round(2 * median[24] / median[48], 3),
        "four_phases_of_12": round(4 * median[12] / median[48], 3),
    }


async def main(args: argparse.Namespace) -> None:
    from services.vllm_engine import VLLMEngine

    setup_logging()
    engine = await VLLMEngine.create(EngineConfig(model=args.model, max_model_len=2048, kv_cache_gib=2, seed=0))
    problems = read_problems(GSM8K, limit=6).problems  # the bench line's quick GSM8K workload
    prompts = [engine.render_prompt(solve_messages(p.question)) for p in problems]
    steps: dict[int, list[float]] = {}
    for n in WIDTHS:
        steps[n] = await step_seconds(engine, prompts, n, args.max_tokens, args.repeat)
        runs = [round(1000 * t, 1) for t in steps[n]]
        print(f"{n:>3} sequences: {1000 * statistics.median(steps[n]):.1f} ms per step {runs}")
    result: dict[str, Any] = {
        "cpu": cpu_model(),
        "model": args.model,
        "max_tokens": args.max_tokens,
        "step_ms": {n: [round(1000 * t, 2) for t in steps[n]] for n in WIDTHS},
        "median_step_ms": {n: round(1000 * statistics.median(t), 2) for n, t in steps.items()},
        **fit({n: statistics.median(t) for n, t in steps.items()}),
    }
    print(json.dumps({k: v for k, v in result.items() if k not in ("step_ms",)}, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path)
    asyncio.run(main(parser.parse_args()))
