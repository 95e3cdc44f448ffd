"""Evaluation runs and reports: the paper's table 3 (Sag, Lag, Ral), table 4 (faithfulness) and
figure 1 (K-curves) for one prepared workspace, one module per phase.

A run has three parts, each cached in the workspace's store so that an interrupted run resumes:

1. **Sag / Lag / K-curves** (:mod:`.saglag`) on N test instances (a seeded sample of the test
   split, without those whose span a person marked wrong; each explains its gold label): every
   method's ranking of the training set per test, its Sag@K and Lag@K for K = 1..Kmax and, with
   faithfulness runs, its Spearman correlation with GroundTruth.
2. **Faithfulness** (:mod:`.faithfulness`, table 4): further runs with new test samples and new
   variants, scored by the same engine.
3. **Ral** (:mod:`.ral`): retrains without the top p % of each method's combined ranking.
4. **LDS and span-LDS** (:mod:`.counterfactual`): each method's summed scores over random
   subsets against retrains with the subsets removed (or their spans masked).

Ral and LDS retrain the trainable subset from the backbone's initial state with the workspace's
training settings; an imported model (:mod:`core.importing`) has neither - it was fine-tuned
elsewhere, in full - so they are refused for it (Sag, Lag and faithfulness run as usual).

Every row is keyed by :func:`core.scoring.result_key` - the method's spec and exactly the
settings that change its numbers - plus the index fingerprint and the corrected training spans.
Values are fractions in the CSV files and x100 in the tables (the paper's units).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from .context import Evaluation, ProgressCallback
from .counterfactual import LDS_COLUMNS, lds
from .faithfulness import empty_table, faithfulness_run, faithfulness_table
from .ral import initial_state, ral, retrain_accuracy
from .render import (
    curve_figures,
    lds_frame,
    lds_note,
    pair_frame,
    report_markdown,
    table3_intervals_frame,
    write_report,
)
from .report import EvalReport, build_report, collect, load_report
from .saglag import main_pass
from .settings import EvalSettings, Selection, resolve_methods, select_tests

RETRAINS_REFUSED = ("Ral and LDS retrain the classifier's top layers from the backbone's initial state with the "
                    "workspace's training settings; this workspace's model was imported (fine-tuned elsewhere, in "
                    "full, with its own settings), so a retrain would measure another model. Run without them "
                    "(--ral none, no --lds): Sag, Lag and faithfulness work as usual")

__all__ = [
    "RETRAINS_REFUSED",
    "EvalReport",
    "EvalSettings",
    "Selection",
    "curve_figures",
    "initial_state",
    "lds_frame",
    "lds_note",
    "load_report",
    "pair_frame",
    "report_markdown",
    "resolve_methods",
    "retrain_accuracy",
    "run_evaluation",
    "select_tests",
    "table3_intervals_frame",
]


def run_evaluation(backend, settings: EvalSettings = EvalSettings(), out_dir: str | Path = "evaluation", *,
                   progress: bool = True, log: Callable[[str], None] = print,
                   on_progress: ProgressCallback | None = None) -> EvalReport:
    """Run (or resume) an evaluation and write its report to ``out_dir`` (see the module docstring);
    ``on_progress`` hears what is being done and the fraction done."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file; give a folder for the report (--out)")
    if backend.manifest.settings.get("imported") and (settings.ral or settings.lds):
        raise ValueError(RETRAINS_REFUSED)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    ev = Evaluation(backend, settings, out, progress, log, on_progress)
    selection = select_tests(backend, settings.test_limit, settings.seed)
    if not selection.ids:
        raise ValueError("no test instance to evaluate (none in the test split, or all excluded)")
    log(f"[evaluate] {len(selection.ids)} test instances ({len(selection.excluded_wrong)} excluded as wrongly "
        f"spanned, {len(selection.excluded_no_span)} without a span); methods: "
        f"{', '.join(m.name for m in ev.computed)}")
    tests = [backend.test_input(i, label="gold") for i in selection.ids]
    main_pass(ev, tests)
    for run in range(1, settings.faithfulness_runs):
        faithfulness_run(ev, run)
    ral_rows = ral(ev, tests) if settings.ral else pd.DataFrame()
    lds_rows, lds_pairs, lds_two_way = (lds(ev, tests) if settings.lds else
                                        (pd.DataFrame(columns=LDS_COLUMNS), pd.DataFrame(), pd.DataFrame()))
    per_test, per_test_curves, baselines = collect(ev, tests)
    faith = faithfulness_table(ev, selection.ids) if ev.faith else empty_table()
    ev.timings["total_seconds"] = round(time.perf_counter() - started, 1)
    report = build_report(ev, selection, per_test, per_test_curves, baselines, faith, ral_rows, lds_rows, lds_pairs,
                          lds_two_way)
    write_report(report)
    return report
