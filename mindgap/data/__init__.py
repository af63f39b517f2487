"""Data shipped inside the package: the bundled sample problems (`make demo`, `mindgap doctor`, the bench)."""

from pathlib import Path

SAMPLE = Path(__file__).with_name("sample.jsonl")
