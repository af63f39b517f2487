"""The trainer's step metrics: the per-stage policy gap goes to the JSONL, TensorBoard and the progress hash."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from trainer.config import TrainerConfig
from trainer.data import TrainItem
from trainer.train import Metrics

STATS = {
    "loss": 0.9,
    "nll": 1.1,
    "kl": 0.0,
    "grad_norm": 0.5,
    "lr": 1e-5,
    "tokens": 40.0,
    "completion_tokens": 20.0,
    "is_weight_mean": 1.0,
    "is_weight_max": 1.2,
    "is_ess": 0.98,
    "is_clip_frac": 0.0,
    "gap/self/nll": 0.41,
    "gap/self/share_below_p": 0.0625,
    "gap/self/is_ratio_mean": 1.01,
    "gap/self/is_ratio_ess": 0.987,
    "gap/self/is_seq_ratio_mean": 1.02,
    "gap/self/is_seq_ratio_ess": 0.95,
    "gap/expert/nll": 1.32,
    "gap/expert/share_below_p": 0.25,
}


class Recorder:
    """Stands in for the Redis announcer: keeps what `progress` was given."""

    def __init__(self) -> None:
        self.fields: dict[str, Any] = {}

    def progress(self, fields: dict[str, Any]) -> None:
        self.fields = fields


def test_gap_metrics_reach_jsonl_tensorboard_and_progress(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = TrainerConfig(source="redis", metrics_jsonl=tmp_path / "m.jsonl", tensorboard_dir=tmp_path / "tb")
    recorder = Recorder()
    metrics = Metrics(cfg, recorder)  # type: ignore[arg-type]
    items = [
        TrainItem("a", "1", [1, 2, 3], 1, [-0.1, -0.2], 0, "self"),
        TrainItem("b", "2", [1, 2], 1, None, 0, "expert"),
    ]
    with caplog.at_level("INFO", logger="mindgap.trainer"):
        metrics.record(3, 1, STATS, items, dt=0.5)
    metrics.close()

    (row,) = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert {k: v for k, v in row.items() if k.startswith("gap/")} == {k: v for k, v in STATS.items() if "gap/" in k}
    tags = EventAccumulator(str(tmp_path / "tb")).Reload().Tags()["scalars"]
    assert "gap/self/is_ratio_ess" in tags and "gap/expert/nll" in tags and "train/nll" in tags
    assert recorder.fields["gap/self/nll"] == "0.41" and recorder.fields["gap/expert/share_below_p"] == "0.25"
    assert recorder.fields["step"] == 3
    assert "gap self nll 0.41 p<0.1 6% ess 0.99 · expert nll 1.32 p<0.1 25%" in caplog.text
