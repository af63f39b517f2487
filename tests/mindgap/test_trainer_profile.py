"""experiments/trainer_profile/profile_step.py: both steps timed and profiled on the tiny model (CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.paths import ROOT

pytestmark = pytest.mark.slow


def test_profile_times_and_profiles_both_steps(tiny_model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    script = ROOT / "experiments" / "trainer_profile" / "profile_step.py"
    argv = [sys.executable, str(script), "--model", str(tiny_model_dir), "--data-dir", str(data_dir)]
    argv += ["--out", str(tmp_path), "--batch", "2", "--seq-len", "160", "--steps", "2", "--profiled", "1"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
    subprocess.run(argv, env=env, check=True, capture_output=True, timeout=600)

    report = json.loads((tmp_path / "profile.json").read_text())
    assert report["device"] == "cpu" and report["shape"] == {"batch": 2, "seq_len": 160, "steps": 2}
    for side in ("bare", "mindgap"):
        r = report[side]
        assert len(r["seconds"]) == 2 and all(s > 0 for s in r["seconds"])
        assert r["device_busy_ms_per_step"] is None  # no GPU: no device time to read
        assert r["top_by_cpu"] and any(e["op"] == "aten::mm" for e in r["top_by_cpu"])
    assert report["ratio_median"] == pytest.approx(report["bare"]["median_ms"] / report["mindgap"]["median_ms"])
    assert "## mindgap" in (tmp_path / "profile.md").read_text()
