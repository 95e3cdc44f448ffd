"""Cost of the new methods (issue 13): EK-FAC fitting, query latency of EKFAC/EKFAC++/TRAK/TRAK++
against IF++, and how much the TRAK rows and the EK-FAC factors add to a workspace on disk.

Needs a workspace indexed with ``--with trak,ekfac``. Three parts, in one run:

* ``ekfac_fit``: the EK-FAC factors fitted from scratch at theta on the training inputs' cached
  prefix states, exactly as ``index --with ekfac`` fits them (two passes, the index's batch
  size, partial sums flushed to a work folder), but into a temporary folder: the workspace's
  ``ekfac/`` is only read (its recorded build time is shown for reference). Reports seconds,
  training instances per second and memory: the process's peak RSS after the fit
  (``resource.getrusage``), its RSS just before, and the difference, a lower bound on the fit's
  own peak (the process already held the model and the caches). One batch is fitted first,
  untimed, to warm autograd and the thread pools as the index build warms them before a real
  fit. ``--ekfac-sample N`` fits on N seeded training instances only; ``full_seconds_estimate``
  then scales the time linearly to the whole training set. Both passes are linear in the
  instances; the eigendecompositions between them are a fixed cost that the scaling multiplies
  too, so the estimate errs high.
* ``query_latency``: seconds of one ``Engine.scores`` call per test input for IF++ (fast mode,
  the default; the comparison's baseline) and EKFAC, EKFAC++, TRAK, TRAK++, on the same
  ``--queries`` test inputs (gold labels). Each method is first run once, untimed, so that its
  inverse is factorised (the Gauss-Newton Cholesky, TRAK's per-checkpoint Phi^T Phi) or loaded
  (the EK-FAC factors) and the index files it reads have been read once (memory-mapped: their
  pages in the OS cache, as on a machine serving queries); then each test is timed
  for every method in turn, the method order rotating from test to test, so that a slow spell
  of a shared machine falls on all methods alike. Reports p50 and max in ms and the p50 as a
  ratio to IF++'s (the issue's target: within 2x) with a 95 % interval (the queries resampled, the
  same draw for the method and IF++); the median over the queries of each query's own ratio to
  IF++'s time on that query (``paired_ratio_median``, with its interval from the same draws: the
  queries' own lengths cancel in it); each query's ms (``per_query_ms``, in the order of the
  queries); and per method the median ms per query of
  its stages (``stages_p50_ms``): the test inputs' frozen prefix, the test vectors (one backward
  pass per point; EK-FAC's, formed in its eigenbasis, counted here and not in its inverse), the
  inverse, the inner products with the index rows, and the rest (each median on its own). Where
  the index keeps TRAK's rows whitened (:mod:`core.whitening`), TRAK and TRAK++ are also timed
  with the inverse applied to the test side at query time, in the same rotation (the path
  before whitening, but over the rows as the index keeps them, float16 or float32; ``... (inverse
  at query time)``, a timing only: its scores apply the inverse twice). Where it keeps them in float16 (:func:`core.index.half_rows`), TRAK and TRAK++ are also
  timed over float32 whitened rows, the rows before they were kept in float16 (``... (float32
  rows)``): those of ``--float32-rows DIR`` when given, else the float16 rows widened (the same
  bytes read, so the same timing), in a temporary copy of the index (links to its other files).
* ``batched_latency`` (where the index keeps TRAK's rows in float16): median seconds of one call
  scoring the first 32 latency tests at once with TRAK and TRAK++, over the float16 rows and over
  the float32 rows, and their ratio (past 8 tests the float16 rows are widened in the product).
* ``half_rows`` (with ``--float32-rows DIR``, a folder of float32 whitened TRAK rows
  ``<point>.<kind>.white.npy`` copied from an index whitened before the rows were kept in float16,
  before ``index`` converted them): per latency test, how TRAK's and TRAK++'s scores over the
  float16 rows differ from those over the float32 rows: relative L2 error, Spearman correlation
  and the share of the top 10 kept; median and worst over the tests.
* ``index_growth``: bytes on disk of the TRAK group (its rows, whitened or not, and
  ``<point>.trak-gram.npz`` over TRAK's points; ``trak_whitened`` lists the points whose rows
  are whitened: they replace the rows as computed, in float16 with a float32 scale per row, so
  whitening halves them) against the
  default ``grad`` group (``<point>.full.npy``, ``<point>.diff.npy`` and ``ggn.npz``), as a
  ratio, each with its span-patch overlays (``patch.<group>.<point>.npz``) where present; the
  TRAK rows and TRAK's d x d float64 Gram matrices are also given apart (at large d the Gram
  matrices can outweigh the rows); the EK-FAC factors' bytes (the workspace's file and the
  one fitted here) and the index's ``ekfac`` rows (the gradients in the factors' eigenbasis, at
  theta only) against the ``grad`` group.

What would make the result misleading: a machine busy with other work during the timed calls
(the rotation spreads it over the methods, it does not remove it; rerun on a quiet machine and
compare the ratios, not the absolute ms); a GPU run, where the first EK-FAC pass also pays CUDA
start-up and RSS does not count GPU memory (``cuda_peak_mib`` does); a workspace whose index was
built with another d than the one to be compared, since TRAK's Gram matrices grow as d^2; and
``--ekfac-sample`` far below the training set, where the fixed costs make the estimate high.
No timing is asserted anywhere.

Prints JSON. ``python benchmarks/new_methods.py --workspace workspaces/mams-full --queries 20``
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import Backend, current_rss_mib, gold_tests, peak_rss_mib

from core.ekfac import Eigenbasis, fit_ekfac
from core.engine import Engine
from core.index import GradientIndex, rows_file, scales_file
from core.model import HiddenCache
from core.registry import METHODS
from core.scoring import ScoreSettings
from core.stats import draws_summary
from core.training_sides import IndexedSide

BASELINE = "IF++"
NEW = ["EKFAC", "EKFAC++", "TRAK", "TRAK++"]
TARGET_RATIO = 2.0
QUERY_TIME = " (inverse at query time)"
WIDE = " (float32 rows)"
DRAWS = 2000


def ekfac_fit(backend: Backend, sample: int | None, batch_size: int, seed: int) -> dict:
    """Fit the factors from scratch into a temporary folder; time and memory."""
    loaded = backend.loaded
    full, _ = backend.train_cache()
    n_all = len(full)
    rows = sorted(random.Random(seed).sample(range(n_all), sample)) if sample and sample < n_all else list(range(n_all))
    cache = full if len(rows) == n_all else HiddenCache([full.states[i] for i in rows])
    cuda = loaded.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    # untimed warm-up on one batch (first autograd passes, thread pools), as the index build before a
    # real fit has warmed them; without a work folder, so it leaves nothing behind
    fit_ekfac(loaded.split, HiddenCache(cache.states[:batch_size]), batch_size=batch_size, device=loaded.device)
    rss_before, peak_before = current_rss_mib(), peak_rss_mib()
    with tempfile.TemporaryDirectory(prefix="ekfac-bench-") as work:
        started = time.perf_counter()
        factors = fit_ekfac(loaded.split, cache, batch_size=batch_size, device=loaded.device, work_dir=Path(work),
                            progress=False)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        path = Path(work) / "factors.safetensors"
        factors.save(path)
        fitted_bytes = path.stat().st_size
    loaded.use("final")
    peak_after = peak_rss_mib()
    out = {"instances": len(rows), "train": n_all, "batch_size": batch_size, "seconds": round(seconds, 2),
           "examples_per_s": round(len(rows) / seconds, 1), "corrected": factors.corrected,
           "linear_weights": len(factors.q_out), "diagonal_tensors": len(factors.diagonals),
           "factors_bytes": fitted_bytes, "rss_before_mib": rss_before, "peak_rss_before_mib": peak_before,
           "peak_rss_after_mib": peak_after,
           "fit_peak_over_before_mib": None if rss_before is None else round(peak_after - rss_before, 1)}
    if len(rows) < n_all:
        out["full_seconds_estimate"] = round(seconds * n_all / len(rows), 1)
        out["estimate"] = "linear in the instances, fixed costs (eigendecompositions) scaled too: errs high"
    if cuda:
        out["cuda_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    try:
        recorded = json.loads((backend.ws.root / "ekfac" / "meta.json").read_text())
        out["workspace_recorded_seconds"] = recorded.get("seconds")  # includes loading the model and the cache
    except (OSError, json.JSONDecodeError):
        pass
    return out


class StageClock:
    """Seconds spent in some of the engine's stages, exclusive: a stage called inside another
    (EK-FAC's inverse forms its own test vectors) counts in the inner one only."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = {}
        self._inner: list[float] = []

    def wrap(self, obj: object, attr: str, stage: str) -> None:
        original = getattr(obj, attr)

        def timed(*args, **kwargs):
            self._inner.append(0.0)
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                total = time.perf_counter() - started
                self.spent[stage] = self.spent.get(stage, 0.0) + total - self._inner.pop()
                if self._inner:
                    self._inner[-1] += total

        setattr(obj, attr, timed)


class QueryTimeInverse:
    """The index's side, claiming its TRAK rows are as computed: TRAK's inverse is then applied to
    the test features at query time, the path before the rows were whitened. For timing only:
    over the whitened rows the inverse is applied twice, so these scores are not TRAK's."""

    def __init__(self, side):
        self.side = side

    def __getattr__(self, name: str):
        return getattr(self.side, name)

    def whitened(self, point: str) -> None:
        return None


def over(engine: Engine, side) -> Engine:
    """The engine's model, sketch and points over another training side."""
    return Engine(engine.loaded, side, engine.projector, points=engine.points)


def half_points(index: GradientIndex) -> list[str]:
    """TRAK's points whose whitened rows the index keeps in float16."""
    return [p for p in index.group_points.get("trak", [])
            if index._map(index.file_of(p, "trak")).dtype == np.float16]


def wide_index(index: GradientIndex, folder: Path, source: Path | None) -> GradientIndex:
    """A copy of the index in ``folder`` whose float16 TRAK rows are float32: those in ``source``,
    else the float16 rows widened; links to its other files."""
    wide = {rows_file(p, k, white=True): (p, k) for p in half_points(index) for k in ("trak", "trak-diff")}
    scales = {scales_file(p, k) for p, k in wide.values()}
    for path in index.root.iterdir():
        if path.is_file() and path.name not in scales and not path.name.startswith("ann."):
            if path.name not in wide:
                (folder / path.name).symlink_to(path)
            elif source is not None:
                given = np.load(source / path.name, mmap_mode="r")
                if given.shape != (len(index.ids), index.meta["dim"]) or given.dtype != np.float32:
                    raise SystemExit(f"{source / path.name}: {given.dtype} {given.shape}, not this index's "
                                     f"float32 ({len(index.ids)}, {index.meta['dim']}) rows")
                (folder / path.name).symlink_to((source / path.name).resolve(strict=True))
            else:
                rows = np.lib.format.open_memmap(folder / path.name, mode="w+", dtype=np.float32,
                                                 shape=(len(index.ids), index.meta["dim"]))
                for start, block in index.blocks(*wide[path.name]):
                    rows[start : start + len(block)] = block.numpy()
                rows.flush()
    return GradientIndex(folder)


def query_latency(backend: Backend, tests, methods: list[str], wide: GradientIndex | None) -> dict:
    """p50 and max ms of one-test scores per method, measured side by side after warming each,
    and the median ms per query of each stage. Where the index keeps TRAK's rows whitened, TRAK
    and TRAK++ are also timed with the inverse applied at query time (``QUERY_TIME``, timing only:
    :class:`QueryTimeInverse`), and over ``wide``'s float32 rows (``WIDE``), in the same rotation."""
    engine = backend.engine()
    runs = [(m, engine, METHODS.resolve(m)) for m in methods]
    trak = [m for m in methods if METHODS.resolve(m).inverse == "trak"]
    trak_points = backend.index.group_points.get("trak", [])
    if trak_points and all(backend.index.whitened(p) is not None for p in trak_points):
        slow = over(engine, QueryTimeInverse(engine.side))
        runs += [(m + QUERY_TIME, slow, METHODS.resolve(m)) for m in trak]
    if wide is not None:
        runs += [(m + WIDE, over(engine, IndexedSide(wide)), METHODS.resolve(m)) for m in trak]
    warm = {}
    for name, eng, spec in runs:  # inverses factorised or loaded, index matrices read
        started = time.perf_counter()
        eng.scores(tests[:1], spec)
        warm[name] = round(1000 * (time.perf_counter() - started), 1)
    clock = StageClock()
    for eng in dict.fromkeys(e for _, e, _ in runs):
        for attr, stage in (("test_batch", "test_prefix"), ("test_vectors", "test_vectors")):
            clock.wrap(eng, attr, stage)
        for inverse in {id(i): i for i in (eng.inverse(s, ScoreSettings()) for _, e, s in runs
                                           if e is eng and s.inverse)}.values():
            clock.wrap(inverse, "apply", "inverse")
    for side in dict.fromkeys(e.side for _, e, _ in runs if not isinstance(e.side, QueryTimeInverse)):
        clock.wrap(side, "dot_many", "inner_products")  # the query-time path's side reads the index's
    times: dict[str, list[float]] = {name: [] for name, _, _ in runs}
    stages: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in runs}
    for q, test in enumerate(tests):
        for name, eng, spec in runs[q % len(runs):] + runs[: q % len(runs)]:
            clock.spent.clear()
            started = time.perf_counter()
            eng.scores([test], spec)
            times[name].append(time.perf_counter() - started)
            stages[name].append(dict(clock.spent, other=times[name][-1] - sum(clock.spent.values())))
    base = statistics.median(times[BASELINE])
    out: dict = {"queries": len(tests), "baseline": BASELINE, "ihvp": "fast", "target_ratio": TARGET_RATIO,
                 "ratio_interval": f"95 % percentile bootstrap over the queries ({DRAWS} draws, paired)"}
    draws = np.random.default_rng(0).integers(0, len(tests), size=(DRAWS, len(tests)))  # the same draws for all
    baseline = np.array(times[BASELINE])
    for name, values in times.items():
        p50 = statistics.median(values)
        names = dict.fromkeys(k for record in stages[name] for k in record)
        mine = np.array(values)
        low, high, _ = draws_summary(np.median(mine[draws], axis=1) / np.median(baseline[draws], axis=1))
        paired = mine / baseline
        paired_low, paired_high, _ = draws_summary(np.median(paired[draws], axis=1))
        out[name] = {"p50_ms": round(1000 * p50, 2), "max_ms": round(1000 * max(values), 2),
                     "first_call_ms": warm[name], "p50_ratio_to_if_pp": round(p50 / base, 2),
                     "p50_ratio_ci95": [round(low, 2), round(high, 2)],
                     "paired_ratio_median": round(float(np.median(paired)), 2),
                     "paired_ratio_ci95": [round(paired_low, 2), round(paired_high, 2)],
                     "per_query_ms": [round(1000 * t, 2) for t in values],
                     "stages_p50_ms": {k: round(1000 * statistics.median(r.get(k, 0.0) for r in stages[name]), 2)
                                       for k in names}}
    return out


