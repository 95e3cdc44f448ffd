"""Where a single query's time goes, and two of its parts against what they replaced, side by side.

* stages of one TracIn query (median over repeats, each test in turn): the frozen prefix of the
  test input, the test side at each checkpoint, the inner products over the index, and the
  whole ``Engine.scores`` call;
* hashing one row's gradient (every trainable block): split into parts (``Projector.sketch``)
  against one ``index_add_`` per block;
* switching to a point and back: ``LoadedModel.at`` against copying it in with ``use``.

Prints JSON. ``python benchmarks/query_stages.py --workspace workspaces/mams-full``
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Callable

import torch
from common import Backend, gold_tests

from core.registry import METHODS


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return round(1000 * statistics.median(times), 2)


def stages(backend: Backend, tests, repeats: int) -> dict:
    engine = backend.engine()
    spec = METHODS.resolve("TracIn")
    points = engine.points.of(spec.points, spec.name)
    out: dict[str, list[float]] = {"prefix": [], "test_side_per_point": [], "dot_per_point": [], "scores_call": []}
    for test in tests:
        batch = engine.test_batch([test], masked=False)
        vecs = engine.test_vectors([test], points[0], "full", batch)
        out["prefix"].append(median_ms(lambda: engine.test_batch([test], masked=False), repeats))
        out["test_side_per_point"].append(median_ms(lambda: [engine.test_vectors([test], p, "full", batch) for p in points], repeats) / len(points))
        out["dot_per_point"].append(median_ms(lambda: engine.side.dot_many(points[0], {"q": ("full", vecs)}), repeats))
        out["scores_call"].append(median_ms(lambda: engine.scores([test], spec), repeats))
    lengths = [len(backend.loaded.encode(t.aspect, t.text)) for t in tests]
    return {"method": "TracIn", "points": len(points), "tokens": [min(lengths), max(lengths)],
            "median_ms": {k: round(statistics.median(v), 2) for k, v in out.items()}}


def hashing(backend: Backend, repeats: int) -> dict:
    projector = backend.engine().projector
    gen = torch.Generator().manual_seed(0)
    rows = {b.param: torch.randn(1, b.size, generator=gen) for b in projector.blocks}
    out = torch.zeros(1, projector.dim)

    def split() -> None:
        for b in projector.blocks:
            projector.sketch(b, rows[b.param], out)

    def whole() -> None:
        for b in projector.blocks:
            out.index_add_(1, projector.buckets[b.param], rows[b.param])

    split_ms, whole_ms = median_ms(split, repeats), median_ms(whole, repeats)
    return {"values": projector.params, "split_ms": split_ms, "index_add_ms": whole_ms,
            "speedup": round(whole_ms / split_ms, 2)}


def point_switch(backend: Backend, repeats: int) -> dict:
    loaded = backend.loaded
    point = next(p for p in loaded.point_set.names() if p != "final")

    def copy() -> None:
        loaded.use(point)
        loaded.use("final")

    def alias() -> None:
        with loaded.at(point):
            pass

    copy_ms, alias_ms = median_ms(copy, repeats), median_ms(alias, repeats)
    return {"copy_in_and_back_ms": copy_ms, "at_ms": alias_ms, "speedup": round(copy_ms / alias_ms, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", required=True)
    parser.add_argument("--queries", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    backend = Backend(args.workspace)
    tests = gold_tests(backend, random.Random(0).sample(backend.instances("test"), args.queries))
    print(json.dumps({"workspace": args.workspace, "train": len(backend.train_ids), "d": backend.index.meta["dim"],
                      "threads": torch.get_num_threads(), "stages": stages(backend, tests, args.repeats),
                      "one_row_hashing": hashing(backend, args.repeats),
                      "point_switch": point_switch(backend, args.repeats)}, indent=2))


if __name__ == "__main__":
    main()
