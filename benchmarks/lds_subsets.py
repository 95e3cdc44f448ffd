"""How much an LDS number depends on which subsets were drawn: a two-way bootstrap.

``evaluate --lds`` reports each method's mean LDS over tests with a bootstrap interval over the
test instances; the M random subsets are held fixed. Every test shares the same M retrains, so
the tests' values move together with the subsets, and that interval leaves the subsets' share of
the uncertainty out. This reads a finished evaluation's retrains and scores from the workspace's
store (nothing is retrained or rescored; it stops if a retrain is missing) and prints, per method:

* ``lds``: the report's mean LDS (x100) over the M subsets;
* ``ci_tests``: the report's interval (tests resampled, subsets fixed);
* ``ci_two_way``: tests and subsets both resampled with replacement (``--draws`` draws;
  :func:`core.lds.two_way_values`, which ``evaluate --lds`` reports too since this benchmark was
  written);
* ``windows``: the mean LDS over each run of ``--window`` consecutive subsets (what an
  evaluation with M = window would have reported, for each such draw).

and per pair of methods checked against the same retrains: the two-way interval of the
difference and a two-sided bootstrap p. Pass the ``evaluate`` options the run used (test limit,
seed, subsets, alpha); ``--interventions remove`` reads only the ``remove`` retrains.

    python benchmarks/lds_subsets.py --workspace workspaces/sentihood-1k-s0 \\
        --out workspaces/sentihood-1k-s0/evaluation-m50 --test-limit 100 --subsets 50
"""
from __future__ import annotations

import argparse
import json
from itertools import combinations
from pathlib import Path

import numpy as np
from common import Backend

from core.evaluate import EvalSettings, select_tests
from core.evaluate.context import Evaluation
from core.evaluate.counterfactual import (
    _scores,
    _select,
    _StoreCache,
    kind_of,
    retrainer_for,
)
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
from core.stats import draws_summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workspace", required=True)
    ap.add_argument("--out", required=True, help="the evaluation's --out folder (its retrains' work folder)")
    ap.add_argument("--test-limit", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--subsets", type=int, default=50)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--window", type=int, default=5)
    ap.add_argument("--draws", type=int, default=2000)
    ap.add_argument("--interventions", nargs="+", choices=["remove", "mask"], default=["remove", "mask"],
                    help="only the methods checked by these retrains (e.g. remove while the mask retrains still run)")
    args = ap.parse_args()

    backend = Backend(args.workspace)
    settings = EvalSettings(methods=("all",), test_limit=args.test_limit, seed=args.seed, ral=(),
                            faithfulness_runs=0, lds=LdsSettings(subsets=args.subsets, alpha=args.alpha, seed=args.seed))
    ev = Evaluation(backend, settings, Path(args.out), False, lambda *_: None)
    tests = [backend.test_input(i, label="gold") for i in select_tests(backend, args.test_limit, args.seed).ids]
    subsets = sample_subsets(ev.n, settings.lds)
    _, test_ids, key = retrainer_for(backend, Path(args.out))
    where = [test_ids.index(t.id) for t in tests]

    def missing(*_):
        raise RuntimeError("a retrain of this evaluation is not in the store; run evaluate --lds first")

    specs = [s for s in ev.reported if kind_of(s)[0] in args.interventions]
    outputs = {iv: [_select(o, where) for o in run_lds(missing, subsets, iv, _StoreCache(ev.store), settings_key=key)]
               for iv in {kind_of(s)[0] for s in specs}}
    q, m = len(tests), len(subsets)
    draws = two_way_draws(q, m, args.draws, args.seed)
    pairs, boot, methods, per = {}, {}, {}, {}
    for spec in specs:
        iv, output = kind_of(spec)
        scores = _scores(ev, spec, tests, stored_only=True)  # the default scoring settings: read, never rescored
        predicted = predicted_outputs(scores, subsets, iv)
        measured = np.stack([o.output(output) for o in outputs[iv]], axis=1)
        per_test = per[spec.name] = lds_scores(scores, subsets, outputs[iv], iv, output)
        boot[spec.name] = two_way_values(predicted, measured, draws)
        windows = [np.nanmean(lds_scores(scores, subsets[w:w + args.window], outputs[iv][w:w + args.window], iv, output))
                   for w in range(0, m - args.window + 1, args.window)]
        low, high, _ = draws_summary(draw_means(boot[spec.name]))
        fixed = summarise(per_test[~np.isnan(per_test)], seed=args.seed)
        methods[spec.name] = {"intervention": iv, "output": output, "lds": round(100 * float(np.nanmean(per_test)), 1),
                              "ci_tests": [round(100 * fixed["low"], 1), round(100 * fixed["high"], 1)],
                              "ci_two_way": [round(100 * low, 1), round(100 * high, 1)],
                              "windows": [round(100 * w, 1) for w in windows]}
    for a, b in combinations(methods, 2):
        if (methods[a]["intervention"], methods[a]["output"]) != (methods[b]["intervention"], methods[b]["output"]):
            continue
        low, high, p = draws_summary(paired_draws(boot[a], boot[b]))
        pairs[f"{a} - {b}"] = {"difference": round(100 * float(np.nanmean(per[a] - per[b])), 1),
                               "ci_two_way": [round(100 * low, 1), round(100 * high, 1)], "p_two_way": round(float(p), 4)}
    print(json.dumps({"workspace": args.workspace, "interventions": args.interventions, "tests": q, "subsets": m,
                      "window": args.window,
                      "draws": args.draws, "methods": methods, "pairs": pairs}, indent=1))


if __name__ == "__main__":
    main()
