"""mindgap.evaluation.estimators against hand-computed numbers."""

from __future__ import annotations

import math

import pytest

from mindgap.evaluation import estimators as stats


def test_pass_at_k_matches_hand_computed_binomials() -> None:
    assert stats.pass_at_k(4, 2, 1) == pytest.approx(0.5)
    assert stats.pass_at_k(4, 2, 2) == pytest.approx(1 - 1 / 6)  # 1 − C(2,2)/C(4,2)
    assert stats.pass_at_k(4, 2, 3) == 1.0  # fewer wrong samples than k: always a hit
    assert stats.pass_at_k(5, 0, 3) == 0.0
    assert stats.pass_at_k(10, 3, 4) == pytest.approx(1 - math.comb(7, 4) / math.comb(10, 4))


@pytest.mark.parametrize(("n", "c", "k"), [(0, 0, 1), (4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)])
def test_pass_at_k_rejects_impossible_counts(n: int, c: int, k: int) -> None:
    with pytest.raises(ValueError):
        stats.pass_at_k(n, c, k)


def test_accuracy_avg_and_pass_at_k() -> None:
    correct = [[True, False, False, False], [True, True, True, True], [False, False, False, False]]
    acc = stats.accuracy(correct)
    assert acc.problems == 3 and acc.n == 4
    assert acc.avg_at_n == pytest.approx(5 / 12)
    assert list(acc.pass_at_k) == [1, 2, 4]
    assert acc.pass_at_k[1] == pytest.approx(5 / 12)  # pass@1 equals avg@n
    assert acc.pass_at_k[2] == pytest.approx((0.5 + 1 + 0) / 3)  # 1 − C(3,2)/C(4,2) = 0.5 for the first
    assert acc.pass_at_k[4] == pytest.approx(2 / 3)
    assert acc.to_json()["pass_at_k"] == {"1": acc.pass_at_k[1], "2": acc.pass_at_k[2], "4": acc.pass_at_k[4]}


def test_accuracy_rejects_ragged_or_empty_input() -> None:
    with pytest.raises(ValueError, match="same"):
        stats.accuracy([[True], [True, False]])
    with pytest.raises(ValueError, match="no problems"):
        stats.accuracy([])


def test_default_ks() -> None:
    assert stats.default_ks(1) == [1]
    assert stats.default_ks(16) == [1, 2, 4, 8, 16]
    assert stats.default_ks(6) == [1, 2, 4, 6]


def test_accuracy_by_subject_groups_and_skips_unlabelled() -> None:
    correct = [[True, True], [False, False], [True, False], [True, True]]
    by = stats.accuracy_by_subject(correct, ["b", "a", "b", None])
    assert list(by) == ["a", "b"]
    assert by["a"].avg_at_n == 0.0 and by["a"].problems == 1
    assert by["b"].avg_at_n == pytest.approx(3 / 4)
    assert by["b"].pass_at_k[2] == 1.0
    with pytest.raises(ValueError, match="subject"):
        stats.accuracy_by_subject(correct, ["a"])


def test_token_stats_by_hand() -> None:
    ts = stats.token_stats([[math.log(0.5), math.log(0.5)], [math.log(0.05)], []])
    assert ts.sequences == 2 and ts.tokens == 3
    assert ts.mean_nll == pytest.approx((2 * math.log(2) + math.log(20)) / 3)
    assert ts.mean_sequence_nll == pytest.approx((math.log(2) + math.log(20)) / 2)
    assert ts.share_below_p == pytest.approx(1 / 3)
    assert ts.quantiles["p50"] == pytest.approx(math.log(0.5))
    assert sum(ts.histogram) == 3
    assert len(ts.histogram) == len(stats.histogram_edges()) - 1
    with pytest.raises(ValueError, match="no tokens"):
        stats.token_stats([[]])


def test_histogram_clips_into_end_bins() -> None:
    assert stats.histogram_edges(-2.0, 1.0) == [-2.0, -1.0, 0.0]
    assert stats.histogram([-5.0, -1.5, -0.5, -0.2, 0.0], [-2.0, -1.0, 0.0]) == [2, 3]


def test_sequence_log_ratio() -> None:
    assert stats.sequence_log_ratio([-1.0, -2.0], [-1.5, -1.0]) == pytest.approx(-0.5)
    with pytest.raises(ValueError, match="behaviour"):
        stats.sequence_log_ratio([-1.0], [-1.0, -2.0])


def test_normalised_ess_by_hand_and_stable_far_below_underflow() -> None:
    # w = (1, 1, 2): (Σw)² / (n Σw²) = 16 / (3 · 6)
    assert stats.normalised_ess([0.0, 0.0, math.log(2)]) == pytest.approx(8 / 9)
    # the same weights scaled by e^-1000: exp() underflows to 0, the log-space form does not care
    assert stats.normalised_ess([-1000.0, -1000.0, -1000.0 + math.log(2)]) == pytest.approx(8 / 9)
    assert stats.normalised_ess([5.0] * 7) == pytest.approx(1.0)
    assert stats.normalised_ess([0.0, -math.inf]) == pytest.approx(0.5)
    assert stats.normalised_ess([0.0, -800.0, -900.0, -750.0]) == pytest.approx(0.25)  # one weight dominates
    with pytest.raises(ValueError):
        stats.normalised_ess([])
    with pytest.raises(ValueError):
        stats.normalised_ess([-math.inf, -math.inf])
    with pytest.raises(ValueError):
        stats.normalised_ess([math.nan])


