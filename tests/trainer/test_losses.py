"""Loss functions against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.losses import (
    LossSpec,
    gap_metrics,
    gap_sums,
    k3_kl,
    micro_batch_terms,
    next_token_logprobs,
    normalised_ess,
    sampling_logprobs,
    token_logprobs,
    token_weights,
)


def _terms(logp, behavior, spec, has_behavior=None, mask=None, weight=None, ref=None):
    mask = torch.ones_like(logp) if mask is None else mask
    has = torch.ones(logp.shape[0], dtype=torch.bool) if has_behavior is None else has_behavior
    weight = torch.ones(logp.shape[0]) if weight is None else weight
    return micro_batch_terms(logp, mask, behavior, has, weight, spec, ref)


def _leaf(values):
    return torch.tensor(values, dtype=torch.float64, requires_grad=True)


def test_sft_is_token_mean_nll():
    logp = _leaf([[math.log(0.5), math.log(0.25)]])
    t = _terms(logp, torch.zeros_like(logp), LossSpec("sft"))
    assert t.loss_sum.item() == pytest.approx(math.log(2) + math.log(4))
    assert t.tokens.item() == 2


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("clip", [1.0, 3.0])
def test_is_equals_sft_when_target_matches_behaviour(level, clip):
    logp_sft = _leaf([[-0.3, -1.2, -2.0], [-0.7, -0.1, -4.0]])
    logp_is = _leaf(logp_sft.tolist())
    behavior = logp_sft.detach().clone()
    sft = _terms(logp_sft, behavior, LossSpec("sft"))
    is_ = _terms(logp_is, behavior, LossSpec("is", is_level=level, is_clip=clip))
    assert is_.loss_sum.item() == pytest.approx(sft.loss_sum.item())
    sft.loss_sum.backward()
    is_.loss_sum.backward()
    assert torch.allclose(logp_sft.grad, logp_is.grad)
    assert is_.is_clipped.item() == 0


def test_dft_weights_are_detached_token_probabilities():
    p = torch.tensor([[0.5, 0.25]], dtype=torch.float64)
    logp = _leaf(p.log().tolist())
    t = _terms(logp, torch.zeros_like(logp), LossSpec("dft"))
    assert t.loss_sum.item() == pytest.approx(0.5 * math.log(2) + 0.25 * math.log(4))
    t.loss_sum.backward()
    # d/dlogp of −p·logp with p detached is −p; had the weight kept its graph it would be −p(1 + logp).
    assert torch.allclose(logp.grad, -p)
    w, _ = token_weights(
        logp, torch.zeros_like(logp), torch.ones(1, dtype=torch.bool), torch.ones_like(logp), LossSpec("dft")
    )
    assert not w.requires_grad


def test_token_level_clipping():
    logp = _leaf([[-1.0, -1.0, -1.0]])
    behavior = torch.tensor([[-1.0, -3.0, -1.5]], dtype=torch.float64)  # ratios e^0, e^2, e^0.5
    w, clipped = token_weights(
        logp, behavior, torch.ones(1, dtype=torch.bool), torch.ones_like(logp), LossSpec("is", is_clip=2.0)
    )
    assert w.tolist()[0] == pytest.approx([1.0, 2.0, math.exp(0.5)])
    assert clipped.tolist() == [[False, True, False]]
    t = _terms(logp, behavior, LossSpec("is", is_clip=2.0))
    assert t.is_clipped.item() == 1
    assert t.is_weight_max.item() == pytest.approx(2.0)
    assert t.is_weight_sum.item() == pytest.approx(3.0 + math.exp(0.5))


def test_sequence_level_and_geometric_mean():
    logp = _leaf([[-1.0, -2.0, 0.0]])
    behavior = torch.tensor([[-1.1, -2.2, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)  # last position is padding
    has = torch.ones(1, dtype=torch.bool)
    w, _ = token_weights(logp, behavior, has, mask, LossSpec("is", is_level="sequence", is_clip=10.0))
    assert w[0, :2].tolist() == pytest.approx([math.exp(0.3)] * 2)
    g, _ = token_weights(
        logp, behavior, has, mask, LossSpec("is", is_level="sequence", is_geometric=True, is_clip=10.0)
    )
    assert g[0, :2].tolist() == pytest.approx([math.exp(0.15)] * 2)
    c, clipped = token_weights(logp, behavior, has, mask, LossSpec("is", is_level="sequence", is_clip=1.2))
    assert c[0, :2].tolist() == pytest.approx([1.2, 1.2])
    assert clipped.tolist() == [[True, True, False]]


def test_sequence_ratio_does_not_overflow():
    logp = _leaf([[0.0] * 200])
    behavior = torch.full((1, 200), -50.0, dtype=torch.float64)
    w, _ = token_weights(
        logp,
        behavior,
        torch.ones(1, dtype=torch.bool),
        torch.ones_like(logp),
        LossSpec("is", is_level="sequence", is_clip=5.0),
    )
    assert torch.isfinite(w).all() and w.max().item() == pytest.approx(5.0)


@pytest.mark.parametrize(("fallback", "expected"), [("dft", [0.5, 0.25]), ("sft", [1.0, 1.0])])
def test_expert_records_fall_back(fallback, expected):
    logp = _leaf([[math.log(0.5), math.log(0.25)], [math.log(0.5), math.log(0.25)]])
    behavior = torch.tensor([[math.log(0.5), math.log(0.5)], [0.0, 0.0]], dtype=torch.float64)
    has = torch.tensor([True, False])
    spec = LossSpec("is", is_clip=4.0, expert_fallback=fallback)
    w, _ = token_weights(logp, behavior, has, torch.ones_like(logp), spec)
    assert w[0].tolist() == pytest.approx([1.0, 0.5])
    assert w[1].tolist() == pytest.approx(expected)
    t = _terms(logp, behavior, spec, has_behavior=has)
    assert t.is_tokens.item() == 2  # only the record with behaviour log-probs has importance ratios


def test_k3_kl():
    logp = torch.randn(64, dtype=torch.float64)
    ref = torch.randn(64, dtype=torch.float64)
    assert (k3_kl(logp, ref) >= 0).all()
    assert torch.equal(k3_kl(logp, logp), torch.zeros(64, dtype=torch.float64))
    assert k3_kl(torch.tensor(0.0), torch.tensor(1.0)).item() == pytest.approx(math.e - 2)


def test_kl_term_adds_beta_times_k3_and_needs_reference():
    logp = _leaf([[-1.0, -2.0]])
    ref = torch.tensor([[-1.0, -1.0]], dtype=torch.float64)
    spec = LossSpec("sft", kl_coef=0.5)
    t = _terms(logp, torch.zeros_like(logp), spec, ref=ref)
    assert t.kl_sum.item() == pytest.approx(math.e - 2)
    assert t.loss_sum.item() == pytest.approx(3.0 + 0.5 * (math.e - 2))
    with pytest.raises(ValueError, match="reference"):
        _terms(logp, torch.zeros_like(logp), spec)


def test_example_weight_scales_its_tokens():
    logp = _leaf([[-1.0], [-2.0]])
    t = _terms(logp, torch.zeros_like(logp), LossSpec("sft"), weight=torch.tensor([1.0, 0.25], dtype=torch.float64))
    assert t.loss_sum.item() == pytest.approx(1.0 + 0.5)


def test_global_token_mean_is_independent_of_micro_batching():
    """Σ micro-batch sums / global token count == the loss of the whole batch, values and gradients."""
    torch.manual_seed(0)
    vocab, lengths = 11, [3, 7, 2, 5]
    logits = torch.randn(len(lengths), max(lengths), vocab, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(vocab, (len(lengths), max(lengths)))
    mask = torch.zeros(len(lengths), max(lengths), dtype=torch.float64)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    behavior = torch.randn(len(lengths), max(lengths), dtype=torch.float64) - 2
    spec = LossSpec("is", is_clip=3.0)
    n_tokens = sum(lengths)

    def loss(rows):
        t = _terms(token_logprobs(logits[rows], targets[rows]), behavior[rows], spec, mask=mask[rows])
        return t.loss_sum / n_tokens

    whole = loss([0, 1, 2, 3])
    (grad_whole,) = torch.autograd.grad(whole, logits)
    split = loss([0]) + loss([1, 2]) + loss([3])
    (grad_split,) = torch.autograd.grad(split, logits)
    assert split.item() == pytest.approx(whole.item())
    assert torch.allclose(grad_split, grad_whole)
    # Averaging per-micro-batch means instead would weight the short sequences differently:
    means = [_terms(token_logprobs(logits[r], targets[r]), behavior[r], spec, mask=mask[r]) for r in ([0], [1, 2], [3])]
    naive = sum((m.loss_sum / m.tokens).item() for m in means) / 3
    assert naive != pytest.approx(whole.item())


def test_normalised_ess():
    assert normalised_ess(4.0, 4.0, 4) == pytest.approx(1.0)  # four weights of 1
    assert normalised_ess(1.0, 1.0, 4) == pytest.approx(0.25)  # one weight carries everything
    assert normalised_ess(0.0, 0.0, 0) == 1.0


def test_sequence_weights_are_truncated_from_below_by_default():
    logp = _leaf([[-1.0, -1.0], [-1.0, -1.0]])
    behavior = torch.tensor([[-0.5, -0.5], [-1.0, -1.25]], dtype=torch.float64)  # sequence ratios e^-1, e^0.25
    has, mask = torch.ones(2, dtype=torch.bool), torch.ones_like(logp)
    w, clipped = token_weights(logp, behavior, has, mask, LossSpec("is", is_level="sequence", is_clip=2.0))
    assert w[:, 0].tolist() == pytest.approx([0.5, math.exp(0.25)])  # e^-1 < 1/C = 0.5 is raised to it
    assert clipped.tolist() == [[True, True], [False, False]]
    # token level has no lower bound unless asked for one
    tok, _ = token_weights(logp, behavior, has, mask, LossSpec("is", is_clip=2.0))
    assert tok[0].tolist() == pytest.approx([math.exp(-0.5)] * 2)
    low, _ = token_weights(logp, behavior, has, mask, LossSpec("is", is_clip=2.0, is_clip_min=0.8))
    assert low[0].tolist() == pytest.approx([0.8, 0.8])


def test_ratio_uses_the_sampling_log_probs_when_given():
    logp = _leaf([[-2.0, -2.0]])
    behavior = torch.tensor([[-1.0, -1.5]], dtype=torch.float64)
    at_sampling = torch.tensor([[-1.0, -1.5]], dtype=torch.float64)  # log π_θ at the record's temperature
    has, mask = torch.ones(1, dtype=torch.bool), torch.ones_like(logp)
    spec = LossSpec("is", is_clip=2.0)
    assert token_weights(logp, behavior, has, mask, spec, at_sampling)[0].tolist() == [[1.0, 1.0]]
    t = micro_batch_terms(logp, mask, behavior, has, torch.ones(1), spec, None, at_sampling)
    assert t.loss_sum.item() == pytest.approx(4.0)  # weight 1 on the temperature-1 NLL 2 + 2


def test_gap_metrics_by_hand():
    # rows: a self record (2 tokens), an expert record (1 token), a zero-weight stand-in (no tokens)
    logp = torch.tensor([[math.log(0.5), math.log(0.05)], [math.log(0.2), 0.0], [0.0, 0.0]], dtype=torch.float64)
    ratio_logp = torch.tensor([[math.log(0.5), math.log(0.1)], [0.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    behavior = torch.tensor([[math.log(0.25), math.log(0.1)], [0.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    has = torch.tensor([True, False, True])
    stage = torch.tensor([0, 2, 1])  # self, expert, guided
    m = gap_metrics(gap_sums(logp, ratio_logp, behavior, mask, has, stage).tolist())
    assert set(m) == {"self", "expert"}  # the stand-in adds nothing, not even an empty guided entry
    assert m["self"]["nll"] == pytest.approx((math.log(2) + math.log(20)) / 2)
    assert m["self"]["share_below_p"] == 0.5  # 0.05 < 0.1
    # token ratios 2 and 1; the sequence ratio 2
    assert m["self"]["is_ratio_mean"] == pytest.approx(1.5)
    assert m["self"]["is_ratio_ess"] == pytest.approx(9 / (2 * 5))
    assert m["self"]["is_seq_ratio_mean"] == pytest.approx(2.0) and m["self"]["is_seq_ratio_ess"] == 1.0
    assert m["expert"] == pytest.approx({"nll": math.log(5), "share_below_p": 0.0})


def test_next_token_logprobs_equal_the_sliced_logits_with_the_same_gradient():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 7, (2, 4))
    ours = next_token_logprobs(logits, targets)
    sliced = token_logprobs(logits[:, :-1], targets)
    assert ours.shape == (2, 4) and torch.allclose(ours, sliced)
    (g_ours,) = torch.autograd.grad(ours.sum(), logits)
    (g_sliced,) = torch.autograd.grad(sliced.sum(), logits)
    assert torch.allclose(g_ours, g_sliced) and not g_ours[:, -1].any()  # the last position gets no gradient


def test_sampling_logprobs_reads_one_completion_span_per_row():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 9)  # one position more than the targets, as a causal LM returns
    targets = torch.randint(0, 9, (2, 5))
    logp = next_token_logprobs(logits, targets)
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]], dtype=torch.float32)
    temperature, top_p = torch.tensor([0.7, 1.0]), torch.tensor([1.0, 1.0])
    out = sampling_logprobs(logits, logp, targets, mask, temperature, top_p, torch.tensor([True, True]))
    tempered = torch.log_softmax(logits[0, 1:4] / 0.7, dim=-1).gather(-1, targets[0, 1:4, None]).squeeze(-1)
    assert torch.allclose(out[0, 1:4], tempered) and out[0, 0] == 0 and out[0, 4] == 0
    assert torch.allclose(out[1, 2:5], logp[1, 2:5])  # T = 1, no top-p: the training log-probs
    gapped = torch.tensor([[0, 1, 0, 1, 0], [0, 0, 1, 1, 1]], dtype=torch.float32)
    with pytest.raises(ValueError, match="row 0: completion positions are not one contiguous span"):
        sampling_logprobs(logits, logp, targets, gapped, temperature, top_p, torch.tensor([True, False]))
