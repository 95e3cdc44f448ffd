"""Evaluation runs and reports: the paper's table 3 (Sag, Lag, Ral), table 4 (faithfulness) and
figure 1 (K-curves) for one prepared workspace.

A run has three parts, each cached so that an interrupted run resumes:

1. **Sag / Lag / K-curves** on N test instances (a seeded sample of the test split, without those
   whose span a person marked wrong): every method's ranking of the training set per test, its
   Sag@K and Lag@K for K = 1..Kmax, and, when faithfulness runs are asked for, its Spearman
   correlation with GroundTruth. One store row per (method, test) (:meth:`Store.put_eval_row`),
   keyed by the workspace fingerprint and the settings that change the numbers.
2. **Faithfulness** (table 4): run 0 is part 1's tests with the workspace's variants; run r >= 1
   draws a new test sample (seed + 7919 r) and makes new variants (``make_variants`` with the
   workspace's seed + r) for the variant-based methods; LiSSA (``--ihvp lissa``) uses seed + r.
   Checkpoints (Control, TracIn), theta (GroundTruth) and the fast inverse (IF family) are
   deterministic, so their spread across runs comes from the test samples alone. A run
   recomputes only the methods whose rows are missing (new variants only when a variant-based
   one is), with GroundTruth beside them for the Spearman.
3. **Ral**: per method and percentage, the top p % of the combined ranking (scores summed over
   part 1's tests) is removed, the trainable subset retrained from its initial state with the
   workspace's settings, and the test-split accuracy compared with a retrain on the unchanged
   training set; a random removal of the same size is the baseline. One retrain costs about as
   long as the workspace's training (minutes on full MAMS on a CPU). Results are cached per
   removed set.

Values are fractions in the CSV files and x100 in the tables (the paper's units).
"""
from __future__ import annotations

import base64
import json
import random
import shutil
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from . import metrics
from .ihvp import DEFAULT_DAMPING, LissaSettings, check_damping
from .index import KINDS, training_gradients
from .methods import CONTROL, METHODS, PAPER_METHODS, Method, TestInput, resolve_method
from .model import (
    HiddenCache,
    Params,
    SplitModel,
    TrainConfig,
    accuracy,
    length_batches,
    load_backbone,
    make_variants,
    predict,
    split_model,
    train,
)
from .workspace import fingerprint, write_json_atomic

ALL_METHODS = (*PAPER_METHODS, "TracIn", "GroundTruth")
RUN_SEED_STEP = 7919  # test sample of faithfulness run r: seed + r * RUN_SEED_STEP
FAITH_COLUMNS = ["run", "test_id", "method", "spearman", "seconds"]

PAPER_SOURCE = "Zhang et al. 2021"
# Zhang et al. 2021, table 3 (200 test instances per data set; x100). No TracIn column; SentiHood uses K=50.
PAPER_TABLE3: dict[str, dict[str, dict[str, float]]] = {
    "MAMS": {
        "Sag@10": {"IF": 14.22, "IF+": 17.17, "IF++": 21.74, "TracInF": 15.89, "TracIn+": 22.65, "TracIn++": 23.92},
        "Sag@100": {"IF": 14.65, "IF+": 15.10, "IF++": 19.83, "TracInF": 15.97, "TracIn+": 19.54, "TracIn++": 21.32},
        "Lag@10": {"IF": 21.63, "IF+": 25.66, "IF++": 65.41, "TracInF": 38.20, "TracIn+": 8.60, "TracIn++": 78.03},
        "Lag@100": {"IF": 26.07, "IF+": 25.66, "IF++": 62.52, "TracInF": 43.19, "TracIn+": 6.27, "TracIn++": 75.02},
        "Ral -20%": {"IF": 9.80, "IF+": 5.64, "IF++": 3.55, "TracInF": 9.80, "TracIn+": 11.89, "TracIn++": 16.05},
        "Ral -50%": {"IF": 28.55, "IF+": 1.47, "IF++": 18.14, "TracInF": 22.30, "TracIn+": 5.64, "TracIn++": 18.14},
    },
    "SentiHood": {
        "Sag@10": {"IF": 4.69, "IF+": 4.75, "IF++": 22.54, "TracInF": 3.07, "TracIn+": 0.98, "TracIn++": 26.21},
        "Sag@50": {"IF": 3.56, "IF+": 7.82, "IF++": 22.21, "TracInF": 1.78, "TracIn+": 1.61, "TracIn++": 23.43},
        "Lag@10": {"IF": 53.00, "IF+": 41.91, "IF++": 61.96, "TracInF": 55.91, "TracIn+": 18.22, "TracIn++": 66.65},
        "Lag@50": {"IF": 56.38, "IF+": 44.05, "IF++": 63.16, "TracInF": 59.66, "TracIn+": 17.49, "TracIn++": 66.72},
        "Ral -20%": {"IF": 10.56, "IF+": 16.21, "IF++": 6.91, "TracInF": 9.23, "TracIn+": 6.91, "TracIn++": 9.23},
        "Ral -50%": {"IF": 16.21, "IF+": 18.53, "IF++": 11.05, "TracInF": 27.83, "TracIn+": 9.23, "TracIn++": 4.58},
    },
}
# Zhang et al. 2021, table 4 (MAMS; Spearman with ground truth x100, 5 runs each).
PAPER_TABLE4: dict[str, dict[str, float]] = {
    "Control": {"mean": 55.11, "var": 4.84},
    "TracIn++": {"mean": 60.14, "var": 3.57},
    "IF++": {"mean": 59.37, "var": 20.50},
}
DATASETS = {"mams": "MAMS", "sentihood": "SentiHood"}


