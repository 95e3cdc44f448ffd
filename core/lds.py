"""Linear datamodeling score (LDS; Park et al. 2023, TRAK) and its span form, span-LDS: does a
method's score predict what retraining on a changed training set does to a test output?

Protocol. Draw M random subsets S_m of the N training instances (:func:`sample_subsets`), each
of exactly ``round(alpha * N)`` instances. For each subset a :class:`Retrainer` retrains the
classifier under an *intervention* and measures every test instance (:class:`RetrainOutputs`):

* ``"remove"`` (whole-instance training side): retrain on the instances in S only;
* ``"mask"`` (span training side): retrain on every instance, those in S with their span masked.

``alpha`` is the share of the training set in S: the kept share for ``"remove"`` (alpha near 1
is a small change), the masked share for ``"mask"`` (alpha near 0 is a small change).

The *measured output* of a test instance z' is one of

* ``"loss"``: ``-loss(z')`` (larger = better fit of the test, as the margin);
* ``"span"``: ``loss(z'_-kl) - loss(z')``, the test span's importance;
* ``"margin"``: ``log p_y - log(1 - p_y)`` of the gold label y.

Sign convention of scores: ``score_i > 0`` (a proponent) means up-weighting training instance i
*raises* the measured output. To first order, giving z_i the weight 1 + eps in the mean training
loss moves the test loss by ``-eps * score_i / N`` (the measured output by ``+eps * score_i / N``)
with ``score_i = v(z')^T H^-1 u(z_i)``: u is the instance's gradient g(z) (whole) or its span's
part g(z) - g(z_-ij) (span); v is g(z') for "loss" and "margin", g(z') - g(z'_-kl) for "span".
Hence the *predicted output* of subset S:

* ``"remove"``: ``+sum_{i in S} score_i``: the instances in S are the ones trained on (all
  subsets have the same size, so the shift common to all of them does not matter);
* ``"mask"``: ``-sum_{i in S} score_i``: replacing z_i by z_i,-ij adds z_i,-ij and drops z_i
  with weight 1 each, moving the output by ``(v^T H^-1 g(z_-ij) - v^T H^-1 g(z)) / N``, i.e.
  by minus the span score over N: masking a proponent's span removes its support.

The (span-)LDS of a test instance is the Spearman correlation over the M subsets between the
predicted and the measured output (:func:`lds_scores`); NaN where either is constant.

Retrains are cached per subset (:func:`run_lds`, :class:`OutputsCache`), so an interrupted run
resumes; :class:`CacheRetrainer` retrains the real trainable subset on the frozen-prefix caches.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from scipy.special import logsumexp

from .metrics import spearman
from .model import HiddenCache, Params, SplitModel, predict
from .stats import bootstrap_ci
from .training import TrainConfig, train

INTERVENTIONS = ("remove", "mask")
TEST_OUTPUTS = ("loss", "span", "margin")
LEVEL = 0.95  # of the confidence interval in summarise()


def _array(x) -> np.ndarray:
    """float64 numpy copy of an array or (any-device) tensor."""
    return np.array(x.detach().cpu() if hasattr(x, "detach") else x, dtype=np.float64)


def _check_intervention(intervention: str) -> None:
    if intervention not in INTERVENTIONS:
        raise ValueError(f"intervention must be one of {INTERVENTIONS}, got {intervention!r}")


def _check_output(test_output: str) -> None:
    if test_output not in TEST_OUTPUTS:
        raise ValueError(f"test output must be one of {TEST_OUTPUTS}, got {test_output!r}")


@dataclass(frozen=True)
class LdsSettings:
    """M = ``subsets`` random subsets of ``alpha`` N training instances each, drawn with ``seed``."""

    subsets: int = 50
    alpha: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.subsets < 2:
            raise ValueError(f"LDS needs at least 2 subsets to correlate over, got {self.subsets}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")


def sample_subsets(n: int, settings: LdsSettings) -> np.ndarray:
    """``(M, n)`` bool: M seeded random subsets of exactly ``round(alpha * n)`` instances each."""
    size = round(settings.alpha * n)
    if not 1 <= size <= n - 1:
        raise ValueError(f"alpha={settings.alpha} of {n} instances gives subsets of {size}: need 1..{n - 1}")
    rng = np.random.default_rng(settings.seed)
    out = np.zeros((settings.subsets, n), dtype=bool)
    for m in range(settings.subsets):
        out[m, rng.choice(n, size=size, replace=False)] = True
    return out


@dataclass(frozen=True, eq=False)
class RetrainOutputs:
    """One retrain's outputs per test instance (Q,): loss, loss of the span-masked test input,
    margin ``log p_y - log(1 - p_y)``; ``seconds`` the retrain took (set by :func:`run_lds`)."""

    loss: np.ndarray
    masked_loss: np.ndarray
    margin: np.ndarray
    seconds: float = 0.0

    @classmethod
    def from_logits(cls, logits, masked_logits, labels) -> RetrainOutputs:
        """Outputs from test logits (Q, C), the masked inputs' logits (Q, C) and gold labels (Q,)."""
        lg, masked = _array(logits), _array(masked_logits)
        rows, y = np.arange(len(lg)), _array(labels).astype(np.int64)
        others = lg.copy()
        others[rows, y] = -np.inf
        return cls(loss=logsumexp(lg, axis=1) - lg[rows, y], masked_loss=logsumexp(masked, axis=1) - masked[rows, y],
                   margin=lg[rows, y] - logsumexp(others, axis=1))

    def output(self, test_output: str) -> np.ndarray:
        """The measured output (Q,): ``-loss``, ``masked_loss - loss`` or ``margin``."""
        _check_output(test_output)
        if test_output == "loss":
            return -self.loss
        return self.masked_loss - self.loss if test_output == "span" else self.margin

    def to_dict(self) -> dict:
        return {"loss": self.loss.tolist(), "masked_loss": self.masked_loss.tolist(),
                "margin": self.margin.tolist(), "seconds": self.seconds}

    @classmethod
    def from_dict(cls, data: dict) -> RetrainOutputs:
        arrays = {k: np.asarray(data[k], dtype=np.float64) for k in ("loss", "masked_loss", "margin")}
        return cls(**arrays, seconds=float(data.get("seconds", 0.0)))


