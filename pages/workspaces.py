"""Workspaces: the prepared workspaces under the root, the chosen one's manifest (accuracy,
spans, index, timings), and creating (or resuming) one with live progress."""
from __future__ import annotations

import time

import pandas as pd
import streamlit as st

from core import catalog
from core.data import default_data_dir
from core.index import IndexSettings
from core.jobs import Job, PrepareJob, job_for, resume_settings, start_job
from pages import resources, state, widgets

state.start_page("Workspaces")
root = resources.root()
infos = catalog.list_workspaces(root)
widgets.caption(f"Workspaces are folders under {root.resolve()} (set SPANLENS_WORKSPACES to use another folder).")


def job_panel(job: Job) -> None:
    """Live progress of a background build."""
    widgets.job_status(
        job, label=lambda j: {"running": f"Building {j.root.name}: {j.stage}…", "done": f"{j.root.name} is ready",
                              "error": f"Building {j.root.name} failed"}[j.state],
        progress=lambda j: f"{100 * j.fraction:.0f}% · {time.time() - j.started:.0f}s",
        note="The build runs on the server: reloading or closing this page does not stop it. If the server stops, "
             "the build resumes from its last finished stage and epoch when resumed.",
        waiting="starting…", every=1.0, seen_key="_job_seen")


# ---------------------------------------------------------------------------- the list
if infos:
    rows = []
    for i in infos:
        summary = catalog.manifest_summary(i.path)
        rows.append({"workspace": i.name, "status": i.status,
                     "dataset": str(summary["settings"].get("dataset", "")),
                     "backbone": str(summary["settings"].get("model", "")),
                     **{split: summary["counts"].get(split) for split in ("train", "dev", "test")},
                     "test accuracy": summary["accuracy"].get("test_accuracy"),
                     "index dim": summary["index"].get("dim")})
    st.dataframe(pd.DataFrame(rows), hide_index=True, key="workspace_table",
                 column_config={"test accuracy": st.column_config.NumberColumn(format="%.3f")})
else:
    st.info(f"No workspace yet under {root}. Create one below.")

# ---------------------------------------------------------------------------- the chosen one
info: catalog.WorkspaceInfo | None = st.session_state.get("workspace_info")
if info is not None:
    st.header(info.name)
    job = job_for("prepare", info.path)
    if job is not None and (job.running or job.finished and time.time() - job.finished < 30):
        job_panel(job)
    elif info.status in ("unfinished", "needs index"):
        st.warning("This workspace's build stopped before the end (the server stopped during the build). "
                   "Resuming continues from the last finished stage and training epoch; nothing done is redone.")
        resume = resume_settings(info.path)
        if resume and st.button("Resume building", type="primary", icon=":material/play_arrow:", key="resume"):
            start_job(PrepareJob(info.path, *resume))
            st.rerun()
    summary = catalog.manifest_summary(info.path)
    counts, acc, index = summary["counts"], summary["accuracy"], summary["index"]
    m = st.columns(6)
    for col, split in zip(m, ("train", "dev", "test")):
        col.metric(f"{split} instances", f"{counts.get(split, 0):,}")
    m[3].metric("dev accuracy", f"{acc['dev_accuracy']:.3f}" if "dev_accuracy" in acc else "–")
    m[4].metric("test accuracy", f"{acc['test_accuracy']:.3f}" if "test_accuracy" in acc else "–")
    m[5].metric("index size", f"{index['bytes'] / 2**20:.0f} MiB" if index.get("bytes") else "–",
                help=f"dimension {index.get('dim')}, {len(index.get('points', []))} parameter points")
    spans = summary["span_stats"]
    c1, c2, c3 = st.columns(3)
    with c1:
        st.markdown("**Training spans**")
        if spans.get("spans"):
            st.dataframe(pd.DataFrame({"value": {
                "spans": spans["spans"], "missing": spans["missing"],
                "whole-text share": round(spans["whole_text_share"], 3),
                "mean span tokens": round(spans["mean_span_tokens"], 1),
                "mean text tokens": round(spans["mean_text_tokens"], 1),
                "mean span/text ratio": round(spans["mean_span_text_ratio"], 3),
                **{f"source: {k}": v for k, v in spans["by_source"].items()}}}), key="span_stats")
    with c2:
        st.markdown("**Timings (seconds)**")
        if summary["timings"]:
            st.dataframe(pd.DataFrame({"seconds": summary["timings"]}), key="timings")
    with c3:
        st.markdown("**Training**")
        if summary["history"]:
            history = pd.DataFrame(summary["history"]).set_index("epoch")
            st.line_chart(history[[c for c in ("dev_accuracy", "train_loss") if c in history]], height=220)
            st.caption(f"best epoch {summary['best_epoch']}")
    with st.expander("Settings and versions"):
        st.json({"settings": summary["settings"], "index": {k: v for k, v in index.items() if k != "points"},
                 "versions": summary["versions"]}, expanded=False)

