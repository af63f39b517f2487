"""`mindgap doctor`: the GPU-box smoke test, run here on CPU (tiny model) as the suite's check of every step."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mindgap import doctor

ROOT = Path(__file__).resolve().parents[2]


def test_compare_states_the_tolerance_and_catches_a_shift() -> None:
    ok, line = doctor.compare([-1.0, -2.0, -0.5], [-1.001, -2.002, -0.5])
    assert ok and "tolerance" in line and "3 tokens" in line
    # a whole-nat shift (wrong position, temperature applied) fails
    assert not doctor.compare([-1.0, -2.0], [-2.0, -3.0])[0]
    assert not doctor.compare([-1.0], [-1.0, -2.0])[0]


def test_environment_names_versions_and_devices() -> None:
    env = doctor.environment()
    assert env["versions"]["torch"] and env["versions"]["python"]
    assert any(d["device"] == "cpu" and d["total_gib"] > 0 for d in env["devices"])
    lines = doctor.environment_lines(env)
    assert lines[0].startswith("versions") and any(line.startswith("device    cpu") for line in lines)


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_doctor_passes_every_step_on_cpu(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "doctor.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "mindgap", "doctor", "--model", str(tiny_model_dir), "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        check=False,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [s["name"] for s in report["steps"]] == ["engine", "rewrite", "score", "reload", "train"]
    assert all(s["verdict"] == "PASS" for s in report["steps"]), report["steps"]
    # one line per step, with its verdict and time, on stdout
    for step in report["steps"]:
        assert any(line.startswith(f"PASS  {step['name']}") for line in proc.stdout.splitlines())
    assert proc.stdout.strip().splitlines()[-1] == "ok: 5 of 5 steps passed"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_without_vllm_the_trainer_and_transformers_parts_still_run(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a lent GPU machine with torch but no vLLM runs: engine steps SKIP, records and train PASS."""
    monkeypatch.setattr(doctor.vllm_version, "installed_release", lambda: None)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    lines: list[str] = []
    report = doctor.run(str(tiny_model_dir), emit=lines.append, keep=tmp_path / "work")
    verdicts = {s.name: s.verdict for s in report.steps}
    assert verdicts == {
        "engine": "SKIP",
        "rewrite": "SKIP",
        "score": "SKIP",
        "reload": "SKIP",
        "records": "PASS",
        "train": "PASS",
    }, report.steps
    assert report.ok and any(line.startswith("PASS  train") for line in lines)
    # a random-weight model's DFT loss is ~0: the NLL beside it shows the step computed something
    train = next(s for s in report.steps if s.name == "train")
    assert re.search(r"2 steps, DFT loss \S+ → \S+, NLL \d+\.?\d* → \d+\.?\d*, grad norm", train.detail), train.detail