class Retrainer(Protocol):
    """``(subset (N,) bool, intervention) -> RetrainOutputs``: for ``"remove"`` the subset is the
    kept instances, for ``"mask"`` the instances whose span is masked."""

    def __call__(self, subset: np.ndarray, intervention: str) -> RetrainOutputs: ...


class OutputsCache(Protocol):
    """Where :func:`run_lds` keeps one retrain's outputs (``RetrainOutputs.to_dict``) per key."""

    def get(self, key: str) -> dict | None: ...

    def put(self, key: str, value: dict) -> None: ...


class MemoryCache(dict):
    """An in-memory :class:`OutputsCache` (resumes within one process only)."""

    def put(self, key: str, value: dict) -> None:
        self[key] = value


def _as_subset(subset, n: int | None = None) -> np.ndarray:
    mask = np.asarray(subset)
    if mask.dtype != bool or mask.ndim != 1 or (n is not None and len(mask) != n):
        raise ValueError(f"a subset is an (N,) bool mask{f' with N={n}' if n is not None else ''}, "
                         f"got {mask.dtype} {mask.shape}")
    return mask


def _digest(*parts, mask: np.ndarray) -> str:
    blob = json.dumps([*parts, len(mask)], sort_keys=True, default=str).encode() + np.packbits(mask).tobytes()
    return hashlib.sha256(blob).hexdigest()[:20]


def subset_key(subset: np.ndarray, intervention: str, settings_key: str) -> str:
    """The cache key of one retrain: the subset mask, the intervention and the caller's
    ``settings_key`` (which must name everything else that changes the outputs: workspace,
    initial state, training settings, test instances)."""
    _check_intervention(intervention)
    return f"lds:{intervention}:{_digest(settings_key, intervention, mask=_as_subset(subset))}"


