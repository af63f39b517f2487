"""The bench's results: what each line measured, the machine it ran on, and the JSON + Markdown written."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mindgap.bench.timings import Row, fmt
from shared.dataio import atomic_write_text

SCHEMA = 1


@dataclass
class LineResult:
    """One bench line: its rows, the configuration it used, and its error if it broke."""

    name: str
    rows: list[Row] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the results JSON."""
        return {
            "name": self.name,
            "seconds": round(self.seconds, 2),
            "error": self.error,
            "rows": [r.to_dict() for r in self.rows],
            "info": self.info,
        }


@dataclass
class Report:
    """A whole bench run."""

    started: str  # ISO UTC timestamp
    quick: bool
    repeat: int
    machine: dict[str, Any]
    lines: list[LineResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def rows(self) -> list[Row]:
        """Every row of every line, in run order."""
        return [r for line in self.lines for r in line.rows]

    @property
    def failed(self) -> list[LineResult]:
        """Lines that raised instead of measuring."""
        return [line for line in self.lines if line.error is not None]

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the results JSON."""
        return {
            "schema": SCHEMA,
            "started": self.started,
            "quick": self.quick,
            "repeat": self.repeat,
            "seconds": round(self.seconds, 2),
            "machine": self.machine,
            "lines": [line.to_dict() for line in self.lines],
        }

    def to_markdown(self) -> str:
        """The results table with the machine it ran on, as Markdown."""
        m = self.machine
        gpu = m.get("gpu") or "none"
        out = [
            f"Run {self.started} ({'--quick' if self.quick else 'full'}, {self.repeat} timed repetitions per"
            f" figure after warm-up, {fmt(self.seconds / 60)} min in all).",
            "",
            f"Machine: {m.get('cpu_model', '?')}, {m.get('cpus', '?')} CPUs, {fmt(m.get('memory_gib', 0))} GiB"
            f" memory, GPU: {gpu}; load average at start {m.get('loadavg', '?')}. "
            + ", ".join(f"{k} {v}" for k, v in sorted(m.get("versions", {}).items())),
            "",
            "| line | metric | model | mindgap | baseline | ratio (range) | target |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in self.rows:
            out.append(
                "| "
                + " | ".join(
                    [
                        row.line,
                        f"{row.metric} ({row.unit}, {'higher' if row.higher_is_better else 'lower'} is better)",
                        row.model,
                        _cell(row.mindgap.median, row.mindgap.low, row.mindgap.high),
                        f"{row.baseline_name}: {_cell(row.baseline.median, row.baseline.low, row.baseline.high)}",
                        _cell(row.ratio, *row.ratio_range),
                        _target(row),
                    ]
                )
                + " |"
            )
        notes = [f"- {row.line} / {row.metric}: {row.note}" for row in self.rows if row.note]
        errors = [f"- **{line.name} failed**: {line.error}" for line in self.failed]
        if notes or errors:
            out += ["", *errors, *notes]
        return "\n".join(out) + "\n"

    def write(self, out_dir: Path) -> tuple[Path, Path]:
        """Write `<timestamp>.json` and `.md` under `out_dir`, and refresh `latest.md`; return both paths."""
        out_dir.mkdir(parents=True, exist_ok=True)
        stamp = self.started.replace(":", "").replace("-", "")
        json_path = out_dir / f"{stamp}.json"
        md_path = out_dir / f"{stamp}.md"
        atomic_write_text(json_path, json.dumps(self.to_dict(), indent=1, default=_jsonable) + "\n")
        markdown = self.to_markdown()
        atomic_write_text(md_path, markdown)
        atomic_write_text(out_dir / "latest.md", markdown)
        return json_path, md_path


def _cell(median: float, low: float, high: float) -> str:
    if math.isclose(low, high, rel_tol=1e-9):
        return fmt(median)
    return f"{fmt(median)} ({fmt(low)}–{fmt(high)})"


def _target(row: Row) -> str:
    if row.target is None:
        return "-"
    mark = "met" if row.meets_target else "**missed**"
    return f"{row.target_op} {row.target:g}: {mark}"


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
