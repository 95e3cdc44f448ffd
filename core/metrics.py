"""Evaluation metrics of ranked explanation lists (paper section 4): Sag, Lag, Ral, K-curves,
faithfulness. Pure functions over numpy arrays (torch tensors are accepted and converted).

A ranking is an array of training-row indices, strongest proponent first. Sag and Lag are both
the mean over the top-K of a per-training-instance value for the test instance:

* Sag: ``cos(emb(x_ij|z), emb(x'_kl|z'))`` with ``emb(span) = emb(x) - emb(x_-ij)`` (Eq. 4, 5);
* Lag: ``1`` where the training label equals the test's gold label, else ``0``.

So one cumulative mean (:func:`k_curve`) gives either metric at every K = 1..Kmax. Values are
fractions (the paper's tables show them x100).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

EPS = 1e-12


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def cosine_to(train_emb, test_emb) -> np.ndarray:
    """Cosines of every training vector (N, H) with a test vector (H,) -> (N,), or (Q, H) -> (Q, N).

    A zero vector (e.g. an instance without a span) has cosine 0 with everything.
    """
    a = _np(train_emb).astype(np.float64)
    b = _np(test_emb).astype(np.float64)
    a = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), EPS)
    b = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), EPS)
    return b @ a.T


def label_agreement(train_labels, test_label) -> np.ndarray:
    """1.0 where a training label equals the test label: (N,) for one label, (Q, N) for (Q,) labels."""
    y = _np(train_labels)
    t = _np(test_label)
    return (y[None, :] == t.reshape(-1, 1)).astype(np.float64).reshape(t.shape + y.shape)


def k_curve(ranked_idx, values, kmax: int) -> np.ndarray:
    """Mean of ``values`` over the top-K of the ranking for K = 1..kmax (cumulative means).

    ``ranked_idx`` (K0,) with ``values`` (N,) gives (kmax,); (Q, K0) with (Q, N) gives (Q, kmax).
    """
    idx = _np(ranked_idx)
    vals = _np(values).astype(np.float64)
    if idx.shape[-1] < kmax:
        raise ValueError(f"the ranking holds {idx.shape[-1]} entries, fewer than kmax={kmax}")
    picked = np.take_along_axis(np.atleast_2d(vals), np.atleast_2d(idx)[:, :kmax].astype(np.int64), axis=-1)
    curve = np.cumsum(picked, axis=-1) / np.arange(1, kmax + 1)
    return curve if idx.ndim == 2 else curve[0]


def sag_curve(ranked_idx, train_span_emb, test_span_emb, kmax: int) -> np.ndarray:
    """Sag@K for K = 1..kmax (see :func:`k_curve` for shapes)."""
    return k_curve(ranked_idx, cosine_to(train_span_emb, test_span_emb), kmax)


def lag_curve(ranked_idx, train_labels, test_label, kmax: int) -> np.ndarray:
    """Lag@K for K = 1..kmax (see :func:`k_curve` for shapes)."""
    return k_curve(ranked_idx, label_agreement(train_labels, test_label), kmax)


def sag_at_k(ranked_idx, train_span_emb, test_span_emb, k: int) -> float:
    """Mean cosine of the top-k training span embeddings with the test span embedding (Eq. 5)."""
    return float(sag_curve(ranked_idx, train_span_emb, test_span_emb, k)[-1])


def lag_at_k(ranked_idx, train_labels, test_label, k: int) -> float:
    """Share of the top-k training instances whose label equals the test label."""
    return float(lag_curve(ranked_idx, train_labels, test_label, k)[-1])


def top_k(scores, k: int) -> np.ndarray:
    """Indices of the k largest scores per row, descending: (N,) -> (k,), (Q, N) -> (Q, k)."""
    s = _np(scores)
    k = min(k, s.shape[-1])
    part = np.argpartition(-s, k - 1, axis=-1)[..., :k]
    order = np.argsort(-np.take_along_axis(s, part, axis=-1), axis=-1, kind="stable")
    return np.take_along_axis(part, order, axis=-1)


@dataclass
class RandomBaseline:
    """A random ranking's curve: mean over draws, a spread band, and the analytic expectation.

    ``draws`` (S, kmax) are test-averaged curves of S random rankings; ``low``/``high`` are the
    ``spread`` percentiles over draws. ``expected`` = mean over tests of the mean value over all
    training instances (for Lag the label share; for Sag the mean cosine with every training
    span), the same for every K.
    """

    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray
    expected: float
    draws: np.ndarray
    spread: tuple[float, float]


def random_baseline(values, kmax: int, *, draws: int = 20, seed: int = 0,
                    spread: tuple[float, float] = (5.0, 95.0)) -> RandomBaseline:
    """The K-curve of uniformly random rankings, for per-test values (Q, N) (cosines or agreement)."""
    vals = np.atleast_2d(_np(values)).astype(np.float64)
    q, n = vals.shape
    rng = np.random.default_rng(seed)
    curves = np.empty((draws, kmax))
    for d in range(draws):
        idx = np.stack([rng.choice(n, size=kmax, replace=False) for _ in range(q)])
        curves[d] = k_curve(idx, vals, kmax).mean(axis=0)
    low, high = np.percentile(curves, spread, axis=0)
    return RandomBaseline(curves.mean(axis=0), low, high, float(vals.mean(axis=1).mean()), curves, spread)


def spearman(a, b) -> float | np.ndarray:
    """Spearman's rank correlation: of two vectors (a float), or row by row of two (Q, N) arrays."""
    x, y = _np(a), _np(b)
    if x.shape != y.shape:
        raise ValueError(f"shapes differ: {x.shape} and {y.shape}")
    if x.ndim == 1:
        return float(stats.spearmanr(x, y).statistic)
    rx = stats.rankdata(x, axis=1)
    ry = stats.rankdata(y, axis=1)
    rx -= rx.mean(axis=1, keepdims=True)
    ry -= ry.mean(axis=1, keepdims=True)
    denom = np.sqrt((rx**2).sum(axis=1) * (ry**2).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (rx * ry).sum(axis=1) / np.where(denom > 0, denom, 1), np.nan)


