"""Precision and recall of the guidance-dependence filter on the labelled guided responses.

Reads `labelled.jsonl` (responses with `label` lean/clean and both prompts' temperature-1 scores, made
by `collect.py` and labelled by reading) and `problems.jsonl`, runs the filter exactly as the pipeline
does (`services.guidance_filter`, default `StageParams` limits) and, for comparison, the phrase-list
and 12-word-copy leak filter it replaced (kept here, verbatim, as the baseline). "Positive" = leaning.

    .venv/bin/python experiments/guidance_filter/evaluate.py [--sweep]
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from services.guidance_filter import (
    REASONS,
    GuidanceLimits,
    guidance_context,
    limits_of,
    logprob_gain,
    text_check,
    with_likelihood,
)
from shared.config import GuidanceMode, StageParams
from shared.grading import extract_gold
from shared.schema import Problem

HERE = Path(__file__).parent

# The leak filter before this one (shared/prompts.py up to issue 13): a phrase list and 12-word copies.
_OLD_PHRASES = re.compile(
    r"reference solution|reference answer|(?:the|this|that) (?:given|provided|official|sample|above) "
    r"(?:solution|answer|hint)|as (?:shown|given|stated|mentioned|done|suggested) in the (?:solution|hint|"
    r"reference)|according to the (?:solution|hint|reference)|the (?:solution|answer|hint) (?:provided|given)"
    r"|provided (?:solution|answer)|given (?:solution|answer) (?:is|says|states|shows)|\bthe hint\b",
    re.IGNORECASE,
)


def _old_words(text: str) -> list[str]:
    text = re.sub(r"<<[^<>]*>>", " ", text)
    text = re.sub(r"\\[a-zA-Z]+", " ", text)
    return re.findall(r"[a-z]+", text.lower())


def _old_spans(words: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def old_leak(response: str, solution: str | None, question: str) -> bool:
    """The old filter's verdict (True: rejected)."""
    if _OLD_PHRASES.search(response):
        return True
    if not solution:
        return False
    copied = _old_spans(_old_words(response), 12) & _old_spans(_old_words(solution), 12)
    return bool(copied - _old_spans(_old_words(question), 12))


def _solution_and_question(p: Problem) -> tuple[str | None, str]:
    return p.solution, p.question


def load(path: Path) -> list[dict[str, Any]]:
    """JSONL rows."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def verdicts(
    rows: Sequence[dict[str, Any]], problems: dict[str, Problem], limits: GuidanceLimits
) -> list[dict[str, Any]]:
    """Each row's filter check (as meta) under `limits`."""
    out = []
    for row in rows:
        p = problems[row["problem_id"]]
        gold = extract_gold(p.answer, p.solution) or ""
        mode: GuidanceMode = row["mode"]
        ctx = guidance_context(p.question, p.solution, gold, mode, StageParams().hint_fraction)
        check = text_check(row["text"], ctx, limits)
        gain = logprob_gain(row["plain_logprobs"], row["guided_logprobs"], limits.gain_window)
        check = with_likelihood(check, gain, limits)
        out.append(check.to_meta())
    return out


def metrics(labels: Sequence[bool], flagged: Sequence[bool]) -> dict[str, float | int]:
    """Precision/recall/F1 of `flagged` against `labels` (True: leaning)."""
    tp = sum(lab and f for lab, f in zip(labels, flagged, strict=True))
    fp = sum(f and not lab for lab, f in zip(labels, flagged, strict=True))
    fn = sum(lab and not f for lab, f in zip(labels, flagged, strict=True))
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "precision": round(precision, 3),
        "recall": round(recall, 3),
        "f1": round(f1, 3),
    }


def report(name: str, labels: Sequence[bool], flagged: Sequence[bool]) -> None:
    m = metrics(labels, flagged)
    print(
        f"{name:<34} precision {m['precision']:.2f}  recall {m['recall']:.2f}  F1 {m['f1']:.2f}"
        f"  (tp {m['tp']}, fp {m['fp']}, fn {m['fn']})"
    )


def main(args: argparse.Namespace) -> None:
    rows = load(args.labelled)
    problems = {p.id: p for p in (Problem.model_validate(r) for r in load(args.problems))}
    limits = limits_of(StageParams())
    subsets: dict[str, Callable[[dict[str, Any]], bool]] = {
        "all": lambda r: True,
        "correct (what the filter sees)": lambda r: bool(r["correct"]),
        "model": lambda r: r["origin"] == "model",
        "hand": lambda r: r["origin"] == "hand",
    }
    for subset, keep in subsets.items():
        part = [r for r in rows if keep(r)]
        labels = [r["label"] == "lean" for r in part]
        checks = verdicts(part, problems, limits)
        print(f"\n{subset}: {len(part)} responses, {sum(labels)} leaning")
        report("filter (defaults)", labels, [c["reason"] is not None for c in checks])
        old = [
            old_leak(r["text"], problems[r["problem_id"]].solution, problems[r["problem_id"]].question) for r in part
        ]
        report("old phrase-list + copy filter", labels, old)
        for reason in REASONS:
            alone = GuidanceLimits(
                echo_words=limits.echo_words if reason == "echo" else 0,
                copy_words=limits.copy_words if reason == "copy" else 0,
                answer_first=reason == "answer_first",
                arithmetic=reason == "arithmetic",
                unworked=reason == "unworked",
                addresses=reason == "addresses",
                other_answer=reason == "other_answer",
                max_logprob_gain=limits.max_logprob_gain if reason == "likelihood" else None,
                gain_window=limits.gain_window,
            )
            report(f"  {reason} alone", labels, [c["reason"] is not None for c in verdicts(part, problems, alone)])
    if args.sweep:
        labels = [r["label"] == "lean" for r in rows]
        print("\nsweep (all rows, other signals at their defaults)")
        for echo in (3, 4, 5, 6, 8):
            flagged = [c["reason"] is not None for c in verdicts(rows, problems, replace(limits, echo_words=echo))]
            report(f"echo_words {echo}", labels, flagged)
        for window in (4, 8, 16, 1000):
            flagged = [c["reason"] is not None for c in verdicts(rows, problems, replace(limits, gain_window=window))]
            report(f"gain_window {window}", labels, flagged)
        for gain in (0.2, 0.3, 0.5, 0.6, 0.7, 0.8, 1.0, 1.5, None):
            flagged = [
                c["reason"] is not None for c in verdicts(rows, problems, replace(limits, max_logprob_gain=gain))
            ]
            report(f"max_logprob_gain {gain}", labels, flagged)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labelled", type=Path, default=HERE / "labelled.jsonl")
    parser.add_argument("--problems", type=Path, default=HERE / "problems.jsonl")
    parser.add_argument("--sweep", action="store_true", help="also sweep the echo and likelihood thresholds")
    main(parser.parse_args())
