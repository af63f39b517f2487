"""Loss functions as pure tensor code: per-token weights on −log π_θ(y_t) (always detached), KL to a reference.

Every function works on right-padded `[batch, length]` tensors of the completion positions: `logp` holds
log π_θ of the target tokens (with grad), `mask` is 1.0 on completion tokens (EOS included) and 0.0 on
padding and prompt. `micro_batch_terms` returns *sums*; the caller divides by the global batch's token
count, so micro-batches and ranks of different sizes still give the token mean of the whole batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from trainer.config import Fallback, IsLevel, LossName, TrainerConfig


@dataclass(frozen=True)
class LossSpec:
    """Which per-token weight to use and how; the loss part of TrainerConfig."""

    loss: LossName = "sft"
    is_level: IsLevel = "token"
    is_geometric: bool = False
    is_clip: float = 2.0
    expert_fallback: Fallback = "dft"
    kl_coef: float = 0.0

    @classmethod
    def from_config(cls, cfg: TrainerConfig) -> LossSpec:
        """The loss fields of a trainer config."""
        return cls(cfg.loss, cfg.is_level, cfg.is_geometric, cfg.is_clip, cfg.expert_fallback, cfg.kl_coef)


@dataclass
class LossTerms:
    """Sums over one micro-batch; all but `loss_sum` are detached statistics for logging."""

    loss_sum: Tensor  # Σ mask · example_weight · w · (−logp) + β Σ mask · k3 — the one term with grad
    tokens: Tensor  # Σ mask
    nll_sum: Tensor  # Σ mask · (−logp), unweighted
    kl_sum: Tensor  # Σ mask · k3 (0 without a reference)
    is_tokens: Tensor  # tokens whose weight is an importance ratio (records with behaviour log-probs)
    is_weight_sum: Tensor
    is_weight_sq_sum: Tensor
    is_weight_max: Tensor
    is_clipped: Tensor  # importance-weighted tokens whose ratio was truncated at C


def token_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    """log π(targets) from `[B, T, V]` logits and `[B, T]` target ids, computed in float32."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(π_θ ‖ π_ref) on tokens sampled from the data: e^d − d − 1, d = ref − logp (≥ 0)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def importance_log_ratio(logp: Tensor, behavior: Tensor, mask: Tensor, spec: LossSpec) -> Tensor:
    """log(π_θ / π_behaviour) per token, or the sequence's (geometric-mean) ratio broadcast to its tokens."""
    per_token = (logp.detach() - behavior) * mask
    if spec.is_level == "token":
        return per_token
    seq = per_token.sum(dim=-1, keepdim=True)
    if spec.is_geometric:
        seq = seq / mask.sum(dim=-1, keepdim=True).clamp(min=1)
    return seq.expand_as(per_token)


def token_weights(
    logp: Tensor, behavior: Tensor, has_behavior: Tensor, mask: Tensor, spec: LossSpec
) -> tuple[Tensor, Tensor]:
    """Detached per-token weights on −logp and a bool tensor marking importance ratios truncated at C."""
    probs = logp.detach().exp()
    if spec.loss == "sft":
        return torch.ones_like(probs), torch.zeros_like(mask, dtype=torch.bool)
    if spec.loss == "dft":
        return probs, torch.zeros_like(mask, dtype=torch.bool)
    log_ratio = importance_log_ratio(logp, behavior, mask, spec)
    log_clip = math.log(spec.is_clip)
    # Clamp in log space before exp: an unbounded sequence ratio overflows float32 otherwise.
    ratio = torch.exp(torch.clamp(log_ratio, max=log_clip))
    clipped = (log_ratio > log_clip) & has_behavior.unsqueeze(-1) & (mask > 0)
    fallback = probs if spec.expert_fallback == "dft" else torch.ones_like(probs)
    weights = torch.where(has_behavior.unsqueeze(-1), ratio, fallback)
    return weights.detach(), clipped


def micro_batch_terms(
    logp: Tensor,
    mask: Tensor,
    behavior: Tensor,
    has_behavior: Tensor,
    example_weight: Tensor,
    spec: LossSpec,
    ref_logp: Tensor | None = None,
) -> LossTerms:
    """Weighted NLL (+ β·k3 KL) summed over a micro-batch's completion tokens, with IS statistics."""
    weights, clipped = token_weights(logp, behavior, has_behavior, mask, spec)
    scale = mask * example_weight.unsqueeze(-1)
    loss_sum = (weights * scale * -logp).sum()
    kl_sum = torch.zeros((), dtype=logp.dtype, device=logp.device)
    if spec.kl_coef > 0:
        if ref_logp is None:
            raise ValueError("kl_coef > 0 needs the reference model's log-probabilities")
        kl = k3_kl(logp, ref_logp) * mask
        loss_sum = loss_sum + spec.kl_coef * kl.sum()
        kl_sum = kl.detach().sum()
    is_mask = (mask > 0) & has_behavior.unsqueeze(-1) if spec.loss == "is" else torch.zeros_like(mask, dtype=torch.bool)
    is_w = torch.where(is_mask, weights, torch.zeros_like(weights))
    return LossTerms(
        loss_sum=loss_sum,
        tokens=mask.sum().detach(),
        nll_sum=(-logp.detach() * mask).sum(),
        kl_sum=kl_sum,
        is_tokens=is_mask.sum().to(logp.dtype),
        is_weight_sum=is_w.sum(),
        is_weight_sq_sum=(is_w * is_w).sum(),
        is_weight_max=is_w.max() if is_w.numel() else torch.zeros((), dtype=logp.dtype),
        is_clipped=clipped.sum().to(logp.dtype),
    )


def normalised_ess(weight_sum: float, weight_sq_sum: float, n: float) -> float:
    """(Σw)² / (n Σw²): 1 for uniform weights, → 1/n when one weight dominates; 1 when there are none."""
    if n <= 0 or weight_sq_sum <= 0:
        return 1.0
    return weight_sum * weight_sum / (n * weight_sq_sum)
