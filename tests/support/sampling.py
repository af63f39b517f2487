"""Sampling from a transformers model the way vLLM samples: logits / T, then the top-p nucleus, renormalised.

Written independently of `trainer.losses.sampled_token_logprobs` (a descending nucleus instead of vLLM's
ascending mask), so tests that compare the two check one against the other.
"""

from __future__ import annotations

from typing import Any

import torch


def sampler_logprobs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """log-probs of the sampling distribution over the whole vocabulary (−inf outside the nucleus)."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    desc, order = probs.sort(dim=-1, descending=True)
    mass_before = desc.cumsum(dim=-1) - desc  # probability of the strictly more likely tokens
    keep = torch.zeros_like(mass_before, dtype=torch.bool).scatter(-1, order, mass_before < top_p)
    kept = torch.where(keep, probs, torch.zeros_like(probs))
    return (kept / kept.sum(dim=-1, keepdim=True)).log()


def draw(
    model: Any, prompt: list[int], temperature: float, top_p: float, n: int, length: int, seed: int = 7
) -> tuple[list[list[int]], list[list[float]]]:
    """`n` completions of `length` tokens after `prompt` and their behaviour log-probs (vLLM's processed ones)."""
    gen = torch.Generator().manual_seed(seed)
    step_ids, past = torch.tensor([prompt] * n), None
    tokens, behaviour = [], []
    with torch.no_grad():
        for _ in range(length):
            out = model(input_ids=step_ids, past_key_values=past, use_cache=True, logits_to_keep=1)
            logprobs = sampler_logprobs(out.logits[:, -1], temperature, top_p)
            step_ids, past = torch.multinomial(logprobs.exp(), 1, generator=gen), out.past_key_values
            tokens.append(step_ids.squeeze(-1))
            behaviour.append(logprobs.gather(-1, step_ids).squeeze(-1))
    return torch.stack(tokens, dim=-1).tolist(), torch.stack(behaviour, dim=-1).tolist()
