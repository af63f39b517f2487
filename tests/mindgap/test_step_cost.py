"""experiments/step_cost: the step-cost fit and the floors it gives (the timing itself needs an idle engine)."""

from __future__ import annotations

import pytest

from experiments.step_cost.step_cost import fit


def test_fit_recovers_a_linear_step_cost_and_its_floors() -> None:
    a, b = 0.020, 0.001  # seconds: a 20 ms fixed cost per step and 1 ms per sequence
    result = fit({n: a + b * n for n in (6, 12, 24, 48)})
    assert result["a_ms"] == pytest.approx(20.0) and result["b_ms"] == pytest.approx(1.0)
    assert result["a_over_b"] == 20.0
    # a 48-wide step costs 68 ms, a 24-wide one 44 and a 12-wide one 32
    assert result["step_24_over_48"] == round(44 / 68, 3) and result["step_12_over_48"] == round(32 / 68, 3)
    assert result["floor_two_phases_of_24"] == round(2 * 44 / 68, 3)
    assert result["four_phases_of_12"] == round(4 * 32 / 68, 3)


def test_fit_reads_the_floors_from_the_measured_medians_not_the_line() -> None:
    # a width that falls off the line moves a and b but not the ratios read from the medians
    medians = {6: 0.030, 12: 0.037, 24: 0.056, 48: 0.085}
    result = fit(medians)
    assert result["step_24_over_48"] == round(0.056 / 0.085, 3)
    assert 0 < result["b_ms"] < result["a_ms"]
