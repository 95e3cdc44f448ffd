"""LDS and span-LDS against exact influence on convex problems, retrain caching, and the real
retrainer on the tiny workspace.

The convex problems are multinomial logistic regression on fixed features (a top with one
linear layer on flattened hidden states), fitted to the optimum with L-BFGS and an L2 term in
float64, so a retrain is deterministic and the influence g(z')^T (H + l2 I)^-1 g(z) is exact to
first order. Whole LDS uses alpha = 0.9 (each retrain drops 10% of the training set) and span-LDS
alpha = 0.1 (each masks 10% of the spans): small changes, where the first-order (linear)
prediction the scores make holds.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from torch import nn

from core.lds import (
    CachePair,
    CacheRetrainer,
    LdsSettings,
    MemoryCache,
    RetrainOutputs,
    draw_means,
    lds_scores,
    paired_draws,
    predicted_outputs,
    run_lds,
    sample_subsets,
    subset_key,
    summarise,
    two_way_draws,
    two_way_values,
)
from core.metrics import spearman
from core.model import HiddenCache
from core.training import TrainConfig

L2 = 0.05


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    """One BLAS thread: on these tiny problems a thread pool only spins against the other
    processes of a shared CPU (10x slower there). Without threadpoolctl the tests just run slower."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(1):
        yield


# ------------------------------------------------------------------------------ convex toolkit


def _design(x: np.ndarray) -> np.ndarray:
    """Flattened inputs (n, ...) with a bias column: (n, D + 1)."""
    flat = x.reshape(len(x), -1)
    return np.concatenate([flat, np.ones((len(flat), 1))], 1)


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _fit(x: np.ndarray, y: np.ndarray, classes: int, start: np.ndarray | None = None) -> np.ndarray:
    """argmin mean CE + (L2/2)|W|^2 of a linear softmax model by L-BFGS; W is (classes, D + 1)."""
    xt = _design(x)
    onehot = np.eye(classes)[y]

    def objective(flat: np.ndarray) -> tuple[float, np.ndarray]:
        w = flat.reshape(classes, -1)
        logits = xt @ w.T
        top = logits.max(1, keepdims=True)
        lse = top[:, 0] + np.log(np.exp(logits - top).sum(1))
        loss = np.mean(lse - logits[np.arange(len(y)), y]) + 0.5 * L2 * flat @ flat
        grad = (_softmax(logits) - onehot).T @ xt / len(y) + L2 * w
        return loss, grad.ravel()

    w0 = start if start is not None else np.zeros((classes, xt.shape[1]))
    result = minimize(objective, w0.ravel(), jac=True, method="L-BFGS-B",
                      options={"gtol": 1e-10, "ftol": 0.0, "maxiter": 2000})
    assert np.abs(result.jac).max() < 1e-7, result.message
    return result.x.reshape(classes, -1)


