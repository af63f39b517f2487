"""A deterministic stand-in for the vLLM engine: byte-level tokenizer, scripted responses, fake log-probs.

Used by unit tests and by test processes started with `--engine fake`. It implements the `Engine`
Protocol exactly (EOS at the end of finished responses, truncation at `max_tokens`, log-prob lists
aligned with token ids) and records every call, so tests can assert how the pipeline batches its work.

The default script "solves" arithmetic questions such as "What is 3+4?": on the plain prompt a problem
with `(a + b) % 3 == 0` is always answered wrongly, `== 1` wrongly then correctly (alternating), `== 2`
always correctly; on a guided prompt (one that contains the correct result besides the question) it
answers correctly in its own words. Prompts without an expression get an answerless reply, or the
`#### n` / `\\boxed{n}` answer of the guidance when there is one.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from services.engine import EngineStats, RequestRejected, Sample, SamplingConfig
from shared.config import EngineConfig
from shared.schema import ChatMessage

EOS_ID = 256  # ids 0..255 are bytes
VOCAB_SIZE = 257

# (prompt text, sample index for that prompt) → response text
Script = Callable[[str, int], str]

_EXPR = re.compile(r"(-?\d+)\s*([+\-*×])\s*(-?\d+)")
_GUIDANCE_ANSWER = re.compile(r"####\s*(-?[\d.,]+)|\\boxed\{([^{}]*)\}")


def arithmetic_script(prompt: str, index: int) -> str:
    """The default script: see the module docstring for which samples are right and wrong."""
    match = _EXPR.search(prompt)
    if match is None:
        guidance = _GUIDANCE_ANSWER.search(prompt)
        if guidance is None:
            return "I am not sure how to solve this."
        answer = (guidance.group(1) or guidance.group(2)).strip()
        return f"Working through it step by step, the result is \\boxed{{{answer}}}."
    a, op, b = int(match.group(1)), match.group(2), int(match.group(3))
    result = a + b if op == "+" else a - b if op == "-" else a * b
    rest = prompt[: match.start()] + prompt[match.end() :]
    guided = re.search(rf"(?<![\d.]){result}(?![\d.])", rest) is not None
    kind = (a + b) % 3
    correct = guided or kind == 2 or (kind == 1 and index % 2 == 1)
    shown = result if correct else result + 1
    if guided:
        return f"Combining {a} and {b} with {op} gives {shown}. So the answer is \\boxed{{{shown}}}."
    return f"We compute {a} {op} {b} = {shown}. The answer is \\boxed{{{shown}}}."


def scripted(responses: Mapping[str, Sequence[str]], default: str = "I do not know.") -> Script:
    """A script from `{prompt substring: responses}`: the first matching entry's responses, cycled."""

    def script(prompt: str, index: int) -> str:
        for needle, options in responses.items():
            if needle in prompt:
                return options[index % len(options)]
        return default

    return script


@dataclass(frozen=True)
class FakeCall:
    """One recorded engine call."""

    kind: str  # "generate" or "score"
    prompt: str
    n: int
    started: float


