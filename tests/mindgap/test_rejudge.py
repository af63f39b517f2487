"""`experiments/guidance_filter/rejudge.py`: the current filter's verdict on a run's kept guided records."""

from __future__ import annotations

from typing import Any

import pytest

from experiments.guidance_filter.rejudge import judge
from shared.prompts import solve_messages

PROBLEMS = [
    {"id": 1, "question": "Ava has 4 cars. She gets 2 more. How many cars now?", "solution": "4+2=6.\n#### 6"},
    {"id": 2, "question": "Ben has 9 pens. He loses 3. How many pens are left?", "solution": "9-3=6.\n#### 6"},
]


def _record(problem: dict[str, Any], text: str, gain: float, stage: str = "guided") -> dict[str, Any]:
    return {
        "problem_id": str(problem["id"]),
        "stage": stage,
        "prompt": [solve_messages(problem["question"])[-1].model_dump()],
        "completion": [{"role": "assistant", "content": text}],
        "answer": "6",
        "meta": {"guidance": "solution", "guidance_check": {"logprob_gain": gain}},
    }


def test_judge_reruns_text_signals_and_the_recorded_gain_against_labels() -> None:
    records = [
        _record(PROBLEMS[0], "Ava starts with 4 cars and gets 2 more: 4 + 2 = 6. The answer is \\boxed{6}.", 0.1),
        _record(PROBLEMS[1], "Ben has some pens left. The answer is \\boxed{6}.", 0.1),  # 6 stated, never worked
        _record(PROBLEMS[1], "Ben loses 3 of his 9 pens: 9 - 3 = 6. So \\boxed{6}.", 5.0),  # the recorded gain
        _record(PROBLEMS[0], "4 + 2 = 6, \\boxed{6}", 0.1, stage="self"),  # not a guided record: not judged
    ]
    labels = [
        {"problem_id": "1", "label": "clean", "note": "works it out"},
        {"problem_id": "2", "label": "lean", "note": "states it"},
    ]
    rows = judge(records, PROBLEMS, labels)
    assert [(pid, label, verdict) for pid, label, verdict, _ in rows] == [
        ("1", "clean", "kept"),
        ("2", "lean", "unworked"),
        ("2", "lean", "likelihood"),
    ]


def test_judge_names_the_records_without_a_label() -> None:
    with pytest.raises(SystemExit, match=r"no label for problem\(s\) \['2'\]"):
        judge([_record(PROBLEMS[1], "9 - 3 = 6, \\boxed{6}", 0.1)], PROBLEMS, [])
