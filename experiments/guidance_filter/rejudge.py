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
from typing import Any

from experiments.guidance_filter.evaluate import load
from services.guidance_filter import GuidanceLimits, guidance_context, limits_of, text_check, with_likelihood
from shared.config import StageParams
from shared.prompts import solve_messages

HERE = Path(__file__).parent


def judge(
    records: list[dict[str, Any]],
    problems: list[dict[str, Any]],
    labels: list[dict[str, Any]],
    limits: GuidanceLimits | None = None,
) -> list[tuple[str, str, str, str]]:
    """(problem_id, label, verdict, note) of every guided record; the verdict is a rejection reason or 'kept'.

    `limits` default to the filter's (`StageParams()`).
    """
    params = StageParams()
    limits = limits or limits_of(params)
    by_id = {row["problem_id"]: row for row in labels}
    # A record's prompt is the plain prompt of its question: match it as the pipeline rendered it.
    by_prompt = {solve_messages(p["question"])[-1].content: p for p in problems}
    guided = [r for r in records if r["stage"] == "guided"]
    missing = [r["problem_id"] for r in guided if r["problem_id"] not in by_id]
    if missing:
        raise SystemExit(f"no label for problem(s) {missing}")
    rows = []
    for r in guided:
        problem = by_prompt[r["prompt"][-1]["content"]]
        ctx = guidance_context(
            problem["question"], problem.get("solution"), r["answer"], r["meta"]["guidance"], params.hint_fraction
        )
        check = text_check(r["completion"][-1]["content"], ctx, limits)
        check = with_likelihood(check, r["meta"]["guidance_check"]["logprob_gain"], limits)
        label = by_id[r["problem_id"]]
        rows.append((r["problem_id"], label["label"], check.reason or "kept", label["note"]))
    return rows


# The labelled arithmetic runs whose kept guided records candidate signals are measured on:
# (folder holding labels.jsonl, the run's records, its problems), relative to this folder.
LABELLED_RUNS = (
    ("spotcheck_arith", "../arith-smollm2-135m/run/rewritten.jsonl", "../arith-smollm2-135m/run/data/train.jsonl"),
    ("spotcheck_arith_final", "spotcheck_arith_final/out.jsonl", "spotcheck_arith_final/problems.jsonl"),
)


def kept_guided(
    folder: str, records: str, problems: str, limits: GuidanceLimits | None = None
) -> list[tuple[dict[str, Any], str, str]]:
    """(record, label, question) of every guided record of a labelled run that the filter with `limits` keeps."""
    recs, probs = load(HERE / records), load(HERE / problems)
    by_prompt = {solve_messages(p["question"])[-1].content: p for p in probs}
    guided = [r for r in recs if r["stage"] == "guided"]
    rows = judge(recs, probs, load(HERE / folder / "labels.jsonl"), limits)  # one row per guided record
    return [
        (r, label, by_prompt[r["prompt"][-1]["content"]]["question"])
        for r, (_, label, verdict, _) in zip(guided, rows, strict=True)
        if verdict == "kept"
    ]


def print_added(name: str, signal: str, labels: list[str], flagged: list[tuple[str, str, Any]]) -> None:
    """What a candidate `signal` would reject (id, label, evidence) among the `labels` a filter keeps."""
    lean = sum(label == "lean" for label in labels)
    print(f"{name}: the filter keeps {len(labels)} ({lean} lean); {signal} rejects:")
    for pid, label, evidence in flagged:
        print(f"  {pid:>14} {label:<5} {evidence}")


def main(args: argparse.Namespace) -> None:
    rows = judge(load(args.records), load(args.problems), load(args.labels))
    for pid, label, verdict, note in rows:
        print(f"{pid:>5} {label:<5} {verdict:<12} {note}")
    before = Counter(label for _, label, _, _ in rows)
    kept = Counter(label for _, label, verdict, _ in rows if verdict == "kept")
    rejected = Counter(verdict for _, _, verdict, _ in rows if verdict != "kept")
    print(f"\nkept by the run's filter: {len(rows)} ({before['lean']} lean, {before['clean']} clean)")
    print(f"kept by the current filter: {kept.total()} ({kept['lean']} lean, {kept['clean']} clean)")
    print("rejected now:", dict(rejected))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("records", type=Path, help="a run's records (its guided ones are judged)")
    parser.add_argument("problems", type=Path, help="the run's problems (question, solution, answer)")
    parser.add_argument("labels", type=Path, help="labels.jsonl: problem_id, label (lean/clean), note")
    main(parser.parse_args())