def test_weight_stats() -> None:
    ws = stats.weight_stats([0.0, 0.0, math.log(2)])
    assert ws.sequences == 3
    assert ws.mean == pytest.approx(math.log(2) / 3)
    assert ws.min == 0.0 and ws.max == pytest.approx(math.log(2)) and ws.median == 0.0
    assert ws.ess == pytest.approx(8 / 9)
    assert stats.as_json(ws)["ess"] == ws.ess


def test_log_sum_exp() -> None:
    assert stats.log_sum_exp([]) == -math.inf
    assert stats.log_sum_exp([math.log(1), math.log(3)]) == pytest.approx(math.log(4))
    assert stats.log_sum_exp([-1e4, -1e4]) == pytest.approx(-1e4 + math.log(2))


# ------------------------------------------------------------------------------ confidence intervals


def test_problem_scores_and_avg_interval_match_avg_at_n() -> None:
    correct = [[True, False, False, False], [True, True, True, True], [False, False, False, False]]
    assert stats.problem_scores(correct) == [0.25, 1.0, 0.0]
    iv = stats.avg_at_n_interval(correct)
    assert iv.value == pytest.approx(stats.accuracy(correct).avg_at_n)
    assert 0.0 <= iv.low <= iv.value <= iv.high <= 1.0 and iv.level == 0.95
    with pytest.raises(ValueError, match="at least one sample"):
        stats.problem_scores([[True], []])


def test_bootstrap_mean_constant_values_give_a_point_and_seeds_repeat() -> None:
    iv = stats.bootstrap_mean([0.5] * 10)
    assert (iv.value, iv.low, iv.high) == (0.5, 0.5, 0.5)
    values = [0.0, 0.25, 1.0, 0.75, 0.5, 0.0, 1.0]
    assert stats.bootstrap_mean(values, seed=3) == stats.bootstrap_mean(values, seed=3)
    assert stats.bootstrap_mean(values).to_json().keys() == {"value", "low", "high", "level"}
    with pytest.raises(ValueError, match="no values"):
        stats.bootstrap_mean([])
    with pytest.raises(ValueError, match="level"):
        stats.bootstrap_mean(values, level=1.0)


def test_bootstrap_width_matches_the_normal_approximation() -> None:
    # 400 problems, 30 % solved: the 95 % interval is about ±1.96·sqrt(0.3·0.7/400) = ±0.045
    values = [1.0] * 120 + [0.0] * 280
    iv = stats.bootstrap_mean(values, resamples=4000)
    half = 1.96 * math.sqrt(0.3 * 0.7 / 400)
    assert iv.value == pytest.approx(0.3)
    assert (iv.high - iv.low) / 2 == pytest.approx(half, rel=0.15)
    assert iv.low < 0.3 < iv.high
    narrow = stats.bootstrap_mean(values, level=0.5)
    assert narrow.high - narrow.low < iv.high - iv.low


def test_paired_difference_removes_shared_problem_variance() -> None:
    a = [0.0, 1.0, 0.25, 1.0, 0.0, 0.75, 1.0, 0.0] * 10
    b = [x - 0.125 if x > 0.5 else x for x in a]  # the same problems easy, b slightly worse on the easy ones
    diff = stats.paired_difference(a, b)
    assert diff.value == pytest.approx(sum(x - y for x, y in zip(a, b, strict=True)) / len(a))
    assert diff.low > 0  # pairing sees the consistent gain ...
    ia, ib = stats.bootstrap_mean(a), stats.bootstrap_mean(b)
    assert ia.low < ib.high  # ... that two separate intervals cannot tell apart
    assert stats.paired_difference(a, a).to_json() == {"value": 0.0, "low": 0.0, "high": 0.0, "level": 0.95}
    with pytest.raises(ValueError, match="same problems"):
        stats.paired_difference([1.0], [1.0, 0.0])


def test_mean_over_seeds_averages_per_problem() -> None:
    assert stats.mean_over_seeds([[0.0, 1.0, 0.5], [1.0, 1.0, 0.0]]) == [0.5, 1.0, 0.25]
    with pytest.raises(ValueError, match="same problems"):
        stats.mean_over_seeds([[0.0], [1.0, 0.0]])
    with pytest.raises(ValueError, match="no seeds"):
        stats.mean_over_seeds([])


def test_sampled_kl_by_hand() -> None:
    ref = [[-1.0, -2.0], [-0.5]]
    other = [[-1.5, -2.0], [-1.0]]
    assert stats.sampled_kl(ref, other) == pytest.approx((0.5 + 0.0 + 0.5) / 3)  # token-weighted
    assert stats.sampled_kl(ref, ref) == 0.0
    with pytest.raises(ValueError, match="same number"):
        stats.sampled_kl([[-1.0]], [[-1.0, -2.0]])
    with pytest.raises(ValueError, match="reference sequences"):
        stats.sampled_kl([[-1.0]], [])
    with pytest.raises(ValueError, match="no tokens"):
        stats.sampled_kl([[]], [[]])
