"""The guided responses a rewrite run would keep after the guidance-dependence filter, for reading.

Input: `collect.py --records OUT.jsonl` rows (a `mindgap rewrite` run's guided records, scored on both
prompts). A guided record exists only for a problem with no correct self sample, so every one is on a
problem the model did not solve on its own. Each row is run through the filter with the default
`StageParams` limits (exactly the pipeline's functions); the kept ones are printed in full, the
rejected ones with their reason.

    .venv/bin/python -m experiments.guidance_filter.spotcheck SCORED.jsonl PROBLEMS.jsonl
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from experiments.guidance_filter.evaluate import load, verdicts
from services.guidance_filter import limits_of
from shared.config import StageParams
from shared.schema import Problem


def main(args: argparse.Namespace) -> None:
    rows = load(args.scored)
    problems = {p.id: p for p in (Problem.model_validate(r) for r in load(args.problems))}
    checks = verdicts(rows, problems, limits_of(StageParams()))
    reasons = Counter(c["reason"] for c in checks)
    kept = [(r, c) for r, c in zip(rows, checks, strict=True) if c["reason"] is None]
    print(
        f"{len(rows)} guided records on {len({r['problem_id'] for r in rows})} unsolved problems;"
        f" kept {len(kept)}, rejected {dict((k, v) for k, v in reasons.items() if k)}"
    )
    for r, c in kept:
        print(
            f"\n=== {r['problem_id']} (gain {c['logprob_gain']:.2f}, echo {c['echo_words']})"
            f" Q: {problems[r['problem_id']].question}\n{r['text']}"
        )
    print("\n--- rejected")
    for r, c in zip(rows, checks, strict=True):
        if c["reason"]:
            print(f"{r['problem_id']} {c['reason']}: {r['text'][:140]!r}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scored", type=Path)
    parser.add_argument("problems", type=Path)
    main(parser.parse_args())