def combined_ranking(scores) -> np.ndarray:
    """Training rows by their score summed over the test instances (Q, N), strongest first (paper 4.2)."""
    total = np.atleast_2d(_np(scores)).astype(np.float64).sum(axis=0)
    return np.argsort(-total, kind="stable")


def removal_count(n: int, percent: float) -> int:
    """How many of ``n`` training instances ``percent`` % removes (rounded up)."""
    if not 0 <= percent < 100:
        raise ValueError(f"a removal percentage must be in [0, 100), got {percent}")
    return min(n, math.ceil(n * percent / 100 - 1e-9))


def top_removal(ranking, percent: float) -> np.ndarray:
    """The rows removed for Ral: the top ``percent`` % of a ranking."""
    order = _np(ranking)
    return np.sort(order[: removal_count(len(order), percent)])


def random_removal(n: int, percent: float, seed: int) -> np.ndarray:
    """A seeded random ``percent`` % of ``n`` rows (Ral's random-removal baseline)."""
    return np.sort(np.random.default_rng(seed).choice(n, size=removal_count(n, percent), replace=False))


def run_statistics(per_run: list) -> dict[str, float]:
    """Mean and spread of a score measured in several runs, each over several tests.

    ``per_run``: one array of per-test values a run. Returns the mean of the run means, the
    variance (ddof=1) across runs of the run means (NaN, undefined, for one run), and the standard deviation
    across all per-test values (ddof=1).
    """
    runs = [np.asarray(r, dtype=np.float64) for r in per_run]
    means = np.array([np.nanmean(r) for r in runs])
    pooled = np.concatenate(runs) if runs else np.array([])
    return {"mean": float(means.mean()) if len(means) else float("nan"),
            "var_runs": float(means.var(ddof=1)) if len(means) > 1 else float("nan"),
            "sd_tests": float(np.nanstd(pooled, ddof=1)) if len(pooled) > 1 else 0.0,
            "runs": len(runs), "tests": int(sum(len(r) for r in runs))}


# ------------------------------------------------------------------------------ one ranked list

@dataclass
class Agreement:
    """Sag@K and Lag@K of one ranked list for K = 1..kmax, with the random-ranking baseline
    (``*_random``: mean, low, high per K; ``*_expected``: its analytic expectation)."""

    ks: list[int]
    sag: list[float]
    lag: list[float]
    sag_random: tuple[list[float], list[float], list[float]]
    lag_random: tuple[list[float], list[float], list[float]]
    sag_expected: float
    lag_expected: float

    def at(self, k: int) -> dict[str, float]:
        """Sag, Lag and a random ranking's expectation of each, at ``k`` (clipped to the curve)."""
        i = min(max(k, 1), len(self.ks)) - 1
        return {"sag": self.sag[i], "lag": self.lag[i], "sag_random": self.sag_expected,
                "lag_random": self.lag_expected}


def agreement(ranked_rows: Sequence[int], cosines: Sequence[float], train_labels: Sequence[str], gold: str,
              kmax: int, draws: int = 100) -> Agreement:
    """Sag/Lag K-curves (core.metrics) of a ranking given as row indices into the training set."""
    kmax = min(kmax, len(ranked_rows))
    cos = np.asarray(cosines, dtype=np.float64)
    match = label_agreement(np.asarray(train_labels), np.asarray(gold))
    base = {name: random_baseline(values, kmax, draws=draws) for name, values in (("sag", cos), ("lag", match))}
    band = {name: (b.mean.tolist(), b.low.tolist(), b.high.tolist()) for name, b in base.items()}
    ranked = np.asarray(ranked_rows[:kmax])
    return Agreement(list(range(1, kmax + 1)), k_curve(ranked, cos, kmax).tolist(),
                     k_curve(ranked, match, kmax).tolist(), band["sag"], band["lag"],
                     base["sag"].expected, base["lag"].expected)


def top_k_overlap(a: Sequence[str], b: Sequence[str], k: int) -> float:
    """|top-K(a) & top-K(b)| / K."""
    return len(set(a[:k]) & set(b[:k])) / k if k else 0.0


def pairwise(methods: Sequence[str], fn: Callable[[str, str], float]) -> list[list[float]]:
    """The square matrix ``fn(row method, column method)``."""
    return [[fn(a, b) for b in methods] for a in methods]
