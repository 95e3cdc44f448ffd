"""Why TRAK ranks as it does on a workspace: its feature inverse, measured against variants.

TRAK scores training instance j for test z' as the mean over the checkpoints p of
phi_p(z')^T (Phi_p^T Phi_p + lambda I)^-1 Q_p(j) phi_p(z_j) (core/inverses.py ``FeatureInverse``,
core/representations.py ``trak``). This prints, for ``--tests`` test instances chosen as
``evaluate`` chooses them (``select_tests``, gold labels):

* ``variants``: the registered TRAK (through the engine), the same sum recomputed here from the
  index rows with the ridge at ``--ridges`` times the mean eigenvalue of Phi^T Phi (the registered
  ridge is core.scoring.TRAK_RIDGE), and with no inverse at all (Q phi(z) . phi(z')). For each:
  Lag@K (share of the top-K with the test's label), the mean Pearson correlation of the score
  vectors of two tests (near 0: the scores do not share a test-independent part), the share of
  distinct training instances among all top-K entries, and ``sign_label_agreement``: the share of
  (test, training) pairs where the score's sign says "same label" exactly when the labels agree.
* ``spectrum`` per checkpoint: the kernel's numerical rank, the share of the kernel's trace on its top eigenvector, the
  correlation ratio of the labels on the training rows' projections onto it (1: that direction is
  the label), and the factor by which the inverse down-weights it against the ridge's floor.
* ``top_k_from_high_leverage``: the share of the registered TRAK's top-K entries that fall on the
  5% of training rows with the largest whitened norm |(G + lambda I)^-1/2 Q phi(z)| (5% by chance);
  ``top_k_from_largest_rows``: the same for the largest plain norms |Q phi(z)| (summed over points).
* ``engine_vs_recomputed_max_rel_diff``: the engine's TRAK against the recomputed sum at the
  registered ridge (a check of this script, near float32 rounding).

What would make it misleading: ``--tests`` small (the shares are means over tests, printed
without intervals); a workspace with few training instances against the sketch dimension (the
kernel is then singular and the ridge decides); Lag is a label check, not a counterfactual one
(LDS is, ``evaluate --lds``); an index that keeps TRAK's rows whitened in float16
(:func:`core.index.half_rows`): the rows as computed are recovered from them through
Phi^T Phi + lambda I, which magnifies their rounding (about 2^-12 of each row's largest entry) in
the other ridges, the "none" baseline and the norms.

    python benchmarks/trak_diagnostics.py --workspace workspaces/sentihood-1k-s0 --tests 100
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from common import Backend

from core.evaluate import select_tests
from core.registry import METHODS
from core.scoring import TRAK_RIDGE


def ranking_stats(scores: np.ndarray, train_labels: np.ndarray, test_labels: np.ndarray, k: int) -> dict:
    """Lag@k, the mean cross-test correlation, distinct top-k share and sign/label agreement."""
    top = np.argsort(-scores, axis=1)[:, :k]
    lag = float((train_labels[top] == test_labels[:, None]).mean())
    corr = np.corrcoef(scores)
    off = corr[~np.eye(len(corr), dtype=bool)]
    same = train_labels[None, :] == test_labels[:, None]
    return {f"lag@{k}": round(100 * lag, 1), "cross_test_corr": round(float(off.mean()), 3),
            "distinct_top_k": round(len(set(top.ravel())) / top.size, 3),
            "sign_label_agreement": round(float(((scores > 0) == same).mean()), 3)}


def correlation_ratio(values: np.ndarray, labels: np.ndarray) -> float:
    """eta^2: the share of the variance of ``values`` explained by the label means."""
    total = ((values - values.mean()) ** 2).sum()
    between = sum((labels == c).sum() * (values[labels == c].mean() - values.mean()) ** 2 for c in np.unique(labels))
    return float(between / total) if total > 0 else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workspace", required=True)
    ap.add_argument("--tests", type=int, default=100)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0, help="the test sample's seed (evaluate's --seed)")
    ap.add_argument("--ridges", default="0.01,1,100", help="ridges relative to the mean eigenvalue")
    args = ap.parse_args()

    backend = Backend(args.workspace)
    engine = backend.engine()
    spec = METHODS.resolve("TRAK")
    backend.check_methods([spec])
    ids = select_tests(backend, args.tests, args.seed).ids
    tests = [backend.test_input(i, label="gold") for i in ids]
    names = backend.loaded.labels
    train_labels = np.array([names.index(backend.record(i).label) for i in backend.train_ids])
    test_labels = np.array([names.index(backend.record(i).label) for i in ids])
    stats = lambda s: ranking_stats(s, train_labels, test_labels, args.k)  # noqa: E731

    registered = engine.scores(tests, spec).values.double().numpy()
    ridges = list(dict.fromkeys([TRAK_RIDGE, *(float(r) for r in args.ridges.split(","))]))  # the registered one first
    sums = {r: 0.0 for r in ridges} | {"none": 0.0}
    spectrum, whitened_norm, row_norm = {}, 0.0, 0.0
    points = backend.index.group_points["trak"]
    for point in points:
        rows = backend.index.matrix(point, "trak").double()
        gram = backend.index.feature_gram(point).double()
        if (white := backend.index.whitened(point)) is not None:  # the rows as computed, from the whitened ones
            rows = rows @ (gram + white["lambda"] * torch.eye(len(gram), dtype=gram.dtype))
        phi = engine.test_vectors(tests, point, "trak").double().cpu()
        evals, evecs = torch.linalg.eigh(gram)
        mean_eig = float(evals.mean())
        for r in ridges:
            lam = r * mean_eig
            solved = (evecs @ torch.diag(1 / (evals + lam)) @ evecs.T @ phi.T).T
            sums[r] = sums[r] + (solved @ rows.T).numpy() / len(points)
            if r == TRAK_RIDGE:
                whitened = rows @ evecs @ torch.diag((evals + lam).rsqrt())
                whitened_norm = whitened_norm + whitened.norm(dim=1).numpy()
        sums["none"] = sums["none"] + (phi @ rows.T).numpy() / len(points)
        row_norm = row_norm + rows.norm(dim=1).numpy()
        top_dir = (rows @ evecs[:, -1]).numpy()
        lam = TRAK_RIDGE * mean_eig
        spectrum[point] = {"kernel_rank": int((evals > 1e-6 * evals[-1]).sum()),
                           "top_eigenvalue_share": round(float(evals[-1] / evals.sum()), 3),
                           "label_eta2_on_top_direction": round(correlation_ratio(top_dir, train_labels), 3),
                           "top_direction_downweight": round(float((evals[-1] + lam) / lam), 1)}

    top = np.argsort(-registered, axis=1)[:, :args.k]
    share = lambda norms: round(float(np.isin(top, np.argsort(-norms)[: max(1, len(norms) // 20)]).mean()), 3)  # noqa: E731
    out = {
        "workspace": args.workspace, "tests": len(ids), "train": len(train_labels), "k": args.k,
        "points": points, "sketch_dim": backend.index.meta.get("dim"), "registered_ridge": TRAK_RIDGE,
        "variants": {"TRAK (engine)": stats(registered)}
        | {f"ridge {r} x mean eigenvalue": stats(sums[r]) for r in ridges}
        | {"no inverse (Q phi . phi')": stats(sums["none"])},
        "spectrum": spectrum,
        "top_k_from_high_leverage": share(whitened_norm),
        "top_k_from_largest_rows": share(row_norm),
        "engine_vs_recomputed_max_rel_diff": float(np.abs(registered - sums[TRAK_RIDGE]).max() / np.abs(registered).max())
        if TRAK_RIDGE in sums else None,
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
