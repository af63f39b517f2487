"""What leans in the kept guided responses: references to the guidance, and the policy's own contradictions.

The two live runs with all eight signals (`spotcheck_arith_contradictions/`, `spotcheck_arith_eight/`)
kept guided responses that lean in two ways (docs/rewrite.md): 9 refer to the guidance in wordings
`addresses` did not read ("The original answer is 12", "No need to revise my previous response"), 17
wrap the right sum in working that contradicts it ("Iris has 7 more stamps than Iris does"). This
script measures three things, with no engine:

1. `addresses`' new forms (an answer, value, example or hint called original/given/provided…, "given the
   answer", "my previous response", "you are referring", "this is a valid answer"), fitted on those two
   runs: what they add to the filter as it was on the kept guided responses of every labelled run, and
   how often they fire where nothing was shown (the model's own correct self-stage responses of the
   same runs, all 7,473 human GSM8K solutions).
2. The policy's baseline: its own correct responses to the plain prompt (no guidance shown) read under
   the same rule (`self_labels.jsonl`), beside the kept guided responses, per live run (the two above
   and `spotcheck_arith_references/`, the held-out run of the new forms). A contradiction the policy
   writes as often without guidance is not evidence that a guided response leaned on it.
3. A declined variant of the likelihood signal: the windowed gain over word tokens only (numbers,
   operators, spaces dropped; the guidance is meant to make the right numbers likelier), on the kept
   guided responses rescored on both prompts (`scored.jsonl`, written by `collect.py --records`).
   Needs the default model's tokenizer (`mindgap model prepare`).
4. `unworked` no longer taking "The answer is = 14" for a derivation (found in the held-out run): what
   that changes on every labelled run's kept guided responses, the self responses and GSM8K.

From the repository root:

    .venv/bin/python -m experiments.guidance_filter.references > experiments/guidance_filter/references.txt
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import replace
from pathlib import Path

from experiments.guidance_filter.contradictions import ALL_RUNS, LIVE_RUNS, gsm8k_rows, live, print_gains
from experiments.guidance_filter.evaluate import load
from experiments.guidance_filter.rejudge import kept_guided, print_added
from services import guidance_filter as gf
from shared.config import StageParams
from shared.model_source import resolve_model
from shared.prompts import solve_messages

HERE = Path(__file__).parent
# the new forms were read off LIVE_RUNS and measured on ALL_RUNS; the held-out live run of the new forms
LIVE_HELD_OUT = live("spotcheck_arith_references")
# `addresses` as it was before the new forms (services/guidance_filter.py's _SHOWN and _AUTHOR then)
ADDRESSES_BEFORE = re.compile(
    r"\b(?:your|the\s+(?:original|given|provided|reference|initial|incomplete))\s+"
    r"(?:(?:own|final|previous|first|current)\s+)?"
    r"(?:solution|code|work|attempt|response|steps?|calculation|reasoning|approach|method)\b"
    r"|\byou(?:'ve|\s+have)?\s+(?:correctly|already|provided|given|made|wrote|written|solved|calculated|shown)\b"
    r"|\byou(?:'re|\s+are)\s+(?:right|correct)\b",
    re.IGNORECASE,
)
PLAIN = solve_messages("")[0].content  # the plain prompt's own words (the question is never a reference)


def new_form(response: str) -> str | None:
    """The phrase `addresses` finds now in a response it did not reject before, else None."""
    if ADDRESSES_BEFORE.search(response):
        return None
    return gf.addressed_phrase(response, PLAIN)


def new_forms() -> None:
    """Section 1: what the new forms add, and where they fire with nothing shown."""
    without = replace(gf.limits_of(StageParams()), addresses=False)
    for folder, records, problems in ALL_RUNS:
        kept = [
            (r, label)
            for r, label, _ in kept_guided(folder, records, problems, without)
            if not ADDRESSES_BEFORE.search(r["completion"][-1]["content"])
        ]
        flagged = [
            (r["problem_id"], label, found) for r, label in kept if (found := new_form(r["completion"][-1]["content"]))
        ]
        print_added(f"{folder} (filter as it was)", "`addresses` (new forms)", [label for _, label in kept], flagged)
    own = [
        (f"{folder}:{r['problem_id']}", r["completion"][-1]["content"])
        for folder, records, _ in ALL_RUNS
        for r in load(HERE / records)
        if r["stage"] == "self"
    ]
    fired = [(pid, found) for pid, text in own if (found := new_form(text))]
    print(f"self responses of those runs (no guidance shown): {len(fired)} of {len(own)} flagged {fired}")
    human = [row["answer"] for row in gsm8k_rows()]
    hits = [(i, found) for i, text in enumerate(human) if (found := new_form(text))]
    print(f"GSM8K reference solutions (all {len(human)}): {len(hits)} flagged {hits}")


def baseline() -> None:
    """Section 2: leaning kept guided responses beside the policy's own self responses, under one rule."""
    for folder, _, _ in (*LIVE_RUNS, LIVE_HELD_OUT):
        labels = load(HERE / folder / "labels.jsonl")
        guided = Counter(row["label"] for row in labels)
        refers = sum(row.get("refers", False) for row in labels)
        contradicts = guided["lean"] - refers
        own = Counter(row["label"] for row in load(HERE / folder / "self_labels.jsonl"))
        print(
            f"{folder}: kept guided {guided['lean']} of {guided.total()} lean ({refers} refer to the guidance,"
            f" {contradicts} ({contradicts / guided.total():.0%}) only contradict themselves);"
            f" the model's own correct self responses {own['lean']} of {own.total()}"
            f" ({own['lean'] / own.total():.0%}) contradict themselves"
        )


