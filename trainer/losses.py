"""Loss functions as pure tensor code: per-token weights on −log π_θ(y_t) (always detached), KL to a reference.

Every function works on right-padded `[batch, length]` tensors of the completion positions: `logp` holds
log π_θ of the target tokens (with grad), `mask` is 1.0 on completion tokens (EOS included) and 0.0 on
padding and prompt. `micro_batch_terms` returns *sums*; the caller divides by the global batch's token
count, so micro-batches and ranks of different sizes still give the token mean of the whole batch.

Importance ratios compare the policy with the distribution a record was *sampled* from: behaviour
log-probs are vLLM's processed log-probs (logits / T, then the top-p nucleus, renormalised), so the
policy side of the ratio is taken under the same transformation (`sampling_logprobs`), never at
temperature 1. On the policy's own samples, before any update, every ratio is then 1 (RL trainers such
as verl and prime-rl do the same). The loss itself always trains the temperature-1 log-probs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from shared.schema import Stage
from trainer.config import Fallback, IsLevel, LossName, TrainerConfig

STAGES = tuple(Stage)  # row order of `gap_sums`; a batch's `stage` tensor holds indices into it
LOW_PROB = 0.1  # `share_below_p`: tokens the policy gives less than this probability
# Raw ratios in the gap statistics are capped at e^±RATIO_LOG_CAP so sums of squares stay finite.
RATIO_LOG_CAP = 50.0
SAMPLED_POSITIONS_PER_PASS = 256  # `sampling_logprobs` works on this many positions of a row at a time


@dataclass(frozen=True)
class LossSpec:
    """Which per-token weight to use and how; the loss part of TrainerConfig."""

    loss: LossName = "sft"
    is_level: IsLevel = "token"
    is_geometric: bool = False
    is_clip: float = 2.0
    expert_fallback: Fallback = "dft"
    kl_coef: float = 0.0
    is_clip_min: float | None = None  # None: 1/is_clip at sequence level, 0 (no lower bound) at token level

    @classmethod
    def from_config(cls, cfg: TrainerConfig) -> LossSpec:
        """The loss fields of a trainer config."""
        return cls(
            cfg.loss, cfg.is_level, cfg.is_geometric, cfg.is_clip, cfg.expert_fallback, cfg.kl_coef, cfg.is_clip_min
        )

    def log_bounds(self) -> tuple[float, float]:
        """The truncation interval of importance weights, in log space: [log lower, log is_clip]."""
        low = self.is_clip_min
        if low is None:
            low = 1.0 / self.is_clip if self.is_level == "sequence" else 0.0
        return (math.log(low) if low > 0 else -math.inf), math.log(self.is_clip)


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
    is_clipped: Tensor  # importance-weighted tokens whose ratio was truncated (at either bound)


def token_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    """log π(targets) from `[B, T, V]` logits and `[B, T]` target ids, computed in float32."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def next_token_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    """`[B, L-1]` log π of the shifted targets from a causal LM's `[B, L, V]` logits (position j predicts j+1).

    The targets are padded by one instead of the logits being sliced to `[:, :-1]`: log_softmax then runs on
    the contiguous logits, where a slice would be copied first, and its backward would fill a second
    full-size `[B, L, V]` gradient. The last position's value is computed and dropped.
    """
    return token_logprobs(logits, torch.nn.functional.pad(targets, (0, 1)))[:, :-1]


def sampled_token_logprobs(logits: Tensor, targets: Tensor, temperature: float, top_p: float) -> Tensor:
    """log-probs of `targets` under the distribution a sampler draws from, in float32: softmax(logits / T)
    restricted to its top-`top_p` nucleus and renormalised, as vLLM's processed log-probs are.

    The nucleus is vLLM's: sort ascending, drop every token whose cumulative probability is ≤ 1 − top_p,
    always keep the most likely one. A target outside the nucleus gets −inf (the sampler could not draw it).
    """
    z = logits.float() / temperature
    if top_p < 1.0:
        ordered, order = z.sort(dim=-1)
        outside = ordered.softmax(dim=-1).cumsum(dim=-1) <= 1.0 - top_p
        outside[..., -1] = False
        z = z.scatter(-1, order, ordered.masked_fill(outside, -math.inf))
    return torch.log_softmax(z, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def sampling_logprobs(
    logits: Tensor, logp: Tensor, targets: Tensor, mask: Tensor, temperature: Tensor, top_p: Tensor, rows: Tensor
) -> Tensor:
    """Detached log π_θ of `targets` under each row's sampling distribution, on the rows marked in `rows`.

    Only completion positions of those rows are computed (0 elsewhere), so the extra softmax covers the
    importance-weighted tokens and nothing else; a row sampled at T = 1 without top-p reuses `logp`.
    `logits` may hold one more position than `targets` (a causal LM's last, which predicts nothing).
    A row's completion is one contiguous span of `mask` (as `collate` builds it). `mask`, `temperature`,
    `top_p` and `rows` are read on the host: pass them as CPU tensors and the loop never waits on a GPU.
    """
    out = torch.zeros_like(logp, dtype=torch.float32)
    mask, temperature, top_p = mask.cpu(), temperature.cpu(), top_p.cpu()
    with torch.no_grad():
        for i in rows.cpu().nonzero().flatten().tolist():
            t, p = float(temperature[i]), float(top_p[i])
            pos = (mask[i] > 0).nonzero().flatten()
            if not len(pos):
                continue
            start, end = int(pos[0]), int(pos[-1]) + 1
            if end - start != len(pos):
                raise ValueError(f"row {i}: completion positions are not one contiguous span")
            if t == 1.0 and p >= 1.0:
                out[i, start:end] = logp[i, start:end].detach().float()
                continue
            # In slices of positions: top-p sorts the vocabulary, and a few float32 and int64 copies of
            # [positions, vocabulary] would otherwise take gigabytes for a long response and a large vocabulary.
            for a in range(start, end, SAMPLED_POSITIONS_PER_PASS):
                b = min(end, a + SAMPLED_POSITIONS_PER_PASS)
                out[i, a:b] = sampled_token_logprobs(logits[i, a:b], targets[i, a:b], t, p)
    return out.to(logp.dtype)


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(π_θ ‖ π_ref) on tokens sampled from the data: e^d − d − 1, d = ref − logp (≥ 0)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def importance_log_ratio(ratio_logp: Tensor, behavior: Tensor, mask: Tensor, spec: LossSpec) -> Tensor:
    """log(π_θ / π_behaviour) per token, or the sequence's (geometric-mean) ratio broadcast to its tokens.

    `ratio_logp` is log π_θ under the record's sampling distribution (`sampling_logprobs`).
    """
    per_token = torch.where(mask > 0, ratio_logp.detach() - behavior, torch.zeros_like(behavior))
    if spec.is_level == "token":
        return per_token
    seq = per_token.sum(dim=-1, keepdim=True)
    if spec.is_geometric:
        seq = seq / mask.sum(dim=-1, keepdim=True).clamp(min=1)
    return seq.expand_as(per_token)


def token_weights(
    logp: Tensor,
    behavior: Tensor,
    has_behavior: Tensor,
    mask: Tensor,
    spec: LossSpec,
    ratio_logp: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Detached per-token weights on −logp and a bool tensor marking importance ratios that were truncated.

    `ratio_logp` (default `logp`: records sampled at temperature 1) is what the ratio compares with the
    behaviour log-probs. Ratios are truncated to `spec.log_bounds()`: above at C always; below at
    `is_clip_min`, by default 1/C at sequence level, where a long response's ratio would otherwise drift to
    0 and silently drop the sample.
    """
    probs = logp.detach().exp()
    if spec.loss == "sft":
        return torch.ones_like(probs), torch.zeros_like(mask, dtype=torch.bool)
    if spec.loss == "dft":
        return probs, torch.zeros_like(mask, dtype=torch.bool)
    log_ratio = importance_log_ratio(logp if ratio_logp is None else ratio_logp, behavior, mask, spec)
    low, high = spec.log_bounds()
    # Clamp in log space before exp: an unbounded sequence ratio overflows float32 otherwise.
    ratio = torch.exp(torch.clamp(log_ratio, min=low, max=high))
    clipped = ((log_ratio > high) | (log_ratio < low)) & has_behavior.unsqueeze(-1) & (mask > 0)
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
    ratio_logp: Tensor | None = None,
) -> LossTerms:
    """Weighted NLL (+ β·k3 KL) summed over a micro-batch's completion tokens, with IS statistics."""
    weights, clipped = token_weights(logp, behavior, has_behavior, mask, spec, ratio_logp)
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
        is_weight_max=is_w.max() if is_w.numel() else torch.zeros((), dtype=logp.dtype, device=logp.device),
        is_clipped=clipped.sum().to(logp.dtype),
    )