def run_lds(retrainer: Retrainer, subsets: np.ndarray, intervention: str, cache: OutputsCache, *,
            settings_key: str, progress: Callable[[int, int], None] | None = None) -> list[RetrainOutputs]:
    """Each subset's outputs, retraining only the subsets whose outputs ``cache`` lacks.

    Each finished retrain is put in the cache at once, so an interrupted run redoes only the
    subsets it had not finished. ``progress(done, total)`` is called after every subset.
    """
    _check_intervention(intervention)
    masks = np.asarray(subsets)
    if masks.ndim != 2:
        raise ValueError(f"subsets must be (M, N) bool, got shape {masks.shape}")
    out = []
    for m, subset in enumerate(masks):
        key = subset_key(subset, intervention, settings_key)
        saved = cache.get(key)
        if saved is None:
            started = time.perf_counter()
            result = retrainer(subset, intervention)
            result = replace(result, seconds=round(time.perf_counter() - started, 3))
            cache.put(key, result.to_dict())
        else:
            result = RetrainOutputs.from_dict(saved)
        out.append(result)
        if progress is not None:
            progress(m + 1, len(masks))
    return out


def predicted_outputs(scores, subsets: np.ndarray, intervention: str) -> np.ndarray:
    """``(Q, M)``: a method's predicted output per test and subset (see the module docstring)."""
    _check_intervention(intervention)
    sums = np.atleast_2d(np.asarray(scores, dtype=np.float64)) @ np.asarray(subsets, dtype=np.float64).T
    return sums if intervention == "remove" else -sums


def lds_scores(scores, subsets: np.ndarray, outputs: list[RetrainOutputs], intervention: str,
               test_output: str) -> np.ndarray:
    """``(Q,)``: per test, Spearman over the M subsets of predicted v. measured output (NaN where
    either is constant). ``scores`` (Q, N) follow the module's sign convention."""
    _check_intervention(intervention)
    _check_output(test_output)
    if len(outputs) != len(subsets):
        raise ValueError(f"{len(subsets)} subsets but {len(outputs)} retrain outputs")
    predicted = predicted_outputs(scores, subsets, intervention)
    measured = np.stack([o.output(test_output) for o in outputs], axis=1)
    if measured.shape != predicted.shape:
        raise ValueError(f"scores give {predicted.shape} (tests, subsets), the outputs {measured.shape}")
    return spearman(predicted, measured)


SUBSET_DRAWS = 4000
"""Draws of the two-way bootstrap (tests and subsets resampled) in :func:`two_way_values`: enough
that its smallest p (2 / 4001) survives Holm's correction over a kind's pairs (up to 15 pairs of
6 methods: 0.0075)."""


