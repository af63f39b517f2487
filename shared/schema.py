"""The example record and the problem row: one versioned pydantic schema for JSONL, streams and the API."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from enum import StrEnum
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

SCHEMA_VERSION = 1
# Log-probs are stored rounded to this many decimals: at most 5e-8 off, below float32 resolution for
# |log p| >= 1 and far below engine-to-trainer noise (~3e-5), while the JSON record shrinks by a third
# and parses about twice as fast (a float32 printed as a double takes 17 digits).
LOGPROB_DECIMALS = 7


class Stage(StrEnum):
    """Which stage of Guided Re-solving produced a training response."""

    SELF = "self"
    GUIDED = "guided"
    EXPERT = "expert"


# correct/incorrect: the response's answer graded against the gold answer; reference: the expert
# demonstration itself (trusted, not graded); ungradable: no gold answer could be determined.
Grade = Literal["correct", "incorrect", "reference", "ungradable"]


class ChatMessage(BaseModel):
    """One chat turn, as in TRL's conversational format."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Literal["system", "user", "assistant"]
    content: str


class Problem(BaseModel):
    """One input row after field mapping: the question, the expert solution and the gold answer."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1)
    question: str = Field(min_length=1)
    solution: str | None = None
    answer: str | None = None  # gold answer; None when it cannot be determined
    meta: dict[str, Any] = Field(default_factory=dict)


class Example(BaseModel):
    """A training example: `prompt → completion` plus the numbers the importance weights need."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    id: str
    problem_id: str
    prompt: list[ChatMessage]
    completion: list[ChatMessage]
    completion_token_ids: list[int]
    stage: Stage
    policy_version: int = Field(ge=0)
    behavior_logprobs: list[float] | None
    target_logprobs: list[float]
    answer: str | None
    grade: Grade
    meta: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _aligned(self) -> Example:
        n = len(self.completion_token_ids)
        if n == 0:
            raise ValueError("completion_token_ids is empty")
        if len(self.target_logprobs) != n:
            raise ValueError(f"target_logprobs has {len(self.target_logprobs)} entries for {n} completion tokens")
        if self.behavior_logprobs is not None and len(self.behavior_logprobs) != n:
            raise ValueError(f"behavior_logprobs has {len(self.behavior_logprobs)} entries for {n} completion tokens")
        if self.stage is Stage.EXPERT and self.behavior_logprobs is not None:
            raise ValueError("expert examples have no behaviour log-probabilities (must be null)")
        if self.schema_version != SCHEMA_VERSION:
            raise ValueError(f"schema_version {self.schema_version} is not supported (expected {SCHEMA_VERSION})")
        return self

    @property
    def response(self) -> str:
        """The assistant text of the completion."""
        return self.completion[-1].content


def wire_logprobs(values: Sequence[float]) -> list[float]:
    """`values` as an example stores them: rounded to `LOGPROB_DECIMALS` decimals."""
    return np.round(np.asarray(values, dtype=np.float64), LOGPROB_DECIMALS).tolist()  # type: ignore[no-any-return]


def example_id(*parts: object) -> str:
    """A deterministic example id from its identifying parts (job, problem, epoch, stage, index…)."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).hexdigest()
    return digest[:24]