@dataclass(frozen=True)
class EvalSettings:
    """What an evaluation run computes. ``test_limit=None`` takes every eligible test instance."""

    methods: tuple[str, ...] = ALL_METHODS
    ks: tuple[int, ...] = (10, 100)
    test_limit: int | None = 200
    ral: tuple[float, ...] = (20, 50)
    faithfulness_runs: int = 5
    ihvp: str = "fast"
    damping: float = DEFAULT_DAMPING
    lissa: LissaSettings = LissaSettings()
    paper_signs: bool = False
    seed: int = 0
    kmax: int = 100
    batch: int = 16
    random_draws: int = 50  # random rankings behind the K-curve baseline band
    ral_random_seeds: int = 1

    def __post_init__(self) -> None:
        if self.ihvp not in ("fast", "lissa"):
            raise ValueError(f"ihvp must be 'fast' or 'lissa', got {self.ihvp!r}")
        if any(k < 1 for k in (*self.ks, self.kmax, self.batch, self.random_draws)):
            raise ValueError("K values, kmax, batch and random_draws must be at least 1")
        if self.test_limit is not None and self.test_limit < 1:
            raise ValueError(f"test_limit must be positive (None for all), got {self.test_limit}")
        object.__setattr__(self, "damping", check_damping(self.damping))
        if self.faithfulness_runs < 0 or self.ral_random_seeds < 0:
            raise ValueError("faithfulness_runs and ral_random_seeds must not be negative")
        for p in self.ral:
            metrics.removal_count(1, p)  # raises outside [0, 100)


@dataclass
class Selection:
    """Which test instances a run uses, and which it left out."""

    ids: list[str]
    seed: int
    eligible: int
    excluded_wrong: list[str]
    excluded_no_span: list[str]

    def describe(self) -> dict:
        return {"n": len(self.ids), "seed": self.seed, "eligible": self.eligible,
                "excluded_wrong": len(self.excluded_wrong), "excluded_no_span": len(self.excluded_no_span),
                "ids": self.ids, "wrong_ids": self.excluded_wrong, "no_span_ids": self.excluded_no_span}


@dataclass
class EvalReport:
    """A finished evaluation: what :func:`run_evaluation` returns and :func:`load_report` reads back.

    ``table3``: rows ``Sag@K``/``Lag@K``/``Ral -p%``, columns methods and ``random`` (x100);
    ``table4``: one row per method (``mean``, ``var_runs``, ``sd_tests`` x100 / x100^2);
    ``curves``: long K-curve table (``series, metric, k, value, low, high``), random included;
    ``per_test``, ``per_test_curves``, ``faithfulness``, ``ral``: the rows behind them (fractions).
    """

    out_dir: Path
    summary: dict
    table3: pd.DataFrame
    table4: pd.DataFrame
    curves: pd.DataFrame
    per_test: pd.DataFrame
    per_test_curves: pd.DataFrame
    faithfulness: pd.DataFrame
    ral: pd.DataFrame


# ------------------------------------------------------------------------------ selection


def _span(test: TestInput) -> list[int] | None:
    return list(test.span) if test.span else None


def select_tests(backend, limit: int | None, seed: int) -> Selection:
    """A seeded sample (in file order) of the test instances whose span is usable.

    Left out: spans a person marked wrong (paper section 5) and instances without a span.
    """
    rows = backend.instances("test")
    wrong = backend.store.wrong_test_ids()
    excluded_wrong = [r["id"] for r in rows if r["id"] in wrong]
    inputs = [backend.test_input(r["id"]) for r in rows if r["id"] not in wrong]
    no_span = [t.id for t in inputs if not t.span]
    eligible = [t.id for t in inputs if t.span]
    if limit is not None and limit < len(eligible):
        keep = set(random.Random(seed).sample(range(len(eligible)), limit))
        chosen = [i for k, i in enumerate(eligible) if k in keep]
    else:
        chosen = eligible
    return Selection(chosen, seed, len(eligible), excluded_wrong, no_span)


# ------------------------------------------------------------------------------ Ral helpers


def initial_state(settings: dict, labels: list[str]) -> Params:
    """The trainable subset before training, as ``prepare`` starts it (same backbone and seed)."""
    model, _ = load_backbone(settings["model"], labels, settings["seed"])
    return split_model(model, settings["trainable_layers"]).state()


def retrain_accuracy(split: SplitModel, init: Params, train_cache: HiddenCache, train_labels: torch.Tensor,
                     keep: Iterable[int], dev: tuple[HiddenCache, torch.Tensor],
                     test: tuple[HiddenCache, torch.Tensor], cfg: TrainConfig, work_dir: Path, *,
                     device: torch.device | str = "cpu", progress: bool = False) -> float:
    """Test accuracy after training the trainable subset from ``init`` on the kept training rows.

    Resumable in ``work_dir`` (see :func:`core.model.train`); leaves the split at the best epoch.
    """
    keep = [int(i) for i in keep]
    split.load_state(init)
    subset = HiddenCache([train_cache.states[i] for i in keep])
    train(split, subset, train_labels[keep], dev[0], dev[1], cfg, out_dir=work_dir, device=device, progress=progress)
    return accuracy(predict(split, test[0], device=device), test[1])


def _encode(values: np.ndarray) -> str:
    return base64.b64encode(zlib.compress(values.astype(np.float32).tobytes())).decode()


def _decode(text: str) -> np.ndarray:
    return np.frombuffer(zlib.decompress(base64.b64decode(text)), dtype=np.float32)


def _chunks(items: list, size: int) -> list[list]:
    return [items[s : s + size] for s in range(0, len(items), size)]


# ------------------------------------------------------------------------------ the run


