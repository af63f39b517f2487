"""Records end with the chat template's end-of-turn token, sampled and expert alike, where EOS differs."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from services.engine import SamplingConfig
from services.fake_engine import FakeEngine
from services.pipeline import rewrite_batch
from shared.config import StageParams
from shared.grading import Grader
from shared.prompts import solve_messages
from shared.schema import Problem, Stage
from tests.support.tokenizers import ChatStyle


@pytest.fixture(scope="module")
def grader() -> Iterator[Grader]:
    with Grader(workers=1, timeout=10.0) as g:
        yield g


async def test_every_record_ends_with_the_turn_terminator(
    chat_tokenizer: tuple[ChatStyle, Any], grader: Grader
) -> None:
    style, tokenizer = chat_tokenizer
    end = tokenizer.convert_tokens_to_ids(style.turn_end)
    engine = FakeEngine(tokenizer=tokenizer)  # the arithmetic script: 1+1 solved alone, 1+2 only when guided
    problems = [
        Problem(id="self", question="What is 1+1?", answer="2"),
        Problem(id="guided", question="What is 1+2?", solution="1 + 2 = 3.\n#### 3", answer="3"),
        Problem(id="expert", question="Name a prime.", solution="Two is prime, for one."),  # ungradable
    ]
    outcomes = await rewrite_batch(problems, engine, grader, StageParams(k=2, resolve_attempts=2, rounds=1))
    stages = {o.problem.id: o.stage for o in outcomes}
    assert stages == {"self": Stage.SELF, "guided": Stage.GUIDED, "expert": Stage.EXPERT}
    for ex in (ex for o in outcomes for ex in o.examples):
        assert ex.completion_token_ids[-1] == end, (ex.stage, tokenizer.decode(ex.completion_token_ids[-3:]))
        assert tokenizer.eos_token_id not in ex.completion_token_ids
        assert end not in ex.completion_token_ids[:-1]


class _StubLLM:
    """Just enough of vLLM's AsyncLLM for VLLMEngine.generate: records the sampling parameters it gets."""

    def __init__(self, tokenizer: Any, reply: list[int]) -> None:
        self.tokenizer, self.reply = tokenizer, reply
        self.sampling: list[Any] = []

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    async def generate(self, prompt: Any, sampling: Any, request_id: str) -> AsyncIterator[Any]:
        from vllm.logprobs import Logprob

        self.sampling.append(sampling)
        out = SimpleNamespace(
            index=0,
            token_ids=self.reply,
            logprobs=[{t: Logprob(-0.5)} for t in self.reply],
            text=self.tokenizer.decode(self.reply, skip_special_tokens=True),
            finish_reason="stop",
        )
        yield SimpleNamespace(finished=True, outputs=[out])


async def test_vllm_engine_stops_on_the_turn_terminator_and_closes_expert_text_with_it(
    chat_tokenizer: tuple[ChatStyle, Any],
) -> None:
    from services.vllm_engine import VLLMEngine

    style, tokenizer = chat_tokenizer
    end = tokenizer.convert_tokens_to_ids(style.turn_end)
    expert = VLLMEngine(_StubLLM(tokenizer, []), "stub", None).encode_completion("So \\boxed{5}.")  # type: ignore[arg-type]
    assert expert[-1] == end and tokenizer.eos_token_id not in expert
    llm = _StubLLM(tokenizer, expert)
    engine = VLLMEngine(llm, "stub", None)  # type: ignore[arg-type]
    (sample,) = await engine.generate([1, 2, 3], SamplingConfig(n=1))
    assert llm.sampling[0].stop_token_ids == [end]
    async with engine.stream([1, 2, 3], SamplingConfig(n=2)) as samples:
        streamed = [s async for s in samples]
    assert [s.stop_token_ids for s in llm.sampling[1:]] == [[end], [end]]
    assert sample.token_ids == expert and all(s.token_ids == expert for s in streamed)


@pytest.mark.vllm
@pytest.mark.slow
async def test_real_vllm_records_end_with_the_turn_terminator(
    chat_tokenizer: tuple[ChatStyle, Any], tmp_path_factory: pytest.TempPathFactory, grader: Grader
) -> None:
    """vLLM stops on the template's terminator (a tiny model that favours it over EOS) and keeps it."""
    from services.vllm_engine import VLLMEngine
    from tests.support.models import make_tiny_model, tiny_engine_config

    style, tokenizer = chat_tokenizer
    end = tokenizer.convert_tokens_to_ids(style.turn_end)
    folder = tmp_path_factory.mktemp(f"tiny_{style.name}")
    tokenizer.save_pretrained(str(folder))
    make_tiny_model(folder, folder, seed=1234, ending=end)
    engine = await VLLMEngine.create(tiny_engine_config(folder))
    try:
        assert engine.turn_end == [end]
        prompt = engine.render_prompt(solve_messages("What is 2 plus 3?"))
        samples = await engine.generate(prompt, SamplingConfig(n=8, temperature=1.0, max_tokens=200))
        finished = [s for s in samples if s.finish_reason == "stop"]
        assert len(finished) >= 4, [s.finish_reason for s in samples]
        assert all(s.token_ids[-1] == end and end not in s.token_ids[:-1] for s in finished)
        problem = Problem(id="x", question="Name a prime.", solution="Two is prime.")  # ungradable: expert only
        (out,) = await rewrite_batch([problem], engine, grader, StageParams())
        (expert,) = out.examples
        assert expert.completion_token_ids[-1] == end and tokenizer.eos_token_id not in expert.completion_token_ids
    finally:
        await engine.shutdown()
