"""Sag, Lag, K-curves, random baselines, Spearman and Ral's removal sets against hand-computed values."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from core import metrics

# four training spans in 2-D; the test span points along x
TRAIN_EMB = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0], [-1.0, 0.0]])
TEST_EMB = np.array([5.0, 0.0])
TRAIN_LABELS = np.array([0, 1, 0, 2])
RANKED = np.array([2, 0, 1, 3])  # cosines in this order: 1/sqrt2, 1, 0, -1


def test_sag_by_hand():
    r = 1 / math.sqrt(2)
    assert metrics.sag_at_k(RANKED, TRAIN_EMB, TEST_EMB, 1) == pytest.approx(r)
    assert metrics.sag_at_k(RANKED, TRAIN_EMB, TEST_EMB, 2) == pytest.approx((r + 1) / 2)
    assert metrics.sag_at_k(RANKED, TRAIN_EMB, TEST_EMB, 4) == pytest.approx((r + 1 + 0 - 1) / 4)
    # torch tensors work the same
    assert metrics.sag_at_k(torch.tensor(RANKED), torch.tensor(TRAIN_EMB), torch.tensor(TEST_EMB), 2) == pytest.approx((r + 1) / 2)


def test_lag_by_hand():
    assert metrics.lag_at_k(RANKED, TRAIN_LABELS, 0, 1) == 1.0
    assert metrics.lag_at_k(RANKED, TRAIN_LABELS, 0, 2) == 1.0
    assert metrics.lag_at_k(RANKED, TRAIN_LABELS, 0, 3) == pytest.approx(2 / 3)
    assert metrics.lag_at_k(RANKED, TRAIN_LABELS, 2, 4) == pytest.approx(1 / 4)


def test_zero_span_embedding_has_cosine_zero():
    assert metrics.cosine_to(np.zeros((2, 3)), np.ones(3)).tolist() == [0.0, 0.0]


def test_k_curve_endpoints_and_batches():
    rng = np.random.default_rng(0)
    emb, test = rng.normal(size=(50, 8)), rng.normal(size=(3, 8))
    labels, test_labels = rng.integers(0, 3, 50), np.array([0, 1, 2])
    ranked = np.stack([rng.permutation(50) for _ in range(3)])
    sag = metrics.sag_curve(ranked, emb, test, 20)
    lag = metrics.lag_curve(ranked, labels, test_labels, 20)
    assert sag.shape == lag.shape == (3, 20)
    for q in range(3):
        for k in (1, 7, 20):
            assert sag[q, k - 1] == pytest.approx(metrics.sag_at_k(ranked[q], emb, test[q], k))
            assert lag[q, k - 1] == pytest.approx(metrics.lag_at_k(ranked[q], labels, test_labels[q], k))
        np.testing.assert_allclose(metrics.sag_curve(ranked[q], emb, test[q], 20), sag[q])
    with pytest.raises(ValueError):
        metrics.k_curve(ranked[:, :5], np.zeros((3, 50)), 6)


def test_top_k_descending():
    scores = np.array([[0.1, 5.0, -2.0, 3.0, 3.5], [1.0, 0.0, 2.0, -1.0, 0.5]])
    assert metrics.top_k(scores, 3).tolist() == [[1, 4, 3], [2, 0, 4]]
    assert metrics.top_k(scores[0], 10).tolist() == [1, 4, 3, 0, 2]


def test_random_baseline_matches_its_expectation():
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1, 2], [50, 30, 20])  # label shares 0.5, 0.3, 0.2
    test_labels = np.array([0, 1, 2, 2])
    agree = metrics.label_agreement(labels, test_labels)
    base = metrics.random_baseline(agree, 30, draws=300, seed=0)
    assert base.expected == pytest.approx((0.5 + 0.3 + 0.2 + 0.2) / 4)
    np.testing.assert_allclose(base.mean, base.expected, atol=0.02)
    assert np.all(base.low <= base.mean) and np.all(base.mean <= base.high)
    assert base.high[0] - base.low[0] > base.high[-1] - base.low[-1]  # narrower band at larger K
    cos = metrics.cosine_to(rng.normal(size=(100, 4)), rng.normal(size=(3, 4)))
    sag = metrics.random_baseline(cos, 30, draws=300, seed=0)
    assert sag.expected == pytest.approx(cos.mean())  # the mean cosine with every training span
    np.testing.assert_allclose(sag.mean, sag.expected, atol=0.03)


def test_spearman_against_scipy():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(4, 40)), rng.normal(size=(4, 40))
    b[0] = a[0] * 3 + 1  # monotone: 1
    a[1, :10] = 0.0  # ties
    rows = metrics.spearman(a, b)
    for q in range(4):
        assert rows[q] == pytest.approx(stats.spearmanr(a[q], b[q]).statistic)
        assert metrics.spearman(a[q], b[q]) == pytest.approx(rows[q])
    assert rows[0] == pytest.approx(1.0)
    assert metrics.spearman(a[2], a[2]) == pytest.approx(1.0)


def test_combined_ranking_and_removal():
    scores = np.array([[1.0, 0.0, 5.0, 2.0], [1.0, 4.0, -4.0, 2.0]])  # sums 2, 4, 1, 4
    ranking = metrics.combined_ranking(scores)
    assert ranking.tolist() == [1, 3, 0, 2]
    assert metrics.top_removal(ranking, 50).tolist() == [1, 3]
    assert metrics.removal_count(11186, 20) == 2238
    assert metrics.removal_count(100, 20) == 20
    r = metrics.random_removal(100, 20, seed=3)
    assert len(r) == len(set(r.tolist())) == 20 and r.tolist() == metrics.random_removal(100, 20, seed=3).tolist()
    with pytest.raises(ValueError):
        metrics.removal_count(10, 100)


def test_run_statistics():
    stats_ = metrics.run_statistics([[1.0, 3.0], [3.0, 5.0], [5.0, 7.0]])
    assert stats_["mean"] == pytest.approx(4.0)
    assert stats_["var_runs"] == pytest.approx(np.var([2.0, 4.0, 6.0], ddof=1))
    assert stats_["sd_tests"] == pytest.approx(np.std([1, 3, 3, 5, 5, 7], ddof=1))
    assert np.isnan(metrics.run_statistics([[0.5, 0.7]])["var_runs"])  # undefined, not 0
