"""The engine Protocol the pipeline and the service are written against (vLLM and a fake implement it), and the
KV-cache size vLLM on CPU starts with."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Literal, Protocol

from shared.config import EngineConfig
from shared.schema import ChatMessage

GiB = 1 << 30
# vLLM on CPU, unless told otherwise: a quarter of the memory free at start, 1 to 4 GiB. vLLM's own default
# (`gpu_memory_utilization` of the machine's *total* memory, 0.85) fails whenever anything else runs, such as
# `mindgap up`'s trainer; 4 GiB hold far more tokens than a CPU engine runs at once.
AUTO_KV_CACHE_SHARE = 0.25
AUTO_KV_CACHE_MAX_GIB = 4
KV_CACHE_ENV = "VLLM_CPU_KVCACHE_SPACE"


class EngineStartError(RuntimeError):
    """The engine cannot start; the message says why and which setting to change (shown as one line)."""


def cpu_kv_cache_gib(configured: float | None, env_value: str | None, available_bytes: int) -> tuple[int, str]:
    """The KV cache of vLLM on CPU in whole GiB, and where that size came from.

    `engine.kv_cache_gib` (rounded up) wins, then a VLLM_CPU_KVCACHE_SPACE the user exported, else a quarter of
    `available_bytes` (free memory) within 1 … AUTO_KV_CACHE_MAX_GIB GiB. Raises EngineStartError for an
    unusable variable, or when the size is more than the free memory.
    """
    if configured is not None:
        gib, source = max(1, math.ceil(configured)), "engine.kv_cache_gib"
    elif env_value:
        if not env_value.isdigit() or int(env_value) < 1:
            raise EngineStartError(f"{KV_CACHE_ENV}={env_value[:20]!r}: give the KV cache size in whole GiB (>= 1)")
        gib, source = int(env_value), KV_CACHE_ENV
    else:
        share = int(available_bytes * AUTO_KV_CACHE_SHARE // GiB)
        gib = min(AUTO_KV_CACHE_MAX_GIB, max(1, share))
        source = f"a quarter of the {available_bytes / GiB:.1f} GiB free, 1 to {AUTO_KV_CACHE_MAX_GIB} GiB"
    if gib * GiB > available_bytes:
        raise EngineStartError(
            f"the vLLM KV cache needs {gib} GiB ({source}) but only {available_bytes / GiB:.1f} GiB of memory is"
            " free: set a smaller engine.kv_cache_gib, or stop what else uses the memory"
        )
    return gib, source


class RequestRejected(ValueError):
    """The engine refused one request (e.g. prompt plus response longer than the model's context).

    Only that request failed: the engine is healthy and other requests go on.
    """


@dataclass(frozen=True)
class SamplingConfig:
    """How to sample: `n` responses per prompt."""

    n: int = 1
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 512
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Sample:
    """One sampled response: text, the engine's token ids (the stop token included when it ended) and log-probs.

    `logprobs[t]` is the log-probability of `token_ids[t]` under the sampling distribution (after
    temperature/top-p: vLLM's processed log-probs).
    """

    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str = "stop"


@dataclass
class EngineStats:
    """Counters an engine keeps for metrics and summaries."""

    generated_tokens: int = 0
    scored_tokens: int = 0
    generate_calls: int = 0
    busy_seconds: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)


class SampleStream(Protocol):
    """The samples of one request, each yielded as soon as it finishes (so not in index order).

    Iterating ends when every sample has been yielded. `abort` stops the ones still running, so a caller
    that has what it needs does not wait for (or pay for) the rest.
    """

    def __aiter__(self) -> AsyncIterator[Sample]: ...

    async def abort(self) -> list[Sample]:
        """Stop the running samples; every sample not yet yielded, the running ones cut where they stood.

        Those cut have `finish_reason == "abort"` and the tokens generated before the abort, so a caller
        can count what was spent on them.
        """
        ...


class Engine(Protocol):
    """What mindgap needs from an inference engine."""

    stats: EngineStats

    def render_prompt(self, messages: Sequence[ChatMessage]) -> list[int]:
        """Token ids of `messages` through the chat template, with the generation prompt appended."""
        ...

    def encode_completion(self, text: str) -> list[int]:
        """Token ids of an assistant response written by someone else (expert), ending like a sampled one.

        That is, with the token that closes an assistant turn in the chat template, which sampling stops on
        (`shared.prompts.turn_end_ids`; the EOS token only where the template writes none).
        """
        ...

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of `token_ids`, special tokens skipped."""
        ...

    async def generate(self, prompt_ids: Sequence[int], params: SamplingConfig) -> list[Sample]:
        """Sample `params.n` responses to one prompt."""
        ...

    def stream(self, prompt_ids: Sequence[int], params: SamplingConfig) -> AbstractAsyncContextManager[SampleStream]:
        """Sample `params.n` responses to one prompt, yielded as each finishes; leaving the context aborts the rest.

        Use as `async with engine.stream(ids, params) as samples: async for s in samples: ...`. A request
        the engine refuses raises `RequestRejected` from the iteration.
        """
        ...

    async def score(self, prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> list[float]:
        """log p(completion_ids[t] | prompt, completion_ids[:t]) under the current weights, temperature 1."""
        ...

    async def reload(self, path: str) -> None:
        """Load new weights (an HF safetensors folder); raise and keep the old weights on failure."""
        ...

    async def shutdown(self) -> None:
        """Release the engine's processes and memory."""
        ...


async def create_engine(backend: Literal["vllm", "fake"], cfg: EngineConfig, fake_delay_s: float = 0.0) -> Engine:
    """The engine `backend` names: vLLM in process (it resolves "default" and HF ids) or the test fake."""
    if backend == "fake":
        from services.fake_engine import FakeEngine

        return FakeEngine.from_config(cfg, delay=fake_delay_s)
    from services.vllm_engine import VLLMEngine

    return await VLLMEngine.create(cfg)
