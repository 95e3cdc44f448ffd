"""Past one machine: the index build on Ray against one process, and queries over indexes that do
not fit in memory, exact and approximate (FAISS).

1. ``build``: the workspace's index (its settings: d, seed, batch; the ``grad`` group at every
   point) built three times from scratch in a temporary copy of the workspace (model, caches and
   instances; the workspace itself is only read): in this process (torch's default threads),
   then as shard tasks (:mod:`core.index_shards`) on a local Ray with 1 and with 2 one-thread
   workers. Printed: seconds, training rows x points per second, each Ray build's speed-up over
   the single process, and whether its rows equal the single process's (bit for bit; the
   single-process build runs at torch's default threads, so tiny float differences are possible
   and the largest difference is printed).
2. ``query``: a synthetic index (tests/synthetic.py: rank-64 rows plus noise, float32, only the
   queried kind filled) at each ``--sizes`` N and ``--dim`` d, queried by a fresh process that
   streams it (:class:`core.training_sides.IndexedSide`, blocks of 64 MiB, pages dropped after
   each): p50 and max seconds over ``--repeats`` queries of ``--queries`` test vectors, and that
   process's peak resident memory (VmHWM) against the matrix's size. The first query reads from
   disk; later ones may hit the OS page cache when the matrix fits in it (both are reported).
3. ``ann``: at the largest N, a FAISS index per ``--ranks`` value (core/ann.py: the rows
   projected onto that many leading directions, 8 bits per coordinate) built over the matrix
   and searched with each ``--candidates`` value; each search's top-10 against the exact top-10
   of the same queries (recall@10), p50 latency of both, build seconds, the share of the rows'
   energy the projection keeps and the FAISS file's size. Rows of a random low-rank model are a
   stand-in for gradient rows; recall on real rows can differ.

What would make it misleading: a loaded machine (the Ray workers and the single process share
2 cores; run it alone); the build's first seconds on Ray include starting the workers and
loading the model there, which a large build amortises; the page cache (a second query of an
index smaller than free memory reads no disk).

Prints JSON. ``python benchmarks/scale.py --workspace workspaces/mams-1k-s0 --sizes 11186,100000,1000000``
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.index import GradientIndex  # noqa: E402
from core.index_build import build_index  # noqa: E402
from core.parallel import RaySettings, mapper  # noqa: E402
from core.workspace import Workspace  # noqa: E402
from tests.synthetic import synthetic_index  # noqa: E402

COPIED = ("manifest.json", "instances.jsonl", "model", "prefix")
QUERY = """
import json, sys, time
import numpy as np, torch
from pathlib import Path
from core.index import GradientIndex
from core.training_sides import IndexedSide
side = IndexedSide(GradientIndex(Path(sys.argv[1])))
vecs = torch.from_numpy(np.random.default_rng(1).standard_normal((int(sys.argv[2]), side.index.settings.dim),
                                                                   dtype=np.float32))
seconds = []
for _ in range(int(sys.argv[3])):
    started = time.perf_counter()
    side.dot_many("final", {"q": ("full", vecs)})
    seconds.append(time.perf_counter() - started)
peak = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"seconds": seconds, "peak_rss_mib": int(peak.split()[1]) / 1024}))
"""


def build(workspace: Path, work: Path) -> dict:
    """The three builds of the workspace's index (see the module docstring)."""
    source = Workspace(workspace)
    settings = GradientIndex(workspace / "index").settings
    out, rows = {}, {}
    for name, ray in (("single_process", None), ("ray_1_worker", 1), ("ray_2_workers", 2)):
        copy = work / name
        copy.mkdir(parents=True)
        for part in COPIED:
            if (source.root / part).is_dir():
                shutil.copytree(source.root / part, copy / part)
            else:
                shutil.copy(source.root / part, copy / part)
        ws = Workspace(copy)
        started = time.perf_counter()
        if ray is None:
            index = build_index(ws, settings, device="cpu", progress=False, log=lambda _: None)
        else:  # Ray's tasks reserve no GPU, so they run on the CPU: so does the single process
            with mapper(RaySettings(num_cpus=ray, device="cpu")) as pool:
                index = build_index(ws, settings, progress=False, log=lambda _: None, mapper=pool)
        seconds = time.perf_counter() - started
        n, points = len(index.ids), len(index.points)
        out[name] = {"seconds": round(seconds, 1), "rows_x_points_per_second": round(n * points / seconds, 1)}
        rows[name] = {(p, k): index.matrix(p, k).numpy() for p in index.points for k in ("full", "diff")}
        if ray is not None:
            diff = max(float(np.abs(rows[name][key] - ref).max()) for key, ref in rows["single_process"].items())
            out[name].update(speedup=round(out["single_process"]["seconds"] / seconds, 2),
                             equal_to_single_process=diff == 0.0, max_abs_difference=diff)
    return {"training_rows": n, "points": points, "dim": settings.dim, **out}