ProgressCallback = Callable[[str, float], None]
"""Called with what is being done (e.g. ``Sag/Lag: 40/200 tests``) and the fraction of the run done."""


class _Phases:
    """The run's phases in order (Sag/Lag, each further faithfulness run, Ral), each an equal
    share of the progress fraction: honest about order, not about time."""

    def __init__(self, settings: EvalSettings, callback: ProgressCallback | None):
        self.names = ["Sag/Lag"] + [f"faithfulness run {r + 1}" for r in range(1, settings.faithfulness_runs)]
        self.names += ["Ral retrains"] if settings.ral else []
        self.callback = callback

    def report(self, name: str, done: int, total: int, unit: str) -> None:
        if self.callback is not None:
            at = self.names.index(name)
            self.callback(f"{name}: {done}/{total} {unit}", (at + done / max(total, 1)) / len(self.names))


class _Evaluation:
    """One evaluation run over a backend (see the module docstring)."""

    def __init__(self, backend, settings: EvalSettings, out_dir: Path, progress: bool, log: Callable[[str], None],
                 on_progress: ProgressCallback | None = None):
        self.backend, self.settings, self.out_dir, self.progress, self.log = backend, settings, out_dir, progress, log
        self.phases = _Phases(settings, on_progress)
        # one snapshot of the index for the whole run: a span corrected meanwhile counts from the next run
        self.engine = backend.engine(exact=False)
        self.index = self.engine.side.index
        self.fixes = self.index.meta.get("overrides", {})
        for point in self.index.points:  # read now, before any later patch
            for kind in KINDS:
                self.index.matrix(point, kind)
        self.store = backend.store
        self.reported = list(dict.fromkeys(resolve_method(m) for m in settings.methods))
        if not self.reported:
            raise ValueError("no methods to evaluate")
        self.faith = settings.faithfulness_runs > 0
        extra = [METHODS["GroundTruth"], CONTROL] if self.faith else []
        self.computed = list(dict.fromkeys([*self.reported, *extra]))
        index = self.index
        if index.ids != backend.train_ids:
            raise ValueError("the index's training rows differ from the workspace's; rebuild the index")
        self.n = len(index.ids)
        labels = backend.manifest.labels
        self.train_labels = np.array([labels.index(backend.by_id[i]["label"]) for i in index.ids])
        full, masked = index.embeddings()
        self.train_span_emb = (full - masked).numpy()
        self.kmax = min(max([settings.kmax, *settings.ks]), self.n)
        self.ks = sorted({min(k, self.n) for k in settings.ks})
        self.notes: list[str] = []
        if self.ks != sorted(set(settings.ks)):
            self.notes.append(f"K clipped to the {self.n} training instances: {self.ks}")
        self.timings: dict[str, float] = {}  # this run's wall times of the phases it computed

    # keys --------------------------------------------------------------------------------
    def _key(self, method: Method, part: str, **extra) -> str:
        s = self.settings
        parts = {"fp": self.backend.fingerprint, "method": method.name, "part": part, **extra}
        if self.fixes:  # Sag reads every training span; the ++ methods too
            parts["train_spans"] = self.fixes
        if method.inverse:
            parts.update(ihvp=s.ihvp, damping=s.damping if s.ihvp == "fast" else None,
                         lissa=asdict(s.lissa) if s.ihvp == "lissa" else None)
        if method.name == "IF":
            parts["paper_signs"] = s.paper_signs
        return f"eval:{part}:{method.name}:{fingerprint(parts)}"

    def _main_key(self, method: Method) -> str:
        return self._key(method, "main", kmax=self.kmax)

    def _scores_key(self, method: Method) -> str:
        return self._key(method, "scores")

    def _faith_key(self, method: Method, run: int) -> str:
        return self._key(method, f"faith{run}")

    # scoring -----------------------------------------------------------------------------
    def _scores(self, tests: list[TestInput], method: Method, run: int = 0) -> np.ndarray:
        s = self.settings
        lissa = s.ihvp == "lissa" and method.inverse
        out = self.engine.scores(
            tests, method, ihvp=s.ihvp, damping=s.damping, lissa_settings=replace(s.lissa, seed=s.lissa.seed + run),
            paper_signs=s.paper_signs, train_cache=self.backend.train_cache if lissa else None)
        return out.values.double().cpu().numpy()

    def _test_span_embeddings(self, tests: list[TestInput]) -> np.ndarray:
        parts = []
        for chunk in _chunks(tests, self.settings.batch):
            full, masked = self.engine.test_embeddings(chunk)
            parts.append((full - masked).numpy())
        return np.concatenate(parts)

    def _test_labels(self, tests: list[TestInput]) -> np.ndarray:
        return np.array([self.backend.loaded.labels.index(t.label) for t in tests])

    # part 1 ------------------------------------------------------------------------------
    def main_pass(self, tests: list[TestInput]) -> None:
        """Sag/Lag curves (and Spearman, and score vectors for Ral) of every method and test."""
        keys = {m.name: self._main_key(m) for m in self.computed}
        score_keys = {m.name: self._scores_key(m) for m in self.reported} if self.settings.ral else {}
        done = {name: self.store.eval_rows(k) for name, k in keys.items()}
        done_scores = {name: self.store.eval_rows(k) for name, k in score_keys.items()}

        def missing(m: Method, t: TestInput) -> bool:
            row = done[m.name].get(t.id)
            if row is None or row.get("span") != _span(t) or (self.faith and "spearman" not in row):
                return True
            stored = done_scores.get(m.name, {}).get(t.id)
            return m.name in score_keys and (stored is None or stored.get("span") != _span(t))

        todo = [t for t in tests if any(missing(m, t) for m in self.computed)]
        if len(todo) < len(tests):
            self.log(f"[evaluate] {len(tests) - len(todo)} of {len(tests)} test instances already done")
        started = time.perf_counter()
        finished = 0
        for batch in tqdm(_chunks(todo, self.settings.batch), desc="Sag/Lag", unit="batch", disable=not self.progress):
            need = [m for m in self.computed if any(missing(m, t) for t in batch)]
            gt_method = METHODS["GroundTruth"]
            scores, seconds = {}, {}
            for m in need if not self.faith or gt_method in need else [*need, gt_method]:
                t0 = time.perf_counter()
                scores[m.name] = self._scores(batch, m)
                seconds[m.name] = (time.perf_counter() - t0) / len(batch)
            cos = metrics.cosine_to(self.train_span_emb, self._test_span_embeddings(batch))
            agree = metrics.label_agreement(self.train_labels, self._test_labels(batch))
            for m in need:
                values = scores[m.name]
                ranked = metrics.top_k(values, self.kmax)
                sag = metrics.k_curve(ranked, cos, self.kmax)
                lag = metrics.k_curve(ranked, agree, self.kmax)
                rho = metrics.spearman(values, scores[gt_method.name]) if self.faith else None
                for q, t in enumerate(batch):
                    row = {"span": _span(t), "label": t.label, "sag": sag[q].round(6), "lag": lag[q].round(6),
                           "top": [self.index.ids[i] for i in ranked[q]], "seconds": round(seconds[m.name], 4)}
                    if rho is not None:
                        row["spearman"] = float(rho[q])
                    self.store.put_eval_row(keys[m.name], t.id, row)
                    if m.name in score_keys:
                        self.store.put_eval_row(score_keys[m.name], t.id, {"span": _span(t), "scores": _encode(values[q])})
            finished += len(batch)
            self.phases.report("Sag/Lag", finished, len(todo), "tests")
        if todo:
            self.timings["sag_lag_seconds"] = round(time.perf_counter() - started, 2)
            self.timings["sag_lag_tests_computed"] = len(todo)

    # part 2 ------------------------------------------------------------------------------
    def faithfulness_run(self, run: int) -> None:
        """Run ``run`` >= 1 of table 4: a new test sample and new variants."""
        s = self.settings
        selection = select_tests(self.backend, s.test_limit, s.seed + RUN_SEED_STEP * run)
        tests = [self.backend.test_input(i) for i in selection.ids]
        keys = {m.name: self._faith_key(m, run) for m in self.computed}
        done = {name: self.store.eval_rows(k) for name, k in keys.items()}
        missing = lambda m, t: done[m.name].get(t.id, {}).get("span") != _span(t)  # noqa: E731
        need = [m for m in self.computed if any(missing(m, t) for t in tests)]  # the rest is stored
        todo = [t for t in tests if any(missing(m, t) for m in need)]
        if not todo:
            return
        started = time.perf_counter()
        variant_methods = [m for m in need if m.points == "variants"]  # new variants only if one needs them
        chunks = _chunks(todo, s.batch)
        phase = f"faithfulness run {run + 1}"
        batches = length_batches(self.backend.train_cache[0].lengths(), self.backend.index_settings.batch_size)
        steps = len(chunks) + (self.backend.manifest.settings["variants"] * len(batches) if variant_methods else 0)
        report = lambda done: self.phases.report(phase, done, steps, "steps")  # noqa: E731
        scores = self._new_variant_scores(todo, variant_methods, run, batches, report) if variant_methods else {}
        others = [m for m in dict.fromkeys([*need, METHODS["GroundTruth"]]) if m.points != "variants"]
        parts: dict[str, list[np.ndarray]] = {m.name: [] for m in others}
        for c, batch in enumerate(tqdm(chunks, desc=phase, unit="batch", disable=not self.progress)):
            for m in others:
                parts[m.name].append(self._scores(batch, m, run))
            report(steps - len(chunks) + c + 1)
        scores.update({name: np.concatenate(p) for name, p in parts.items()})
        gt = scores["GroundTruth"]
        elapsed = time.perf_counter() - started
        share = round(elapsed / (len(need) * len(todo)), 4)  # the run's time, shared by its rows
        for m in need:
            rho = metrics.spearman(scores[m.name], gt)
            for q, t in enumerate(todo):
                self.store.put_eval_row(keys[m.name], t.id, {"span": _span(t), "spearman": float(rho[q]), "seconds": share})
        self.timings[f"faithfulness_run{run}_seconds"] = round(elapsed, 2)

    def _new_variant_scores(self, tests: list[TestInput], methods: list[Method], run: int,
                            batches: list[list[int]], report: Callable[[int], None]) -> dict[str, np.ndarray]:
        """Scores of variant-based methods at new variants (workspace seed + run), streamed over
        the training ``batches``; ``report`` hears the number of batches done over all variants."""
        backend, loaded = self.backend, self.backend.loaded
        ws = backend.manifest.settings
        full_cache, labels = backend.train_cache
        masked_cache = HiddenCache.load(self.index.root / "prefix-masked.safetensors")
        loaded.use("final")
        variants, _ = make_variants(loaded.split, full_cache, labels, count=ws["variants"], batch_size=ws["batch_size"],
                                    lr=ws["variant_lr"], seed=ws["seed"] + run, device=loaded.device)
        out = {m.name: np.zeros((len(tests), self.n)) for m in methods}
        names = [f"faith-run{run}-variant-{i}" for i in range(1, len(variants) + 1)]
        try:
            for v, (name, params) in enumerate(zip(names, variants)):
                loaded.points[name] = params
                test_side = {kind: torch.cat([self.engine.test_vectors(c, name, kind).cpu().double()
                                              for c in _chunks(tests, self.settings.batch)])
                             for kind in {m.test for m in methods}}
                grads = training_gradients(loaded, self.engine.projector, full_cache, masked_cache, labels, name, batches)
                for b, gb in enumerate(tqdm(grads, total=len(batches), desc=f"run {run + 1} {name[-9:]}", unit="batch",
                                            disable=not self.progress)):
                    side = {"full": gb.full.double(), "diff": gb.diff.double()}
                    for m in methods:
                        out[m.name][:, gb.rows] += (test_side[m.test] @ side[m.train].T).numpy()
                    report(v * len(batches) + b + 1)
        finally:
            for name in names:
                loaded.points.pop(name, None)
            loaded.use("final")
        return out

    # part 3 ------------------------------------------------------------------------------
    def ral(self, tests: list[TestInput]) -> pd.DataFrame:
        """Accuracy lost by retraining without the top p % of each method's combined ranking."""
        s, ws = self.settings, self.backend.manifest.settings
        cfg = TrainConfig(epochs=ws["epochs"], batch_size=ws["batch_size"], lr=ws["lr"], seed=ws["seed"],
                          checkpoints=ws["checkpoints"])
        jobs: list[tuple[str, int | None, float, np.ndarray]] = [("unchanged", None, 0.0, np.array([], dtype=np.int64))]
        for m in self.reported:
            rows = self.store.eval_rows(self._scores_key(m))
            ranking = metrics.combined_ranking(np.stack([_decode(rows[t.id]["scores"]) for t in tests]))
            jobs += [(m.name, None, p, metrics.top_removal(ranking, p)) for p in s.ral]
        for p in s.ral:
            jobs += [("random", r, p, metrics.random_removal(self.n, p, s.seed + r)) for r in range(s.ral_random_seeds)]
        keys = [self._ral_key(cfg, removed) for *_, removed in jobs]
        unique = {key: removed for key, (*_, removed) in zip(keys, jobs)}  # equal sets share one retrain
        todo = [removed for key, removed in unique.items() if not self.store.eval_rows(key)]
        if todo:
            self._retrain(cfg, todo)
        test_cache, test_labels = self._split_cache("test")
        loaded = self.backend.loaded
        theta_acc = accuracy(predict(loaded.split, test_cache, device=loaded.device), test_labels)
        results = [self.store.eval_rows(key)["result"] for key in keys]
        base = results[0]["accuracy"]
        return pd.DataFrame([
            {"method": name, "draw": draw, "percent": p, "removed": r["removed"], "accuracy": r["accuracy"],
             "baseline_accuracy": base, "theta_accuracy": theta_acc, "ral": base - r["accuracy"], "seconds": r["seconds"],
             "retrain": key.split(":")[-1][:12]}
            for (name, draw, p, _), r, key in zip(jobs, results, keys)
        ])

    def _retrain(self, cfg: TrainConfig, removals: list[np.ndarray]) -> None:
        """Retrain without each removed set (resumable per set) and store the test accuracy."""
        backend, loaded = self.backend, self.backend.loaded
        per_run = backend.manifest.stages.get("model", {}).get("timings", {}).get("train")
        guess = f", each about as long as the workspace's own training ({per_run:.0f} s)" if per_run else ""
        self.log(f"[evaluate] Ral: {len(removals)} retrain(s) of the trainable subset{guess}")
        init = initial_state(backend.manifest.settings, list(backend.manifest.labels))
        train_cache, train_labels = backend.train_cache
        dev, test = self._split_cache("dev"), self._split_cache("test")
        started = time.perf_counter()
        try:
            for r, removed in enumerate(tqdm(removals, desc="Ral retrains", unit="run", disable=not self.progress)):
                key = self._ral_key(cfg, removed)
                work = self.out_dir / "ral-train" / key.split(":")[-1]
                t0 = time.perf_counter()
                keep = np.setdiff1d(np.arange(self.n), removed)
                acc = retrain_accuracy(loaded.split, init, train_cache, train_labels, keep, dev, test, cfg, work,
                                       device=loaded.device, progress=self.progress)
                self.store.put_eval_row(key, "result", {"accuracy": acc, "removed": int(len(removed)),
                                                        "seconds": round(time.perf_counter() - t0, 1)})
                shutil.rmtree(work, ignore_errors=True)
                self.phases.report("Ral retrains", r + 1, len(removals), "retrains")
        finally:
            loaded.use("final")
        shutil.rmtree(self.out_dir / "ral-train", ignore_errors=True)
        self.timings["ral_seconds"] = round(time.perf_counter() - started, 1)

    def _ral_key(self, cfg: TrainConfig, removed: np.ndarray) -> str:
        return "eval:ral:" + fingerprint(self.backend.fingerprint, asdict(cfg), removed.tolist())

    def _split_cache(self, split: str) -> tuple[HiddenCache, torch.Tensor]:
        cache = HiddenCache.load(self.backend.ws.root / "prefix" / f"{split}.safetensors")
        labels = self.backend.manifest.labels
        return cache, torch.tensor([labels.index(r["label"]) for r in self.backend.instances(split)])

    # collecting --------------------------------------------------------------------------
    def collect(self, tests: list[TestInput]) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
        """Per-test rows and per-test curves of part 1, and the random baselines."""
        per_test, curves = [], []
        for m in self.computed:
            rows = self.store.eval_rows(self._main_key(m))
            for t in tests:
                row = rows[t.id]
                rec = {"test_id": t.id, "method": m.name, "label": t.label, "top1": row["top"][0]}
                rec |= {f"sag@{k}": row["sag"][k - 1] for k in self.ks} | {f"lag@{k}": row["lag"][k - 1] for k in self.ks}
                rec["spearman"] = row.get("spearman")
                rec["seconds"] = row.get("seconds")
                per_test.append(rec)
                curves += [{"test_id": t.id, "method": m.name, "k": k + 1, "sag": row["sag"][k], "lag": row["lag"][k]}
                           for k in range(self.kmax)]
        cos = metrics.cosine_to(self.train_span_emb, self._test_span_embeddings(tests))
        agree = metrics.label_agreement(self.train_labels, self._test_labels(tests))
        s = self.settings
        baselines = {name: metrics.random_baseline(values, self.kmax, draws=s.random_draws, seed=s.seed)
                     for name, values in (("sag", cos), ("lag", agree))}
        return pd.DataFrame(per_test), pd.DataFrame(curves), baselines

    def faithfulness_table(self, selection_ids: list[str]) -> pd.DataFrame:
        """Spearman with GroundTruth per (run, test, method)."""
        records = []
        for run in range(self.settings.faithfulness_runs):
            ids = selection_ids if run == 0 else select_tests(
                self.backend, self.settings.test_limit, self.settings.seed + RUN_SEED_STEP * run).ids
            for m in self.computed:
                rows = self.store.eval_rows(self._main_key(m) if run == 0 else self._faith_key(m, run))
                records += [{"run": run, "test_id": i, "method": m.name, "spearman": rows[i]["spearman"],
                             "seconds": rows[i].get("seconds")} for i in ids]
        return pd.DataFrame(records, columns=FAITH_COLUMNS)


