"""The current filter's verdict on the guided records a run kept under an earlier filter, against labels.

A run's kept guided records carry their question (the plain prompt), gold answer, guidance mode and the
likelihood signal's recorded gain (`meta.guidance_check.logprob_gain`); the reference solution comes
from the run's problems file, matched by question. So no engine is needed: the text signals run again
exactly as the pipeline runs them (default `StageParams` limits) and the likelihood signal compares the
recorded gain with the current threshold. `labels.jsonl` holds one
reading per record (`problem_id`, `label` lean/clean, `note`). Prints every record with its label and
verdict, then how many leaning records each filter keeps.

What this cannot show: in a run under the current filter, a record rejected here would have been
followed by the problem's remaining guided attempts, which may have kept another response.

    .venv/bin/python -m experiments.guidance_filter.rejudge RECORDS.jsonl PROBLEMS.jsonl LABELS.jsonl
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from experiments.guidance_filter.evaluate import load
from services.guidance_filter import guidance_context, limits_of, text_check, with_likelihood
from shared.config import StageParams
from shared.prompts import SOLVE_INSTRUCTION
from shared.schema import Problem


def main(args: argparse.Namespace) -> None:
    params = StageParams()
    limits = limits_of(params)
    labels = {row["problem_id"]: row for row in load(args.labels)}
    problems = {
        r["question"].strip(): Problem(id=str(r["id"]), question=r["question"], solution=r.get("solution"))
        for r in load(args.problems)
    }
    records = [r for r in load(args.records) if r["stage"] == "guided"]
    missing = [r["problem_id"] for r in records if r["problem_id"] not in labels]
    if missing:
        raise SystemExit(f"{args.labels}: no label for problem(s) {missing}")
    kept: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    for r in records:
        label = labels[r["problem_id"]]
        question = r["prompt"][-1]["content"].removesuffix(SOLVE_INSTRUCTION).strip()  # the plain prompt
        solution = problems[question].solution
        ctx = guidance_context(question, solution, r["answer"], r["meta"]["guidance"], params.hint_fraction)
        check = text_check(r["completion"][-1]["content"], ctx, limits)
        check = with_likelihood(check, r["meta"]["guidance_check"]["logprob_gain"], limits)
        reasons[check.reason or "kept"] += 1
        if check.reason is None:
            kept[label["label"]] += 1
        print(f"{r['problem_id']:>5} {label['label']:<5} {check.reason or 'kept':<12} {label['note']}")
    before = Counter(labels[r["problem_id"]]["label"] for r in records)
    print(f"\nkept by the run's filter: {len(records)} ({before['lean']} lean, {before['clean']} clean)")
    print(f"kept by the current filter: {reasons['kept']} ({kept['lean']} lean, {kept['clean']} clean)")
    print("rejected now:", {k: v for k, v in reasons.items() if k != "kept"})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("records", type=Path, help="a run's records (its guided ones are judged)")
    parser.add_argument("problems", type=Path, help="the run's problems (question, solution, answer)")
    parser.add_argument("labels", type=Path, help="labels.jsonl: problem_id, label (lean/clean), note")
    main(parser.parse_args())
