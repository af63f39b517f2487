"""The seventh signal, `addresses`, measured: a guided response that talks to or about a solution it was shown.

Of the leaning responses the six earlier signals kept, several reply to the guidance as if it were the
user's work: "Your solution is correct, you have correctly applied…", "I made a clever error in the
original solution", "You can return to the original code", "I hope you're happy with your solution".
Under the plain prompt the user asked a question and showed no solution, so such a reference has nothing
to refer to. The signal is `services.guidance_filter.addressed_phrase`; this script measures it like
`unsupported_numbers.py` measured its declined signal:

- what it adds to the six earlier signals on the labelled spot checks and the labelled set (the
  responses those keep, with their labels);
- how often it fires where nothing was shown: 1,000 human GSM8K solutions, and the model's own correct
  self-stage responses (plain prompt) from the same two runs.

From the repository root:

    .venv/bin/python -m experiments.guidance_filter.addresses_guidance \
        > experiments/guidance_filter/addresses_guidance.txt
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from experiments.guidance_filter.evaluate import load, verdicts
from experiments.guidance_filter.rejudge import LABELLED_RUNS, kept_guided, print_added
from services import guidance_filter as gf
from shared.config import StageParams
from shared.prompts import solve_messages
from shared.schema import Problem

HERE = Path(__file__).parent
GSM8K = HERE.parents[1].parent / "shared" / "data" / "gsm8k" / "train.jsonl"
# the filter as it was before this signal: what `addresses` is measured against
BEFORE = replace(gf.limits_of(StageParams()), addresses=False)


def addressed(response: str, question: str) -> str | None:
    """The signal on `response` to the plain prompt of `question`."""
    return gf.addressed_phrase(response, solve_messages(question)[0].content)


def spot_checks() -> None:
    """What the signal adds to the six earlier signals on the labelled real-run records they keep."""
    for folder, records, problems in LABELLED_RUNS:
        kept = kept_guided(folder, records, problems, BEFORE)
        flagged = [
            (r["problem_id"], label, found)
            for r, label, question in kept
            if (found := addressed(r["completion"][-1]["content"], question))
        ]
        print_added(f"{folder} (six earlier signals)", "`addresses`", [label for _, label, _ in kept], flagged)


def labelled_set() -> None:
    """The same on the labelled set: alone on all 65 responses, and on the correct ones the others keep."""
    problems = {p.id: p for p in (Problem.model_validate(r) for r in load(HERE / "problems.jsonl"))}
    rows = load(HERE / "labelled.jsonl")
    hits = {r["id"]: addressed(r["text"], problems[r["problem_id"]].question) for r in rows}
    lean = [r for r in rows if r["label"] == "lean"]
    caught_lean = sum(bool(hits[r["id"]]) for r in lean)
    false = [(r["id"], hits[r["id"]]) for r in rows if r["label"] == "clean" and hits[r["id"]]]
    print(f"labelled set, alone on all {len(rows)}: catches {caught_lean} of {len(lean)} leaning; flags clean: {false}")
    correct = [r for r in rows if r.get("correct", True)]
    kept = [r for r, v in zip(correct, verdicts(correct, problems, BEFORE), strict=True) if not v["reason"]]
    flagged = [(r["id"], r["label"], hits[r["id"]]) for r in kept if hits[r["id"]]]
    print_added("labelled set (six earlier signals)", "`addresses`", [r["label"] for r in kept], flagged)


def self_responses() -> None:
    """How often it fires on the model's own correct responses to the plain prompt (nothing was shown)."""
    for folder, records, problems in LABELLED_RUNS:
        recs, probs = load(HERE / records), load(HERE / problems)
        by_prompt = {solve_messages(p["question"])[-1].content: p for p in probs}
        own = [r for r in recs if r["stage"] == "self"]
        flagged = [
            (r["problem_id"], found)
            for r in own
            if (found := addressed(r["completion"][-1]["content"], by_prompt[r["prompt"][-1]["content"]]["question"]))
        ]
        print(f"self responses of {folder}: {len(flagged)} of {len(own)} flagged {flagged[:6]}")


def gsm8k_references(n: int = 1000) -> None:
    """How often it fires on correct human solutions (a floor on false positives)."""
    rows: list[dict[str, Any]] = [json.loads(line) for line in GSM8K.open()][:n]
    flagged = [r["answer"][:80] for r in rows if addressed(r["answer"], r["question"])]
    print(f"GSM8K reference solutions flagged (first {len(rows)}): {len(flagged)} {flagged[:3]}")


def main() -> None:
    """Print every measurement."""
    spot_checks()
    labelled_set()
    self_responses()
    gsm8k_references()


if __name__ == "__main__":
    main()