def batched_latency(backend: Backend, wide: GradientIndex, tests, repeats: int = 5) -> dict:
    """Median seconds of one ``scores_many`` call over all ``tests`` for TRAK and TRAK++ over the
    float16 rows and over ``wide``'s float32 rows, in turn (past ``HALF_GEMM_MAX`` tests a call
    widens the float16 rows: it should cost what the float32 rows cost)."""
    engine = backend.engine()
    engines = {"float16 rows": engine,
               "float32 rows": over(engine, IndexedSide(wide))}
    specs = [METHODS.resolve(m) for m in NEW if METHODS.resolve(m).inverse == "trak"]
    times: dict[str, list[float]] = {name: [] for name in engines}
    for e in engines.values():
        e.scores_many(tests, specs)  # warm
    for _ in range(repeats):
        for name, e in engines.items():
            started = time.perf_counter()
            e.scores_many(tests, specs)
            times[name].append(time.perf_counter() - started)
    out = {"tests_per_call": len(tests), "methods": [s.name for s in specs], "repeats": repeats,
           **{f"{name} s": round(statistics.median(v), 2) for name, v in times.items()}}
    out["ratio"] = round(out["float16 rows s"] / out["float32 rows s"], 2)
    return out


def half_rows_agreement(backend: Backend, wide: GradientIndex, tests, top: int = 10) -> dict:
    """Per test, TRAK's and TRAK++'s scores over the float16 rows against those over the float32
    rows: relative L2 error, Spearman correlation, share of the top ``top`` kept (median, worst)."""
    from scipy.stats import spearmanr

    engine = backend.engine()
    wide_engine = over(engine, IndexedSide(wide))
    out: dict = {"tests": len(tests), "top": top}
    for name in [m for m in NEW if METHODS.resolve(m).inverse == "trak"]:
        spec, errors, rhos, kept = METHODS.resolve(name), [], [], []
        for test in tests:
            half = engine.scores([test], spec).values[0].double()
            full = wide_engine.scores([test], spec).values[0].double()
            errors.append(float((half - full).norm() / full.norm()))
            rhos.append(float(spearmanr(half.numpy(), full.numpy()).statistic))
            kept.append(len(set(half.topk(top).indices.tolist()) & set(full.topk(top).indices.tolist())) / top)
        out[name] = {"relative_l2_median": float(f"{statistics.median(errors):.3g}"),
                     "relative_l2_max": float(f"{max(errors):.3g}"),
                     "spearman_median": round(statistics.median(rhos), 6), "spearman_min": round(min(rhos), 6),
                     f"top{top}_kept_median": statistics.median(kept), f"top{top}_kept_min": min(kept)}
    return out