def word_gain() -> None:
    """Section 3: the likelihood signal over word tokens only, on what the filter keeps."""
    from transformers import AutoTokenizer  # the one section that needs it

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("default"))
    limits = gf.limits_of(StageParams())
    gains: dict[str, list[float]] = {"lean": [], "clean": []}
    for folder, records, problems in ALL_RUNS:
        scored = {row["id"]: row for row in load(HERE / folder / "scored.jsonl")}
        for r, label, _ in kept_guided(folder, records, problems):
            row = scored[r["id"]]
            words = [i for i, t in enumerate(row["token_ids"]) if re.search(r"[A-Za-z]", str(tokenizer.decode([t])))]
            plain = [row["plain_logprobs"][i] for i in words]
            guided = [row["guided_logprobs"][i] for i in words]
            gains[label].append(gf.logprob_gain(plain, guided, limits.gain_window))
    print_gains(gains, "word-token gains", "a word-token gain over", (0.2, 0.3, 0.4, 0.5))


def stated_with_equals() -> None:
    """Section 4: `unworked` no longer reads "The answer is = 14" as a derivation: what that changes."""

    def derived_before(response: str, target: float) -> bool:  # `_derives` as it was
        return any(gf._same_number(gf._operand(m.group(1)), target) for m in gf._DERIVATION.finditer(response))

    def changed(response: str, question: str, gold: str) -> bool:
        target = gf._judged_answer(gf._question_numbers(question), gold)
        return target is not None and derived_before(response, target) and not gf.worked_out(response, question, gold)

    for folder, records, problems in (*ALL_RUNS, LIVE_HELD_OUT):
        kept = kept_guided(folder, records, problems, replace(gf.limits_of(StageParams()), unworked=False))
        flagged = [
            (r["problem_id"], label, "unworked")
            for r, label, question in kept
            if changed(r["completion"][-1]["content"], question, r["answer"])
        ]
        labels = [label for _, label, _ in kept]
        print_added(f"{folder} (without `unworked`)", "`unworked` (answer phrase and `=`)", labels, flagged)
    own = [
        (r["completion"][-1]["content"], r["answer"], r["prompt"][-1]["content"])
        for _, records, _ in (*ALL_RUNS, LIVE_HELD_OUT)
        for r in load(HERE / records)
        if r["stage"] == "self"
    ]
    print(f"self responses: {sum(changed(t, q, a) for t, a, q in own)} of {len(own)} changed")
    human = gsm8k_rows()
    hit = [i for i, row in enumerate(human) if changed(row["answer"], row["question"], row["answer"].split("####")[-1])]
    print(f"GSM8K reference solutions (all {len(human)}): {len(hit)} changed {hit[:10]}")


def main() -> None:
    print("1. addresses' new forms\n")
    new_forms()
    print("\n2. the policy's own responses under the same rule\n")
    baseline()
    print("\n3. the likelihood signal over word tokens only (declined)\n")
    word_gain()
    print("\n4. `unworked` and an answer phrase before a bare `=`\n")
    stated_with_equals()


if __name__ == "__main__":
    main()
