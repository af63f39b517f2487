"""What every bench line is handed: the run's size, repetitions, scratch folder and data paths."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BenchContext:
    """Options shared by all lines of one `mindgap bench` run."""

    quick: bool
    repeat: int  # timed repetitions per figure, after one warm-up
    work_dir: Path  # scratch space: logs, worker results, throwaway servers
    data_dir: Path  # ../shared/data (gsm8k/train.jsonl)
    model: str = "default"  # the real model where model speed matters ('default' = SmolLM2-135M-Instruct)

    @property
    def gsm8k(self) -> Path:
        """The problems the rewrite, service and trainer lines draw from."""
        return self.data_dir / "gsm8k" / "train.jsonl"

    def scratch(self, name: str) -> Path:
        """A fresh sub-folder of the scratch space for one line."""
        path = self.work_dir / name
        path.mkdir(parents=True, exist_ok=True)
        return path
