"""The state one evaluation run shares between its phases: the index snapshot, the engine, the
methods, the training side's labels and span embeddings, result keys and progress."""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .. import metrics
from ..engine import TestInput
from ..index import IndexUnavailable
from ..registry import METHODS, MethodSpec
from ..scoring import result_key
from ..workspace import fingerprint
from .settings import METHOD_GROUPS, EvalSettings

if TYPE_CHECKING:
    from ..backend import Backend

ProgressCallback = Callable[[str, float], None]
"""Called with what is being done (e.g. ``Sag/Lag: 40/200 tests``) and the fraction of the run done."""


class Phases:
    """The run's phases in order (Sag/Lag, each further faithfulness run, Ral), each an equal
    share of the progress fraction: honest about order, not about time."""

    def __init__(self, settings: EvalSettings, callback: ProgressCallback | None):
        self.names = ["Sag/Lag"] + [f"faithfulness run {r + 1}" for r in range(1, settings.faithfulness_runs)]
        self.names += ["Ral retrains"] if settings.ral else []
        self.names += ["LDS retrains (remove)", "LDS retrains (mask)"] if settings.lds else []
        self.callback = callback

    def report(self, name: str, done: int, total: int, unit: str) -> None:
        if self.callback is not None:
            at = self.names.index(name)
            self.callback(f"{name}: {done}/{total} {unit}", (at + done / max(total, 1)) / len(self.names))


def chunks(items: list, size: int) -> list[list]:
    return [items[s : s + size] for s in range(0, len(items), size)]


def span_of(test: TestInput) -> list[int] | None:
    return list(test.span) if test.span else None


class Evaluation:
    """One evaluation run over a backend: what every phase reads (see :mod:`core.evaluate`)."""

    def __init__(self, backend: "Backend", settings: EvalSettings, out_dir: Path, progress: bool,
                 log: Callable[[str], None], on_progress: ProgressCallback | None = None):
        self.backend, self.settings, self.out_dir, self.progress, self.log = backend, settings, out_dir, progress, log
        self.phases = Phases(settings, on_progress)
        self.store = backend.store
        # one snapshot of the index for the whole run (its overlay of corrected spans is read when it
        # opens, the base matrices never change): a span corrected meanwhile counts from the next run
        self.index = backend.sync_spans()
        self.engine = backend.engine(exact=False)
        self.fixes = self.index.meta.get("overrides", {})
        self.notes: list[str] = []
        self.reported = self._available(settings)
        self.faith = settings.faithfulness_runs > 0
        extra = [METHODS.resolve("GroundTruth"), METHODS.resolve("Control")] if self.faith else []
        self.computed = list(dict.fromkeys([*self.reported, *extra]))
        if self.index.ids != backend.train_ids:
            raise ValueError("the index's training rows differ from the workspace's; rebuild the index")
        self.n = len(self.index.ids)
        labels = backend.manifest.labels
        by_id = backend.by_id
        self.train_labels = np.array([labels.index(by_id[i].label) for i in self.index.ids])
        full, masked = self.index.embeddings()
        self.train_span_emb = (full - masked).numpy()
        self.kmax = min(max([settings.kmax, *settings.ks]), self.n)
        self.ks = sorted({min(k, self.n) for k in settings.ks})
        if self.ks != sorted(set(settings.ks)):
            self.notes.append(f"K clipped to the {self.n} training instances: {self.ks}")
        self.timings: dict[str, float] = {}  # this run's wall times of the phases it computed

    def _available(self, settings: EvalSettings) -> list[MethodSpec]:
        """The methods to report: a method named outright must have its artifacts (IndexUnavailable
        with the command otherwise); one a group brings in (``all``) is left out, with a note, when
        the workspace lacks them."""
        named = {METHODS.resolve(m).name for m in settings.methods if m not in METHOD_GROUPS}
        out = []
        for spec in settings.specs():
            try:
                self.backend.check_methods([spec])
            except IndexUnavailable as err:
                if spec.name in named:
                    raise
                self.notes.append(f"{spec.name} left out: {err}")
                continue
            out.append(spec)
        if not out:
            raise ValueError("none of the methods asked for can run on this workspace")
        return out

    # keys --------------------------------------------------------------------------------
    def key(self, spec: MethodSpec, part: str, run: int = 0, **extra) -> str:
        """The store key of a method's rows of one part of the run (:func:`core.scoring.result_key`)."""
        parts = result_key(spec, self.settings.scoring(run), fp=self.backend.fingerprint, part=part,
                           train_spans=self.fixes or None, **extra)  # Sag reads every training span
        return f"eval:{part}:{spec.name}:{fingerprint(parts)}"

    def main_key(self, spec: MethodSpec) -> str:
        return self.key(spec, "main", kmax=self.kmax)

    def scores_key(self, spec: MethodSpec) -> str:
        return self.key(spec, "scores")

    def faith_key(self, spec: MethodSpec, run: int) -> str:
        return self.key(spec, f"faith{run}", run)

    # scoring -----------------------------------------------------------------------------
    def scores(self, tests: Sequence[TestInput], specs: Sequence[MethodSpec], run: int = 0,
               engine=None) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Scores (Q, N) of several methods through the engine, and seconds per test of each."""
        started = time.perf_counter()
        out = (engine or self.engine).scores_many(tests, specs, self.settings.scoring(run))
        each = (time.perf_counter() - started) / max(len(specs) * len(tests), 1)
        return {name: s.values.double().cpu().numpy() for name, s in out.items()}, {s.name: each for s in specs}

    def test_span_embeddings(self, tests: Sequence[TestInput]) -> np.ndarray:
        parts = []
        for chunk in chunks(list(tests), self.settings.batch):
            full, masked = self.engine.test_embeddings(chunk)
            parts.append((full - masked).numpy())
        return np.concatenate(parts)

    def test_labels(self, tests: Sequence[TestInput]) -> np.ndarray:
        return np.array([self.backend.loaded.labels.index(t.label) for t in tests])

    def cosines_and_agreement(self, tests: Sequence[TestInput]) -> tuple[np.ndarray, np.ndarray]:
        """Per test (Q, N): cosines of span embeddings (Sag) and label agreement (Lag)."""
        return (metrics.cosine_to(self.train_span_emb, self.test_span_embeddings(tests)),
                metrics.label_agreement(self.train_labels, self.test_labels(tests)))
