"""experiments/reproduce.py: data slicing, and the whole reproduction end to end at toy size on a tiny model."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "experiments" / "reproduce.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("reproduce", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["reproduce"] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


def test_slices_are_disjoint_seeded_and_sized(tmp_path: Path) -> None:
    repro = load_script()
    src = tmp_path / "src.jsonl"
    src.write_text("".join(json.dumps({"question": f"q{i}", "answer": f"#### {i}"}) + "\n" for i in range(20)))
    train, heldout = repro.slice_gsm8k(src, tmp_path / "a", 6, 5, seed=3)
    train_q = [json.loads(line)["question"] for line in train.read_text().splitlines()]
    held_q = [json.loads(line)["question"] for line in heldout.read_text().splitlines()]
    assert len(train_q) == 6 and len(held_q) == 5 and not set(train_q) & set(held_q)
    again, _ = repro.slice_gsm8k(src, tmp_path / "b", 6, 5, seed=3)
    assert again.read_text() == train.read_text()
    with pytest.raises(SystemExit, match="fewer than"):
        repro.slice_gsm8k(src, tmp_path / "c", 15, 6, seed=3)


def test_toy_flag_overrides_sizes() -> None:
    args = load_script().parse_args(["--out", "x", "--toy", "--train-size", "999"])
    assert args.train_size == 4 and args.steps == 2 and args.n == 2


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.timeout(1800)
def test_reproduction_runs_end_to_end_at_toy_size(tiny_model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "repro"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "MINDGAP_DATA_DIR": str(data_dir)}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), "--toy", "--train-nll", "--model", str(tiny_model_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1700,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results["finetuned"]) == {"sft-raw", "sft-rewritten", "dft-raw", "dft-rewritten"}
    for rep in [results["base"], *results["finetuned"].values()]:
        assert rep["benchmarks"]["gsm8k_heldout"]["problems"] == 2
    assert [d["name"] for d in results["gap"]["datasets"]] == ["raw", "rewritten"]
    commands = (out / "commands.txt").read_text().splitlines()
    assert sum(c.startswith("mindgap rewrite") for c in commands) == 1
    assert sum(c.startswith("mindgap train") for c in commands) == 4
    md = (out / "results.md").read_text()
    assert "| dft-rewritten | rewritten | dft |" in md and "| base |" in md
    for png in (out / "training.png", out / "gap" / "gap.png"):
        assert png.read_bytes()[:4] == b"\x89PNG"
    assert all(results["train_nll"][name]["raw"] > 0 for name in results["finetuned"])
