"""Is the 55-60 cluster of the paper's table 4 a noise floor? GroundTruth against itself with dropout on.

Table 4 scores each method by its Spearman correlation (x100) with GroundTruth, e(z') . e(z) at
theta (TracIn++ at theta alone). If the paper's GroundTruth was computed with dropout active,
two computations of it would not agree perfectly, and no method could score above their
agreement: a ceiling that would look like a cluster. This measures that agreement.

On ``--train`` seeded training instances (default 1000) and ``--tests`` seeded test instances
with a span (default 20, gold labels), in the index's own sketch (a streamed training side with
a projector of the index's d and seed over those rows' cached prefix states, so the rows are the
index's rows but recomputed with the model as it is), GroundTruth is computed three times:

* ``eval``: the model in eval mode (no dropout), as SpanLens computes it;
* ``dropout_a``, ``dropout_b``: the top model in train mode, so dropout is active on both sides
  (the test vectors e(z') and every training batch's e(z)), with different torch seeds: a
  forward pre-hook calls ``torch.manual_seed`` before each forward pass (the backward pass reuses
  its forward pass's masks), from a seed per run and side plus the pass's number, so each run is
  reproducible (``determinism`` checks it on the test side) and the two runs draw independent
  masks. In a training batch the input and its span-masked copy draw different masks, as they
  would in a dropout-on computation. Afterwards the model is back in eval mode and torch's
  global random state is restored.

Reported, each as the mean over tests of the per-test Spearman x100 with its 95% percentile
bootstrap interval (core.stats.bootstrap_ci; NaN tests, e.g. a constant row, left out and
counted): ``dropout_a`` against ``dropout_b`` (the noise floor itself), each dropout run against
``eval``; and for reference, in eval mode, TracIn++ (the workspace's variants) against
GroundTruth, both read from the index's rows of the same training instances (as table 4's
numbers are computed), plus the streamed ``eval`` GroundTruth against the index's (a check that
the streamed side reproduces the index: about 100). ``dropout`` lists the top model's dropout
probabilities (all zero would make the floor trivially 100).

What would make the result misleading: a backbone whose dropout differs from the paper's (a
checkpoint's config sets the probabilities; a tiny test model's floor says nothing about
BERT-base's); too few training instances (Spearman over few rows is noisy whatever the
dropout); the masks: an input and its span-masked copy draw independent masks here (as two
separate dropout-on passes would), so e(z) = g(z) - g(z_-ij) carries the difference of two
dropout noises, which swamps a small span effect (``determinism`` gives how far dropout moves
the test vectors and the scores from eval mode); a computation sharing one mask between an
input and its masked copy would have a higher floor, not measured here; and reading the floor
as the paper's: it is the floor only if the paper's GroundTruth was computed with dropout on,
which this cannot tell.

Prints JSON. ``python benchmarks/noise_floor.py --workspace workspaces/mams-full --train 1000 --tests 20``
"""
from __future__ import annotations

import argparse
import json
import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from common import (
    Backend,
    engine_over,
    gold_tests,
    peak_rss_mib,
    sketched_streamed_side,
)
from scipy.stats import spearmanr
from torch import nn

from core.model import SplitModel
from core.registry import METHODS
from core.stats import bootstrap_ci
from core.training_sides import InMemorySide

PASS_STRIDE = 1_000_003  # seeds of one (run, side): base * PASS_STRIDE + pass number


@contextmanager
def dropout_on(split: SplitModel, seed: int) -> Iterator[dict]:
    """The top model in train mode, torch seeded before each of its forward passes from ``seed``;
    eval mode and torch's random state restored afterwards. Yields a counter of the passes."""
    passes = {"forward": 0}

    def reseed(module: nn.Module, args) -> None:
        torch.manual_seed(seed * PASS_STRIDE + passes["forward"])
        passes["forward"] += 1

    cpu_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    handle = split.top.register_forward_pre_hook(reseed)
    split.top.train()
    try:
        yield passes
    finally:
        handle.remove()
        split.top.eval()
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


