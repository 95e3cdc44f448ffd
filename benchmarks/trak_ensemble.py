"""TRAK over independently trained models against TRAK over the checkpoints, by retraining (LDS).

TRAK's authors average its features over independently trained models; SpanLens does that when
the workspace has them (``prepare --models N``) and falls back to the last checkpoints of one
training run otherwise. This scores TRAK (and, with ``--methods TRAK,TRAK++``, its span form)
with each point set in turn, the same tests and the same retrains, and prints per point set:

* ``lds``: the mean LDS (x100) over the tests, with the interval that resamples the tests and
  the subsets both (:func:`core.lds.two_way_values`) and the tests-only one;
* per point set against the checkpoints: the difference, its two-way interval and p.

The point sets are the checkpoints and the first 1, 2, ... models of the ensemble (``--sizes``;
"1" is theta alone). Every set is scored over a streamed side in the index's own sketch (the
index holds TRAK rows at the ensemble only), and the whole ensemble's scores are checked
against the index's (``index_agreement``). The retrains are those of ``evaluate --lds`` with the
same options, cached in the workspace's store, so this and ``evaluate`` share them.

    python benchmarks/trak_ensemble.py --workspace workspaces/sentihood-1k-m5 \\
        --out workspaces/sentihood-1k-m5/evaluation-trak --test-limit 100 --subsets 50
"""
from __future__ import annotations

import argparse
import json
import time
from itertools import pairwise
from pathlib import Path

import numpy as np
from common import Backend, engine_over, gold_tests, sketched_streamed_side
from tqdm import tqdm

from core.evaluate import EvalSettings, select_tests
from core.evaluate.context import Evaluation
from core.evaluate.counterfactual import _select, _StoreCache, kind_of, retrainer_for
from core.lds import (
    LdsSettings,
    draw_means,
    lds_scores,
    paired_draws,
    predicted_outputs,
    run_lds,
    sample_subsets,
    summarise,
    two_way_draws,
    two_way_values,
)
from core.registry import METHODS
from core.stats import draws_summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workspace", required=True, help="a workspace prepared with --models N (N >= 2) and --with trak")
    ap.add_argument("--out", required=True, help="folder of the retrains' work (as evaluate's --out)")
    ap.add_argument("--methods", default="TRAK", help="TRAK, TRAK++ or both (comma-separated)")
    ap.add_argument("--sizes", default="", help="ensemble sizes to score (default: 1, 2, 4, ... and all)")
    ap.add_argument("--test-limit", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--subsets", type=int, default=50)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--draws", type=int, default=2000)
    ap.add_argument("--json-out", type=Path, help="also write the JSON here")
    args = ap.parse_args()

    backend = Backend(args.workspace)
    specs = [METHODS.resolve(m) for m in args.methods.split(",")]
    point_set = backend.loaded.point_set
    models = point_set.groups["ensemble"]
    if not any(p.startswith("model-") for p in models):
        raise SystemExit(f"{args.workspace} has no independently trained models: prepare it with --models N")
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else sorted({*(2 ** k for k in range(8) if 2 ** k < len(models)), len(models)})
    sets = {"checkpoints": point_set.groups["checkpoints"], **{f"models-{k}": models[:k] for k in sizes}}

    settings = EvalSettings(methods=tuple(s.name for s in specs), test_limit=args.test_limit, seed=args.seed, ral=(),
                            faithfulness_runs=0, lds=LdsSettings(subsets=args.subsets, alpha=args.alpha, seed=args.seed))
    out = Path(args.out)
    ev = Evaluation(backend, settings, out, False, lambda *_: None)
    tests = gold_tests(backend, [backend.by_id[i] for i in select_tests(backend, args.test_limit, args.seed).ids])
    subsets = sample_subsets(ev.n, settings.lds)
    retrainer, test_ids, key = retrainer_for(backend, out)
    where = [test_ids.index(t.id) for t in tests]
    started = time.perf_counter()
    outputs = {}
    for intervention in sorted({kind_of(s)[0] for s in specs}, reverse=True):
        bar = tqdm(total=len(subsets), desc=f"LDS retrains ({intervention})", unit="run")
        found = run_lds(retrainer, subsets, intervention, _StoreCache(ev.store), settings_key=key,
                        progress=lambda done, total: bar.update(done - bar.n))
        bar.close()
        outputs[intervention] = [_select(o, where) for o in found]
    retrain_seconds = time.perf_counter() - started

    side, projector = sketched_streamed_side(backend, list(range(ev.n)))
    draws = two_way_draws(len(tests), len(subsets), args.draws, args.seed)
    results, agreement = {}, {}
    started = time.perf_counter()
    for spec in specs:
        intervention, output = kind_of(spec)
        measured = np.stack([o.output(output) for o in outputs[intervention]], axis=1)
        boot, rows, per = {}, {}, {}
        for name, points in tqdm(sets.items(), desc=f"{spec.name} point sets", unit="set"):
            engine = engine_over(backend, side, projector, point_set.with_group("ensemble", points))
            scores = engine.scores(tests, spec).values.double().numpy()
            per_test = per[name] = lds_scores(scores, subsets, outputs[intervention], intervention, output)
            boot[name] = two_way_values(predicted_outputs(scores, subsets, intervention), measured, draws)
            low, high, _ = draws_summary(draw_means(boot[name]))
            fixed = summarise(per_test[~np.isnan(per_test)], seed=args.seed)
            rows[name] = {"points": list(points), "lds": round(100 * float(np.nanmean(per_test)), 1),
                          "ci_two_way": [round(100 * low, 1), round(100 * high, 1)],
                          "ci_tests": [round(100 * fixed["low"], 1), round(100 * fixed["high"], 1)]}
            if len(points) == len(models) and name != "checkpoints":
                indexed = backend.engine().scores(tests, spec).values.double().numpy()
                agreement[spec.name] = float(np.abs(indexed - scores).max() / np.abs(indexed).max())
        for name in sets:
            if name != "checkpoints":
                low, high, p = draws_summary(paired_draws(boot[name], boot["checkpoints"]))
                rows[name]["minus_checkpoints"] = {"difference": round(100 * float(np.nanmean(per[name] - per["checkpoints"])), 1),
                                                   "ci_two_way": [round(100 * low, 1), round(100 * high, 1)],
                                                   "p_two_way": round(float(p), 4)}
        for a, b in pairwise([n for n in sets if n != "checkpoints"]):
            low, high, p = draws_summary(paired_draws(boot[b], boot[a]))
            rows[b][f"minus_{a}"] = {"difference": round(100 * float(np.nanmean(per[b] - per[a])), 1),
                                     "ci_two_way": [round(100 * low, 1), round(100 * high, 1)], "p_two_way": round(float(p), 4)}
        results[spec.name] = {"intervention": intervention, "output": output, "sets": rows}
    report = {"workspace": args.workspace, "tests": len(tests), "subsets": len(subsets), "alpha": args.alpha,
              "draws": args.draws, "dim": projector.dim, "retrain_seconds": round(retrain_seconds, 1),
              "scoring_seconds": round(time.perf_counter() - started, 1), "index_agreement_max_rel": agreement,
              "models": backend.manifest.stages["models"]["records"], "methods": results}
    text = json.dumps(report, indent=1)
    print(text)
    if args.json_out:
        args.json_out.write_text(text + "\n")


if __name__ == "__main__":
    main()
