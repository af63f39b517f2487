"""Pure statistics for evaluation and the policy-gap report: accuracy estimators and log-prob summaries.

Everything here works on plain lists of booleans or floats, so it is tested against hand-computed
numbers and reused by `mindgap eval`, `mindgap gap` and the reproduction script.

Accuracy (`n` samples per problem, `c` of them correct):
  - avg@n  = mean over problems of c / n (the papers' "accuracy at temperature T, n samples");
  - pass@k = mean over problems of the unbiased estimator 1 − C(n−c, k) / C(n, k) (Chen et al. 2021).

Uncertainty: avg@n gets a percentile-bootstrap CI over problems (a problem's n samples stay together),
and two models evaluated on the same problems get a paired bootstrap CI for their difference.

Importance weights: sequence weights are handled as log-weights throughout, because a response of a
few hundred tokens easily has log w ≈ −300, far below float underflow; the normalised effective sample
size `(Σw)² / (n Σw²)` is therefore computed with log-sum-exp.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

LOW_PROB = 0.1  # tokens the model gives probability below this count as "surprising" in the gap report
HIST_MIN = -20.0  # histogram floor for token log-probs: anything lower lands in the first bin
HIST_BIN_WIDTH = 0.5


# ------------------------------------------------------------------------------------------- accuracy


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with `c` correct out of `n` samples: 1 − C(n−c, k) / C(n, k)."""
    if n < 1 or not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n and n >= 1, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n={n}], got {k}")
    if n - c < k:
        return 1.0
    # C(n−c, k)/C(n, k) = Π_{i=n−c+1}^{n} (1 − k/i): a product of ratios, no huge binomials.
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def default_ks(n: int) -> list[int]:
    """The k values reported for `n` samples: powers of two below n, and n itself."""
    ks = [k for k in (1, 2, 4, 8, 16, 32, 64, 128, 256) if k < n]
    return [*ks, n]


@dataclass(frozen=True)
class Accuracy:
    """avg@n and pass@k over a set of problems that each have the same number of samples `n`."""

    problems: int
    n: int
    avg_at_n: float
    pass_at_k: dict[int, float]

    def to_json(self) -> dict[str, Any]:
        """Plain JSON data (k values as string keys)."""
        return {
            "problems": self.problems,
            "n": self.n,
            "avg_at_n": self.avg_at_n,
            "pass_at_k": {str(k): v for k, v in self.pass_at_k.items()},
        }


def accuracy(correct: Sequence[Sequence[bool]], ks: Sequence[int] | None = None) -> Accuracy:
    """avg@n and unbiased pass@k from per-problem lists of per-sample correctness (equal lengths)."""
    if not correct:
        raise ValueError("no problems to score")
    n = len(correct[0])
    if n == 0 or any(len(row) != n for row in correct):
        raise ValueError("every problem needs the same, non-zero number of samples")
    counts = [sum(bool(x) for x in row) for row in correct]
    k_values = list(ks) if ks is not None else default_ks(n)
    return Accuracy(
        problems=len(correct),
        n=n,
        avg_at_n=sum(counts) / (n * len(correct)),
        pass_at_k={k: sum(pass_at_k(n, c, k) for c in counts) / len(counts) for k in k_values},
    )


def accuracy_by_subject(
    correct: Sequence[Sequence[bool]], subjects: Sequence[str | None], ks: Sequence[int] | None = None
) -> dict[str, Accuracy]:
    """`accuracy` per subject label (sorted by name); problems without a subject are left out."""
    if len(correct) != len(subjects):
        raise ValueError(f"{len(correct)} problems but {len(subjects)} subject labels")
    groups: dict[str, list[Sequence[bool]]] = {}
    for row, subject in zip(correct, subjects, strict=True):
        if subject is not None:
            groups.setdefault(subject, []).append(row)
    return {s: accuracy(rows, ks) for s, rows in sorted(groups.items())}


# ------------------------------------------------------------------------------ confidence intervals


BOOTSTRAP_RESAMPLES = 2000


