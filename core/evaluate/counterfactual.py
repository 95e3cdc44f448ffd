"""Phase 4: counterfactual truth, LDS and span-LDS (:mod:`core.lds`) by retraining.

M seeded subsets of a fraction alpha of the training set; each method is checked against the
retrains its own sides call for: a whole-instance training side against retrains on the subset
("remove"), a span training side against retrains on every instance with the subset's spans
masked ("mask"); a whole test side against the test loss (its Spearman is the same for the
margin: both are monotone in p_y), a span test side against the test span's importance
loss(z'_-kl) - loss(z'). Retrains are shared by every method with the same intervention and
measure every test instance of the split, so another test selection reuses them; each is cached
in the store by its subset, so an interrupted run resumes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ..lds import (
    CachePair,
    CacheRetrainer,
    RetrainOutputs,
    draw_means,
    lds_scores,
    paired_draws,
    predicted_outputs,
    run_lds,
    sample_subsets,
    subset_key,
    summarise,
    two_way_draws,
    two_way_values,
)
from ..model import HiddenCache, compute_prefix, mask_span
from ..parallel import mapper, worker_cache
from ..registry import MethodSpec
from ..representations import REPRESENTATIONS
from ..stats import ALPHA, draws_summary, holm, paired_difference
from ..training import TrainConfig
from ..workspace import fingerprint
from .context import Evaluation, chunks
from .ral import initial_state, split_cache
from .saglag import decode_scores

if TYPE_CHECKING:
    from ..backend import Backend

LDS_COLUMNS = ["test_id", "method", "intervention", "output", "lds"]


def kind_of(spec: MethodSpec) -> tuple[str, str]:
    """(intervention, test output) a method is checked against."""
    return ("mask" if REPRESENTATIONS[spec.train].span else "remove",
            "span" if REPRESENTATIONS[spec.test].span else "loss")


class _StoreCache:
    """The retrains' outputs in the workspace's store (one row per subset key)."""

    def __init__(self, store):
        self.store = store

    def get(self, key: str) -> dict | None:
        return self.store.eval_rows(key).get("outputs")

    def put(self, key: str, value: dict) -> None:
        self.store.put_eval_row(key, "outputs", value)


def _test_pair(backend: "Backend") -> tuple[CachePair, list[str]]:
    """Every test instance of the split, whole and with its span in use masked, gold labels."""
    records = backend.instances("test")
    loaded = backend.loaded
    tok = loaded.tokenizer
    masked = [mask_span(loaded.encode(r.aspect, r.text), *r.span_pair, tok.mask_token_id) if r.span
              else loaded.encode(r.aspect, r.text) for r in records]
    whole, labels = split_cache(backend, "test")
    return CachePair(whole, compute_prefix(loaded.split, masked, tok.pad_token_id, device=loaded.device,
                                           progress=False), labels), [r.id for r in records]


def _scores(ev: Evaluation, spec: MethodSpec, tests: list, *, stored_only: bool = False) -> np.ndarray:
    """(Q, N) scores of a method for the selected tests in SpanLens' signs (larger = proponent, as
    :mod:`core.lds` requires, whatever ``--paper-signs`` made phase 1 store): stored by phase 1,
    else computed now (``stored_only``: else an error)."""
    rows = ev.store.eval_rows(ev.scores_key(spec))
    if all(t.id in rows for t in tests):
        signed = np.stack([decode_scores(rows[t.id]["scores"]) for t in tests]).astype(np.float64)
    elif stored_only:
        raise RuntimeError(f"{spec.name}: the evaluation's scores of these tests are not in the store under "
                           "these scoring settings")
    else:
        signed = np.concatenate([ev.scores(batch, [spec])[0][spec.name] for batch in chunks(tests, ev.settings.batch)])
    return ev.settings.scoring().sign(spec) * signed


def retrainer_for(backend: "Backend", out_dir: Path) -> tuple[CacheRetrainer, list[str], str]:
    """The retrainer of a workspace's LDS (its model, initial state, training and test caches, the
    workspace's training settings), the test ids whose outputs it measures, and the key its
    results are cached under (what they depend on besides the subset and the intervention)."""
    pair, test_ids = _test_pair(backend)
    cfg = TrainConfig.from_settings(backend.manifest.settings)
    full, labels = backend.train_cache()
    index = backend.index
    masked = HiddenCache.load(index.root / "prefix-masked.safetensors")
    table = backend.table
    stages = backend.manifest.stages  # what a retrain depends on: spans, masked inputs, the model stage; not the sketch
    key = fingerprint([stages.get(s, {}).get("fingerprint") for s in ("spans", "importance", "model")],
                      dataclasses.asdict(cfg), index.meta.get("overrides", {}), test_ids,
                      [table.by_id[i].span_pair for i in test_ids])
    retrainer = CacheRetrainer(backend.loaded.split, initial_state(backend.manifest.settings, backend.manifest.labels),
                               CachePair(full, masked, labels), pair, split_cache(backend, "dev"), cfg,
                               out_dir / "lds-train" / key, device=backend.loaded.device, progress=False)
    return retrainer, test_ids, key


def lds(ev: Evaluation, tests: list) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Per-test LDS of every reported method, pairwise paired comparisons within each kind, and
    each method's interval with the tests and the subsets resampled (:func:`core.lds.two_way_values`)."""
    subsets = sample_subsets(ev.n, ev.settings.lds)
    retrainer, test_ids, key = retrainer_for(ev.backend, ev.out_dir)
    where = [test_ids.index(t.id) for t in tests]
    kinds = {spec.name: kind_of(spec) for spec in ev.reported}
    outputs: dict[str, list[RetrainOutputs]] = {}
    started = time.perf_counter()
    for intervention in sorted({i for i, _ in kinds.values()}, reverse=True):  # remove (cheaper) first
        bar = tqdm(total=len(subsets), desc=f"LDS retrains ({intervention})", unit="run", disable=not ev.progress)
        tick = lambda done, total, i=intervention: _tick(ev, bar, i, done, total)  # noqa: E731
        cache = _StoreCache(ev.store)
        if ev.settings.ray is None:
            outputs[intervention] = run_lds(retrainer, subsets, intervention, cache, settings_key=key, progress=tick)
        else:
            outputs[intervention] = _over_ray(ev, subsets, intervention, cache, key, tick)
        bar.close()
    for folder in (retrainer.work_dir, retrainer.work_dir.parent):  # every retrain finished: drop the empty folders
        with contextlib.suppress(OSError):
            folder.rmdir()
    ev.timings["lds_seconds"] = round(time.perf_counter() - started, 1)
    rows, boot = [], {}
    draws = two_way_draws(len(tests), len(subsets), seed=ev.settings.seed)
    for spec in ev.reported:
        intervention, output = kinds[spec.name]
        chosen = [_select(o, where) for o in outputs[intervention]]
        scores = _scores(ev, spec, tests)
        values = lds_scores(scores, subsets, chosen, intervention, output)
        boot[spec.name] = two_way_values(predicted_outputs(scores, subsets, intervention),
                                         np.stack([o.output(output) for o in chosen], axis=1), draws)
        rows += [{"test_id": t.id, "method": spec.name, "intervention": intervention, "output": output, "lds": float(v)}
                 for t, v in zip(tests, values)]
    per_test = pd.DataFrame(rows, columns=LDS_COLUMNS)
    two_way = pd.DataFrame({m: dict(zip(TWO_WAY, draws_summary(draw_means(b))[:2])) for m, b in boot.items()}).T
    return per_test, _pairs(per_test, ev.settings.seed, boot), two_way


