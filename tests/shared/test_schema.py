"""The example record's stored form of log-probs."""

from __future__ import annotations

import numpy as np

from shared.schema import LOGPROB_DECIMALS, wire_logprobs


def test_wire_logprobs_rounds_within_half_a_unit_and_keeps_float32_values() -> None:
    rng = np.random.default_rng(0)
    values = -rng.exponential(2.0, size=2000).astype(np.float32)
    stored = wire_logprobs(values.tolist())
    assert len(stored) == len(values) and all(type(v) is float for v in stored)
    assert np.max(np.abs(np.asarray(stored) - values.astype(np.float64))) <= 0.5 * 10.0**-LOGPROB_DECIMALS + 1e-12
    # below float32 resolution where |log p| >= 1: those values come back as the same float32
    big = np.abs(values) >= 1
    assert np.array_equal(np.float32(np.asarray(stored)[big]), values[big])
    # and the JSON text is short: no float32-as-double tails of 17 digits
    assert max(len(repr(v)) for v in stored) <= len("-12.3456789")
