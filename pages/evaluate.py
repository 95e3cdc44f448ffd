"""Evaluate: the workspace's evaluation report (table 3 beside the paper's, K-curves, table 4)
and running an evaluation on a chosen subset with live progress."""
from __future__ import annotations

import time

import pandas as pd
import streamlit as st

from core.evaluate import (
    RETRAINS_REFUSED,
    EvalSettings,
    curve_figures,
    lds_frame,
    pair_frame,
    table3_intervals_frame,
)
from core.jobs import EvalJob, Job, job_for, start_job
from core.lds import LdsSettings
from core.registry import METHODS
from pages import resources, state, widgets

state.start_page("Evaluate")
info, backend = resources.require_backend()
out_dir = resources.evaluation_dir(info.path)


def progress_panel(job: Job) -> None:
    """Live progress of the evaluation job."""
    widgets.job_status(
        job, label=lambda j: f"Evaluation: {j.state}",
        progress=lambda j: f"{j.stage} · {time.time() - j.started:.0f}s",
        note="Runs on the server: reloading this page does not stop it; a stopped run resumes from the rows "
             "already stored.", waiting="loading the model…", every=2.0, seen_key="_eval_seen")


def pair_picker(pairs: pd.DataFrame, methods: list[str], scale: float, key: str) -> None:
    """Two methods chosen by the user, and their paired test on each cell of the report."""
    if pairs.empty or len(methods) < 2:
        return
    st.markdown("**Is one method better than another here?** (paired, on the same test instances)")
    c1, c2 = st.columns(2)
    a = c1.selectbox("Method a", methods, key=f"pair_{key}_a")
    b = c2.selectbox("Method b", [m for m in methods if m != a], key=f"pair_{key}_b")
    frame = pair_frame(pairs, a, b, scale)
    if frame.empty:
        st.caption(f"{a} and {b} are not compared: they are checked against different retrains or outputs.")
        return
    st.dataframe(frame, key=f"pair_{key}_table")
    st.caption("a - b (x100) over the tests where both are defined, with its 95% bootstrap interval; *holds*: "
               "significant at 5% after Holm's correction over all the pairs of that cell.")


job = job_for("evaluate", info.path)
if job is not None and (job.running or job.finished and time.time() - job.finished < 30):
    progress_panel(job)

report = resources.evaluation_report(info.path)
if report is None:
    st.info("No evaluation report for this workspace yet. Run one below, or from the command line:")
    st.code(f"python -m core evaluate --workspace {info.path} --test-limit 200", language="bash")
else:
    sel, summary = report.summary["selection"], report.summary
    if summary.get("fingerprint") != backend.fingerprint:
        st.warning("This report was computed on an earlier build of the workspace (its index has changed since): "
                   "its numbers may not hold for what Explore shows now. Run the evaluation again.")
    widgets.caption(f"{sel['n']} test instances (seed {sel['seed']}; {sel['excluded_wrong']} excluded as wrongly "
                   f"spanned, {sel['excluded_no_span']} without a span) · inverse Hessian "
                   f"{summary['approximations']['ihvp']} · report in {report.out_dir}")
    t3, curves, t4, lds_tab, per_test = st.tabs(["Table 3", "K-curves", "Table 4 (faithfulness)",
                                                 "LDS (retraining)", "Per test"])
    with t3:
        st.markdown("**Ours** (Sag, Lag x100; Ral in accuracy points; `random`: a random ranking)")
        st.dataframe(widgets.table3_frame(report), key="eval_table3")
        intervals = table3_intervals_frame(report)
        if not intervals.empty:
            st.markdown("**With 95% intervals** (bootstrap over the test instances)")
            st.dataframe(intervals, key="eval_table3_ci")
            pair_picker(report.table3_pairs, list(intervals.columns), 1.0, "t3")
        paper = summary.get("paper", {})
        if paper.get("table3"):
            st.markdown(f"**Paper** ({paper.get('source', 'Zhang et al. 2021')}, table 3, {summary.get('dataset')})")
            st.dataframe(pd.DataFrame(paper["table3"]).T.style.format("{:.2f}", na_rep="–"), key="paper_table3")
    with curves:
        figures = curve_figures(report)
        c1, c2 = st.columns(2)
        c1.plotly_chart(figures["sag"], key="eval_sag")
        c2.plotly_chart(figures["lag"], key="eval_lag")
    with t4:
        if len(report.table4):
            st.dataframe(report.table4.style.format("{:.2f}", na_rep="–"), key="eval_table4")
            st.caption("Spearman correlation of each method's scores with GroundTruth (x100) over runs.")
        else:
            st.caption("Faithfulness was not computed in this run.")
    with lds_tab:
        frame = lds_frame(report)
        if frame.empty:
            st.caption("LDS was not computed in this run (tick *LDS by retraining* below, or `evaluate --lds`).")
        else:
            st.dataframe(frame.style.format({c: "{:.1f}" for c in frame.columns if c not in ("checked by", "tests",
                                                                                          "NaN tests")}),
                         key="eval_lds")
            st.caption("Per test, the Spearman correlation over random training subsets between a method's summed "
                       "scores and the output of the classifier retrained on that subset (`remove`), or with that "
                       "subset's spans masked (`mask`); mean over tests with a 95% bootstrap interval.")
            pair_picker(report.lds_pairs, list(frame.index), 100.0, "lds")
    with per_test:
        st.dataframe(report.per_test, hide_index=True, key="eval_per_test")
    markdown = report.out_dir / "report.md"
    if markdown.exists():
        st.download_button("Download report.md", markdown.read_bytes(), file_name=f"{info.name}-report.md",
                           mime="text/markdown", icon=":material/download:")

