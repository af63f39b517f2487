"""The example record and the problem row: one versioned pydantic schema for JSONL, streams and the API."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from enum import StrEnum
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

# Version 2 added `sampling` (the distribution a response was drawn from) and made `target_logprobs`
# optional (scored only when a job asks). Version 1 records still read: they have no `sampling` (the
# trainer then takes their behaviour log-probs as temperature-1 ones, the convention they were made
# under) and always carry `target_logprobs`.
SCHEMA_VERSION = 2
READABLE_SCHEMA_VERSIONS = (1, 2)
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


class Sampling(BaseModel):
    """The distribution a response was sampled from: the model's logits / `temperature`, then nucleus `top_p`.

    `behavior_logprobs` are log-probabilities under exactly this distribution (vLLM's processed
    log-probs), so an importance ratio must take the policy's log-probabilities under it too.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(gt=0.0)
    top_p: float = Field(gt=0.0, le=1.0)


class Example(BaseModel):
    """A training example: `prompt → completion` plus the numbers the importance weights need.

    `sampling` is set exactly when `behavior_logprobs` are (self and guided records of schema version
    2); `target_logprobs` (the policy's temperature-1 log-probs on the training prompt) only when the
    job asked for scoring.
    """

    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    id: str
    problem_id: str
    prompt: list[ChatMessage]
    completion: list[ChatMessage]
    completion_token_ids: list[int]
    stage: Stage
    policy_version: int = Field(ge=0)
    sampling: Sampling | None = None
    behavior_logprobs: list[float] | None
    target_logprobs: list[float] | None = None
    answer: str | None
    grade: Grade
    meta: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _aligned(self) -> Example:
        if self.schema_version not in READABLE_SCHEMA_VERSIONS:
            raise ValueError(
                f"schema_version {self.schema_version} is not supported (readable: {READABLE_SCHEMA_VERSIONS})"
            )
        n = len(self.completion_token_ids)
        if n == 0:
            raise ValueError("completion_token_ids is empty")
        if self.target_logprobs is not None and len(self.target_logprobs) != n:
            raise ValueError(f"target_logprobs has {len(self.target_logprobs)} entries for {n} completion tokens")
        if self.behavior_logprobs is not None and len(self.behavior_logprobs) != n:
            raise ValueError(f"behavior_logprobs has {len(self.behavior_logprobs)} entries for {n} completion tokens")
        if self.stage is Stage.EXPERT and self.behavior_logprobs is not None:
            raise ValueError("expert examples have no behaviour log-probabilities (must be null)")
        if self.schema_version == 1:
            if self.sampling is not None:
                raise ValueError("sampling is a schema_version 2 field: a version 1 record cannot have it")
            if self.target_logprobs is None:
                raise ValueError("target_logprobs is required in schema_version 1 records")
        elif (self.sampling is None) != (self.behavior_logprobs is None):
            behavior = "null" if self.behavior_logprobs is None else "set"
            raise ValueError(
                "sampling (temperature, top_p) must be given exactly when behavior_logprobs are"
                f" (sampling {self.sampling}, behavior_logprobs {behavior})"
            )
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