# ---------------------------------------------------------------------------- create
st.header("Create a workspace")
DATASETS = {"mams": "MAMS (restaurant reviews)", "sentihood": "SentiHood (neighbourhoods)",
            "file": "My own file or folder (SemEval XML, JSONL, CSV)"}
dataset_kind = st.radio("Dataset", list(DATASETS), format_func=DATASETS.get, horizontal=True, key="new_dataset")
with st.form("create"):
    c1, c2 = st.columns(2)
    name = c1.text_input("Name", placeholder="e.g. mams-demo", key="new_name")
    size = c2.selectbox("Size", list(catalog.SIZE_PRESETS), index=1, key="new_size",
                        help="tiny slice: 300 training instances (a minute on a CPU); demo: 2,000; full: everything.")
    if dataset_kind == "file":
        source = st.text_input("Data file or folder", key="new_path",
                               help="Fields text, aspect, label (optional from, to, split).")
        data_dir = None
    else:
        source = dataset_kind
        data_dir = st.text_input("Data folder", value=str(default_data_dir()), key="new_data_dir",
                                 help="Holds mams-atsa/ and sentihood/; default: $SPANLENS_DATA or ../shared/data.")
    c3, c4 = st.columns(2)
    backbone = c3.text_input("Backbone", value="minilm", key="new_backbone",
                             help="'minilm' (packaged all-MiniLM-L6-v2), or a Hugging Face model folder or hub id.")
    proj = c4.number_input("Sketch dimension d (0 = exact gradients)", 0, 65536, IndexSettings().dim, step=1024,
                           key="new_proj", help="Dimension of the gradient index's CountSketch; exact only suits "
                           "small workspaces.")
    submitted = st.form_submit_button("Create and build", type="primary", icon=":material/add:")
if submitted:
    problem = catalog.check_workspace_name(root, name.strip())
    missing = catalog.missing_data(source.strip(), data_dir) if source.strip() else ["(no file given)"]
    if problem:
        st.error(f"Name: {problem}.")
    elif missing:
        st.error("Data not found.")
        st.code("\n".join(missing), language=None)
        if dataset_kind != "file":
            st.markdown("Download the public data sets into a folder, then give that folder above:")
            st.code("python -m core fetch-data --dest DIR", language="bash")
    else:
        settings = catalog.settings_for(source.strip(), data_dir, backbone.strip(), size)
        start_job(PrepareJob(root / name.strip(), settings, IndexSettings(dim=int(proj) or None)))
        st.session_state["workspace"] = name.strip()
        st.session_state.pop("w_workspace", None)
        st.rerun()
elif dataset_kind != "file" and catalog.missing_data(dataset_kind, st.session_state.get("new_data_dir")):
    st.info("The data set is not in the data folder. Fetch it with `python -m core fetch-data --dest DIR` "
            "(needs internet), then set the folder above.")
