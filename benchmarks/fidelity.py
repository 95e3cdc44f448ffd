"""Fidelity of the projected gradient index: projected against exact scores.

On a seeded sample of training instances of a prepared workspace and a seeded sample of test
instances, compares each method's sketched scores (the index's default d) with a reference:

* TracIn++ (and GroundTruth): exact, unprojected per-example gradients (streamed);
* IF++: an exact inverse needs the full Gauss-Newton matrix (P x P, P = millions for the
  default backbone), out of reach here, so the reference is a wider sketch (``--reference-dim``)
  with its exact damped inverse.

Prints JSON: mean Spearman and mean top-10 overlap per method.

    python benchmarks/fidelity.py --workspace workspaces/mams-full --train 1000 --tests 20
"""
from __future__ import annotations

import argparse
import json
import random
import time

import torch
from scipy.stats import spearmanr

from common import Backend, peak_rss_mib, subset_side
from core.index import IndexSettings
from core.methods import METHODS, Engine


def compare(a: torch.Tensor, b: torch.Tensor, top: int = 10) -> tuple[float, float]:
    rho = [spearmanr(x, y).statistic for x, y in zip(a.numpy(), b.numpy())]
    overlap = [len(set(torch.topk(x, top).indices.tolist()) & set(torch.topk(y, top).indices.tolist())) for x, y in zip(a, b)]
    return float(sum(rho) / len(rho)), float(sum(overlap) / len(overlap))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", required=True)
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--tests", type=int, default=20)
    parser.add_argument("--dim", type=int, default=IndexSettings().dim, help="sketch dimension d under test")
    parser.add_argument("--reference-dim", type=int, default=16384, help="the IF++ reference's sketch dimension")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", default=["TracIn++", "GroundTruth", "IF++"],
                        choices=["TracIn++", "GroundTruth", "IF++"])
    args = parser.parse_args()
    backend = Backend(args.workspace)
    rng = random.Random(args.seed)
    rows = sorted(rng.sample(range(len(backend.train_ids)), min(args.train, len(backend.train_ids))))
    tests = [backend.test_input(r["id"]) for r in rng.sample(backend.instances("test"), args.tests)]
    lrs = backend._checkpoint_lrs()
    variants = [p for p in backend.loaded.points if p.startswith("variant-")]
    out: dict = {"train": len(rows), "tests": len(tests)}

    with_if = "IF++" in args.methods
    projected, built = subset_side(backend, rows, ["final", *variants], args.dim, with_gram=with_if)
    exact, _ = subset_side(backend, rows, [], None)
    out["d"] = projected.projector.dim
    out["projected_build_seconds"] = round(built, 1)
    references = {"TracIn++": exact, "GroundTruth": exact}
    if with_if:
        references["IF++"], _ = subset_side(backend, rows, ["final"], args.reference_dim, with_gram=True)
        out["reference_d"] = references["IF++"].projector.dim
    for name in args.methods:
        ref_side = references[name]
        started = time.perf_counter()
        ref = Engine(backend.loaded, ref_side, lrs).scores(tests, METHODS[name]).values
        ours = Engine(backend.loaded, projected, lrs).scores(tests, METHODS[name]).values
        rho, overlap = compare(ours, ref)
        out[name] = {"spearman": round(rho, 4), "top10_overlap": round(overlap, 2),
                     "reference": "exact" if ref_side is exact else f"sketch d={args.reference_dim}",
                     "seconds": round(time.perf_counter() - started, 1)}
    out["peak_rss_mib"] = peak_rss_mib()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