@dataclass(frozen=True)
class Interval:
    """A point estimate with a percentile-bootstrap confidence interval."""

    value: float
    low: float
    high: float
    level: float = 0.95

    def to_json(self) -> dict[str, float]:
        """Plain JSON data."""
        return asdict(self)


def problem_scores(correct: Sequence[Sequence[bool]]) -> list[float]:
    """Per-problem share of correct samples c / n (the terms avg@n averages)."""
    if any(len(row) == 0 for row in correct):
        raise ValueError("every problem needs at least one sample")
    return [sum(bool(x) for x in row) / len(row) for row in correct]


def _resampled_means(columns: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """Means of `resamples` bootstrap resamples of the rows (problems) of `columns`, the same rows for every column."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, columns.shape[0], size=(resamples, columns.shape[0]))
    means: np.ndarray = columns[idx].mean(axis=1)  # (resamples, columns)
    return means


def bootstrap_mean(
    values: Sequence[float], level: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> Interval:
    """Mean of `values` (one per problem) with a percentile-bootstrap CI, resampling problems."""
    if not values:
        raise ValueError("no values to resample")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    arr = np.asarray(values, dtype=np.float64)[:, None]
    means = _resampled_means(arr, resamples, seed)[:, 0]
    low, high = np.quantile(means, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return Interval(float(arr.mean()), float(low), float(high), level)


def avg_at_n_interval(
    correct: Sequence[Sequence[bool]], level: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> Interval:
    """avg@n with a 95 % bootstrap CI over problems (samples of one problem stay together)."""
    return bootstrap_mean(problem_scores(correct), level, resamples, seed)


def paired_difference(
    a: Sequence[float], b: Sequence[float], level: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> Interval:
    """mean(a) − mean(b) over the same problems, with a paired bootstrap CI (both resampled with the same rows).

    Pairing removes the between-problem variance both arms share, so the interval is much narrower than
    the difference of two independent intervals when the arms agree on which problems are easy.
    """
    if len(a) != len(b):
        raise ValueError(f"paired scores need the same problems: {len(a)} vs {len(b)}")
    return bootstrap_mean([x - y for x, y in zip(a, b, strict=True)], level, resamples, seed)


def mean_over_seeds(per_seed: Sequence[Sequence[float]]) -> list[float]:
    """Per-problem scores averaged over training seeds (each inner list: one seed, problems in the same order)."""
    if not per_seed:
        raise ValueError("no seeds")
    if any(len(s) != len(per_seed[0]) for s in per_seed):
        raise ValueError("every seed needs the same problems")
    return [float(x) for x in np.mean(np.asarray(per_seed, dtype=np.float64), axis=0)]


def sampled_kl(reference: Sequence[Sequence[float]], other: Sequence[Sequence[float]]) -> float:
    """Per-token KL(ref ‖ other) estimated on sequences sampled from `ref` at temperature 1.

    Each sequence comes with its tokens' log-probs under both models; E_ref[log p_ref − log p_other] is
    the KL, estimated by the token-weighted mean of the differences (the plain Monte-Carlo estimator).
    """
    if len(reference) != len(other):
        raise ValueError(f"{len(reference)} reference sequences but {len(other)} others")
    if any(len(rs) != len(os) for rs, os in zip(reference, other, strict=True)):
        raise ValueError("each sequence needs the same number of log-probs under both models")
    diffs = [r - o for rs, os in zip(reference, other, strict=True) for r, o in zip(rs, os, strict=True)]
    if not diffs:
        raise ValueError("no tokens")
    return math.fsum(diffs) / len(diffs)


# ------------------------------------------------------------------------------------- token log-probs


def log_sum_exp(values: Sequence[float]) -> float:
    """log Σ exp(v), stable for very negative values; −inf for an empty sequence."""
    if not values:
        return -math.inf
    arr = np.asarray(values, dtype=np.float64)
    top = float(arr.max())
    if math.isinf(top):
        return top
    return top + float(np.log(np.exp(arr - top).sum()))


def histogram_edges(low: float = HIST_MIN, width: float = HIST_BIN_WIDTH) -> list[float]:
    """Bin edges from `low` to 0 for token log-probs."""
    steps = round(-low / width)
    return [low + i * width for i in range(steps + 1)]


def histogram(values: Sequence[float], edges: Sequence[float]) -> list[int]:
    """Counts per bin; values outside the edges are clipped into the first or last bin."""
    arr = np.clip(np.asarray(values, dtype=np.float64), edges[0], edges[-1])
    counts, _ = np.histogram(arr, bins=np.asarray(edges, dtype=np.float64))
    return [int(c) for c in counts]


@dataclass(frozen=True)
class TokenStats:
    """How probable a dataset's tokens are under a model."""

    sequences: int
    tokens: int
    mean_nll: float  # −mean log p over all tokens (token-weighted)
    mean_sequence_nll: float  # mean over sequences of their per-token NLL (sequence-weighted)
    share_below_p: float  # share of tokens with p < LOW_PROB
    quantiles: dict[str, float]  # token log-prob quantiles: p05, p25, p50, p75, p95
    histogram: list[int] = field(repr=False)  # counts over histogram_edges()


def token_stats(sequences: Sequence[Sequence[float]], edges: Sequence[float] | None = None) -> TokenStats:
    """Summarise per-token log-probs of a set of sequences (each a list of log p(y_t))."""
    seqs = [s for s in sequences if len(s) > 0]
    if not seqs:
        raise ValueError("no tokens to summarise")
    flat = np.concatenate([np.asarray(s, dtype=np.float64) for s in seqs])
    qs = np.quantile(flat, [0.05, 0.25, 0.5, 0.75, 0.95])
    return TokenStats(
        sequences=len(seqs),
        tokens=int(flat.size),
        mean_nll=float(-flat.mean()),
        mean_sequence_nll=float(np.mean([-np.mean(s) for s in seqs])),
        share_below_p=float((flat < math.log(LOW_PROB)).mean()),
        quantiles={name: float(q) for name, q in zip(("p05", "p25", "p50", "p75", "p95"), qs, strict=True)},
        histogram=histogram(flat.tolist(), edges if edges is not None else histogram_edges()),
    )


# ------------------------------------------------------------------------------------ sequence weights


def sequence_log_ratio(target: Sequence[float], behavior: Sequence[float]) -> float:
    """log w = Σ_t (target_t − behavior_t) for one sequence (aligned per-token log-probs)."""
    if len(target) != len(behavior):
        raise ValueError(f"{len(target)} target log-probs but {len(behavior)} behaviour log-probs")
    return math.fsum(t - b for t, b in zip(target, behavior, strict=True))


def normalised_ess(log_weights: Sequence[float]) -> float:
    """(Σw)² / (n Σw²) from log-weights, in log space: 1 = uniform weights, 1/n = one weight dominates."""
    if not log_weights:
        raise ValueError("no weights")
    if any(math.isnan(x) or x == math.inf for x in log_weights):
        raise ValueError("log-weights must be finite or −inf")
    lse1 = log_sum_exp(log_weights)
    if lse1 == -math.inf:
        raise ValueError("every weight is zero")
    lse2 = log_sum_exp([2.0 * x for x in log_weights])
    return math.exp(2.0 * lse1 - math.log(len(log_weights)) - lse2)


@dataclass(frozen=True)
class WeightStats:
    """Spread of sequence log-weights and the normalised ESS of the weights they stand for."""

    sequences: int
    mean: float
    std: float
    min: float
    max: float
    median: float
    ess: float  # normalised, in [1/n, 1]


def weight_stats(log_weights: Sequence[float]) -> WeightStats:
    """Summarise sequence log-weights: moments, extremes, and the normalised ESS."""
    arr = np.asarray(log_weights, dtype=np.float64)
    if arr.size == 0:
        raise ValueError("no weights")
    return WeightStats(
        sequences=int(arr.size),
        mean=float(arr.mean()),
        std=float(arr.std()),
        min=float(arr.min()),
        max=float(arr.max()),
        median=float(np.median(arr)),
        ess=normalised_ess(arr.tolist()),
    )


def as_json(obj: TokenStats | WeightStats) -> dict[str, Any]:
    """A stats dataclass as plain JSON data."""
    return asdict(obj)
