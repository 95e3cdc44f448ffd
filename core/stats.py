"""Uncertainty of evaluation figures: bootstrap confidence intervals, paired comparisons of two
methods on the same test instances, and the spread of a figure across repeated runs.

Pure numpy. NaN values (e.g. a correlation that is undefined for one test instance) are left
out everywhere; each function says what it returns when too few values remain.
"""
from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Sequence

import numpy as np

ALPHA = 0.05  # the significance level of paired_difference


def _finite(values) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64).ravel()
    return x[~np.isnan(x)]


def _takes_axis(statistic: Callable) -> bool:
    try:
        return "axis" in inspect.signature(statistic).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return False


def bootstrap_ci(values, *, statistic: Callable = np.mean, n_resamples: int = 2000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float, float]:
    """``(estimate, low, high)``: ``statistic`` of the values and its percentile-bootstrap interval.

    NaN values are left out. With no value left all three are NaN; with one, the interval is
    NaN (a single value says nothing about its spread). A ``statistic`` with an ``axis``
    argument (numpy reductions) is evaluated on all resamples at once.
    """
    if not 0 < level < 1 or n_resamples < 1:
        raise ValueError(f"need 0 < level < 1 and n_resamples >= 1, got {level}, {n_resamples}")
    x = _finite(values)
    if len(x) == 0:
        return float("nan"), float("nan"), float("nan")
    estimate = float(statistic(x))
    if len(x) == 1:
        return estimate, float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    samples = x[rng.integers(0, len(x), size=(n_resamples, len(x)))]
    if _takes_axis(statistic):
        dist = np.asarray(statistic(samples, axis=1), dtype=np.float64)
    else:
        dist = np.array([statistic(s) for s in samples], dtype=np.float64)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(dist, [tail, 100 - tail])
    return estimate, float(low), float(high)


def draws_summary(draws, level: float = 0.95) -> tuple[float, float, float]:
    """``(low, high, p)`` of bootstrap draws made elsewhere (e.g. two-way, tests and subsets): their
    percentile interval and, for draws of a difference, the two-sided bootstrap p of 0, counted as
    ``2 (1 + hits) / (1 + draws)`` on the smaller side (never 0: n draws cannot show p < 1/n).
    NaN draws are left out."""
    x = _finite(draws)
    if len(x) == 0:
        return float("nan"), float("nan"), float("nan")
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(x, [tail, 100 - tail])
    side = min(np.sum(x <= 0), np.sum(x >= 0))
    return float(low), float(high), float(min(1.0, 2 * (1 + side) / (1 + len(x))))


def holm(p_values) -> np.ndarray:
    """Holm's step-down adjustment of a family of p-values (NaN left as NaN, not counted): a pair
    is significant at level a over the whole family when its adjusted p is below a."""
    p = np.asarray(p_values, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    idx = np.flatnonzero(~np.isnan(p))
    order = idx[np.argsort(p[idx], kind="stable")]
    out[order] = np.minimum(1.0, np.maximum.accumulate((len(order) - np.arange(len(order))) * p[order]))
    return out


def _sign_flip_p(d: np.ndarray, n_resamples: int, seed: int) -> tuple[float, bool]:
    """Two-sided p-value of mean(d) = 0 under random sign flips; exact when 2^n <= n_resamples."""
    n = len(d)
    observed = abs(d.mean())
    tol = 1e-12 * max(1.0, float(np.abs(d).max()))
    if 2**n <= n_resamples:
        signs = ((np.arange(2**n)[:, None] >> np.arange(n)) & 1) * 2 - 1
        return float(np.mean(np.abs(signs @ d) / n >= observed - tol)), True
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=(n_resamples, n))
    extreme = int(np.sum(np.abs(signs @ d) / n >= observed - tol))
    return (1 + extreme) / (1 + n_resamples), False