def query(root: Path, queries: int, repeats: int) -> dict:
    """A fresh process's query timings and peak memory over the index at ``root``."""
    done = subprocess.run([sys.executable, "-c", QUERY, str(root), str(queries), str(repeats)], capture_output=True,
                          text=True, cwd=ROOT, check=True)
    got = json.loads(done.stdout.strip().splitlines()[-1])
    seconds = got["seconds"]
    return {"first_query_seconds": round(seconds[0], 3), "p50_seconds": round(float(np.median(seconds)), 3),
            "max_seconds": round(max(seconds), 3), "peak_rss_mib": round(got["peak_rss_mib"], 1),
            "matrix_mib": round((root / "final.full.npy").stat().st_size / 2**20, 1)}


def ann(root: Path, queries: int, repeats: int, ranks: list[int], candidates: list[int]) -> dict:
    """FAISS against the exact top-10 over the index at ``root``: built once per rank, searched
    with every number of candidates (a search-time choice: no rebuild)."""
    import torch

    from core.ann import AnnSearch, AnnSettings, ann_record, build_ann, recall_at_k
    from core.training_sides import IndexedSide

    index = GradientIndex(root)
    vecs = torch.from_numpy(np.random.default_rng(2).standard_normal((queries, index.settings.dim), dtype=np.float32))
    exact_s = []
    for _ in range(repeats):
        started = time.perf_counter()
        exact = IndexedSide(index).dot_many("final", {"q": ("full", vecs)})["q"].numpy()
        exact_s.append(time.perf_counter() - started)
    builds = []
    for rank in ranks:
        started = time.perf_counter()
        path = build_ann(index, "final", "full", AnnSettings(rank=rank))
        built = time.perf_counter() - started
        searches = []
        for cand in candidates:
            search = AnnSearch(index, [("final", "full")], AnnSettings(candidates=cand))
            approx_s = []
            for _ in range(repeats):
                started = time.perf_counter()
                positions, _ = search.top_k({("final", "full"): vecs}, {("final", "full"): 1.0}, k=10)
                approx_s.append(time.perf_counter() - started)
            searches.append({"candidates": cand, "recall_at_10": recall_at_k(positions, exact, 10),
                             "ann_p50_seconds": round(float(np.median(approx_s)), 3)})
            print(json.dumps({"rank": rank, **searches[-1]}), file=sys.stderr, flush=True)
        builds.append({"rank": rank, "energy_kept": ann_record(index, "final", "full")["energy_kept"],
                       "build_seconds": round(built, 1), "ann_file_mib": round(path.stat().st_size / 2**20, 1),
                       "searches": searches})
    import faiss

    return {"exact_p50_seconds": round(float(np.median(exact_s)), 3), "torch_threads": torch.get_num_threads(),
            "faiss_threads": faiss.omp_get_max_threads(), "builds": builds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workspace", type=Path, help="a prepared workspace with an index (omit: no build part)")
    p.add_argument("--sizes", default="11186,100000,1000000", help="synthetic index rows N, comma-separated")
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--queries", type=int, default=16, help="test vectors per query (the evaluation's batch)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--ranks", default="64,256", help="projection ranks, comma-separated (one FAISS build each)")
    p.add_argument("--candidates", default="1,5,20", help="candidates per K before exact rescoring, comma-separated")
    p.add_argument("--no-ann", action="store_true")
    p.add_argument("--work", type=Path, help="folder for the temporary indexes (default: a temporary folder)")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="spanlens-scale-", dir=args.work))
    out: dict = {}
    try:
        if args.workspace:
            out["build"] = build(args.workspace, work / "build")
            print(json.dumps(out["build"]), file=sys.stderr, flush=True)
        sizes = [int(s) for s in args.sizes.split(",")]
        out["query"] = {}
        for n in sizes:
            root = synthetic_index(work / f"n{n}", n, args.dim, filled=("full",), rank=64)
            out["query"][n] = {"dim": args.dim, "queries": args.queries, **query(root, args.queries, args.repeats)}
            print(json.dumps({n: out["query"][n]}), file=sys.stderr, flush=True)
            if n != max(sizes):
                shutil.rmtree(root)
        if not args.no_ann:
            out["ann"] = {"rows": max(sizes), **ann(work / f"n{max(sizes)}", args.queries, args.repeats,
                                                    [int(v) for v in args.ranks.split(",")],
                                                    [int(v) for v in args.candidates.split(",")])}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
