"""Model fixtures: the converted default model, tiny random models, and ONE shared real vLLM engine.

The tiny models are random LlamaForCausalLM (hidden 128, 2 layers, 4 heads of 32: vLLM's CPU attention
needs head sizes that are multiples of 32) with the default model's tokenizer and chat template. Pure
random weights spread probability over all 49k tokens, so EOS would never be sampled and greedy outputs
would be noise; two tweaks keep them random yet useful: a constant feature in every token embedding lets
the output layer push all but a handful of tokens (EOS among them) far down, and large embeddings make
the next token depend on the current one. Responses then end by EOS within a few dozen tokens and
different seeds give different greedy outputs.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import pytest_asyncio

from shared.config import EngineConfig
from shared.model_source import prepare_default_model

if TYPE_CHECKING:
    from services.vllm_engine import VLLMEngine

TINY_WORDS = " zero one two three four five six seven eight nine plus minus equals answer is so"
TINY_SEED_A = 1234
TINY_SEED_B = 5678


def make_tiny_model(dest: Path, tokenizer_dir: Path, seed: int, ending: int | None = None) -> Path:
    """Write a tiny random Llama (safetensors, float32) with the tokenizer of `tokenizer_dir` to `dest`.

    `ending` is the token its responses end with (favoured like the words); EOS unless given.
    """
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    eos = tokenizer.eos_token_id
    end = eos if ending is None else ending
    favoured = sorted(set(tokenizer(TINY_WORDS, add_special_tokens=False)["input_ids"]) | {end})
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos,
        pad_token_id=eos,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        embed = model.model.embed_tokens.weight
        embed.normal_(0.0, 1.0)
        # Dimension 0 is the same for every token, so after the final norm it is a near-constant
        # feature and lm_head column 0 acts as a per-token bias: -4 sinks all tokens but the favoured.
        embed[:, 0] = 4.0
        head = model.lm_head.weight
        head[:, 0] = -4.0
        head[favoured, 0] = 0.0
        head[favoured, 1:] = torch.randn(len(favoured), config.hidden_size - 1) * 0.23
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=eos, pad_token_id=eos)
    model.save_pretrained(str(dest), safe_serialization=True)
    tokenizer.save_pretrained(str(dest))
    return dest


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The converted SmolLM2-135M-Instruct folder (converted once per cache, reused afterwards)."""
    return prepare_default_model()


@pytest.fixture(scope="session")
def tiny_model_dir(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with the default model's tokenizer and chat template."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny_a"), default_model_dir, TINY_SEED_A)


@pytest.fixture(scope="session")
def tiny_model_dir_b(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tiny architecture as `tiny_model_dir` with other random weights (for reload tests)."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny_b"), default_model_dir, TINY_SEED_B)


def tiny_engine_config(model_dir: Path) -> EngineConfig:
    """Engine options for tests: float32 (scores compare with HF), short context, 1 GiB KV cache, no compile."""
    return EngineConfig(
        model=str(model_dir), dtype="float32", max_model_len=1024, kv_cache_gib=1, seed=0, enforce_eager=True
    )


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def vllm_tiny_engine(tiny_model_dir: Path) -> AsyncIterator[VLLMEngine]:
    """ONE real VLLMEngine on `tiny_model_dir` for the whole session; tests that reload must restore it."""
    from services.vllm_engine import VLLMEngine

    # Unset, so a test can tell that the engine itself sized the KV cache from kv_cache_gib.
    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
    engine = await VLLMEngine.create(tiny_engine_config(tiny_model_dir))
    try:
        yield engine
    finally:
        await engine.shutdown()
