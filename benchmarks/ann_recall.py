"""Approximate top-K on a real index: recall of FAISS candidates (core/ann.py) against the exact
lists, for real test instances and real gradient rows.

``benchmarks/scale.py`` measures recall on synthetic low-rank rows with random queries; this
measures it where it matters: a prepared workspace's index, its methods' own test vectors (gold
labels), proponents and opponents. For each ``--ranks`` value the FAISS files of ``--methods``
are built again (``core.ann.build_ann``; seconds and the share of the rows' energy the
projection keeps, per matrix), then every test is explained exactly (``Backend.explain``,
not cached) and approximately with each ``--candidates`` value. Reported per method, rank and
candidates: mean and minimum recall@K of the proponents and of the opponents over the tests,
and the p50 seconds of the exact and the approximate explanation (the test vectors included in
both; the ratio is what a user gains, which grows with N).

What would make it misleading: a small training set, where K x candidates is a large share of
the rows (recall is then near 1 whatever the layout; the JSON gives the share per matrix, and a
method reading several matrices rescores the union of theirs); a loaded machine (compare the
ratios of one run, not its seconds). The workspace's FAISS files are left at the last rank of
``--ranks``, so a later ``index --ann`` at another rank rebuilds them.

Prints JSON. ``python benchmarks/ann_recall.py --workspace workspaces/mams-full --methods TracIn++,IF++,TRAK --tests 50``
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from common import Backend, gold_tests

from core.ann import AnnSettings, ann_record, build_ann, list_recall
from core.registry import METHODS


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workspace", required=True, type=Path, help="a prepared workspace with a sketched index")
    p.add_argument("--methods", default="TracIn++,IF++", help="comma-separated method names")
    p.add_argument("--tests", type=int, default=50, help="test instances (the first ones of the test split)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--ranks", default="64,256", help="projection ranks, comma-separated (one FAISS build each)")
    p.add_argument("--candidates", default="1,5,20", help="candidates per K, comma-separated")
    args = p.parse_args()
    backend = Backend(args.workspace)
    methods = [METHODS.resolve(m).name for m in args.methods.split(",")]
    tests = gold_tests(backend, backend.instances("test")[: args.tests])
    exact, exact_s = {}, {m: [] for m in methods}
    for test in tests:
        for m in methods:
            got = backend.explain(test, m, k=args.k, use_cache=False)
            exact[test.id, m] = got
            exact_s[m].append(got.seconds)
    index = backend.index
    out = {"workspace": str(args.workspace), "training_rows": len(index.ids), "dim": index.settings.dim,
           "tests": len(tests), "k": args.k, "builds": []}
    for rank in (int(r) for r in args.ranks.split(",")):
        build = {"rank": rank, "matrices": {}}
        for point, kind in backend.ann_terms(methods):
            started = time.perf_counter()
            build_ann(index, point, kind, AnnSettings(rank=rank), seed=index.settings.seed)
            record = ann_record(index, point, kind)
            build["matrices"][f"{point}.{kind}"] = {"seconds": round(time.perf_counter() - started, 1),
                                                    "rank": record["rank"], "energy_kept": record["energy_kept"]}
        build["searches"] = []
        for cand in (int(c) for c in args.candidates.split(",")):
            for m in methods:
                recalls, lows, approx_s = [], [], []
                for test in tests:
                    got = backend.explain_approximate(test, m, k=args.k, search=AnnSettings(candidates=cand))
                    want = exact[test.id, m]
                    recalls.append(list_recall(got.top, want.top))
                    lows.append(list_recall(got.opponents, want.opponents))
                    approx_s.append(got.seconds)
                row = {"method": m, "candidates": cand,
                       "candidate_share_of_rows_per_matrix": round(min(1.0, cand * args.k / len(index.ids)), 4),
                       "recall_mean": round(statistics.mean(recalls), 4), "recall_min": min(recalls),
                       "opponents_recall_mean": round(statistics.mean(lows), 4), "opponents_recall_min": min(lows),
                       "exact_p50_seconds": round(statistics.median(exact_s[m]), 4),
                       "approx_p50_seconds": round(statistics.median(approx_s), 4)}
                build["searches"].append(row)
                print(json.dumps({"rank": rank, **row}), file=sys.stderr, flush=True)
        out["builds"].append(build)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