def normalised_ess(weight_sum: float, weight_sq_sum: float, n: float) -> float:
    """(Σw)² / (n Σw²): 1 for uniform weights, → 1/n when one weight dominates; 1 when there are none."""
    if n <= 0 or weight_sq_sum <= 0:
        return 1.0
    return weight_sum * weight_sum / (n * weight_sq_sum)


GAP_FIELDS = (
    "tokens",
    "nll_sum",
    "below_p",
    "ratio_tokens",
    "ratio_sum",
    "ratio_sq_sum",
    "sequences",
    "seq_ratio_sum",
    "seq_ratio_sq_sum",
)


def gap_sums(
    logp: Tensor, ratio_logp: Tensor, behavior: Tensor, mask: Tensor, has_behavior: Tensor, stage: Tensor
) -> Tensor:
    """Per-stage sums behind the online policy-gap metrics, `[len(STAGES), len(GAP_FIELDS)]` in float64.

    From log-probs the step computes anyway: token NLL and the count of tokens below `LOW_PROB` (both at
    temperature 1, the gap report's definitions), and the raw (untruncated) importance ratios of records
    with behaviour log-probs, per token and per sequence, against `ratio_logp`. Sums, so micro-batches
    and ranks add up before `gap_metrics` divides.
    """
    m = (mask > 0).double()
    lp = logp.detach().double()
    has = has_behavior.double()
    log_ratio = torch.where(mask > 0, ratio_logp.detach().double() - behavior.double(), torch.zeros_like(lp))
    token_ratio = torch.exp(log_ratio.clamp(-RATIO_LOG_CAP, RATIO_LOG_CAP)) * m
    seq_ratio = torch.exp(log_ratio.sum(dim=-1).clamp(-RATIO_LOG_CAP, RATIO_LOG_CAP))
    real = m.sum(dim=-1) > 0  # a zero-weight stand-in row has no completion tokens
    seq_has = has * real.double()
    per_row = torch.stack(
        [
            m.sum(dim=-1),
            (-lp * m).sum(dim=-1),
            ((lp < math.log(LOW_PROB)).double() * m).sum(dim=-1),
            m.sum(dim=-1) * has,
            token_ratio.sum(dim=-1) * has,
            (token_ratio * token_ratio).sum(dim=-1) * has,
            seq_has,
            seq_ratio * seq_has,
            seq_ratio * seq_ratio * seq_has,
        ],
        dim=-1,
    )  # [B, len(GAP_FIELDS)]
    out = torch.zeros(len(STAGES), len(GAP_FIELDS), dtype=torch.float64, device=per_row.device)
    return out.index_add_(0, stage.to(per_row.device).long(), per_row)