def two_way_draws(tests: int, subsets: int, draws: int = SUBSET_DRAWS, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Bootstrap draws of test and subset indices, both with replacement (shared by the methods
    checked against the same retrains, so their differences are paired)."""
    rng = np.random.default_rng(seed)
    return [(rng.integers(tests, size=tests), rng.integers(subsets, size=subsets)) for _ in range(draws)]


def two_way_values(predicted: np.ndarray, measured: np.ndarray, draws: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """``(draws, tests)``: per draw, the LDS of each drawn test, a Spearman over the drawn subsets
    (a subset drawn twice is a tie; NaN where undefined). Every test shares the same retrains, so
    the subsets drawn move all tests' values together; resampling only the tests leaves that out."""
    return np.stack([spearman(predicted[t][:, s], measured[t][:, s]) for t, s in draws])


def draw_means(values: np.ndarray) -> np.ndarray:
    """``(draws,)``: each draw's mean LDS over its tests where defined (NaN if none is)."""
    finite = np.isfinite(values)
    return np.where(finite.any(axis=1), np.nansum(values, axis=1) / np.maximum(finite.sum(axis=1), 1), np.nan)


def paired_draws(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(draws,)``: per draw, the mean of ``a - b`` over the drawn tests where both methods' LDS
    is defined (two methods' :func:`two_way_values` over the same draws), so a difference and its
    interval rest on the same tests for both."""
    both = np.isfinite(a) & np.isfinite(b)
    return draw_means(np.where(both, a - b, np.nan))


def summarise(per_test, seed: int = 0) -> dict:
    """Mean (span-)LDS over tests with its 95% bootstrap interval; NaN tests left out, counted."""
    values = np.asarray(per_test, dtype=np.float64)
    mean, low, high = bootstrap_ci(values, level=LEVEL, seed=seed)
    return {"lds": mean, "low": low, "high": high, "level": LEVEL, "tests": int(len(values)),
            "nan": int(np.isnan(values).sum())}


# ------------------------------------------------------------------------------ real retrains


@dataclass
class CachePair:
    """Frozen-prefix hidden states of the same inputs, whole and span-masked, with their labels
    (gold, or whichever labels the scores explain: the losses and margins are of these)."""

    whole: HiddenCache
    masked: HiddenCache
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if not len(self.whole) == len(self.masked) == len(self.labels):
            raise ValueError(f"whole ({len(self.whole)}), masked ({len(self.masked)}) and labels "
                             f"({len(self.labels)}) must hold the same inputs in the same order")


def measure_outputs(split: SplitModel, test: CachePair, *, device: torch.device | str = "cpu") -> RetrainOutputs:
    """The test outputs at the split's current parameters."""
    logits = predict(split, test.whole, device=device)
    masked = predict(split, test.masked, device=device)
    return RetrainOutputs.from_logits(logits, masked, test.labels)


class CacheRetrainer:
    """Retrains the trainable subset of ``split`` from ``initial`` (a :class:`Retrainer`).

    ``"remove"`` trains on the subset's rows of ``train_data.whole``; ``"mask"`` on every row,
    the subset's taken from ``train_data.masked``. Training is :func:`core.training.train` with ``cfg`` and
    ``dev`` for choosing the best epoch, as the workspace's own training; it runs in a folder of
    ``work_dir`` named by the subset, intervention and ``cfg``, so an interrupted retrain resumes
    from its last finished epoch, and the folder is removed once the outputs are measured.
    ``work_dir`` must belong to one workspace and initial state. The split must be on ``device``.
    The same subset gives bitwise the same outputs on the CPU (seeded shuffling and dropout).

    Afterwards (also after an error) the split holds the parameters it had before the call,
    not the retrained ones: the caller's model (e.g. at theta) is left as it was.
    """

    def __init__(self, split: SplitModel, initial: Params, train_data: CachePair, test: CachePair,
                 dev: tuple[HiddenCache, torch.Tensor], cfg: TrainConfig, work_dir: Path, *,
                 device: torch.device | str = "cpu", progress: bool = False):
        self.split, self.initial, self.train_data, self.test = split, initial, train_data, test
        self.dev, self.cfg, self.work_dir = dev, cfg, Path(work_dir)
        self.device, self.progress = device, progress

    def training_set(self, subset: np.ndarray, intervention: str) -> tuple[HiddenCache, torch.Tensor]:
        """The cache and labels a retrain under ``intervention`` trains on."""
        _check_intervention(intervention)
        data = self.train_data
        mask = _as_subset(subset, len(data.whole))
        if intervention == "remove":
            keep = np.flatnonzero(mask)
            if not len(keep):
                raise ValueError("an empty subset leaves nothing to train on")
            return HiddenCache([data.whole.states[i] for i in keep]), data.labels[torch.as_tensor(keep)]
        rows = [m if masked else w for w, m, masked in zip(data.whole.states, data.masked.states, mask)]
        return HiddenCache(rows), data.labels

    def __call__(self, subset: np.ndarray, intervention: str) -> RetrainOutputs:
        cache, labels = self.training_set(subset, intervention)
        work = self.work_dir / _digest(intervention, asdict(self.cfg), mask=np.asarray(subset))
        found, was_training = self.split.state(), self.split.top.training
        try:
            self.split.load_state(self.initial)
            train(self.split, cache, labels, *self.dev, self.cfg, out_dir=work, device=self.device,
                  progress=self.progress)
            outputs = measure_outputs(self.split, self.test, device=self.device)
        finally:
            self.split.load_state(found)
            self.split.top.train(was_training)
        shutil.rmtree(work, ignore_errors=True)
        return outputs
