"""The real vLLM engine on the tiny random model: log-probs against transformers, EOS, weight reload.

All tests share the session's one engine (`vllm_tiny_engine`); a test that reloads other weights puts
the tiny model's weights back before it ends.
"""

from __future__ import annotations

import asyncio
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from services.engine import SamplingConfig
from shared.checkpoints import CheckpointError
from shared.schema import ChatMessage

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
# the engine lives on the session's event loop, so the tests must run there too
on_session_loop = pytest.mark.asyncio(loop_scope="session")

QUESTIONS = ("What is 2+3?", "Name three prime numbers.")


@pytest.fixture(scope="module")
def hf_tiny(tiny_model_dir: Path) -> Any:
    """The tiny model in transformers, float32, for reference log-probs."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype="float32").eval()


@pytest.fixture
async def engine(vllm_tiny_engine: Any, tiny_model_dir: Path) -> Any:
    """The shared engine, serving the tiny model's own weights."""
    if Path(vllm_tiny_engine.model_path).resolve() != tiny_model_dir.resolve():
        await vllm_tiny_engine.reload(str(tiny_model_dir))
    return vllm_tiny_engine


def hf_logprobs(model: Any, prompt: Sequence[int], completion: Sequence[int], temperature: float = 1.0) -> list[float]:
    """log softmax(logits / temperature) of each completion token under transformers."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([[*prompt, *completion]])).logits[0].float()
    # logits at position i predict token i + 1: the completion's predictions start at the prompt's last token
    steps = logits[len(prompt) - 1 : -1] / temperature
    return steps.log_softmax(-1).gather(-1, torch.tensor(completion)[:, None])[:, 0].tolist()


def prompt_ids(engine: Any, question: str) -> list[int]:
    return list(engine.render_prompt([ChatMessage(role="user", content=question)]))


async def greedy(engine: Any, max_tokens: int = 16) -> list[list[int]]:
    """Greedy responses to every question."""
    params = SamplingConfig(n=1, temperature=0.0, max_tokens=max_tokens)
    outs = await asyncio.gather(*(engine.generate(prompt_ids(engine, q), params) for q in QUESTIONS))
    return [out[0].token_ids for out in outs]


def mean_abs_diff(a: Sequence[float], b: Sequence[float]) -> float:
    assert len(a) == len(b)
    return sum(abs(x - y) for x, y in zip(a, b, strict=True)) / len(a)


def test_cpu_kv_cache_space_is_set_before_start(vllm_tiny_engine: Any) -> None:
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("VLLM_CPU_KVCACHE_SPACE only applies to the CPU backend")
    # The fixture removed the variable and asked for kv_cache_gib=1: the engine's cache size comes from
    # the variable the engine set before the engine core read it.
    assert vllm_tiny_engine._llm.vllm_config.cache_config.kv_cache_memory_bytes == 1 << 30


def test_cpu_kv_cache_size_is_exported_whole_gib_or_chosen_from_free_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.vllm_engine import size_cpu_kv_cache

    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    assert size_cpu_kv_cache(2.5) == 3 and os.environ["VLLM_CPU_KVCACHE_SPACE"] == "3"
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE")
    chosen = size_cpu_kv_cache(None)  # nothing configured or exported: sized from the free memory
    assert 1 <= chosen <= 4 and os.environ["VLLM_CPU_KVCACHE_SPACE"] == str(chosen)


@on_session_loop
async def test_generate_aligns_tokens_logprobs_and_eos(engine: Any) -> None:
    eos = engine.tokenizer.eos_token_id
    params = SamplingConfig(n=6, temperature=1.0, max_tokens=40)
    samples = [s for q in QUESTIONS for s in await engine.generate(prompt_ids(engine, q), params)]
    assert len(samples) == 12
    by_eos = [s for s in samples if s.finish_reason == "stop"]
    assert by_eos, "the tiny model should end some responses by EOS"
    for s in samples:
        assert len(s.logprobs) == len(s.token_ids) > 0
        assert all(lp <= 0.0 and math.isfinite(lp) for lp in s.logprobs)
        assert eos not in s.token_ids[:-1]
        assert s.text == engine.decode(s.token_ids)
        if s.finish_reason == "stop":
            assert s.token_ids[-1] == eos  # EOS is part of the response's tokens...
            assert "<|im_end|>" not in s.text  # ...but not of its text
        else:
            assert s.finish_reason == "length" and len(s.token_ids) == params.max_tokens
            assert s.token_ids[-1] != eos
    assert engine.stats.generated_tokens >= sum(len(s.token_ids) for s in samples)


@on_session_loop
async def test_score_matches_transformers(engine: Any, hf_tiny: Any) -> None:
    sampled = await engine.generate(prompt_ids(engine, QUESTIONS[0]), SamplingConfig(n=1, max_tokens=24))
    pairs = [
        (prompt_ids(engine, QUESTIONS[0]), sampled[0].token_ids),
        (prompt_ids(engine, QUESTIONS[1]), engine.encode_completion("two, three and five <|im_end|> five")),
    ]
    for prompt, completion in pairs:
        scores = await engine.score(prompt, completion)
        assert len(scores) == len(completion)
        assert mean_abs_diff(scores, hf_logprobs(hf_tiny, prompt, completion)) < 1e-3
    assert await engine.score(pairs[0][0], []) == []


@on_session_loop
async def test_expert_completion_is_text_then_eos(engine: Any) -> None:
    ids = engine.encode_completion("so <|im_end|> is text here")
    assert ids[-1] == engine.tokenizer.eos_token_id
    assert engine.tokenizer.eos_token_id not in ids[:-1]  # special-token text in the data stays text
    assert engine.decode(ids) == "so <|im_end|> is text here"


@on_session_loop
async def test_sampled_logprobs_include_temperature(engine: Any, hf_tiny: Any) -> None:
    prompt = prompt_ids(engine, QUESTIONS[1])
    samples = await engine.generate(prompt, SamplingConfig(n=3, temperature=0.7, max_tokens=24))
    for s in samples:
        assert mean_abs_diff(s.logprobs, hf_logprobs(hf_tiny, prompt, s.token_ids, temperature=0.7)) < 5e-3
        # and they are not the temperature-1 log-probs
        assert mean_abs_diff(s.logprobs, hf_logprobs(hf_tiny, prompt, s.token_ids)) > 1e-2


@on_session_loop
async def test_reload_changes_outputs_and_back_restores(
    engine: Any, tiny_model_dir: Path, tiny_model_dir_b: Path
) -> None:
    prompt = prompt_ids(engine, QUESTIONS[0])
    completion = engine.encode_completion("three plus two equals five")
    before, score_before = await greedy(engine), await engine.score(prompt, completion)
    await engine.reload(str(tiny_model_dir_b))
    try:
        assert await greedy(engine) != before
        assert mean_abs_diff(await engine.score(prompt, completion), score_before) > 0.1
    finally:
        await engine.reload(str(tiny_model_dir))
    assert await greedy(engine) == before
    assert await engine.score(prompt, completion) == pytest.approx(score_before, abs=1e-5)


@on_session_loop
async def test_reload_while_generating(engine: Any, tiny_model_dir: Path, tiny_model_dir_b: Path) -> None:
    params = SamplingConfig(n=4, temperature=1.0, max_tokens=120)
    task = asyncio.create_task(engine.generate(prompt_ids(engine, QUESTIONS[1]), params))
    await asyncio.sleep(0.2)
    try:
        await engine.reload(str(tiny_model_dir_b))
    finally:
        await engine.reload(str(tiny_model_dir))
    for s in await task:
        assert len(s.logprobs) == len(s.token_ids) > 0


def _without_tensor(src: Path, dest: Path, drop: str) -> None:
    """Copy of the checkpoint in `src` with one tensor left out."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dest)
    tensors = load_file(str(src / "model.safetensors"))
    del tensors[drop]
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})