def ground_truth(engine, tests, batch, seeds: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """GroundTruth e(z') . e(z) at theta (Q, N), with dropout on each side under ``seeds``
    (test side, training side), or in eval mode for ``None``; and the test vectors."""
    split = engine.loaded.split
    if seeds is None:
        vecs = engine.test_vectors(tests, "final", "diff", batch)
        return engine.side.dot_many("final", {"gt": ("diff", vecs)})["gt"], vecs
    with dropout_on(split, seeds[0]):
        vecs = engine.test_vectors(tests, "final", "diff", batch)
    with dropout_on(split, seeds[1]):
        scores = engine.side.dot_many("final", {"gt": ("diff", vecs)})["gt"]
    return scores, vecs


def agreement(a: torch.Tensor, b: torch.Tensor, seed: int) -> dict:
    """Mean per-test Spearman x100 of two (Q, N) score matrices, its 95% bootstrap interval."""
    rho = []
    for x, y in zip(a.double().numpy(), b.double().numpy()):
        rho.append(float("nan") if np.ptp(x) == 0 or np.ptp(y) == 0 else 100 * spearmanr(x, y).statistic)
    mean, low, high = bootstrap_ci(rho, seed=seed)
    return {"spearman_mean": round(mean, 2), "ci95": [round(low, 2), round(high, 2)],
            "nan_tests": int(np.isnan(rho).sum()),
            "sd_tests": round(float(np.nanstd(rho, ddof=1)), 2) if np.sum(~np.isnan(rho)) > 1 else None}


def dropout_rates(split: SplitModel) -> dict:
    """The top model's dropout probabilities (modules and the attention's own, where configured)."""
    rates = sorted({float(m.p) for m in split.top.modules() if isinstance(m, nn.Dropout)})
    config = getattr(split.model, "config", None)
    return {"modules": sum(isinstance(m, nn.Dropout) for m in split.top.modules()), "module_p": rates,
            "attention_p": getattr(config, "attention_probs_dropout_prob", None),
            "hidden_p": getattr(config, "hidden_dropout_prob", None)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", required=True)
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--tests", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    backend = Backend(args.workspace)
    loaded = backend.loaded
    rng = random.Random(args.seed)
    rows = sorted(rng.sample(range(len(backend.train_ids)), min(args.train, len(backend.train_ids))))
    spanned = [r for r in backend.instances("test") if r.span is not None]
    tests = gold_tests(backend, rng.sample(spanned, min(args.tests, len(spanned))))
    side, projector = sketched_streamed_side(backend, rows, backend.index.settings.batch_size)
    engine = engine_over(backend, side, projector)
    batch = engine.test_batch(tests)
    out: dict = {"train": len(rows), "tests": len(tests), "d": projector.dim, "units": "Spearman x 100",
                 "dropout": dropout_rates(loaded.split)}

    base = 1000 * (args.seed + 1)
    seeds = {"dropout_a": (base + 1, base + 2), "dropout_b": (base + 3, base + 4)}
    scores, vecs = {}, {}
    scores["eval"], vecs["eval"] = ground_truth(engine, tests, batch, None)
    for name, pair in seeds.items():
        scores[name], vecs[name] = ground_truth(engine, tests, batch, pair)
    with dropout_on(loaded.split, seeds["dropout_a"][0]):
        repeat = engine.test_vectors(tests, "final", "diff", batch)
    change = lambda a, b: float((a - b).norm() / b.norm().clamp_min(1e-30))  # noqa: E731
    out["determinism"] = {"test_side_repeat_max_abs_diff": float((repeat - vecs["dropout_a"]).abs().max()),
                          "test_side_dropout_vs_eval_rel_change": round(change(vecs["dropout_a"], vecs["eval"]), 4),
                          "scores_dropout_vs_eval_rel_change": round(change(scores["dropout_a"], scores["eval"]), 4),
                          "mode_after": "train" if loaded.split.top.training else "eval"}
    out["seeds"] = {k: {"test_side": v[0], "training_side": v[1]} for k, v in seeds.items()}
    out["dropout_a_vs_dropout_b"] = agreement(scores["dropout_a"], scores["dropout_b"], args.seed)
    out["dropout_a_vs_eval"] = agreement(scores["dropout_a"], scores["eval"], args.seed)
    out["dropout_b_vs_eval"] = agreement(scores["dropout_b"], scores["eval"], args.seed)

    # reference, eval mode: TracIn++ against GroundTruth on the index's rows of the same instances
    points = ["final", *loaded.point_set.of("variants")]
    indexed = InMemorySide({(p, "diff"): backend.index.matrix(p, "diff")[rows] for p in points}, exact=projector.exact)
    ref = engine_over(backend, indexed, projector)
    gt_index = ref.scores(tests, METHODS.resolve("GroundTruth")).values
    tracin = ref.scores(tests, METHODS.resolve("TracIn++")).values
    out["reference_eval"] = {"tracin_pp_vs_ground_truth": agreement(tracin, gt_index, args.seed),
                             "tracin_pp_vs_streamed_eval_ground_truth": agreement(tracin, scores["eval"], args.seed),
                             "streamed_eval_vs_index_ground_truth": agreement(scores["eval"], gt_index, args.seed),
                             "variants": len(points) - 1}
    out["peak_rss_mib"] = peak_rss_mib()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