def solve_and_precision(backend: Backend, tests) -> dict:
    """What the query path's two shortcuts cost and save, on the workspace's own matrices.

    ``solve``: ms (median of 20) of one vector through the damped Gauss-Newton inverse as the
    engine applies it (an explicit float64 inverse, :class:`DampedInverse`) against two
    triangular solves with its Cholesky factor (``torch.cholesky_solve``), and their largest
    relative difference. ``ekfac_float32``: per test, the relative L2 difference between the
    sketched EK-FAC test vectors (whole and span) as the engine forms them for a float32 model
    (in the eigenbasis, divided before the sketch, in float32: :class:`Eigenbasis`) and the
    factors applied in float64 to autograd's dense gradient, rotated into that basis, then
    sketched; the smallest Spearman correlation of the resulting scores over the index's ekfac
    rows; and ``parameter_coordinates_spearman``, the correlation of those scores with the same
    float64 vector sketched in the parameters' coordinates and dotted with the ``grad`` rows
    (the query path before the ekfac rows): the two sketches' noise, not an error."""
    from scipy.stats import spearmanr

    from core.ihvp import DEFAULT_DAMPING, DampedInverse

    engine = backend.engine()
    gram = engine.side.gauss_newton().double()
    inverse = DampedInverse(gram, DEFAULT_DAMPING)
    factor = torch.linalg.cholesky(gram + DEFAULT_DAMPING * torch.eye(gram.shape[0], dtype=gram.dtype))
    vecs = engine.test_vectors(tests, "final", "full").double().cpu()
    ways = {"explicit_inverse": inverse.solve, "cholesky_solve": lambda v: torch.cholesky_solve(v.T, factor).T}
    times: dict[str, list[float]] = {name: [] for name in ways}
    for i in range(20):
        for name, solve in ways.items():
            started = time.perf_counter()
            solve(vecs[i % len(vecs)][None])
            times[name].append(1000 * (time.perf_counter() - started))
    reference = ways["cholesky_solve"](vecs)
    diff = (ways["explicit_inverse"](vecs) - reference).norm(dim=1) / reference.norm(dim=1)
    out: dict = {"solve": {"d": int(gram.shape[0]), **{f"{k}_ms": round(statistics.median(v), 2) for k, v in times.items()},
                           "max_relative_difference": float(f"{float(diff.max()):.3g}")}}
    factors = engine.ekfac()
    engine.loaded.use("final")
    batch = engine.test_batch(tests)
    rotate = lambda vec: {n: factors.q_out[n].T @ v @ factors.q_in[n] if n in factors.q_out else v  # noqa: E731
                          for n, v in vec.items()}
    errors, rhos, rhos_params = [], [], []
    for rep, plain in (("ekfac", "full"), ("ekfac-diff", "diff")):
        v32 = engine.test_vectors(tests, "final", rep, batch, basis=Eigenbasis(factors, DEFAULT_DAMPING))  # the engine's
        for q in range(len(tests)):
            dense = engine.dense_test_gradient(batch, q, plain)
            applied = factors.apply({n: t.double() for n, t in dense.items()}, DEFAULT_DAMPING)
            v64 = engine.projector.project_params(rotate(applied)).double()
            if float(v64.norm()) == 0:
                continue
            errors.append(float((v32[q].double() - v64).norm() / v64.norm()))
            params = engine.projector.project_params(applied)  # the same vector sketched in the parameters' coordinates
            scores = engine.side.dot_many("final", {32: (rep, v32[q][None]), 64: (rep, v64[None].float()),
                                                    "params": (plain, params[None])})
            reference = scores[64][0].cpu().numpy()
            rhos.append(float(spearmanr(scores[32][0].cpu().numpy(), reference)[0]))
            rhos_params.append(float(spearmanr(scores["params"][0].cpu().numpy(), reference)[0]))
    out["ekfac_float32"] = {"vectors": len(errors), "max_relative_difference": float(f"{max(errors):.3g}"),
                            "min_score_spearman": round(min(rhos), 6),
                            "parameter_coordinates_spearman": {"min": round(min(rhos_params), 4),
                                                               "median": round(statistics.median(rhos_params), 4)}}
    return out


