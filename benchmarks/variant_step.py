"""Faithfulness of TracIn++ against the size of the variants' step (table 4's TracIn++ row).

TracIn++ sums span-gradient products over variants theta + delta_i (one optimiser step each);
GroundTruth is the same product at theta alone. The smaller the step, the closer TracIn++ is to
GroundTruth. For each learning rate this makes 3 new variants (the workspace's optimiser and
seed), scores a seeded sample of test instances over a seeded sample of training instances in
the index's sketch, and reports the mean Spearman correlation with GroundTruth (x100, as in
table 4), its spread over the tests, and the step's size relative to theta. Control
(checkpoints in place of variants) is scored once for reference.

Prints JSON. ``python benchmarks/variant_step.py --workspace workspaces/sentihood-full``
"""
from __future__ import annotations

import argparse
import json
import random
import statistics

import torch
from scipy.stats import spearmanr

from common import Backend, peak_rss_mib, subset_side
from core.methods import CONTROL, METHODS, Engine
from core.model import make_variants


def faithfulness(values: torch.Tensor, truth: torch.Tensor) -> dict:
    rho = [100 * spearmanr(a, b).statistic for a, b in zip(values.numpy(), truth.numpy())]
    return {"spearman_mean": round(statistics.mean(rho), 2), "sd_tests": round(statistics.stdev(rho), 2)}


def relative_step(variants: list[dict[str, torch.Tensor]], theta: dict[str, torch.Tensor]) -> float:
    norm = lambda p: float(torch.sqrt(sum((x.double() ** 2).sum() for x in p.values())))  # noqa: E731
    return statistics.mean(norm({n: v[n] - theta[n] for n in theta}) / norm(theta) for v in variants)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", required=True)
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--tests", type=int, default=50)
    parser.add_argument("--lrs", default="1e-4,1e-3,1e-2,1e-1", help="variant learning rates, comma separated")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    backend = Backend(args.workspace)
    loaded, ws = backend.loaded, backend.manifest.settings
    rng = random.Random(args.seed)
    rows = sorted(rng.sample(range(len(backend.train_ids)), min(args.train, len(backend.train_ids))))
    tests = [backend.test_input(r["id"]) for r in rng.sample(backend.instances("test"), args.tests)]
    dim, lrs = backend.index_settings.dim, backend._checkpoint_lrs()
    checkpoints = list(lrs)
    side, _ = subset_side(backend, rows, ["final", *checkpoints], dim)
    engine = Engine(loaded, side, lrs)
    truth = engine.scores(tests, METHODS["GroundTruth"]).values
    out: dict = {"train": len(rows), "tests": len(tests), "d": dim, "optimizer": ws.get("variant_optimizer", "adamw"),
                 "workspace_lr": ws["variant_lr"], "control": faithfulness(engine.scores(tests, CONTROL).values, truth)}
    names = [p for p in loaded.points if p.startswith("variant-")]
    own = {p: loaded.points[p] for p in names}
    theta = {n: p.detach().clone() for n, p in loaded.points["final"].items()}
    full, labels = backend.train_cache
    loaded.use("final")
    try:
        for lr in (float(x) for x in args.lrs.split(",")):
            variants, _ = make_variants(loaded.split, full, labels, count=len(names), batch_size=ws["batch_size"], lr=lr,
                                        optimizer=out["optimizer"], seed=ws["seed"], device=loaded.device)
            loaded.points.update(zip(names, variants))
            side, _ = subset_side(backend, rows, names, dim)
            scores = Engine(loaded, side, lrs).scores(tests, METHODS["TracIn++"]).values
            out[f"lr={lr:g}"] = {**faithfulness(scores, truth), "relative_step": round(relative_step(variants, theta), 6)}
            loaded.use("final")
    finally:
        loaded.points.update(own)
        loaded.use("final")
    out["peak_rss_mib"] = peak_rss_mib()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
