"""Two extensions for the leaning kind no signal read, measured before adoption: working that contradicts itself.

What the filter with all seven signals still kept on problems SmolLM2 cannot solve was a right sum inside
working that contradicts it (docs/rewrite.md, `spotcheck_arith_addresses/`). Some of those contradictions
are statements a text check can test, and both are now in `services.guidance_filter`:

- the `arithmetic` signal's new forms (`false_equation`): an equation written result first whose
  arithmetic is wrong ("11 = 11/5"), and a number or sum said in words to equal another, wrongly
  ("Since 42 is indeed 13", "6 * 7 equals 13": `equals`, `is equal to`, `is indeed`, `is the same as`).
  The signal read `a op b = r` only.
- the `other_answer` signal (`other_answer`): the response states an answer ("The answer is 2.",
  "\\boxed{5}", "#### 5") other than the one it was graded on ("… Final answer: 6"). Plain numbers only.

Each is measured like `addresses_guidance.py` measured its signal: what it adds to the seven signals as
they were (`arithmetic` reading `a op b = r` only) on the three labelled arithmetic runs and on the
labelled set (the responses those keep, with their labels); how often it fires where no guidance was
shown: every human GSM8K solution (right by construction) and the model's own correct self-stage
responses (plain prompt) of the three runs and of the two live runs with both checks on; and what it
flags among the guided records of the two GSM8K spot checks. Last, the `likelihood` signal's recorded
gains of the five runs' kept guided responses, leaning against clean.

From the repository root:

    .venv/bin/python -m experiments.guidance_filter.contradictions \
        > experiments/guidance_filter/contradictions.txt
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from experiments.guidance_filter.evaluate import load, verdicts
from experiments.guidance_filter.rejudge import LABELLED_RUNS, kept_guided, print_added
from services import guidance_filter as gf
from shared.config import StageParams
from shared.grading import extract_gold
from shared.schema import Problem

HERE = Path(__file__).parent
GSM8K = HERE.parents[1].parent / "shared" / "data" / "gsm8k" / "train.jsonl"
# the third labelled run: problems the default model could not solve, rewritten with all seven signals
RUNS = (
    *LABELLED_RUNS,
    ("spotcheck_arith_addresses", "spotcheck_arith_addresses/out.jsonl", "spotcheck_arith_addresses/problems.jsonl"),
)


def live(folder: str) -> tuple[str, str, str]:
    """(folder, records, problems) of a live spot check, relative to this folder."""
    return folder, f"{folder}/out.jsonl", f"{folder}/problems.jsonl"


# the live runs with both checks in the filter (not measured on for what the checks add: their guided
# records are what the checks kept), and every labelled run: those three, then these
LIVE_RUNS = (live("spotcheck_arith_contradictions"), live("spotcheck_arith_eight"))
ALL_RUNS = (*RUNS, *LIVE_RUNS)
# The seven signals as they were, less `arithmetic`, whose old form `forward_equation` applies on top.
BEFORE = replace(gf.limits_of(StageParams()), arithmetic=False, other_answer=False)

Check = Callable[[str, str], str | None]  # (response, gold) -> evidence or None


def forward_equation(response: str) -> str | None:
    """The `arithmetic` signal as it was: the first `a op b = r` whose arithmetic is wrong."""
    return next((m.group(0) for m in gf._EQUATION.finditer(response) if gf._wrong(m.group(1), m.group(2))), None)


def new_forms(response: str, gold: str) -> str | None:
    """What the `arithmetic` signal reads now and did not: a wrong `r = a op b` or equality in words."""
    return None if forward_equation(response) else gf.false_equation(response)


CHECKS: dict[str, Check] = {"arithmetic, new forms": new_forms, "other_answer": gf.other_answer}


def spot_checks() -> None:
    """What each adds to the seven signals as they were on the labelled real-run records those keep."""
    for folder, records, problems in RUNS:
        kept = [
            k
            for k in kept_guided(folder, records, problems, BEFORE)
            if not forward_equation(k[0]["completion"][-1]["content"])
        ]
        labels = [label for _, label, _ in kept]
        for name, check in CHECKS.items():
            flagged = [
                (r["problem_id"], label, found)
                for r, label, _ in kept
                if (found := check(r["completion"][-1]["content"], r["answer"]))
            ]
            print_added(f"{folder} (seven signals as they were)", f"`{name}`", labels, flagged)


def labelled_set() -> None:
    """The same on the labelled set: alone on the correct responses, and on those the seven signals keep."""
    problems = {p.id: p for p in (Problem.model_validate(r) for r in load(HERE / "problems.jsonl"))}
    correct = [r for r in load(HERE / "labelled.jsonl") if r.get("correct", True)]
    gold = {
        r["id"]: extract_gold(problems[r["problem_id"]].answer, problems[r["problem_id"]].solution) or ""
        for r in correct
    }
    kept = [
        r
        for r, v in zip(correct, verdicts(correct, problems, BEFORE), strict=True)
        if not v["reason"] and not forward_equation(r["text"])
    ]
    for name, check in CHECKS.items():
        hits = {r["id"]: check(r["text"], gold[r["id"]]) for r in correct}
        lean = [r for r in correct if r["label"] == "lean"]
        false = [(r["id"], hits[r["id"]]) for r in correct if r["label"] == "clean" and hits[r["id"]]]
        print(
            f"labelled set, `{name}` alone on the {len(correct)} correct: catches "
            f"{sum(bool(hits[r['id']]) for r in lean)} of {len(lean)} leaning; flags clean: {false}"
        )
        flagged = [(r["id"], r["label"], hits[r["id"]]) for r in kept if hits[r["id"]]]
        print_added("labelled set (seven signals as they were)", f"`{name}`", [r["label"] for r in kept], flagged)


def self_responses() -> None:
    """How often each fires on the model's own correct responses to the plain prompt (here the live runs
    with both checks in the filter count too: the filter never sees self responses)."""
    for folder, records, _ in ALL_RUNS:
        own = [r for r in load(HERE / records) if r["stage"] == "self"]
        for name, check in CHECKS.items():
            flagged = [
                (r["problem_id"], found) for r in own if (found := check(r["completion"][-1]["content"], r["answer"]))
            ]
            print(f"self responses of {folder}, `{name}`: {len(flagged)} of {len(own)} flagged {flagged[:4]}")


def gsm8k_spot_checks() -> None:
    """What each flags among the guided records of the two GSM8K spot checks (unlabelled; printed to read)."""
    for folder in ("spotcheck_run", "spotcheck_final"):
        guided = [r for r in load(HERE / folder / "out.jsonl") if r["stage"] == "guided"]
        for name, check in CHECKS.items():
            flagged = [
                (r["problem_id"], found)
                for r in guided
                if (found := check(r["completion"][-1]["content"], r["answer"]))
            ]
            print(f"guided records of {folder} (GSM8K), `{name}`: {len(flagged)} of {len(guided)} flagged {flagged}")


def gsm8k_references() -> None:
    """How often each fires on correct human solutions (a floor on false positives)."""
    rows = gsm8k_rows()
    for name, check in CHECKS.items():
        flagged = [found for r in rows if (found := check(r["answer"], extract_gold(None, r["answer"]) or ""))]
        print(f"GSM8K reference solutions, `{name}` (all {len(rows)}): {len(flagged)} flagged {flagged[:6]}")


def gsm8k_rows() -> list[dict[str, Any]]:
    """Every GSM8K training row (`question`, `answer`: the human solution ending `#### X`)."""
    return [json.loads(line) for line in GSM8K.read_text().splitlines() if line.strip()]


def likelihood_gains() -> None:
    """The `likelihood` signal's recorded gains of every guided response the five labelled runs kept (each
    under the filter it ran with), leaning against clean, and what a lower threshold would reject."""
    gains: dict[str, list[float]] = {"lean": [], "clean": []}
    for folder, records, _ in ALL_RUNS:
        labels = {row["problem_id"]: row["label"] for row in load(HERE / folder / "labels.jsonl")}
        for r in load(HERE / records):
            if r["stage"] == "guided":
                gains[labels[r["problem_id"]]].append(r["meta"]["guidance_check"]["logprob_gain"])
    print_gains(gains, "gains", "guidance_max_logprob_gain", (0.3, 0.4, 0.5, 0.6))


def print_gains(gains: dict[str, list[float]], what: str, threshold: str, limits: tuple[float, ...]) -> None:
    """The spread of leaning and clean responses' gains, and how many of each a `threshold` rejects at `limits`."""
    for label, values in gains.items():
        print(f"kept guided, {label}: {len(values)}, {what} {min(values):.2f}–{max(values):.2f} nats")
    for limit in limits:
        over = {label: sum(g > limit for g in values) for label, values in gains.items()}
        print(f"  {threshold} {limit}: would reject {over['lean']} leaning, {over['clean']} clean")


def main() -> None:
    """Print every measurement."""
    spot_checks()
    labelled_set()
    self_responses()
    gsm8k_spot_checks()
    gsm8k_references()
    likelihood_gains()


if __name__ == "__main__":
    main()
