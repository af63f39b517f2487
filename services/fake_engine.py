"""A deterministic stand-in for the vLLM engine: byte-level tokenizer, scripted responses, fake log-probs.

Used by unit tests and by test processes started with `--backend fake`. It implements the `Engine`
Protocol exactly (EOS at the end of finished responses, truncation at `max_tokens`, log-prob lists
aligned with token ids) and records every call, so tests can assert how the pipeline batches its work.

The default script "solves" arithmetic questions such as "What is 3+4?": on the plain prompt a problem
with `(a + b) % 3 == 0` is always answered wrongly, `== 1` wrongly then correctly (alternating), `== 2`
always correctly; on a guided prompt (one that contains the correct result besides the question) it
answers correctly in its own words. Prompts without an expression get an answerless reply, or the
`#### n` / `\\boxed{n}` answer of the guidance when there is one.

Given a Hugging Face `tokenizer`, the fake tokenizes like the real engine instead: prompts through the
chat template, responses (sampled and expert alike) closed by the template's end-of-turn token
(`shared.prompts.turn_end_ids`), so tests can check how records of a model family end.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.engine import EngineStats, RequestRejected, Sample, SampleStream, SamplingConfig
from shared.config import EngineConfig
from shared.prompts import completion_token_ids, render_prompt_ids, turn_end_ids
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
        return f"Combining {a} and {b}: {a} {op} {b} gives {shown}. So the answer is \\boxed{{{shown}}}."
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
        self,
        script: Script = arithmetic_script,
        delay: float = 0.0,
        max_model_len: int | None = None,
        tokenizer: Any = None,
    ) -> None:
        self.script = script
        self.tokenizer = tokenizer  # None: byte tokens, EOS_ID closes a response
        self.turn_end = [EOS_ID] if tokenizer is None else turn_end_ids(tokenizer)
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
        """Byte ids of a simple chat rendering, ending with the assistant header (or the tokenizer's template)."""
        if self.tokenizer is not None:
            return render_prompt_ids(self.tokenizer, messages)
        text = "".join(f"<|{m.role}|>\n{m.content}\n" for m in messages) + "<|assistant|>\n"
        return list(text.encode())

    def encode_completion(self, text: str) -> list[int]:
        """Byte ids of `text` and EOS (with a tokenizer: its ids and turn terminator), as sampling yields too."""
        if self.tokenizer is not None:
            return completion_token_ids(self.tokenizer, text, self.turn_end)
        return [*text.encode(), EOS_ID]

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of the byte ids, EOS skipped (or the tokenizer's decoding, special tokens skipped)."""
        if self.tokenizer is not None:
            text: str = self.tokenizer.decode(list(token_ids), skip_special_tokens=True)
            return text
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
            samples = self._draw(prompt_ids, prompt, params)
            self.stats.generated_tokens += sum(len(s.token_ids) for s in samples)
            return samples

    @asynccontextmanager
    async def stream(self, prompt_ids: Sequence[int], params: SamplingConfig) -> AsyncIterator[SampleStream]:
        """The samples `generate` would return, shortest first, as a real engine finishes them (see `FakeStream`)."""
        prompt = self.decode(prompt_ids)
        self._check_length(len(prompt_ids) + 1)
        async with self._call("generate", prompt, params.n, wait=False):
            yield FakeStream(self, self._draw(prompt_ids, prompt, params))

    def _draw(self, prompt_ids: Sequence[int], prompt: str, params: SamplingConfig) -> list[Sample]:
        """The next `params.n` scripted samples of `prompt`, cut at `max_tokens`."""
        first = self._drawn[prompt]
        self._drawn[prompt] += params.n
        samples = []
        for i in range(first, first + params.n):
            ids = self.encode_completion(self.script(prompt, i + self.version))
            finish = "stop"
            if len(ids) > params.max_tokens:  # cut before the terminator, as a real engine would
                ids, finish = ids[: params.max_tokens], "length"
            logprobs = [self.token_logprob(prompt_ids, t, pos) / params.temperature for pos, t in enumerate(ids)]
            samples.append(Sample(self.decode(ids), ids, logprobs, finish))
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

    def _call(self, kind: str, prompt: str, n: int, wait: bool = True) -> _InFlight:
        if self.closed:
            raise RuntimeError("engine is shut down")
        self.calls.append(FakeCall(kind, prompt, n, time.monotonic()))
        return _InFlight(self, kind, wait)


class FakeStream:
    """One streamed request of the fake: its samples in the order a real engine would finish them.

    Every running sample gains one token per engine step, so the shortest finishes first (ties in index
    order), and when a sample of `L` tokens finishes every sample still running holds its first `L`
    tokens: `abort` cuts them there. The engine only steps while the consumer waits for the next sample,
    which makes the cut points exact whatever the consumer does in between (grading). A request run to
    its end takes the engine's `delay`, spread over its steps.
    """

    def __init__(self, engine: FakeEngine, samples: list[Sample]) -> None:
        self._engine = engine
        self._samples = samples
        self._order = sorted(range(len(samples)), key=lambda i: (len(samples[i].token_ids), i))
        self._next = 0  # position in `_order` of the next sample to yield
        self._steps = 0  # engine steps run so far = tokens held by every running sample
        self._longest = max((len(s.token_ids) for s in samples), default=1)

    def __aiter__(self) -> AsyncIterator[Sample]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Sample]:
        while self._next < len(self._order):
            sample = self._samples[self._order[self._next]]
            self._next += 1
            steps = len(sample.token_ids)
            if self._engine.delay and steps > self._steps:
                await asyncio.sleep(self._engine.delay * (steps - self._steps) / self._longest)
            self._steps = max(self._steps, steps)
            self._engine.stats.generated_tokens += steps
            yield sample

    async def abort(self) -> list[Sample]:
        """The samples not yet yielded; those still running cut at the current step, finish reason "abort"."""
        rest = [self._samples[i] for i in self._order[self._next :]]
        self._next = len(self._order)
        cut = [s if len(s.token_ids) <= self._steps else self._cut(s) for s in rest]
        self._engine.stats.generated_tokens += sum(len(s.token_ids) for s in cut)
        return cut

    def _cut(self, sample: Sample) -> Sample:
        ids = sample.token_ids[: self._steps]
        return Sample(self._engine.decode(ids), ids, sample.logprobs[: self._steps], "abort")


class _InFlight:
    """Tracks concurrent calls and applies the configured delay (unless the call spreads it itself)."""

    def __init__(self, engine: FakeEngine, kind: str, wait: bool = True) -> None:
        self.engine = engine
        self.kind = kind
        self.wait = wait
        self.start = 0.0

    async def __aenter__(self) -> None:
        e = self.engine
        e.in_flight[self.kind] += 1
        e.max_in_flight[self.kind] = max(e.max_in_flight[self.kind], e.in_flight[self.kind])
        self.start = time.monotonic()
        if self.kind == "generate":
            e.stats.generate_calls += 1
        if e.delay and self.wait:
            await asyncio.sleep(e.delay)

    async def __aexit__(self, *exc: object) -> None:
        self.engine.in_flight[self.kind] -= 1
        self.engine.stats.busy_seconds += time.monotonic() - self.start