def _over_ray(ev: Evaluation, subsets: np.ndarray, intervention: str, cache: _StoreCache, key: str,
              tick) -> list[RetrainOutputs]:
    """The retrains the cache lacks as Ray tasks (each worker opens the workspace once), cached as
    they finish; then every subset's outputs from the cache."""
    keys = [subset_key(s, intervention, key) for s in subsets]
    todo = [m for m, k in enumerate(keys) if cache.get(k) is None]
    done = len(subsets) - len(todo)
    with mapper(ev.settings.ray) as pool:
        for m, result in pool.map(_retrain_task, todo, str(ev.backend.ws.root), str(ev.out_dir), intervention, subsets,
                                  key):
            cache.put(keys[m], result)
            done += 1
            tick(done, len(subsets))
    return [RetrainOutputs.from_dict(cache.get(k)) for k in keys]


def _retrain_task(m: int, ws_root: str, out_dir: str, intervention: str, subsets: np.ndarray, key: str) -> dict:
    """One LDS retrain in a Ray worker (the retrainer opened once per worker)."""
    from ..backend import Backend

    retrainer, _, worker_key = worker_cache(("lds", ws_root, out_dir), lambda: retrainer_for(Backend(ws_root),
                                                                                         Path(out_dir)))
    if worker_key != key:
        raise RuntimeError(f"{ws_root} changed during the evaluation (its index or spans); run it again")
    started = time.perf_counter()
    outputs = retrainer(subsets[m], intervention)
    return dataclasses.replace(outputs, seconds=round(time.perf_counter() - started, 3)).to_dict()