st.header("Run an evaluation")
n_test = len(backend.instances("test"))
imported = bool(backend.manifest.settings.get("imported"))  # Ral and LDS retrain: refused for an imported model
with st.form("run_eval"):
    c1, c2 = st.columns([3, 1])
    methods = c1.multiselect("Methods", METHODS.names(), default=METHODS.paper(), key="eval_methods")
    limit = c2.number_input("Test instances", 1, max(n_test, 1), min(50, max(n_test, 1)), key="eval_limit",
                            help="A seeded sample of the test split, without spans marked wrong.")
    c3, c4, c5, c6 = st.columns(4)
    ks = c3.multiselect("K in the tables", [1, 5, 10, 20, 50, 100], default=[10, 100], key="eval_ks")
    faith = c4.number_input("Faithfulness runs", 0, 5, 0, key="eval_faith",
                            help="Table 4; each extra run makes new variants (slow on a CPU).")
    ral = c5.multiselect("Ral removal %", [10, 20, 30, 50], default=[], key="eval_ral", disabled=imported,
                         help="Each percentage retrains once per method: minutes each on full data.")
    ihvp = c6.selectbox("Inverse Hessian", ["fast", "lissa"], key="eval_ihvp")
    c7, c8 = st.columns(2)
    paper_signs = c7.checkbox("The paper's literal signs (IF's Eq. 1 minus; the ++ test side reversed)", key="eval_signs")
    lds_subsets = c8.number_input("LDS by retraining: subsets (0 = off)", 0, 200, 0, key="eval_lds_subsets",
                                  disabled=imported,
                                  help="Two retrains per subset (instances removed; spans masked): long on full data.")
    if imported:
        widgets.caption(RETRAINS_REFUSED + ".")
    start = st.form_submit_button("Run evaluation", type="primary", icon=":material/play_arrow:",
                                  disabled=bool(job and job.running))
if start:
    if not methods or not ks:
        st.error("Choose at least one method and one K.")
    else:
        settings = EvalSettings(methods=tuple(methods), ks=tuple(sorted(ks)), test_limit=int(limit),
                                ral=tuple(float(p) for p in ral), faithfulness_runs=int(faith), ihvp=ihvp,
                                paper_signs=paper_signs,
                                lds=LdsSettings(int(lds_subsets)) if lds_subsets >= 2 else None)
        start_job(EvalJob(info.path, settings, out_dir))
        st.rerun()
widgets.caption(f"Reports are written to {out_dir}. The command line takes the same settings: "
               "python -m core evaluate --workspace DIR --methods paper --test-limit 50 --ral none")
