"""Phase 2: faithfulness (the paper's table 4), the Spearman correlation of each method's scores
with GroundTruth's, over runs.

Run 0 is phase 1's tests with the workspace's variants. Run r >= 1 draws a new test sample
(seed + 7919 r) and, when a variant-based method needs it, makes new variants exactly as the
workspace made its own (same optimizer, step and batch; seed + r). Their training rows are
streamed, sketched with the index's projector, and every method is scored by the same engine as
in run 0 - the new variants replace the workspace's in the engine's point set - so signs,
weights and inverses are the same. Checkpoints (Control, TracIn), theta (GroundTruth) and the
fast inverse (IF family) are deterministic: their spread across runs comes from the test samples.
With ``--ray`` the new variants' training rows are streamed as Ray tasks over shards of the
training rows (:class:`core.training_sides.ShardedSide`); the scores are the same up to rounding.
"""
from __future__ import annotations

import time
from contextlib import nullcontext

import pandas as pd

from .. import metrics
from ..engine import Engine, TestInput
from ..model import HiddenCache, length_batches
from ..parallel import Mapper, mapper
from ..registry import METHODS
from ..training import variants_like
from ..training_sides import RoutedSide, ShardedSide, StreamedSide
from .context import Evaluation, span_of
from .settings import RUN_SEED_STEP, select_tests

FAITH_COLUMNS = ["run", "test_id", "method", "spearman", "seconds"]


def run_tests(ev: Evaluation, run: int) -> list[TestInput]:
    """Run ``run``'s test sample (gold labels, as every evaluation)."""
    s = ev.settings
    ids = select_tests(ev.backend, s.test_limit, s.seed + RUN_SEED_STEP * run).ids
    return [ev.backend.test_input(i, label="gold") for i in ids]


def faithfulness_run(ev: Evaluation, run: int) -> None:
    """Run ``run`` >= 1 of table 4: a new test sample and, where needed, new variants."""
    tests = run_tests(ev, run)
    keys = {m.name: ev.faith_key(m, run) for m in ev.computed}
    done = {name: ev.store.eval_rows(k) for name, k in keys.items()}
    missing = lambda m, t: done[m.name].get(t.id, {}).get("span") != span_of(t)  # noqa: E731
    need = [m for m in ev.computed if any(missing(m, t) for t in tests)]  # the rest is stored
    todo = [t for t in tests if any(missing(m, t) for m in need)]
    if not todo:
        return
    started = time.perf_counter()
    phase = f"faithfulness run {run + 1}"
    specs = list(dict.fromkeys([*need, METHODS.resolve("GroundTruth")]))
    new_variants = any(m.points == "variants" for m in need)
    with mapper(ev.settings.ray) if new_variants and ev.settings.ray else nullcontext() as pool:
        engine, names = _run_engine(ev, run, new_variants, pool,
                                    lambda done, total: ev.phases.report(phase, done, total, "steps"))
        try:
            scores, _ = ev.scores(todo, specs, run, engine)
        finally:
            for name in names:
                ev.backend.loaded.points.pop(name, None)
    ev.phases.report(phase, len(todo), len(todo), "tests")
    gt = scores["GroundTruth"]
    elapsed = time.perf_counter() - started
    share = round(elapsed / (len(need) * len(todo)), 4)  # the run's time, shared by its rows
    for m in need:
        rho = metrics.spearman(scores[m.name], gt)
        for q, t in enumerate(todo):
            ev.store.put_eval_row(keys[m.name], t.id, {"span": span_of(t), "spearman": float(rho[q]), "seconds": share})
    ev.timings[f"faithfulness_run{run}_seconds"] = round(elapsed, 2)


def _run_engine(ev: Evaluation, run: int, new_variants: bool, pool: Mapper | None, report) -> tuple[Engine, list[str]]:
    """The engine of run ``run``: the workspace's, with new variants when asked, their training
    rows streamed here or, with a ``pool`` (``--ray``), as tasks over shards of the rows; and the
    names of the points it added to the loaded model (to drop afterwards)."""
    if not new_variants:
        return ev.engine, []
    backend, loaded = ev.backend, ev.backend.loaded
    settings = backend.manifest.settings
    full_cache, labels = backend.train_cache()
    loaded.use("final")
    variants, _ = variants_like(settings, loaded.split, full_cache, labels, seed=settings["seed"] + run,
                                device=loaded.device)
    names = [f"faith-run{run}-variant-{i}" for i in range(1, len(variants) + 1)]
    loaded.points.update(zip(names, variants))
    batch_size = ev.index.settings.batch_size
    steps = len(full_cache) if pool is not None else len(length_batches(full_cache.lengths(), batch_size))
    counter = {"done": 0}

    def step(n: int) -> None:  # batches here, training rows of finished tasks with a pool
        counter["done"] += n
        report(counter["done"], len(names) * steps)

    if pool is not None:
        streamed = ShardedSide(pool, (str(backend.ws.root), backend.fingerprint), dict(zip(names, variants)),
                               len(full_cache), exact=ev.engine.projector.exact, progress=step)
    else:
        masked = HiddenCache.load(ev.index.root / "prefix-masked.safetensors")
        streamed = StreamedSide(loaded, ev.engine.projector, full_cache, masked, labels, batch_size, progress=step)
    side = RoutedSide(ev.engine.side, {name: streamed for name in names})
    points = ev.engine.points.with_group("variants", tuple(names))
    return Engine(loaded, side, ev.engine.projector, points=points, train_cache=ev.engine.train_cache,
                  ekfac=ev.engine.ekfac), names


def faithfulness_table(ev: Evaluation, selection_ids: list[str]) -> pd.DataFrame:
    """Spearman with GroundTruth per (run, test, method)."""
    records = []
    for run in range(ev.settings.faithfulness_runs):
        ids = selection_ids if run == 0 else [t.id for t in run_tests(ev, run)]
        for m in ev.computed:
            rows = ev.store.eval_rows(ev.main_key(m) if run == 0 else ev.faith_key(m, run))
            records += [{"run": run, "test_id": i, "method": m.name, "spearman": rows[i]["spearman"],
                         "seconds": rows[i].get("seconds")} for i in ids]
    return pd.DataFrame(records, columns=FAITH_COLUMNS)


def empty_table() -> pd.DataFrame:
    return pd.DataFrame(columns=FAITH_COLUMNS)

