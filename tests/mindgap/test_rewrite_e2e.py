"""End to end: `mindgap rewrite` with the real default model on one-digit arithmetic, in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared.grading import answers_match, extract_prediction
from shared.schema import Example, Stage

pytestmark = [pytest.mark.vllm, pytest.mark.smollm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]

PROBLEMS = [
    ("What is 3 + 4?", "3 + 4 = 7.\n#### 7"),
    ("What is 2 + 2?", "2 + 2 = 4.\n#### 4"),
    ("What is 9 - 5?", "9 - 5 = 4.\n#### 4"),
    ("What is 2 * 3?", "2 * 3 = 6.\n#### 6"),
    ("Tom has 5 apples and eats 1. How many apples are left?", "5 - 1 = 4 apples are left.\n#### 4"),
    ("What is 1 + 8?", "1 + 8 = 9.\n#### 9"),
]


def test_rewrite_default_model_on_arithmetic(default_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    src = tmp_path / "arith.jsonl"
    src.write_text("".join(json.dumps({"question": q, "solution": s}) + "\n" for q, s in PROBLEMS))
    out = tmp_path / "out.jsonl"
    cmd = [
        *(sys.executable, "-m", "mindgap", "rewrite", str(src), "-o", str(out)),
        *("--model", str(default_model_dir), "--k", "2", "--resolve-attempts", "2", "--max-tokens", "96"),
        *("--max-model-len", "1024", "--enforce-eager", "--score"),  # eager: no minutes of torch.compile on CPU
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]

    examples = [Example.model_validate_json(line) for line in out.read_text().splitlines()]
    assert {e.problem_id for e in examples} == {str(i) for i in range(1, len(PROBLEMS) + 1)}
    eos = AutoTokenizer.from_pretrained(str(default_model_dir)).eos_token_id
    for ex in examples:
        assert ex.target_logprobs is not None and len(ex.target_logprobs) == len(ex.completion_token_ids)
        assert all(lp <= 0.0 for lp in ex.target_logprobs)
        assert ex.completion_token_ids[-1] == eos
        if ex.stage is Stage.EXPERT:
            assert ex.behavior_logprobs is None and ex.grade == "reference"
            continue
        # self/guided: the response's own final answer really is the gold answer
        assert ex.grade == "correct" and ex.answer is not None
        prediction = extract_prediction(ex.response)
        assert prediction is not None and answers_match(prediction, ex.answer), ex.response
        assert ex.behavior_logprobs is not None and len(ex.behavior_logprobs) == len(ex.completion_token_ids)
        assert "Reference" not in ex.prompt[0].content

    summary = json.loads(Path(f"{out}.summary.json").read_text())
    assert summary["problems"] == len(PROBLEMS) and summary["examples"] == len(examples)
    assert summary["generated_tokens"] > 0 and summary["tokens_per_second"] > 0
    assert "self" in proc.stdout and "guided" in proc.stdout
