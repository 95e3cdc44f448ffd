"""Fidelity of the projected gradient index: projected against exact scores.

On a seeded sample of training instances of a prepared workspace and a seeded sample of test
instances, compares each method's sketched scores (the index's default d) with a reference:

* TracIn++ (and GroundTruth): exact, unprojected per-example gradients (streamed);
* IF++: the exact damped inverse in the full parameter space, (G + lam I)^-1 with G the
  Gauss-Newton matrix of ``--hessian-train`` of the sampled instances (both sides use the same
  G and the same lam, ``--damping``, default the engine's 2.5), by Woodbury over the exact Jacobian rows:
  (G + lam I)^-1 v = (v - F^T (n lam I + F F^T)^-1 F v) / lam for G = F^T F / n. The rows take
  n x classes x P floats of memory (6.7 GB for 150 MAMS instances).

Prints JSON: mean Spearman and mean top-10 overlap per method.

    python benchmarks/fidelity.py --workspace workspaces/mams-full --train 1000 --tests 20
"""
from __future__ import annotations

import argparse
import json
import random

import torch
from common import (
    Backend,
    engine_over,
    gold_tests,
    peak_rss_mib,
    subset_caches,
    subset_side,
)
from scipy.stats import spearmanr

from core.ihvp import DEFAULT_DAMPING
from core.index import IndexSettings
from core.registry import METHODS
from core.scoring import ScoreSettings
from core.training_sides import InMemorySide


def compare(a: torch.Tensor, b: torch.Tensor, top: int = 10) -> tuple[float, float]:
    rho = [spearmanr(x, y).statistic for x, y in zip(a.numpy(), b.numpy())]
    overlap = [len(set(torch.topk(x, top).indices.tolist()) & set(torch.topk(y, top).indices.tolist())) for x, y in zip(a, b)]
    return float(sum(rho) / len(rho)), float(sum(overlap) / len(overlap))


def exact_influence(backend, exact, exact_projector, h_rows: list[int], tests, lam: float) -> torch.Tensor:
    """IF++ scores with the exact (G + lam I)^-1, G from the rows ``h_rows`` (Woodbury)."""
    from core.ggn import gauss_newton_factor
    from core.model import length_batches
    from core.training_rows import training_gradients

    full, masked, labels = subset_caches(backend, h_rows)
    factors = []
    for b in training_gradients(backend.loaded, exact_projector, full, masked, labels, "final",
                                length_batches(full.lengths(), 16), kinds=("full",), with_jacobian=True):
        factors.append(gauss_newton_factor(b.logits, b.jacobian))
    rows_f = torch.cat(factors)  # F: G = F^T F / n
    del factors
    n = len(h_rows)
    engine = engine_over(backend, exact, exact_projector)
    v = engine.test_vectors(tests, "final", "diff").double()
    small = (rows_f @ rows_f.T).double() + n * lam * torch.eye(rows_f.shape[0], dtype=torch.float64)
    coef = torch.linalg.solve(small, (rows_f @ v.float().T).double())  # (n C, Q)
    u = (v - (coef.T.float() @ rows_f).double()) / lam
    del rows_f
    return exact.dot_many("final", {"u": ("diff", u.float())})["u"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", required=True)
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--tests", type=int, default=20)
    parser.add_argument("--dim", type=int, default=IndexSettings().dim, help="sketch dimension d under test")
    parser.add_argument("--hessian-train", type=int, default=150,
                        help="instances whose Gauss-Newton matrix IF++ inverts (exactly, for the reference)")
    parser.add_argument("--damping", type=float, default=DEFAULT_DAMPING, help="lambda of both inverses")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", default=["TracIn++", "GroundTruth", "IF++"],
                        choices=["TracIn++", "GroundTruth", "IF++"])
    args = parser.parse_args()
    backend = Backend(args.workspace)
    rng = random.Random(args.seed)
    rows = sorted(rng.sample(range(len(backend.train_ids)), min(args.train, len(backend.train_ids))))
    tests = gold_tests(backend, rng.sample(backend.instances("test"), args.tests))
    variants = backend.loaded.point_set.of("variants")
    out: dict = {"train": len(rows), "tests": len(tests)}

    with_if = "IF++" in args.methods
    projected, projector, built = subset_side(backend, rows, ["final", *variants], args.dim)
    exact, exact_projector, _ = subset_side(backend, rows, [], None)
    out["d"] = projector.dim
    out["projected_build_seconds"] = round(built, 1)
    references: dict[str, torch.Tensor] = {}
    for name in [m for m in args.methods if m != "IF++"]:
        references[name] = engine_over(backend, exact, exact_projector).scores(tests, METHODS.resolve(name)).values
    ours: dict[str, torch.Tensor] = {name: engine_over(backend, projected, projector).scores(tests, METHODS.resolve(name)).values
                                     for name in references}
    if with_if:
        h_rows = rows[: args.hessian_train]
        hessian_side, _, _ = subset_side(backend, h_rows, ["final"], args.dim, with_gram=True)
        # the projected rows with G over the Hessian rows, in the sketch
        with_gram = InMemorySide(projected.rows, gram=hessian_side.gauss_newton(), exact=projected.exact)
        engine = engine_over(backend, with_gram, projector)
        ours["IF++"] = engine.scores(tests, METHODS.resolve("IF++"), ScoreSettings(damping=args.damping)).values
        lam = args.damping
        references["IF++"] = exact_influence(backend, exact, exact_projector, h_rows, tests, lam)
        out["hessian_train"], out["lambda"] = len(h_rows), lam
    for name in args.methods:
        rho, overlap = compare(ours[name], references[name])
        out[name] = {"spearman": round(rho, 4), "top10_overlap": round(overlap, 2), "reference": "exact"}
    out["peak_rss_mib"] = peak_rss_mib()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
