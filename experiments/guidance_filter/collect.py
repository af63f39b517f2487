"""Collect guided responses of the real default model, scored on both prompts, for labelling.

For each problem this samples `--self-samples` responses to the plain prompt (stage 1: whether the model
solves the problem on its own) and, for each guidance mode, `--attempts` responses to the guided prompt
(exactly as stage 2 of the pipeline builds it, at the pipeline's default temperature), grades them, and
scores every finished guided response at temperature 1 on the plain prompt and on the guided prompt. Hand-written
responses (`--handwritten FILE`: rows with `problem_id`, `mode`, `text`) are scored the same way. The
output rows (`responses.jsonl`) carry everything the filter looks at, so `evaluate.py` needs no engine.
`--records OUT.jsonl` scores the guided records of a `mindgap rewrite` run instead (no sampling; each
spot check's `scored.jsonl` was made so, with the run's own problems file).

    flock /tmp/heavy.lock .venv/bin/python experiments/guidance_filter/collect.py \
        --problems experiments/guidance_filter/problems.jsonl --out experiments/guidance_filter/responses.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

from services.engine import Engine, SamplingConfig, create_engine
from shared.config import EngineConfig, GuidanceMode, StageParams
from shared.dataio import FieldMap, read_problems
from shared.grading import extract_gold, grade_response, states_final_answer
from shared.prompts import guided_messages, solve_messages
from shared.schema import Example, Problem, Stage, wire_logprobs


async def _scored(engine: Engine, problem: Problem, mode: GuidanceMode, token_ids: list[int]) -> dict[str, Any]:
    gold = extract_gold(problem.answer, problem.solution) or ""
    plain = engine.render_prompt(solve_messages(problem.question))
    guided = engine.render_prompt(
        guided_messages(problem.question, problem.solution, gold, mode, StageParams().hint_fraction)
    )
    plain_lp, guided_lp = await asyncio.gather(engine.score(plain, token_ids), engine.score(guided, token_ids))
    return {"plain_logprobs": wire_logprobs(plain_lp), "guided_logprobs": wire_logprobs(guided_lp)}


async def _self_correct(engine: Engine, problem: Problem, n: int, max_tokens: int) -> int:
    """How many of `n` plain-prompt samples the pipeline would count correct (explicit and right)."""
    gold = extract_gold(problem.answer, problem.solution) or ""
    params = StageParams()
    sampling = SamplingConfig(n=n, temperature=params.temperature, top_p=params.top_p, max_tokens=max_tokens)
    samples = await engine.generate(engine.render_prompt(solve_messages(problem.question)), sampling)
    return sum(
        s.finish_reason == "stop" and states_final_answer(s.text) and grade_response(s.text, gold) for s in samples
    )


async def _sample(
    engine: Engine, problem: Problem, mode: GuidanceMode, attempts: int, max_tokens: int, self_samples: int
) -> list[dict[str, Any]]:
    gold = extract_gold(problem.answer, problem.solution) or ""
    params = StageParams()
    prompt = engine.render_prompt(guided_messages(problem.question, problem.solution, gold, mode, params.hint_fraction))
    sampling = SamplingConfig(n=attempts, temperature=params.temperature, top_p=params.top_p, max_tokens=max_tokens)
    guided, self_correct = await asyncio.gather(
        engine.generate(prompt, sampling), _self_correct(engine, problem, self_samples, max_tokens)
    )
    rows = []
    for i, s in enumerate(guided):
        if s.finish_reason != "stop":
            continue  # the pipeline never keeps an unfinished response
        row: dict[str, Any] = {
            "id": f"{problem.id}:{mode}:{i}",
            "origin": "model",
            "problem_id": problem.id,
            "mode": mode,
            "text": s.text,
            "correct": states_final_answer(s.text) and grade_response(s.text, gold),
            "self_correct": self_correct,
            "token_ids": list(s.token_ids),
        }
        row.update(await _scored(engine, problem, mode, list(s.token_ids)))
        rows.append(row)
    return rows


async def _handwritten(engine: Engine, problems: dict[str, Problem], n: int, hand: dict[str, Any]) -> dict[str, Any]:
    problem = problems[hand["problem_id"]]
    ids = engine.encode_completion(hand["text"])
    gold = extract_gold(problem.answer, problem.solution) or ""
    row = {
        "id": f"hand:{n}",
        "origin": "hand",
        "problem_id": problem.id,
        "mode": hand["mode"],
        "text": hand["text"],
        "correct": states_final_answer(hand["text"]) and grade_response(hand["text"], gold),
        "token_ids": ids,
        "label": hand["label"],
        "note": hand.get("note", ""),
    }
    row.update(await _scored(engine, problem, hand["mode"], ids))
    return row


async def main(args: argparse.Namespace) -> None:
    # the dataset reader `mindgap rewrite` uses, ids from the file (generated files carry more fields)
    problems = {p.id: p for p in read_problems(args.problems, FieldMap(id="id"), strict=True).problems}
    engine = await create_engine(
        "vllm", EngineConfig(enforce_eager=True, kv_cache_gib=1.0, max_model_len=2048, seed=args.seed)
    )
    try:
        modes: list[GuidanceMode] = args.modes
        chosen = [p for p in problems.values() if not args.only or p.id in args.only]
        written = 0
        if args.records:
            records = [Example.model_validate_json(line) for line in args.records.read_text().splitlines() if line]
            guided = [r for r in records if r.stage is Stage.GUIDED]
            # a record's prompt is the plain prompt of its question (its problem_id is the row's place in
            # the rewrite input, not the problem file's id)
            by_prompt = {solve_messages(p.question)[-1].content: p for p in problems.values()}
            with args.out.open("a") as f:
                for r in guided:
                    mode: GuidanceMode = r.meta["guidance"]
                    row: dict[str, Any] = {
                        "id": r.id,
                        "origin": "rewrite",
                        "problem_id": r.problem_id,
                        "mode": mode,
                        "text": r.response,
                    }
                    row |= {"correct": True, "meta": r.meta, "token_ids": r.completion_token_ids}
                    row.update(await _scored(engine, by_prompt[r.prompt[-1].content], mode, r.completion_token_ids))
                    f.write(json.dumps(row) + "\n")
            print(f"{len(guided)} guided records scored → {args.out}")
            return
        with args.out.open("a") as f:  # appended as each prompt's responses are done: a cut run keeps them
            for n, line in enumerate(args.handwritten.read_text().splitlines() if args.handwritten else []):
                if line.strip():
                    f.write(json.dumps(await _handwritten(engine, problems, n, json.loads(line))) + "\n")
                    written += 1
            jobs = [
                _sample(engine, p, m, args.attempts, args.max_tokens, args.self_samples) for p in chosen for m in modes
            ]
            for job in asyncio.as_completed(jobs):
                for row in await job:
                    f.write(json.dumps(row) + "\n")
                    written += 1
                f.flush()
        print(f"{written} responses → {args.out}")
    finally:
        await engine.shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--handwritten", type=Path)
    parser.add_argument("--records", type=Path, help="score the guided records of a rewrite output instead")
    parser.add_argument("--only", nargs="*", help="problem ids to sample (default: all)")
    parser.add_argument("--modes", nargs="+", default=["answer", "solution"])
    parser.add_argument("--attempts", type=int, default=4)
    parser.add_argument("--self-samples", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    asyncio.run(main(parser.parse_args()))
