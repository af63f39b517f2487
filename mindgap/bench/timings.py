"""Pure numbers of the bench: medians and spreads of repeated timings, and mindgap-versus-baseline rows.

Every figure the bench reports is a `Stat` over several repetitions (warm-up already dropped), and every
line of the table is a `Row` pairing mindgap's `Stat` with its baseline's on the same workload.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

TargetOp = Literal[">=", "<="]


@dataclass(frozen=True)
class Stat:
    """Median, quartiles and extremes of repeated measurements of one quantity."""

    median: float
    low: float
    high: float
    q1: float
    q3: float
    values: tuple[float, ...]

    @property
    def n(self) -> int:
        """How many repetitions the figure summarises."""
        return len(self.values)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the results JSON."""
        return {
            "median": self.median,
            "min": self.low,
            "max": self.high,
            "q1": self.q1,
            "q3": self.q3,
            "n": self.n,
            "values": list(self.values),
        }


def summarize(values: Sequence[float]) -> Stat:
    """The `Stat` of `values` (at least one); quartiles by the inclusive method, so n=1 and n=2 work."""
    if not values:
        raise ValueError("cannot summarise an empty list of measurements")
    data = sorted(float(v) for v in values)
    if len(data) == 1:
        q1 = q3 = data[0]
    else:
        q1, _, q3 = statistics.quantiles(data, n=4, method="inclusive")
    return Stat(median=statistics.median(data), low=data[0], high=data[-1], q1=q1, q3=q3, values=tuple(values))


def rate_stat(amounts: Sequence[float], seconds: Sequence[float]) -> Stat:
    """The `Stat` of per-repetition rates `amounts[i] / seconds[i]` (e.g. tokens per second)."""
    if len(amounts) != len(seconds):
        raise ValueError(f"{len(amounts)} amounts for {len(seconds)} timings")
    if any(s <= 0 for s in seconds):
        raise ValueError("every timing must be positive")
    return summarize([a / s for a, s in zip(amounts, seconds, strict=True)])


@dataclass
class Row:
    """One line of the table: mindgap against its baseline on the same workload, in the same run."""

    line: str
    metric: str
    unit: str
    mindgap: Stat
    baseline: Stat
    baseline_name: str
    model: str = "-"
    higher_is_better: bool = True
    target: float | None = None  # on `ratio`, compared with `target_op`
    target_op: TargetOp = ">="
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        """mindgap's median over the baseline's median."""
        return _divide(self.mindgap.median, self.baseline.median)

    @property
    def ratio_range(self) -> tuple[float, float]:
        """The widest ratio the spreads allow: (mindgap min / baseline max, mindgap max / baseline min)."""
        return (
            _divide(self.mindgap.low, self.baseline.high),
            _divide(self.mindgap.high, self.baseline.low),
        )

    @property
    def meets_target(self) -> bool | None:
        """Whether the median ratio meets the target; None when the row has none."""
        if self.target is None:
            return None
        return self.ratio >= self.target if self.target_op == ">=" else self.ratio <= self.target

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the results JSON."""
        low, high = self.ratio_range
        return {
            "line": self.line,
            "metric": self.metric,
            "unit": self.unit,
            "model": self.model,
            "mindgap": self.mindgap.to_dict(),
            "baseline": self.baseline.to_dict(),
            "baseline_name": self.baseline_name,
            "higher_is_better": self.higher_is_better,
            "ratio": self.ratio,
            "ratio_min": low,
            "ratio_max": high,
            "target": None if self.target is None else f"{self.target_op} {self.target:g}",
            "meets_target": self.meets_target,
            "note": self.note,
            "extra": self.extra,
        }


def _divide(a: float, b: float) -> float:
    return a / b if b != 0 else float("inf") if a > 0 else float("nan")


def fmt(x: float) -> str:
    """A number with three significant figures, plain notation for everyday magnitudes."""
    if x != x or x in (float("inf"), float("-inf")):
        return str(x)
    if x == 0:
        return "0"
    if abs(x) >= 1e6 or abs(x) < 1e-3:
        return f"{x:.2e}"
    digits = max(0, 2 - int(f"{abs(x):e}".split("e")[1]))
    return f"{x:,.{digits}f}"