def gap_metrics(sums: Sequence[Sequence[float]]) -> dict[str, dict[str, float]]:
    """Per-stage policy-gap metrics from summed `gap_sums` rows; stages without tokens are left out.

    `nll`: mean token NLL; `share_below_p`: share of tokens with π_θ(y_t) < `LOW_PROB`; `is_ratio_mean`/
    `is_ratio_ess`: mean and normalised ESS of the raw token ratios; `is_seq_ratio_mean`/`is_seq_ratio_ess`:
    the same over whole-sequence ratios (stages with behaviour log-probs only).
    """
    out: dict[str, dict[str, float]] = {}
    for stage, row in zip(STAGES, sums, strict=True):
        f = dict(zip(GAP_FIELDS, row, strict=True))
        if f["tokens"] <= 0:
            continue
        m = {"nll": f["nll_sum"] / f["tokens"], "share_below_p": f["below_p"] / f["tokens"]}
        if f["ratio_tokens"] > 0:
            m["is_ratio_mean"] = f["ratio_sum"] / f["ratio_tokens"]
            m["is_ratio_ess"] = normalised_ess(f["ratio_sum"], f["ratio_sq_sum"], f["ratio_tokens"])
            m["is_seq_ratio_mean"] = f["seq_ratio_sum"] / f["sequences"]
            m["is_seq_ratio_ess"] = normalised_ess(f["seq_ratio_sum"], f["seq_ratio_sq_sum"], f["sequences"])
        out[stage.value] = m
    return out
