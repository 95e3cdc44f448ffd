"""Faithfulness of TracIn++ against the size of the variants' step (table 4's TracIn++ row).

TracIn++ sums span-gradient products over variants theta + delta_i (one optimiser step each);
GroundTruth is the same product at theta alone. The smaller the step, the closer TracIn++ is to
GroundTruth. For each learning rate this makes 3 new variants (the workspace's optimiser and
seed), scores a seeded sample of test instances over a seeded sample of training instances in
the index's sketch, and reports the mean Spearman correlation with GroundTruth (x100, as in
table 4), its spread over the tests, and the step's size relative to theta. Control
(checkpoints in place of variants) is scored once for reference. The new variants are added to
the loaded model under their own names (the workspace's variants are left as they are).

Prints JSON. ``python benchmarks/variant_step.py --workspace workspaces/sentihood-full``
"""
from __future__ import annotations

import argparse
import json
import random
import statistics

import torch
from common import Backend, engine_over, gold_tests, peak_rss_mib, subset_side
from scipy.stats import spearmanr

from core.registry import METHODS
from core.training import variants_like


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
    tests = gold_tests(backend, rng.sample(backend.instances("test"), args.tests))
    dim, point_set = backend.index.settings.dim, loaded.point_set
    checkpoints = point_set.of("checkpoints")
    side, projector, _ = subset_side(backend, rows, ["final", *checkpoints], dim)
    engine = engine_over(backend, side, projector)
    truth = engine.scores(tests, METHODS.resolve("GroundTruth")).values
    out: dict = {"train": len(rows), "tests": len(tests), "d": dim, "optimizer": ws.get("variant_optimizer", "adamw"),
                 "workspace_lr": ws["variant_lr"],
                 "control": faithfulness(engine.scores(tests, METHODS.resolve("Control")).values, truth)}
    theta = {n: p.detach().clone() for n, p in loaded.points["final"].items()}
    full, labels = backend.train_cache()
    loaded.use("final")
    added: list[str] = []
    try:
        for lr in (float(x) for x in args.lrs.split(",")):
            # the workspace's variant settings (count, batch size, optimiser, seed) at this learning rate
            variants, _ = variants_like({**ws, "variant_lr": lr}, loaded.split, full, labels, seed=ws["seed"],
                                        device=loaded.device)
            names = tuple(f"step-lr{lr:g}-variant-{i}" for i in range(1, len(variants) + 1))
            loaded.points.update(zip(names, variants))
            added += names
            side, projector, _ = subset_side(backend, rows, list(names), dim)
            points = point_set.with_group("variants", names)
            scores = engine_over(backend, side, projector, points).scores(tests, METHODS.resolve("TracIn++")).values
            out[f"lr={lr:g}"] = {**faithfulness(scores, truth), "relative_step": round(relative_step(variants, theta), 6)}
            loaded.use("final")
    finally:
        for name in added:
            loaded.points.pop(name, None)
        loaded.use("final")
    out["peak_rss_mib"] = peak_rss_mib()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
