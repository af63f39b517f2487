"""The example record: its stored form of log-probs and the versions it reads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from shared.dataio import read_examples
from shared.schema import LOGPROB_DECIMALS, SCHEMA_VERSION, Example, Sampling, wire_logprobs


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


# A record exactly as a schema_version 1 writer produced it: no `sampling`, `target_logprobs` always set.
V1_RECORD = {
    "schema_version": 1,
    "id": "old",
    "problem_id": "p1",
    "prompt": [{"role": "user", "content": "What is 2+2?"}],
    "completion": [{"role": "assistant", "content": "\\boxed{4}"}],
    "completion_token_ids": [7, 8, 2],
    "stage": "self",
    "policy_version": 3,
    "behavior_logprobs": [-0.5, -0.25, -0.1],
    "target_logprobs": [-0.6, -0.3, -0.1],
    "answer": "4",
    "grade": "correct",
    "meta": {},
}


_DROP = object()  # a key _v2 leaves out
PAIRED = r"sampling \(temperature, top_p\) must be given exactly when behavior_logprobs are"


def _v2(**changes: Any) -> dict[str, Any]:
    row = {**V1_RECORD, "schema_version": SCHEMA_VERSION, "sampling": {"temperature": 0.7, "top_p": 0.95}}
    return {k: v for k, v in (row | changes).items() if v is not _DROP}


def test_version_1_records_still_read_from_files_and_json(tmp_path: Path) -> None:
    path = tmp_path / "v1.jsonl"
    path.write_text(json.dumps(V1_RECORD) + "\n")
    [(_, ex)] = list(read_examples(path))
    assert isinstance(ex, Example), ex
    assert ex.schema_version == 1 and ex.sampling is None and ex.target_logprobs == [-0.6, -0.3, -0.1]
    # the stream reader parses the entry's JSON text, not a dict
    assert Example.model_validate_json(json.dumps(V1_RECORD)) == ex
    # written back it stays a version 1 record (it still lacks what version 2 requires)
    assert Example.model_validate_json(ex.model_dump_json()).schema_version == 1
    with pytest.raises(ValidationError, match="target_logprobs is required in schema_version 1"):
        Example.model_validate(V1_RECORD | {"target_logprobs": None})
    with pytest.raises(ValidationError, match="version 1 record cannot have it"):
        Example.model_validate(V1_RECORD | {"sampling": {"temperature": 0.7, "top_p": 1.0}})


def test_version_2_sampling_goes_with_behaviour_and_target_logprobs_are_optional() -> None:
    ex = Example.model_validate(_v2(target_logprobs=_DROP))
    assert ex.sampling == Sampling(temperature=0.7, top_p=0.95) and ex.target_logprobs is None
    with pytest.raises(ValidationError, match=PAIRED):
        Example.model_validate(_v2(sampling=_DROP))
    expert = _v2(stage="expert", grade="reference", behavior_logprobs=None, sampling=None)
    assert Example.model_validate(expert).sampling is None
    with pytest.raises(ValidationError, match=PAIRED):
        Example.model_validate(expert | {"sampling": {"temperature": 0.7, "top_p": 1.0}})
    with pytest.raises(ValidationError, match="target_logprobs has 2 entries for 3"):
        Example.model_validate(_v2(target_logprobs=[-1.0, -1.0]))
    with pytest.raises(ValidationError, match=r"schema_version 3 is not supported \(readable: \(1, 2\)\)"):
        Example.model_validate(_v2(schema_version=3))
    with pytest.raises(ValidationError, match="temperature"):
        Example.model_validate(_v2(sampling={"temperature": 0.0, "top_p": 1.0}))