def _tick(ev: Evaluation, bar, intervention: str, done: int, total: int) -> None:
    bar.update(1)
    ev.phases.report(f"LDS retrains ({intervention})", done, total, "retrains")


def _select(outputs: RetrainOutputs, where: list[int]) -> RetrainOutputs:
    """A retrain's outputs for the selected tests only."""
    return RetrainOutputs(outputs.loss[where], outputs.masked_loss[where], outputs.margin[where], outputs.seconds)


def lds_table(per_test: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Per method: mean (span-)LDS over tests with its 95% bootstrap interval (x100 in reports)."""
    out = {}
    for method, group in per_test.groupby("method", sort=False):
        first = group.iloc[0]
        out[method] = {"intervention": first.intervention, "output": first.output,
                       **summarise(group.lds.to_numpy(), seed=seed)}
    return pd.DataFrame(out).T.infer_objects()


TWO_WAY = ("low_subsets", "high_subsets")
"""Columns of the 95% interval with tests and subsets resampled (LDS table and pairs)."""


def _pairs(per_test: pd.DataFrame, seed: int, boot: dict[str, np.ndarray]) -> pd.DataFrame:
    """Paired differences between methods checked the same way, over the tests where both are
    defined: the two-way interval and p from the shared draws ``boot`` (each method's
    :func:`core.lds.two_way_values`), Holm-adjusted over the pairs of each kind (``significant``), and the
    tests-only sign-flip test and interval (subsets fixed: too narrow, uncorrected; kept for comparison)."""
    rows = []
    wide = per_test.pivot(index="test_id", columns="method", values="lds")
    kinds = per_test.drop_duplicates("method").set_index("method")[["intervention", "output"]]
    names = list(dict.fromkeys(per_test.method))
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if tuple(kinds.loc[a]) == tuple(kinds.loc[b]):
                diff = paired_difference(wide[a].to_numpy(), wide[b].to_numpy(), seed=seed)
                low, high, p_two_way = draws_summary(paired_draws(boot[a], boot[b]))
                rows.append({"a": a, "b": b, **{k: diff[k] for k in ("difference", "low", "high", "p_value", "n")},
                             **dict(zip(TWO_WAY, (low, high))), "p_subsets": p_two_way})
    pairs = pd.DataFrame(rows, columns=["a", "b", "difference", "low", "high", "p_value", "n", *TWO_WAY, "p_subsets"])
    family = pairs.a.map(lambda m: tuple(kinds.loc[m]))  # the pairs checked against the same retrains and output
    pairs["p_holm"] = pairs.groupby(family).p_subsets.transform(lambda p: holm(p.to_numpy(dtype=np.float64)))
    pairs["significant"] = pairs.p_holm < ALPHA
    return pairs
