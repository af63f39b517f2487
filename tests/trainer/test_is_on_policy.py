"""Importance weights on the policy's own samples: 1 before any update, at token and sequence level.

Samples are drawn with torch from a tiny random policy the way vLLM draws them (`tests.support.sampling`:
logits / T, then the top-p nucleus, renormalised), and their behaviour log-probs are that distribution's
log-probs, as vLLM's processed log-probs are. The trainer's own path then computes the weights: collate,
forward, `sampling_logprobs`, `token_weights`, `gap_sums`.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from shared.prompts import render_prompt_ids
from shared.schema import ChatMessage
from tests.support.sampling import draw
from trainer.data import TrainItem, collate
from trainer.losses import (
    LossSpec,
    gap_metrics,
    gap_sums,
    next_token_logprobs,
    normalised_ess,
    sampled_token_logprobs,
    sampling_logprobs,
    token_weights,
)

N_SAMPLES, LENGTH = 48, 24


@pytest.fixture(scope="module")
def policy(tiny_model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(tiny_model_dir))


def _weights(policy, temperature: float, top_p: float, at_sampling: bool = True):
    """Token weights (flat), sequence weights and the gap sums of freshly drawn samples."""
    model, tokenizer = policy
    prompt = render_prompt_ids(tokenizer, [ChatMessage(role="user", content="What is two plus three?")])
    completions, behaviour = draw(model, prompt, temperature, top_p, N_SAMPLES, LENGTH)
    items = [
        TrainItem(f"s{i}", str(i), prompt + c, len(prompt), b, 0, "self", temperature=temperature, top_p=top_p)
        for i, (c, b) in enumerate(zip(completions, behaviour, strict=True))
    ]
    batch = collate(items, pad_id=tokenizer.eos_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        logp = next_token_logprobs(logits, batch.targets)
        args = (logits, logp, batch.targets, batch.mask, batch.temperature, batch.top_p, batch.has_behavior)
        ratio_logp = sampling_logprobs(*args) if at_sampling else logp
    weights = []
    for level in ("token", "sequence"):
        spec = LossSpec("is", is_level=level, is_clip=1e6, is_clip_min=0.0)  # untruncated: the raw ratios
        weights.append(token_weights(logp, batch.behavior, batch.has_behavior, batch.mask, spec, ratio_logp)[0])
    sums = gap_sums(logp, ratio_logp, batch.behavior, batch.mask, batch.has_behavior, batch.stage)
    return weights[0][batch.mask > 0], weights[1][:, -1], sums


def _mean_ess(w: torch.Tensor) -> tuple[float, float]:
    return w.mean().item(), normalised_ess(w.sum().item(), (w**2).sum().item(), w.numel())


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_own_samples_have_weight_one_at_both_levels(policy, top_p: float) -> None:
    tokens, seq, sums = _weights(policy, 0.7, top_p)
    for mean, ess in (_mean_ess(tokens), _mean_ess(seq)):
        assert abs(mean - 1.0) <= 0.05 and ess >= 0.9
    # the trainer's online gap metrics say the same
    self_gap = gap_metrics(sums.tolist())["self"]
    assert abs(self_gap["is_ratio_mean"] - 1.0) <= 0.05 and self_gap["is_ratio_ess"] >= 0.9
    assert abs(self_gap["is_seq_ratio_mean"] - 1.0) <= 0.05 and self_gap["is_seq_ratio_ess"] >= 0.9


def test_temperature_one_ratios_collapse_on_the_same_samples(policy) -> None:
    # What the trainer did before: π_θ at T = 1 against behaviour at T = 0.7. The sequence weights of
    # the policy's own samples fall far from 1, which the test above would catch.
    _, seq, _ = _weights(policy, 0.7, 1.0, at_sampling=False)
    mean, ess = _mean_ess(seq)
    assert abs(mean - 1.0) > 0.05 and ess < 0.9


def test_sampled_token_logprobs_by_hand() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    targets = torch.tensor([0])
    # temperature only: softmax(log p / T)
    tempered = torch.softmax(logits / 0.5, dim=-1)
    assert sampled_token_logprobs(logits, targets, 0.5, 1.0).item() == pytest.approx(tempered[0, 0].log().item())
    # top-p 0.8: ascending cumulative mass 0.05, 0.2, 0.5, 1 — tokens at ≤ 0.2 are dropped, the
    # nucleus {0.5, 0.3} renormalises to 0.625 / 0.375 and the dropped ones are impossible
    nucleus = sampled_token_logprobs(logits.expand(4, 4), torch.arange(4), 1.0, 0.8)
    assert nucleus[:2].tolist() == pytest.approx([math.log(0.625), math.log(0.375)])
    assert nucleus[2:].tolist() == [-math.inf, -math.inf]
    # the most likely token always stays, however small top_p
    assert sampled_token_logprobs(logits, targets, 1.0, 0.01).item() == pytest.approx(0.0)