def _logits(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    return _design(x) @ w.T


def _grads(w: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-instance gradients of the CE loss, flattened like W: (n, C (D + 1))."""
    residual = _softmax(_logits(w, x)) - np.eye(len(w))[y]
    return (residual[:, :, None] * _design(x)[:, None, :]).reshape(len(x), -1)


def _inverse_hessian(w: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(H + L2 I)^-1, H the Hessian of the mean training CE at w (autograd, not the formula)."""
    xt, labels = torch.from_numpy(_design(x)), torch.from_numpy(y)
    hessian = torch.autograd.functional.hessian(
        lambda v: nn.functional.cross_entropy(xt @ v.view(len(w), -1).T, labels), torch.from_numpy(w).flatten())
    return np.linalg.inv(hessian.numpy() + L2 * np.eye(len(hessian)))


@dataclass
class Problem:
    """Training and test inputs, whole and span-masked (the same when there are no spans)."""

    x: np.ndarray
    x_masked: np.ndarray
    y: np.ndarray
    test_x: np.ndarray
    test_x_masked: np.ndarray
    test_y: np.ndarray
    classes: int


@dataclass
class ConvexRetrainer:
    """A :class:`core.lds.Retrainer` that refits the convex model to its optimum; counts its calls."""

    problem: Problem
    start: np.ndarray
    calls: int = 0

    def __call__(self, subset: np.ndarray, intervention: str) -> RetrainOutputs:
        self.calls += 1
        p = self.problem
        if intervention == "remove":
            x, y = p.x[subset], p.y[subset]
        else:
            x, y = np.where(subset.reshape(-1, *[1] * (p.x.ndim - 1)), p.x_masked, p.x), p.y
        w = _fit(x, y, p.classes, self.start)
        return RetrainOutputs.from_logits(_logits(w, p.test_x), _logits(w, p.test_x_masked), p.test_y)


def _whole_problem(n: int = 100, features: int = 5, classes: int = 3, tests: int = 8, seed: int = 0) -> Problem:
    rng = np.random.default_rng(seed)
    true_w = 2 * rng.normal(size=(classes, features))
    x = rng.normal(size=(n + tests, features))
    y = (x @ true_w.T + 0.8 * rng.normal(size=(n + tests, classes))).argmax(-1)
    return Problem(x[:n], x[:n], y[:n], x[n:], x[n:], y[n:], classes)


def _influence(problem: Problem, w: np.ndarray, span: bool) -> np.ndarray:
    """Exact scores (Q, N): v(z')^T (H + L2 I)^-1 u(z), with gradients (whole) or span differences."""
    p = problem
    u = _grads(w, p.x, p.y) - (_grads(w, p.x_masked, p.y) if span else 0)
    v = _grads(w, p.test_x, p.test_y) - (_grads(w, p.test_x_masked, p.test_y) if span else 0)
    return v @ _inverse_hessian(w, p.x, p.y) @ u.T


# ------------------------------------------------------------------------------ whole LDS


def test_exact_influence_has_high_lds_and_random_scores_none():
    problem = _whole_problem()
    theta = _fit(problem.x, problem.y, problem.classes)
    scores = _influence(problem, theta, span=False)
    subsets = sample_subsets(len(problem.y), LdsSettings(subsets=40, alpha=0.9, seed=1))
    retrainer = ConvexRetrainer(problem, theta)
    outputs = run_lds(retrainer, subsets, "remove", MemoryCache(), settings_key="convex")
    assert retrainer.calls == 40
    lds = lds_scores(scores, subsets, outputs, "remove", "loss")
    assert lds.shape == (8,) and not np.isnan(lds).any()
    assert lds.mean() > 0.9, lds
    # flipping the sign convention (the "mask" prediction) turns it into a strong anti-correlation
    assert lds_scores(scores, subsets, outputs, "mask", "loss").mean() < -0.9
    assert lds_scores(scores, subsets, outputs, "remove", "margin").mean() > 0.7
    noise = np.random.default_rng(0).normal(size=scores.shape)
    assert abs(lds_scores(noise, subsets, outputs, "remove", "loss").mean()) < 0.2
    summary = summarise(lds, seed=0)
    assert summary["low"] <= summary["lds"] <= summary["high"] and summary["nan"] == 0 and summary["tests"] == 8
    measured = np.stack([o.output("loss") for o in outputs], axis=1)
    boot = draw_means(two_way_values(predicted_outputs(scores, subsets, "remove"), measured, two_way_draws(8, 40, draws=200)))
    assert np.percentile(boot, 2.5) > 0.8  # a real relation survives resampling the subsets too


def test_two_way_interval_counts_the_subsets_that_all_tests_share():
    """No relation between predicted and measured outputs, but both share a per-subset part across
    tests (as a retrain's noise is shared): the tests-only interval excludes 0, the two-way one
    (tests and subsets resampled) does not."""
    rng = np.random.default_rng(3)
    tests, subsets = 60, 12
    shared_predicted, shared_measured = rng.normal(size=subsets), rng.normal(size=subsets)  # drawn independently
    predicted = shared_predicted + 0.3 * rng.normal(size=(tests, subsets))
    measured = shared_measured + 0.3 * rng.normal(size=(tests, subsets))
    fixed = summarise(spearman(predicted, measured), seed=0)
    assert fixed["low"] > 0
    low, high = np.percentile(draw_means(two_way_values(predicted, measured, two_way_draws(tests, subsets, draws=400))),
                              [2.5, 97.5])
    assert low < 0 < high and high - low > 5 * (fixed["high"] - fixed["low"])


def test_planted_instance_that_flips_a_prediction_ranks_first():
    """One training instance alone carries a rare feature that the test instance shares: it tips
    the test's prediction to the gold label; without it the test is misclassified."""
    rng = np.random.default_rng(5)
    n, planted = 40, 17
    x = np.concatenate([rng.normal(size=(n, 3)), np.zeros((n, 1))], 1)
    y = (x[:, 0] + 0.5 * rng.normal(size=n) > 0).astype(np.int64)
    x[planted], y[planted] = [-0.5, 0.0, 0.0, 3.0], 1
    test_x = np.array([[-0.6, 0.1, -0.2, 3.0]])  # leans to class 0; the rare feature says 1
    problem = Problem(x, x, y, test_x, test_x, np.array([1]), 2)
    theta = _fit(x, y, 2)
    scores = _influence(problem, theta, span=False)[0]
    assert int(np.argmax(scores)) == planted
    assert scores[planted] > 3 * np.sort(scores)[-2]
    everyone = np.ones(n, dtype=bool)
    loo = everyone.copy()
    loo[planted] = False
    full, without = run_lds(ConvexRetrainer(problem, theta), np.stack([everyone, loo]), "remove", MemoryCache(),
                            settings_key="flip")
    assert full.margin[0] > 0 > without.margin[0]  # binary: the margin's sign is the prediction


# ------------------------------------------------------------------------------ span-LDS


def _span_problem(n: int = 60, planted: int = 20, tests: int = 10, seed: int = 0) -> Problem:
    """Inputs of two positions x 3 features; position 1 is the span, masking zeroes it (neutral).

    The ``planted`` first training instances and the tests: the span carries the decider,
    feature 0 = +-2 by the label, which alone decides it (the context is noise). The other
    training instances: the context decides (feature 2 = +-2), the span is faint noise on
    features 1 and 2, which says nothing."""
    rng = np.random.default_rng(seed)
    total = n + tests
    y = rng.integers(0, 2, total)
    sign = 2.0 * y - 1
    carries = np.arange(total) < planted
    carries[n:] = True
    context = rng.normal(size=(total, 3))
    context[~carries, 2] = 2 * sign[~carries] + 0.3 * context[~carries, 2]
    span = 0.3 * rng.normal(size=(total, 3))
    span[carries, 0] += 2 * sign[carries]
    span[carries, 1:] = 0.0
    span[~carries, 0] = 0.0
    x = np.stack([context, span], 1)
    masked = x.copy()
    masked[:, 1] = 0.0
    return Problem(x[:n], masked[:n], y[:n], x[n:], masked[n:], y[n:], 2)


def test_span_lds_on_planted_spans():
    """Exact span scores (span differences on both sides) single out the planted spans - by
    size: masking a well-fitted planted span can also free its context to help or hurt, so a few
    are opponents - and predict the masking retrains (span-LDS); shuffled scores do not."""
    problem = _span_problem()
    theta = _fit(problem.x, problem.y, 2)
    scores = _influence(problem, theta, span=True)
    assert (np.argmax(scores, axis=1) < 20).all()  # every test's strongest proponent is a planted span
    assert (np.argsort(-np.abs(scores), axis=1)[:, :20] < 20).mean() >= 0.9
    subsets = sample_subsets(60, LdsSettings(subsets=40, alpha=0.1, seed=2))
    outputs = run_lds(ConvexRetrainer(problem, theta), subsets, "mask", MemoryCache(), settings_key="span")
    span_lds = lds_scores(scores, subsets, outputs, "mask", "span")
    assert span_lds.mean() > 0.8, span_lds
    rng = np.random.default_rng(0)
    shuffled = np.stack([rng.permutation(row) for row in scores])
    assert abs(lds_scores(shuffled, subsets, outputs, "mask", "span").mean()) < 0.25


# ------------------------------------------------------------------------------ caching and resuming


class CountingRetrainer:
    """Outputs that depend on the subset only; counts retrains; raises after ``fail_after`` of them."""

    def __init__(self, fail_after: int | None = None):
        self.calls, self.fail_after = 0, fail_after

    def __call__(self, subset: np.ndarray, intervention: str) -> RetrainOutputs:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt
        self.calls += 1
        value = float(np.flatnonzero(subset).sum()) + (0.5 if intervention == "mask" else 0.0)
        return RetrainOutputs(np.array([value, 1.0]), np.array([value + 1, 2.0]), np.array([-value, 0.0]))


class JsonCache:
    """An :class:`core.lds.OutputsCache` that keeps JSON text, as a database would."""

    def __init__(self):
        self.rows: dict[str, str] = {}

    def get(self, key: str) -> dict | None:
        return json.loads(self.rows[key]) if key in self.rows else None

    def put(self, key: str, value: dict) -> None:
        self.rows[key] = json.dumps(value, allow_nan=False)


def _same(a: RetrainOutputs, b: RetrainOutputs) -> bool:
    return all(np.array_equal(getattr(a, f), getattr(b, f)) for f in ("loss", "masked_loss", "margin"))


def test_retrains_are_cached_per_subset_and_resume_after_an_interruption():
    subsets = sample_subsets(30, LdsSettings(subsets=6, alpha=0.5, seed=3))
    reference = run_lds(CountingRetrainer(), subsets, "mask", MemoryCache(), settings_key="k")
    cache, seen = JsonCache(), []
    with pytest.raises(KeyboardInterrupt):
        run_lds(CountingRetrainer(fail_after=4), subsets, "mask", cache, settings_key="k",
                progress=lambda done, total: seen.append((done, total)))
    assert len(cache.rows) == 4 and seen == [(k, 6) for k in range(1, 5)]
    resumed = CountingRetrainer()
    outputs = run_lds(resumed, subsets, "mask", cache, settings_key="k")
    assert resumed.calls == 2  # only the subsets the interrupted run had not finished
    assert all(_same(a, b) for a, b in zip(outputs, reference))
    again = CountingRetrainer()
    cached = run_lds(again, subsets, "mask", cache, settings_key="k")
    assert again.calls == 0 and all(_same(a, b) for a, b in zip(cached, reference))
    assert all(o.seconds >= 0 for o in cached)
    # another intervention or other settings are other retrains
    other = CountingRetrainer()
    run_lds(other, subsets, "remove", cache, settings_key="k")
    run_lds(other, subsets[:2], "mask", cache, settings_key="k2")
    assert other.calls == 8
    assert subset_key(subsets[0], "mask", "k") != subset_key(subsets[1], "mask", "k")
    assert subset_key(subsets[0], "mask", "k") == subset_key(subsets[0].copy(), "mask", "k")


def test_subsets_settings_and_outputs():
    subsets = sample_subsets(41, LdsSettings(subsets=12, alpha=0.5, seed=7))
    assert subsets.shape == (12, 41) and subsets.dtype == bool
    assert (subsets.sum(1) == round(0.5 * 41)).all() and len({s.tobytes() for s in subsets}) == 12
    assert np.array_equal(subsets, sample_subsets(41, LdsSettings(subsets=12, alpha=0.5, seed=7)))
    assert not np.array_equal(subsets, sample_subsets(41, LdsSettings(subsets=12, alpha=0.5, seed=8)))
    for bad in ({"subsets": 1}, {"alpha": 0.0}, {"alpha": 1.0}):
        with pytest.raises(ValueError):
            LdsSettings(**bad)
    with pytest.raises(ValueError):
        sample_subsets(3, LdsSettings(alpha=0.9))  # 3 of 3: nothing varies
    logits = np.array([[2.0, 0.5, -1.0], [0.0, 0.0, 3.0]])
    out = RetrainOutputs.from_logits(torch.tensor(logits), logits + [[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]], [0, 2])
    p = _softmax(logits)[[0, 1], [0, 2]]
    np.testing.assert_allclose(out.loss, -np.log(p))
    np.testing.assert_allclose(out.margin, np.log(p) - np.log(1 - p))
    np.testing.assert_allclose(out.output("span"), [out.masked_loss[0] - out.loss[0], 0.0], atol=1e-12)
    np.testing.assert_allclose(out.output("loss"), -out.loss)
    assert _same(RetrainOutputs.from_dict(json.loads(json.dumps(out.to_dict()))), out)
    with pytest.raises(ValueError):
        out.output("accuracy")


def test_predictions_signs_and_undefined_correlations():
    scores = np.array([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
    subsets = np.array([[True, False, True], [False, True, True], [True, True, False]])
    np.testing.assert_allclose(predicted_outputs(scores, subsets, "remove"), [[1, 2, 3], [0, 0, 0]])
    np.testing.assert_allclose(predicted_outputs(scores, subsets, "mask"), [[-1, -2, -3], [0, 0, 0]])
    outputs = [RetrainOutputs(np.array([v, v]), np.zeros(2), np.zeros(2)) for v in (3.0, 2.0, 1.0)]
    lds = lds_scores(scores, subsets, outputs, "remove", "loss")  # measured -loss rises with the prediction
    assert lds[0] == pytest.approx(1.0) and np.isnan(lds[1])  # constant predictions: undefined
    summary = summarise(lds)
    assert summary["nan"] == 1 and summary["tests"] == 2 and summary["lds"] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        lds_scores(scores, subsets, outputs[:2], "remove", "loss")
    with pytest.raises(ValueError):
        lds_scores(scores, subsets, outputs, "drop", "loss")


# ------------------------------------------------------------------------------ the real retrainer


@pytest.fixture(scope="module")
def real(tiny_workspace):
    """The tiny workspace's model at theta, its caches as CachePairs (6 test inputs) and initial state."""
    from core.evaluate import initial_state
    from core.model import compute_prefix, mask_span
    from core.points import load_workspace_model
    from core.workspace import Workspace

    ws = Workspace(tiny_workspace)
    loaded = load_workspace_model(ws, device="cpu")
    rows = ws.load_instances()

    def labels(split: str, limit: int | None = None) -> torch.Tensor:
        return torch.tensor([loaded.labels.index(r["label"]) for r in rows if r["split"] == split][:limit])

    prefix = tiny_workspace / "prefix"
    train_data = CachePair(HiddenCache.load(prefix / "train.safetensors"),
                           HiddenCache.load(tiny_workspace / "index" / "prefix-masked.safetensors"), labels("train"))
    tests = [r for r in rows if r["split"] == "test"][:6]
    tok = loaded.tokenizer
    whole = [loaded.encode(r["aspect"], r["text"]) for r in tests]
    masked = [mask_span(e, r["span"]["start"], r["span"]["end"], tok.mask_token_id) if r.get("span") else e
              for e, r in zip(whole, tests)]
    stored = HiddenCache(HiddenCache.load(prefix / "test.safetensors").states[:6])
    mine = compute_prefix(loaded.split, whole, tok.pad_token_id, progress=False)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(stored.states, mine.states))  # same rows, same order
    test = CachePair(stored, compute_prefix(loaded.split, masked, tok.pad_token_id, progress=False), labels("test", 6))
    dev = (HiddenCache.load(prefix / "dev.safetensors"), labels("dev"))
    init = initial_state(ws.manifest().settings, loaded.labels)
    return loaded.split, init, train_data, test, dev


def test_cache_retrainer_on_the_tiny_workspace(real, tmp_path):
    split, init, train_data, test, dev = real
    cfg = TrainConfig(epochs=1, batch_size=8, lr=1e-2, seed=0, checkpoints=1)
    retrainer = CacheRetrainer(split, init, train_data, test, dev, cfg, tmp_path / "work")
    theta = split.state()
    n = len(train_data.whole)
    subsets = sample_subsets(n, LdsSettings(subsets=2, alpha=0.5, seed=0))
    cache, rows = retrainer.training_set(subsets[0], "mask")
    chosen = int(np.flatnonzero(subsets[0])[0])
    assert cache.states[chosen] is train_data.masked.states[chosen] and len(cache) == n
    kept, kept_labels = retrainer.training_set(subsets[0], "remove")
    assert len(kept) == len(kept_labels) == subsets[0].sum()
    outputs = run_lds(retrainer, subsets, "mask", MemoryCache(), settings_key="tiny")
    for o in outputs:
        for values in (o.loss, o.masked_loss, o.margin):
            assert values.shape == (6,) and np.isfinite(values).all()
    assert np.abs(outputs[0].loss - outputs[1].loss).max() > 1e-6  # the subsets matter
    assert _same(retrainer(subsets[0], "mask"), outputs[0])  # deterministic: the same subset, the same outputs
    removed = retrainer(subsets[1], "remove")
    assert removed.loss.shape == (6,) and np.abs(removed.loss - outputs[1].loss).max() > 1e-6
    # the split holds the parameters it had (theta), not the retrained or the initial ones
    after = split.state()
    assert all(torch.equal(after[k], theta[k]) for k in theta)
    assert any(not torch.equal(theta[k], init[k]) for k in theta)
    assert not any((tmp_path / "work").iterdir())  # finished retrains leave no work folder


def test_cache_retrainer_resumes_an_interrupted_retrain_and_restores_on_errors(real, tmp_path, monkeypatch):
    import core.lds as lds

    split, init, train_data, test, dev = real
    theta = split.state()
    cfg = TrainConfig(epochs=2, batch_size=16, lr=1e-3, seed=0, checkpoints=1)
    subset = sample_subsets(len(train_data.whole), LdsSettings(subsets=2, alpha=0.5, seed=1))[0]
    reference = CacheRetrainer(split, init, train_data, test, dev, cfg, tmp_path / "a")(subset, "remove")
    real_train, epochs = lds.train, []

    def interrupted(*args, **kwargs):
        def stop(record):
            epochs.append(record.epoch)
            raise KeyboardInterrupt
        return real_train(*args, **kwargs, on_epoch=stop)

    retrainer = CacheRetrainer(split, init, train_data, test, dev, cfg, tmp_path / "b")
    monkeypatch.setattr(lds, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        retrainer(subset, "remove")
    assert all(torch.equal(split.state()[k], theta[k]) for k in theta)  # restored after the error too
    monkeypatch.setattr(lds, "train", lambda *a, **k: real_train(*a, **k, on_epoch=lambda r: epochs.append(r.epoch)))
    assert _same(retrainer(subset, "remove"), reference)
    assert epochs == [1, 2]  # the second call trained epoch 2 only: resumed from epoch 1's files


def test_paired_draws_compare_two_methods_on_the_tests_where_both_are_defined():
    a = np.array([[0.5, np.nan, 0.1], [0.2, 0.4, np.nan]])
    b = np.array([[0.1, 0.3, 0.3], [np.nan, 0.0, 0.2]])
    np.testing.assert_allclose(paired_draws(a, b), [(0.4 - 0.2) / 2, 0.4])  # test 2 of draw 1, 1 and 3 of draw 2 out
    np.testing.assert_allclose(draw_means(a), [0.3, 0.3])
    assert np.isnan(draw_means(np.full((1, 3), np.nan))[0])