@on_session_loop
async def test_bad_checkpoint_is_refused_and_old_weights_keep_serving(
    engine: Any, tiny_model_dir_b: Path, tmp_path: Path
) -> None:
    before = await greedy(engine)

    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_model_dir_b, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        await engine.reload(str(truncated))

    incomplete = tmp_path / "incomplete"
    _without_tensor(tiny_model_dir_b, incomplete, "lm_head.weight")
    with pytest.raises(CheckpointError, match=r"missing lm_head\.weight"):
        await engine.reload(str(incomplete))

    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError):
        await engine.reload(str(garbage))

    with pytest.raises(CheckpointError, match="not found"):
        await engine.reload(str(tmp_path / "nowhere"))

    assert await greedy(engine) == before


@on_session_loop
async def test_stream_yields_every_sample_as_it_finishes(engine: Any) -> None:
    params = SamplingConfig(n=4, temperature=1.0, max_tokens=40)
    before = engine.stats.generated_tokens
    async with engine.stream(prompt_ids(engine, QUESTIONS[0]), params) as samples:
        got = [s async for s in samples]
    assert len(got) == 4
    for s in got:
        assert s.finish_reason in ("stop", "length") and len(s.logprobs) == len(s.token_ids) > 0
    assert engine.stats.generated_tokens - before == sum(len(s.token_ids) for s in got)


@on_session_loop
async def test_stream_abort_stops_the_running_samples_and_returns_their_tokens(engine: Any) -> None:
    params = SamplingConfig(n=3, temperature=1.0, max_tokens=1000)  # far more than 0.2 s of decoding
    before = engine.stats.generated_tokens
    async with engine.stream(prompt_ids(engine, QUESTIONS[1]), params) as samples:
        await asyncio.sleep(0.02)  # the tiny model ends its samples by EOS within ~0.2 s on a busy CPU
        cut = await samples.abort()
        assert [s async for s in samples] == []  # nothing is left to yield
    assert len(cut) == 3 and any(s.finish_reason == "abort" for s in cut)
    for s in cut:
        assert len(s.logprobs) == len(s.token_ids) < params.max_tokens
    assert engine.stats.generated_tokens - before == sum(len(s.token_ids) for s in cut)
    assert engine._llm.get_num_unfinished_requests() == 0


@on_session_loop
async def test_leaving_a_stream_early_leaves_no_request_behind(engine: Any) -> None:
    params = SamplingConfig(n=3, temperature=1.0, max_tokens=1000)
    with pytest.raises(RuntimeError, match="consumer failed"):
        async with engine.stream(prompt_ids(engine, QUESTIONS[1]), params):
            await asyncio.sleep(0.1)
            raise RuntimeError("consumer failed")
    await asyncio.sleep(0.1)  # the engine core drops aborted requests on its next step
    assert engine._llm.get_num_unfinished_requests() == 0