def paired_difference(a, b, *, n_resamples: int = 2000, seed: int = 0) -> dict:
    """Mean of ``a - b`` over paired items (e.g. two methods' scores on the same tests).

    Returns ``difference`` (the mean), ``low``/``high`` (its 95% percentile-bootstrap interval),
    ``p_value`` (two-sided, paired sign-flip permutation test: exact over all 2^n sign patterns
    when 2^n <= ``n_resamples``, else Monte Carlo with ``(1 + hits) / (1 + n_resamples)``),
    ``significant`` (p < 0.05), ``exact``, ``n`` (pairs used) and ``dropped`` (pairs with a NaN).
    """
    x, y = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"paired values differ in length: {len(x)} and {len(y)}")
    keep = ~(np.isnan(x) | np.isnan(y))
    d = x[keep] - y[keep]
    difference, low, high = bootstrap_ci(d, n_resamples=n_resamples, seed=seed)
    p_value, exact = _sign_flip_p(d, n_resamples, seed) if len(d) else (float("nan"), True)
    return {"difference": difference, "low": low, "high": high, "p_value": p_value,
            "significant": bool(p_value < ALPHA), "exact": exact, "n": int(len(d)), "dropped": int((~keep).sum())}


def run_variance(run_means: Sequence[float]) -> float | None:
    """Variance (ddof=1) of a figure across runs; ``None`` (undefined) for fewer than 2 runs.

    NaN run means are left out before counting.
    """
    x = _finite(run_means)
    return float(x.var(ddof=1)) if len(x) >= 2 else None


def seeds_tests_draws(per_seed: Sequence[np.ndarray], *, crossed: bool, n_resamples: int = 2000,
                      seed: int = 0) -> np.ndarray:
    """``(n_resamples,)`` bootstrap draws of a grand mean over classifier seeds and test instances.

    ``per_seed``: each seed's per-test values. The grand mean weighs every seed alike: the mean
    over seeds of each seed's mean over its tests (NaN left out). A draw resamples the seeds with
    replacement and the tests: once for all seeds when ``crossed`` (every seed evaluated the same
    tests, in the same order, so a test's difficulty is shared and moves all seeds together),
    else within each drawn seed (nested: each seed has its own tests; a seed's mean already
    carries its test noise, so this counts it twice and errs wide). The same ``seed`` gives the
    same draws for arrays of the same shapes. With S seeds the seed level has only C(2S - 1, S)
    distinct draws (10 for 3) and shrinks the seeds' variance by (S - 1) / S: read its intervals
    as approximate (:func:`core.evaluate.combine.table3_across` adds a t-test over the seeds).
    Draws are made in chunks of at most :data:`DRAW_CHUNK` values.
    """
    arrays = [np.asarray(v, dtype=np.float64).ravel() for v in per_seed]
    if not arrays or any(len(a) == 0 for a in arrays):
        raise ValueError("every seed needs at least one value")
    if crossed and len({len(a) for a in arrays}) != 1:
        raise ValueError("crossed draws need the same tests in every seed")
    rng = np.random.default_rng(seed)
    n_seeds, longest = len(arrays), max(len(a) for a in arrays)
    step = max(1, DRAW_CHUNK // (n_seeds * longest * (1 if crossed else n_seeds)))
    values = np.stack(arrays) if crossed else None  # (S, T)
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a draw of only NaN tests: NaN, left out later
        for start in range(0, n_resamples, step):
            n = min(step, n_resamples - start)
            seeds = rng.integers(n_seeds, size=(n, n_seeds))
            if crossed:
                tests = rng.integers(values.shape[1], size=(n, values.shape[1]))
                means = np.nanmean(values[seeds[:, :, None], tests[:, None, :]], axis=2)  # (n, S)
            else:  # each seed's test means for every (draw, slot), then the drawn seed's value in each slot
                own = np.stack([np.nanmean(a[rng.integers(len(a), size=(n, n_seeds, len(a)))], axis=2)
                                for a in arrays])  # (S, n, slots)
                means = np.take_along_axis(own.transpose(1, 2, 0), seeds[:, :, None], axis=2)[:, :, 0]
            out.append(np.nanmean(means, axis=1))
    return np.concatenate(out)


DRAW_CHUNK = 20_000_000
"""Values resampled at once by :func:`seeds_tests_draws` (160 MB of float64)."""
