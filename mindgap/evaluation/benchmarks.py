"""The five math benchmarks `mindgap eval --benchmarks` knows by name: where they lie and how their fields map.

The files are not part of the repository: they are read from `$MINDGAP_DATA_DIR/benchmarks/<name>/`
or, by default, from `../shared/data/benchmarks/` beside the checkout. Each entry names the source
fields that feed `Problem` (question, solution, answer, id) and the field that labels the subject for
per-subject breakdowns (None where the benchmark has none).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from shared.dataio import FieldMap

DATA_DIR_ENV = "MINDGAP_DATA_DIR"
# mindgap/evaluation/benchmarks.py → the checkout root → ../shared/data beside it
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[3] / "shared" / "data"


@dataclass(frozen=True)
class Benchmark:
    """One benchmark: its file relative to the data folder, field mapping and subject field."""

    name: str
    path: str
    fields: FieldMap
    subject_field: str | None = None


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark(
            "math500",
            "benchmarks/math500/test.jsonl",
            FieldMap(id="unique_id", question="problem", solution="solution", answer="answer"),
            subject_field="subject",
        ),
        # Minerva has no answer column: the gold answer is the solution's last \boxed{}.
        Benchmark(
            "minerva_math",
            "benchmarks/minerva_math/test.jsonl",
            FieldMap(id="idx", question="problem", solution="solution"),
            subject_field="type",
        ),
        Benchmark(
            "olympiadbench",
            "benchmarks/olympiadbench/test.jsonl",
            FieldMap(id="id", question="question", solution="solution", answer="final_answer"),
            subject_field="subfield",
        ),
        Benchmark("aime24", "benchmarks/aime24/test.jsonl", FieldMap(id="id", question="problem", answer="answer")),
        Benchmark("amc23", "benchmarks/amc23/test.jsonl", FieldMap(id="id", question="question", answer="answer")),
    )
}


class BenchmarkError(ValueError):
    """An unknown benchmark name or a missing data folder or file."""


def data_dir() -> Path:
    """The shared data folder: `$MINDGAP_DATA_DIR`, else `../shared/data` beside the checkout."""
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env) if env else DEFAULT_DATA_DIR


def parse_benchmark_names(spec: str) -> list[str]:
    """`math500,aime24` → ["math500", "aime24"], checking every name (duplicates dropped, order kept)."""
    names = list(dict.fromkeys(s.strip() for s in spec.split(",") if s.strip()))
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown or not names:
        raise BenchmarkError(
            f"unknown benchmark {', '.join(map(repr, unknown)) or repr(spec)}: choose from {', '.join(BENCHMARKS)}"
        )
    return names


def benchmark_path(name: str, root: Path | None = None) -> Path:
    """The file of benchmark `name`, with an error that says where it was looked for and how to point elsewhere."""
    if name not in BENCHMARKS:
        raise BenchmarkError(f"unknown benchmark {name!r}: choose from {', '.join(BENCHMARKS)}")
    base = root if root is not None else data_dir()
    if not base.is_dir():
        raise BenchmarkError(f"data folder not found at {base}: set {DATA_DIR_ENV} to the folder holding benchmarks/")
    path = base / BENCHMARKS[name].path
    if not path.is_file():
        raise BenchmarkError(f"benchmark {name!r} not found at {path} (data folder {base}, set by {DATA_DIR_ENV})")
    return path
