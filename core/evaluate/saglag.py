"""Phase 1: Sag/Lag K-curves of every method and test (and Spearman with GroundTruth, and the
score vectors Ral needs), one store row per (method, test).

With ``--ray`` each batch of tests is scored as a Ray task (the worker opens the workspace once,
:func:`core.parallel.worker_cache`) and the curves are computed and stored here as the scores
arrive; without it, batch after batch in this process."""
from __future__ import annotations

import base64
import time
import zlib
from collections.abc import Iterator

import numpy as np
from tqdm.auto import tqdm

from .. import metrics
from ..engine import TestInput
from ..parallel import mapper, worker_cache
from ..registry import METHODS, MethodSpec
from ..scoring import ScoreSettings
from .context import Evaluation, chunks, span_of


def encode_scores(values: np.ndarray) -> str:
    return base64.b64encode(zlib.compress(values.astype(np.float32).tobytes())).decode()


def decode_scores(text: str) -> np.ndarray:
    return np.frombuffer(zlib.decompress(base64.b64decode(text)), dtype=np.float32)


def paper_view(ev: Evaluation, spec: MethodSpec) -> bool:
    """Whether to keep the method's curves under the paper's literal sign too (they differ, and
    the run uses ours): so the paper's numbers are compared with its own sign."""
    return spec.paper_sign < 0 and not ev.settings.paper_signs


def main_pass(ev: Evaluation, tests: list[TestInput]) -> None:
    """Sag/Lag curves (and Spearman, and score vectors for Ral) of every method and test."""
    keys = {m.name: ev.main_key(m) for m in ev.computed}
    keep_scores = ev.settings.ral or ev.settings.lds  # Ral and LDS sum them over tests and subsets
    score_keys = {m.name: ev.scores_key(m) for m in ev.reported} if keep_scores else {}
    done = {name: ev.store.eval_rows(k) for name, k in keys.items()}
    done_scores = {name: ev.store.eval_rows(k) for name, k in score_keys.items()}

    def missing(m: MethodSpec, t: TestInput) -> bool:
        row = done[m.name].get(t.id)
        if row is None or row.get("span") != span_of(t) or (ev.faith and "spearman" not in row):
            return True
        if paper_view(ev, m) and "sag_paper" not in row:
            return True
        stored = done_scores.get(m.name, {}).get(t.id)
        return m.name in score_keys and (stored is None or stored.get("span") != span_of(t))

    todo = [t for t in tests if any(missing(m, t) for m in ev.computed)]
    if len(todo) < len(tests):
        ev.log(f"[evaluate] {len(tests) - len(todo)} of {len(tests)} test instances already done")
    started = time.perf_counter()
    finished = 0
    gt = METHODS.resolve("GroundTruth")
    work = []
    for batch in chunks(todo, ev.settings.batch):
        need = [m for m in ev.computed if any(missing(m, t) for t in batch)]
        work.append((batch, need, list(dict.fromkeys([*need, *([gt] if ev.faith else [])]))))
    bar = tqdm(total=len(work), desc="Sag/Lag", unit="batch", disable=not ev.progress)
    for (batch, need, _), (scores, seconds) in _scored(ev, work):
        bar.update(1)
        cos, agree = ev.cosines_and_agreement(batch)
        reversed_curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for m in need:
            values = scores[m.name]
            ranked = metrics.top_k(values, ev.kmax)
            sag, lag = metrics.k_curve(ranked, cos, ev.kmax), metrics.k_curve(ranked, agree, ev.kmax)
            rho = metrics.spearman(values, scores[gt.name]) if ev.faith else None
            if paper_view(ev, m):  # the paper's literal sign ranks by -score: the same rows, reversed
                flipped = metrics.top_k(-values, ev.kmax)
                reversed_curves[m.name] = (metrics.k_curve(flipped, cos, ev.kmax), metrics.k_curve(flipped, agree, ev.kmax))
            for q, t in enumerate(batch):
                row = {"span": span_of(t), "label": t.label, "sag": sag[q].round(6), "lag": lag[q].round(6),
                       "top": [ev.index.ids[i] for i in ranked[q]], "seconds": round(seconds[m.name], 4)}
                if rho is not None:
                    row["spearman"] = float(rho[q])
                if paper_view(ev, m):
                    row["sag_paper"], row["lag_paper"] = (c[q].round(6) for c in reversed_curves[m.name])
                ev.store.put_eval_row(keys[m.name], t.id, row)
                if m.name in score_keys:
                    ev.store.put_eval_row(score_keys[m.name], t.id, {"span": span_of(t), "scores": encode_scores(values[q])})
        finished += len(batch)
        ev.phases.report("Sag/Lag", finished, len(todo), "tests")
    bar.close()
    if todo:
        ev.timings["sag_lag_seconds"] = round(time.perf_counter() - started, 2)
        ev.timings["sag_lag_tests_computed"] = len(todo)


Work = tuple[list[TestInput], list[MethodSpec], list[MethodSpec]]  # tests, methods to store, methods to score


def _scored(ev: Evaluation, work: list[Work]) -> Iterator[tuple[Work, tuple[dict[str, np.ndarray], dict[str, float]]]]:
    """Each batch's scores: here in order, or as Ray tasks in the order they finish."""
    if ev.settings.ray is None:
        for item in work:
            yield item, ev.scores(item[0], item[2])
        return
    key = ("backend", str(ev.backend.ws.root), ev.backend.fingerprint)  # shared with ShardedSide's tasks
    with mapper(ev.settings.ray) as pool:
        yield from pool.map(_batch_task, work, key, ev.settings.scoring(0))


def _batch_task(item: Work, key: tuple, settings: ScoreSettings) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """One batch's scores in a Ray worker (the workspace opened once per worker and index)."""
    from ..backend import Backend

    tests, _, specs = item
    backend = worker_cache(key, lambda: Backend(key[1]))
    if backend.fingerprint != key[2]:
        raise RuntimeError(f"{key[1]}: its index changed during the evaluation; run it again")
    started = time.perf_counter()
    out = backend.engine().scores_many(tests, specs, settings)
    each = (time.perf_counter() - started) / max(len(specs) * len(tests), 1)
    return {name: s.values.double().cpu().numpy() for name, s in out.items()}, {s.name: each for s in specs}