def index_growth(backend: Backend, fitted_bytes: int | None) -> dict:
    """Bytes of the TRAK group, of the EK-FAC factors and of the index's ekfac rows (at theta)
    against the default grad group."""
    index = backend.index
    root, points = index.root, index.points
    size = lambda names: sum((root / n).stat().st_size for n in names if (root / n).exists())  # noqa: E731
    trak_points = index.group_points.get("trak", [])
    trak_files = [index.file_of(p, k) for p in trak_points for k in ("trak", "trak-diff")]
    scale_files = [scales_file(p, k) for p in trak_points for k in ("trak", "trak-diff")]  # float16 rows' scales
    missing = [n for n in trak_files if not (root / n).exists()] if trak_points else ["no trak group"]
    grad = size([f"{p}.{k}.npy" for p in points for k in ("full", "diff")] + ["ggn.npz"]
                + [f"patch.grad.{p}.npz" for p in points])
    trak_rows = size(trak_files + scale_files + [f"patch.trak.{p}.npz" for p in trak_points])
    trak_grams = size([f"{p}.trak-gram.npz" for p in trak_points])
    factors = backend.ws.root / "ekfac" / "factors.safetensors"
    ekfac = factors.stat().st_size if factors.exists() else None
    ekfac_rows = size(["final.ekfac.npy", "final.ekfac-diff.npy", "patch.ekfac.final.npz"])
    out = {"points": len(points), "d": index.meta["dim"], "train": len(index.ids), "grad_bytes": grad,
           "trak_whitened": [p for p in trak_points if index.whitened(p) is not None],
           "trak_bytes": trak_rows + trak_grams, "trak_rows_bytes": trak_rows, "trak_gram_bytes": trak_grams,
           "trak_over_grad": round((trak_rows + trak_grams) / grad, 3),
           "trak_rows_over_grad": round(trak_rows / grad, 3),
           "ekfac_bytes": ekfac, "ekfac_over_grad": None if ekfac is None else round(ekfac / grad, 3),
           "ekfac_rows_bytes": ekfac_rows, "ekfac_rows_over_grad": round(ekfac_rows / grad, 3),
           "ekfac_fitted_here_bytes": fitted_bytes, "index_bytes": index.size_bytes()}
    if missing:
        out["missing_trak_files"] = missing[:4]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", required=True)
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--ekfac-sample", type=int, default=None,
                        help="fit EK-FAC on this many seeded training instances (default: all)")
    parser.add_argument("--ekfac-batch-size", type=int, default=None, help="default: the index's batch size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--float32-rows", type=Path, default=None,
                        help="a folder of float32 whitened TRAK rows (<point>.<kind>.white.npy) copied from the "
                             "index before it kept them in float16: the latency's float32 timing reads them, "
                             "and half_rows compares the scores")
    parser.add_argument("--skip", nargs="*", default=[], choices=["ekfac", "latency", "precision", "growth"])
    args = parser.parse_args()
    backend = Backend(args.workspace)
    methods = [BASELINE, *NEW]
    backend.check_methods([METHODS.resolve(m) for m in methods])  # IndexUnavailable with the --with command
    out: dict = {"workspace": args.workspace, "train": len(backend.train_ids), "d": backend.index.meta["dim"],
                 "device": str(backend.loaded.device)}
    fitted_bytes = None
    if "ekfac" not in args.skip:  # first: before the latency part reads the index matrices into memory
        batch_size = args.ekfac_batch_size or backend.index.settings.batch_size
        out["ekfac_fit"] = ekfac_fit(backend, args.ekfac_sample, batch_size, args.seed)
        fitted_bytes = out["ekfac_fit"]["factors_bytes"]
    if "latency" not in args.skip:
        records = backend.instances("test")
        tests = gold_tests(backend, random.Random(args.seed).sample(records, min(args.queries, len(records))))
        with tempfile.TemporaryDirectory(prefix="wide-index-") as folder:
            wide = wide_index(backend.index, Path(folder), args.float32_rows) if half_points(backend.index) else None
            out["query_latency"] = query_latency(backend, tests, methods, wide)
            if wide is not None:
                out["batched_latency"] = batched_latency(backend, wide, tests[:32])
            if wide is not None and args.float32_rows is not None:
                out["half_rows"] = half_rows_agreement(backend, wide, tests)
            elif args.float32_rows is not None:
                out["half_rows"] = "not measured: the index keeps no TRAK rows in float16"
    if "precision" not in args.skip:
        records = backend.instances("test")
        sample = random.Random(args.seed).sample(records, min(10, len(records)))
        out.update(solve_and_precision(backend, gold_tests(backend, sample)))
    if "growth" not in args.skip:
        out["index_growth"] = index_growth(backend, fitted_bytes)
    out["peak_rss_mib"] = peak_rss_mib()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