def run_evaluation(backend, settings: EvalSettings = EvalSettings(), out_dir: str | Path = "evaluation", *,
                   progress: bool = True, log: Callable[[str], None] = print,
                   on_progress: ProgressCallback | None = None) -> EvalReport:
    """Run (or resume) an evaluation and write its report to ``out_dir`` (see the module docstring);
    ``on_progress`` hears what is being done and the fraction done."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    ev = _Evaluation(backend, settings, out, progress, log, on_progress)
    selection = select_tests(backend, settings.test_limit, settings.seed)
    if not selection.ids:
        raise ValueError("no test instance to evaluate (none in the test split, or all excluded)")
    log(f"[evaluate] {len(selection.ids)} test instances ({len(selection.excluded_wrong)} excluded as wrongly "
        f"spanned, {len(selection.excluded_no_span)} without a span); methods: "
        f"{', '.join(m.name for m in ev.computed)}")
    tests = [backend.test_input(i) for i in selection.ids]
    ev.main_pass(tests)
    for run in range(1, settings.faithfulness_runs):
        ev.faithfulness_run(run)
    ral = ev.ral(tests) if settings.ral else pd.DataFrame()
    per_test, per_test_curves, baselines = ev.collect(tests)
    faith = ev.faithfulness_table(selection.ids) if ev.faith else pd.DataFrame(columns=FAITH_COLUMNS)
    ev.timings["total_seconds"] = round(time.perf_counter() - started, 1)
    report = _build_report(ev, selection, per_test, per_test_curves, baselines, faith, ral)
    write_report(report)
    return report


# ------------------------------------------------------------------------------ tables


def _table3(ev: _Evaluation, per_test: pd.DataFrame, baselines: dict, ral: pd.DataFrame) -> pd.DataFrame:
    names = [m.name for m in ev.reported]
    means = per_test[per_test.method.isin(names)].groupby("method").mean(numeric_only=True)
    rows: dict[str, dict[str, float]] = {}
    for metric in ("sag", "lag"):
        for k in ev.ks:
            rows[f"{metric.capitalize()}@{k}"] = {**{m: 100 * means.loc[m, f"{metric}@{k}"] for m in names},
                                                  "random": 100 * baselines[metric].expected}
    if len(ral):
        for p in ev.settings.ral:
            at = ral[ral.percent == p]
            row = {m: 100 * float(at[at.method == m].ral.iloc[0]) for m in names}
            row["random"] = 100 * float(at[at.method == "random"].ral.mean())
            rows[f"Ral -{p:g}%"] = row
    return pd.DataFrame(rows).T[[*names, "random"]]


def _table4(faith: pd.DataFrame) -> pd.DataFrame:
    if faith.empty:
        return pd.DataFrame(columns=["mean", "var_runs", "sd_tests", "runs", "tests"])
    order = [CONTROL.name, *[m for m in dict.fromkeys(faith.method) if m not in (CONTROL.name, "GroundTruth")], "GroundTruth"]
    table = {}
    for m in order:
        runs = [100 * g.spearman.to_numpy() for _, g in faith[faith.method == m].groupby("run")]
        table[m] = metrics.run_statistics(runs)
    return pd.DataFrame(table).T


def _curves(ev: _Evaluation, per_test_curves: pd.DataFrame, baselines: dict) -> pd.DataFrame:
    names = [m.name for m in ev.reported]
    mean = per_test_curves[per_test_curves.method.isin(names)].groupby(["method", "k"])[["sag", "lag"]].mean()
    records = []
    for metric in ("sag", "lag"):
        for m in names:
            records += [{"series": m, "metric": metric, "k": k, "value": float(mean.loc[(m, k), metric]),
                         "low": None, "high": None} for k in range(1, ev.kmax + 1)]
        b = baselines[metric]
        records += [{"series": "random", "metric": metric, "k": k + 1, "value": float(b.mean[k]),
                     "low": float(b.low[k]), "high": float(b.high[k])} for k in range(ev.kmax)]
    return pd.DataFrame(records)


def _computed_seconds(per_test: pd.DataFrame, faith: pd.DataFrame, ral: pd.DataFrame) -> dict[str, float | None]:
    """Seconds spent computing the results in this report, from the rows that hold them (by
    whichever runs computed them); None where some rows predate the record."""
    def total(values: pd.Series) -> float | None:
        return None if values.isna().any() else round(float(values.sum()), 1)

    out = {"sag_lag_scoring_seconds": total(per_test.seconds)}
    later = faith[faith.run > 0]
    if len(later):
        out["faithfulness_seconds"] = total(later.seconds)
    if len(ral):
        out["ral_retrain_seconds"] = total(ral.drop_duplicates("retrain").seconds)  # rows may share a retrain
    return out


def _build_report(ev, selection, per_test, per_test_curves, baselines, faith, ral) -> EvalReport:
    backend, s = ev.backend, ev.settings
    dataset = DATASETS.get(str(backend.manifest.settings.get("dataset", "")).lower(), "")
    table3 = _table3(ev, per_test, baselines, ral)
    table4 = _table4(faith)
    seconds = per_test.groupby("method", sort=False).seconds.mean()
    summary = {
        "workspace": str(backend.ws.root), "fingerprint": backend.fingerprint, "dataset": dataset,
        "settings": {**asdict(s), "methods": [m.name for m in ev.reported], "ks": ev.ks, "kmax": ev.kmax},
        "approximations": {"projection": ev.engine.projector.describe(),
                           "ihvp": f"fast, lambda = {s.damping:g}" if s.ihvp == "fast" else f"lissa, lambda = {s.lissa.lam:g}",
                           "paper_signs": s.paper_signs, "n_train": ev.n,
                           "variant_seeds": [backend.manifest.settings["seed"] + r for r in range(s.faithfulness_runs)]},
        "selection": selection.describe(),
        "table3": json.loads(table3.to_json()), "table4": json.loads(table4.to_json()),
        "random_baseline": {m: {"expected": b.expected, "draws": len(b.draws), "spread_percentiles": list(b.spread)}
                            for m, b in baselines.items()},
        "paper": {"source": PAPER_SOURCE, "table3": PAPER_TABLE3.get(dataset, {}),
                  "table4": PAPER_TABLE4 if dataset == "MAMS" else {}},
        "timings": {"this_run": ev.timings, "computed": _computed_seconds(per_test, faith, ral),
                    "seconds_per_test": {m: round(float(v), 4) for m, v in seconds.items()}},
        "notes": ev.notes,
    }
    curves = _curves(ev, per_test_curves, baselines)
    return EvalReport(ev.out_dir, summary, table3, table4, curves, per_test, per_test_curves, faith, ral)


# ------------------------------------------------------------------------------ files

FILES = {"per_test": "per_test.csv", "per_test_curves": "per_test_curves.csv", "curves": "k_curves.csv",
         "faithfulness": "faithfulness.csv", "ral": "ral.csv", "table3": "table3.csv", "table4": "table4.csv"}


def write_report(report: EvalReport) -> None:
    """Write the CSVs, ``summary.json``, ``report.md`` and the K-curve plots (HTML, PNG)."""
    out = report.out_dir
    for attr, name in FILES.items():
        frame: pd.DataFrame = getattr(report, attr)
        frame.to_csv(out / name, index=attr in ("table3", "table4"))
    write_json_atomic(out / "summary.json", report.summary)
    _plots(report)
    (out / "report.md").write_text(report_markdown(report), encoding="utf-8")


def load_report(out_dir: str | Path) -> EvalReport:
    """Read back a report written by :func:`run_evaluation` (what the app's Evaluate page shows)."""
    out = Path(out_dir)
    path = out / "summary.json"
    if not path.exists():
        raise FileNotFoundError(f"{out}: no summary.json; run `python -m core evaluate` first")
    frames = {}
    for attr, name in FILES.items():
        try:
            frames[attr] = pd.read_csv(out / name, index_col=0 if attr in ("table3", "table4") else None)
        except pd.errors.EmptyDataError:
            frames[attr] = pd.DataFrame()
    return EvalReport(out, json.loads(path.read_text()), **frames)


def curve_figures(report: EvalReport) -> dict:
    """The K-curve figures ``{"sag": Figure, "lag": Figure}`` (plotly, via :mod:`core.views`)."""
    from .views import k_curve_figure

    figs = {}
    for metric, title in (("sag", "Sag@K"), ("lag", "Lag@K")):
        c = report.curves[report.curves.metric == metric]
        rnd = c[c.series == "random"].sort_values("k")
        methods = {m: g.sort_values("k").value.tolist() for m, g in c[c.series != "random"].groupby("series", sort=False)}
        n = report.summary["selection"]["n"]
        figs[metric] = k_curve_figure(rnd.k.tolist(), methods, rnd.value.tolist(), rnd.low.tolist(), rnd.high.tolist(),
                                      f"{title} v. K on {n} test instances")
    return figs


def _plots(report: EvalReport) -> None:
    figs = curve_figures(report)
    parts = [fig.to_html(full_html=False, include_plotlyjs=(i == 0)) for i, fig in enumerate(figs.values())]
    (report.out_dir / "k_curves.html").write_text(
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>SpanLens K-curves</title></head><body>"
        + "".join(parts) + "</body></html>", encoding="utf-8")
    _png(report)


def _png(report: EvalReport) -> None:
    """The K-curves as PNG with matplotlib (plotly's PNG export would need a browser)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from .views import BASELINE_COLOUR, METHOD_COLOURS, METHOD_DASHES

    styles = {"solid": "-", "dash": "--", "dot": ":"}
    fig, axes = plt.subplots(1, 2, figsize=(12.5, 4.2))
    for ax, metric in zip(axes, ("sag", "lag")):
        c = report.curves[report.curves.metric == metric]
        rnd = c[c.series == "random"].sort_values("k")
        ax.fill_between(rnd.k, rnd.low, rnd.high, color=BASELINE_COLOUR, alpha=0.25, linewidth=0, label="random (band)")
        ax.plot(rnd.k, rnd.value, color=BASELINE_COLOUR, linestyle="-.", label="random (mean)")
        for m, g in c[c.series != "random"].groupby("series", sort=False):
            g = g.sort_values("k")
            ax.plot(g.k, g.value, color=METHOD_COLOURS.get(m, "black"), linestyle=styles[METHOD_DASHES.get(m, "solid")], label=m)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("K")
        ax.set_title(f"{metric.capitalize()}@K")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    fig.savefig(report.out_dir / "k_curves.png", dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------ markdown


def _fmt(value) -> str:
    return "–" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.2f}"


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)])


def report_markdown(report: EvalReport) -> str:
    """``report.md``: our table 3 and table 4 beside the paper's, with how they were computed."""
    s, sel = report.summary["settings"], report.summary["selection"]
    approx, dataset = report.summary["approximations"], report.summary["dataset"] or "(not a paper data set)"
    paper3, paper4 = report.summary["paper"]["table3"], report.summary["paper"]["table4"]
    t3 = report.table3
    methods = [c for c in t3.columns if c != "random"]
    out = [
        "# SpanLens evaluation",
        "",
        f"Workspace `{report.summary['workspace']}` (fingerprint `{report.summary['fingerprint']}`), data set {dataset}.",
        f"{sel['n']} test instances (seed {sel['seed']}; {sel['eligible']} eligible; {sel['excluded_wrong']} excluded "
        f"because a person marked their span wrong; {sel['excluded_no_span']} without a span); "
        f"{approx['n_train']} training instances.",
        f"Gradient sketch: {json.dumps(approx['projection'])}; inverse Hessian (IF family): {approx['ihvp']}; "
        f"The paper's literal signs (IF's Eq. 1 minus; -e(z') on the ++ test side): {approx['paper_signs']}.",
        "",
        "## Table 3: Sag, Lag (x100) and Ral (accuracy points)",
        "",
        f"Each cell: ours / paper ({PAPER_SOURCE}, table 3, {dataset}; '–' where the paper has no such cell: "
        "it has no TracIn column, and uses K=50 for SentiHood). `random`: the analytic expectation of a random "
        "ranking for Sag/Lag (mean cosine with all training spans; label share), a random removal of the same "
        "size for Ral.",
        "",
        _md_table(["metric", *methods, "random"],
                  [[idx, *[f"{_fmt(row[m])} / {_fmt(paper3.get(idx, {}).get(m))}" for m in methods], _fmt(row["random"])]
                   for idx, row in t3.iterrows()]),
        "",
    ]
    if len(report.ral):
        base = report.ral.iloc[0]
        out += [f"Ral = accuracy of a retrain on the unchanged training set ({100 * base.baseline_accuracy:.2f}%; "
                f"the workspace's own model: {100 * base.theta_accuracy:.2f}%) minus the accuracy after removing the "
                f"top p% of the method's ranking summed over the {sel['n']} test instances, then retraining with the "
                "workspace's settings (a single retrain each: noisy, as the paper notes).", ""]
    else:
        out += ["Ral was not computed (`--ral none`).", ""]
    out += ["## Figure 1: K-curves", "",
            "`k_curves.html` (interactive) and `k_curves.png`; the numbers are in `k_curves.csv` (per test: "
            "`per_test_curves.csv`). The grey band is the "
            f"{report.summary['random_baseline']['sag']['spread_percentiles']} percentile range of "
            f"{report.summary['random_baseline']['sag']['draws']} random rankings. The paper's figure 1 is an image; "
            "its values are not in its text.", "", "![K-curves](k_curves.png)", ""]
    t4 = report.table4
    if len(t4):
        runs = int(t4["runs"].iloc[0])
        out += ["## Table 4: Spearman correlation with the ground truth (x100)", "",
                _md_table(["method", "mean", "var (runs)", "sd (tests)", "paper mean", "paper var"],
                          [[m, _fmt(r["mean"]), _fmt(r["var_runs"]), _fmt(r["sd_tests"]),
                            _fmt(paper4.get(m, {}).get("mean")), _fmt(paper4.get(m, {}).get("var"))]
                           for m, r in t4.iterrows()]),
                "",
                f"{runs} run(s). mean: mean over runs of each run's mean Spearman over its test instances; var (runs): "
                "variance (ddof=1) across runs of those means; sd (tests): standard deviation over every (run, test) "
                "value. The paper does not say which variance it reports. Run 0 uses the test instances above and the "
                "workspace's variants; run r >= 1 draws a new test sample and makes new variants (seed + r) for "
                "TracInF/TracIn+/TracIn++. Control (checkpoints), TracIn, GroundTruth and the IF family with the fast "
                "inverse are deterministic: their variance across runs comes from the test samples alone (0 when "
                "every run has the same tests). With `--ihvp lissa`, run r uses LiSSA seed + r. GroundTruth against "
                "itself is 1 (100) by construction.", ""]
    t = report.summary["timings"]
    out += ["## Timings", "", "Seconds. `this_run`: this run's total and the phases it computed (a fully cached "
            "re-run computes none); `computed`: what the results in this report cost to compute, summed from "
            "their stored rows whichever run computed them (null where rows predate that record); "
            "`seconds_per_test`: scoring time per test instance, by method.", "",
            "```", json.dumps(t, indent=1), "```", ""]
    if report.summary["notes"]:
        out += ["## Notes", "", *[f"- {n}" for n in report.summary["notes"]], ""]
    out += ["## Settings", "", "```", json.dumps(s, indent=1, default=str), "```", ""]
    return "\n".join(out)