class FakeEngine:
    """Deterministic Engine for tests: byte tokens, scripted responses, log-probs as functions of tokens."""

    def __init__(
        self, script: Script = arithmetic_script, delay: float = 0.0, max_model_len: int | None = None
    ) -> None:
        self.script = script
        self.delay = delay
        self.max_model_len = max_model_len  # longer requests are refused, as vLLM refuses them
        self.stats = EngineStats()
        self.version = 0  # bumped by reload(): changes both responses and log-probs
        self.calls: list[FakeCall] = []
        self.in_flight: defaultdict[str, int] = defaultdict(int)
        self.max_in_flight: defaultdict[str, int] = defaultdict(int)  # per call kind, the most at once
        self.closed = False
        self._drawn: defaultdict[str, int] = defaultdict(int)  # samples already drawn per prompt

    @classmethod
    def from_config(cls, cfg: EngineConfig | None = None, delay: float = 0.0) -> FakeEngine:
        """The fake with the default arithmetic script (the engine options do not matter to it)."""
        return cls(arithmetic_script, delay=delay)

    # tokenizer -------------------------------------------------------------------------------------
    def render_prompt(self, messages: Sequence[ChatMessage]) -> list[int]:
        """Byte ids of a simple chat rendering, ending with the assistant header."""
        text = "".join(f"<|{m.role}|>\n{m.content}\n" for m in messages) + "<|assistant|>\n"
        return list(text.encode())

    def encode_completion(self, text: str) -> list[int]:
        """Byte ids of `text` followed by EOS."""
        return [*text.encode(), EOS_ID]

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of the byte ids, EOS skipped."""
        return bytes(t for t in token_ids if t < EOS_ID).decode(errors="replace")

    # inference -------------------------------------------------------------------------------------
    def token_logprob(self, prompt_ids: Sequence[int], token: int, position: int) -> float:
        """The fake model's temperature-1 log-prob of `token` at `position` after `prompt_ids`."""
        salt = sum(prompt_ids) % 11 + 7 * self.version
        return -(((token * 31 + position * 17 + salt) % 50) + 1) / 40

    async def generate(self, prompt_ids: Sequence[int], params: SamplingConfig) -> list[Sample]:
        """`params.n` scripted responses; the processed log-probs are the temperature-1 ones / T."""
        prompt = self.decode(prompt_ids)
        self._check_length(len(prompt_ids) + 1)
        async with self._call("generate", prompt, params.n):
            first = self._drawn[prompt]
            self._drawn[prompt] += params.n
            samples = []
            for i in range(first, first + params.n):
                ids = self.encode_completion(self.script(prompt, i + self.version))
                finish = "stop"
                if len(ids) > params.max_tokens:  # cut before EOS, as a real engine would
                    ids, finish = ids[: params.max_tokens], "length"
                logprobs = [self.token_logprob(prompt_ids, t, pos) / params.temperature for pos, t in enumerate(ids)]
                samples.append(Sample(self.decode(ids), ids, logprobs, finish))
                self.stats.generated_tokens += len(ids)
            return samples

    async def score(self, prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> list[float]:
        """Temperature-1 log-probs of `completion_ids` after `prompt_ids`."""
        self._check_length(len(prompt_ids) + len(completion_ids))
        async with self._call("score", self.decode(prompt_ids), 1):
            self.stats.scored_tokens += len(completion_ids)
            return [self.token_logprob(prompt_ids, t, pos) for pos, t in enumerate(completion_ids)]

    async def reload(self, path: str) -> None:
        """Pretend to load weights from the folder `path`: the version tag changes all outputs."""
        if not Path(path).is_dir():
            raise FileNotFoundError(f"no checkpoint folder at {path}")
        self.version += 1

    async def shutdown(self) -> None:
        """Mark the engine closed; later calls fail."""
        self.closed = True

    def _check_length(self, tokens: int) -> None:
        if self.max_model_len is not None and tokens > self.max_model_len:
            raise RequestRejected(f"{tokens} tokens exceed the maximum context length {self.max_model_len}")

    def _call(self, kind: str, prompt: str, n: int) -> _InFlight:
        if self.closed:
            raise RuntimeError("engine is shut down")
        self.calls.append(FakeCall(kind, prompt, n, time.monotonic()))
        return _InFlight(self, kind)


class _InFlight:
    """Tracks concurrent calls and applies the configured delay."""

    def __init__(self, engine: FakeEngine, kind: str) -> None:
        self.engine = engine
        self.kind = kind
        self.start = 0.0

    async def __aenter__(self) -> None:
        e = self.engine
        e.in_flight[self.kind] += 1
        e.max_in_flight[self.kind] = max(e.max_in_flight[self.kind], e.in_flight[self.kind])
        self.start = time.monotonic()
        if self.kind == "generate":
            e.stats.generate_calls += 1
        if e.delay:
            await asyncio.sleep(e.delay)

    async def __aexit__(self, *exc: object) -> None:
        self.engine.in_flight[self.kind] -= 1
        self.engine.stats.busy_seconds += time.monotonic() - self.start
