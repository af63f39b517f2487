"""A candidate seventh signal, weighed and not adopted: numbers a guided response states from nowhere.

The leaning responses the final filter still keeps put a right equation inside working that contradicts
it ("5 + 6 = 11 … Sasha will have 12 more buttons"). `unsupported` counts the numbers a response states
that are none of: the question's numbers, an operand or result of the response's own expressions (the
`arithmetic`/`unworked` patterns), the gold answer, a list or step number. This script measures it:

- on the kept guided records of the labelled spot checks (`spotcheck_arith`, `spotcheck_arith_final`)
  and the labelled set, restricted to what the current filter keeps: what it would add;
- on 1,000 human GSM8K reference solutions (calculator notes removed, `#### X` → "The answer is X."),
  correct and self-contained by construction: a floor on its false positives on real reasoning, beside
  the same figure for the adopted `unworked` signal.

    .venv/bin/python -m experiments.guidance_filter.unsupported_numbers > unsupported_numbers.txt  # in this folder
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from experiments.guidance_filter.evaluate import load, verdicts
from experiments.guidance_filter.rejudge import LABELLED_RUNS, kept_guided, print_added
from services import guidance_filter as gf
from shared.config import StageParams
from shared.schema import Problem

HERE = Path(__file__).parent
GSM8K = HERE.parents[1].parent / "shared" / "data" / "gsm8k" / "train.jsonl"
_ENUMERATOR = re.compile(r"(?:^|\n)\s*(?:step\s*)?$", re.IGNORECASE)


def unsupported(response: str, question: str, gold: str) -> list[float]:
    """The numbers `response` states that nothing in the question or its own working accounts for."""
    known = gf._question_numbers(question) | {gf._operand(m.group(1)) for m in gf._DERIVATION.finditer(response)}
    for m in gf._EQUATION.finditer(response):
        known |= {gf._operand(t) for t in gf._TOKEN.findall(m.group(1))[::2]}  # operand, operator, operand…
    target = gf._as_number(gold) if gold else None
    if target is not None:
        known.add(target)
    out = []
    for m in gf._NUMBER.finditer(response):
        if _ENUMERATOR.search(response[: m.start()]) and response[m.end() : m.end() + 1] in (".", ")", ":"):
            continue  # "1." / "Step 2:" numbers a list
        value = gf._as_number(m.group(0))
        if value is not None and value not in known:
            out.append(value)
    return out


def spot_checks() -> None:
    """What the signal adds to the current filter on the labelled real-run records it keeps."""
    for folder, records, problems in LABELLED_RUNS:
        kept = kept_guided(folder, records, problems)
        flagged = [
            (r["problem_id"], label, u)
            for r, label, question in kept
            if (u := unsupported(r["completion"][-1]["content"], question, r["answer"]))
        ]
        print_added(folder, "unsupported", [label for _, label, _ in kept], flagged)


def labelled_set() -> None:
    """The same on the labelled set's correct responses the current filter keeps."""
    problems = {p.id: p for p in (Problem.model_validate(r) for r in load(HERE / "problems.jsonl"))}
    rows = [r for r in load(HERE / "labelled.jsonl") if r.get("correct", True)]
    kept = [
        r for r, v in zip(rows, verdicts(rows, problems, gf.limits_of(StageParams())), strict=True) if not v["reason"]
    ]
    flagged = []
    for r in kept:
        p = problems[r["problem_id"]]
        gold = p.answer or (p.solution or "").rpartition("####")[2].strip()
        u = unsupported(r["text"], p.question, gold)
        if u:
            flagged.append((r["id"], r["label"], u))
    print_added("labelled set", "unsupported", [r["label"] for r in kept], flagged)


def gsm8k_references(n: int = 1000) -> None:
    """How often each signal rejects a correct human solution (a floor on false positives)."""
    rows: list[dict[str, Any]] = [json.loads(line) for line in GSM8K.open()][:n]
    flags = {"unsupported": 0, "unworked": 0}
    for r in rows:
        body, _, gold = r["answer"].rpartition("####")
        text = re.sub(r"<<[^<>]*>>", "", body).strip() + f"\nThe answer is {gold.strip()}."
        flags["unsupported"] += bool(unsupported(text, r["question"], gold.strip()))
        flags["unworked"] += not gf.worked_out(text, r["question"], gold.strip())
    print(f"\nGSM8K reference solutions rejected (first {len(rows)} of train.jsonl):")
    for name, count in flags.items():
        print(f"  {name:<12} {count:>4} ({100 * count / len(rows):.1f} %)")


if __name__ == "__main__":
    spot_checks()
    labelled_set()
    gsm8k_references()
