"""Workspaces: the prepared workspaces under the root, the chosen one's manifest (accuracy,
spans and their source, index, timings), and creating (or resuming) one with live progress -
trained here, or imported: a model fine-tuned elsewhere."""
from __future__ import annotations

import time
from dataclasses import replace

import pandas as pd
import streamlit as st

from core import catalog
from core.data import default_data_dir
from core.finetuned import check_classifier, check_qa_model
from core.formats import DESCRIPTIONS, INPUT_FORMATS
from core.importing import ImportSettings
from core.index import IndexSettings
from core.jobs import Job, PrepareJob, forget_jobs, job_for, resume_settings, start_job
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


def build_actions(info: catalog.WorkspaceInfo, failed: bool) -> None:
    """Resume, or delete (after a confirmation), a workspace whose build failed or stopped."""
    if failed:
        st.warning("This workspace's build failed (the reason is above). Fix the cause and resume it, or delete "
                   "the workspace.")
    else:
        st.warning("This workspace's build stopped before the end (the server stopped during the build). "
                   "Resuming continues from the last finished stage and training epoch; nothing done is redone.")
    try:
        resume = resume_settings(info.path)
    except (ValueError, TypeError, KeyError) as err:  # a damaged or outdated request: delete and start again
        resume = None
        st.caption(f"It cannot be resumed: {err}")
    c1, c2 = st.columns(2)
    if resume and c1.button("Resume building", type="primary", icon=":material/play_arrow:", key="resume"):
        start_job(PrepareJob(info.path, *resume))
        st.rerun()
    sure = c2.checkbox("Yes, delete this workspace and all its files", key="delete_confirm")
    if c2.button("Delete this workspace", icon=":material/delete:", disabled=not sure, key="delete"):
        try:
            forget_jobs(info.path)  # refuses while a build (resumed from another page) runs
            catalog.delete_workspace(root, info.name)
        except (ValueError, OSError) as err:
            st.error(f"Not deleted: {err}")
            return
        for key in ("workspace", "w_workspace", "workspace_info", "delete_confirm"):
            st.session_state.pop(key, None)
        st.rerun()


def imported_caption(imported: dict) -> None:
    """Where an imported model came from and which Trainer checkpoints serve TracIn (or why none)."""
    points = imported.get("checkpoints") or []
    kept = ", ".join(f"step {c['step']} (learning rate {c['lr']:.3g})" for c in points)
    widgets.caption(f"Imported from {imported.get('imported_from')}: nothing retrained; accuracy measured on every "
                    "split. " + (f"Checkpoints for TracIn, Control and TRAK: {kept}." if points else
                                 f"TracIn, Control and TRAK are unavailable: {imported.get('checkpoints_missing')}."))


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
    failed = job is not None and job.state == "error"
    if job is not None and (job.running or failed or job.finished and time.time() - job.finished < 30):
        job_panel(job)
    if not (job is not None and job.running) and info.status in ("unfinished", "needs index"):
        build_actions(info, failed)
    summary = catalog.manifest_summary(info.path)
    counts, acc, index = summary["counts"], summary["accuracy"], summary["index"]
    m = st.columns(6)
    for col, split in zip(m, ("train", "dev", "test")):
        col.metric(f"{split} instances", f"{counts.get(split, 0):,}")
    m[3].metric("dev accuracy", f"{acc['dev_accuracy']:.3f}" if "dev_accuracy" in acc else "–")
    m[4].metric("test accuracy", f"{acc['test_accuracy']:.3f}" if "test_accuracy" in acc else "–")
    m[5].metric("index size", f"{index['bytes'] / 2**20:.0f} MiB" if index.get("bytes") else "–",
                help=f"dimension {index.get('dim')}, {len(index.get('points', []))} parameter points")
    if summary["span_source"]:
        widgets.caption(f"Spans: {summary['span_source']}; a person's correction (Annotate spans) overrides them.")
    if summary["imported"]:
        imported_caption(summary["imported"])
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
                **{f"source: {k}": v for k, v in spans["by_source"].items()},
                **({"past the token limit": spans["past_token_limit"]["train"]} if "past_token_limit" in spans
                   else {})}}), key="span_stats")
            if spans.get("past_token_limit", {}).get("train"):
                st.caption("Past the token limit: training spans wholly beyond max_length tokens; masking them "
                           "changes nothing, so their span scores are 0.")
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
    if summary["models"]:
        st.markdown(f"**TRAK's ensemble: theta (seed {summary['settings'].get('seed')}) and the classifiers trained "
                    "independently beside it**")
        st.dataframe(pd.DataFrame(summary["models"]).set_index("point")[
            ["seed", "best_epoch", "dev_accuracy", "test_accuracy"]], key="models")
    if summary["data_report"]:
        with st.expander("Data report (items read and skipped, split assignment)"):
            st.code(summary["data_report"], language=None)
    with st.expander("Settings and versions"):
        st.json({"settings": summary["settings"], "index": {k: v for k, v in index.items() if k != "points"},
                 "versions": summary["versions"]}, expanded=False)

# ---------------------------------------------------------------------------- create
st.header("Create a workspace")
DATASETS = {"mams": "MAMS (restaurant reviews)", "sentihood": "SentiHood (neighbourhoods)",
            "file": "My own file or folder (SemEval XML, JSONL, CSV)"}
dataset_kind = st.radio("Dataset", list(DATASETS), format_func=DATASETS.get, horizontal=True, key="new_dataset")
roots = ", ".join(str(r) for r in catalog.data_roots())
RC_HELP = (f"A local Hugging Face extractive question-answering folder under a data root ({roots}), asked the "
           "paper's questions about each aspect. Empty: the clause heuristic around the aspect. Single texts and "
           "text pairs have no aspect: their spans come from the importance rule with the model.")
with st.form("create"):
    c1, c2 = st.columns(2)
    name = c1.text_input("Name", placeholder="e.g. mams-demo", key="new_name")
    size = c2.selectbox("Size", list(catalog.SIZE_PRESETS), index=1, key="new_size",
                        help="tiny slice: 300 training instances (a minute on a CPU); demo: 2,000; full: everything.")
    if dataset_kind == "file":
        source = st.text_input("Data file or folder", key="new_path",
                               help=f"A path under a data root of this server ({roots}). "
                                    "Fields text, aspect, label (optional from, to, split).")
        upload = st.file_uploader("…or upload your own file", type=list(catalog.UPLOAD_TYPES), key="new_upload",
                                  help="JSONL or CSV with text, aspect, label (optional from, to, split), or "
                                       "SemEval-2014 XML; kept in the new workspace's folder. It wins over a path.")
        data_dir = None
    else:
        source, upload = dataset_kind, None
        data_dir = st.text_input("Data folder", value=str(default_data_dir()), key="new_data_dir",
                                 help=f"Holds mams-atsa/ and sentihood/; under a data root of this server ({roots}).")
    c3, c4, c5 = st.columns(3)
    backbone = c3.text_input("Backbone", value="minilm", key="new_backbone",
                             help="'minilm' (packaged all-MiniLM-L6-v2), or a Hugging Face model folder or hub id.")
    rc_model = c4.text_input("Reading-comprehension span model (optional)", key="new_rc", help=RC_HELP)
    proj = c5.number_input("Sketch dimension d (0 = exact gradients)", 0, 65536, IndexSettings().dim, step=1024,
                           key="new_proj", help="Dimension of the gradient index's CountSketch; exact only suits "
                           "small workspaces.")
    submitted = st.form_submit_button("Create and build", type="primary", icon=":material/add:")


def rc_folder(text: str) -> str | None:
    """The reading-comprehension model folder given (None when left empty), checked: under a data
    root, and an extractive question-answering model."""
    if not text.strip():
        return None
    folder = catalog.allowed_data_path(text)
    check_qa_model(folder)
    return str(folder)


def chosen_data(kind: str, source: str, data_dir: str | None, uploaded: bool) -> tuple[str | None, str | None]:
    """The dataset (None for an upload) and data folder, the paths checked against the data roots."""
    if uploaded:
        return None, None
    if kind == "file":
        if not source.strip():
            raise ValueError("give a data file or folder, or upload one")
        return str(catalog.allowed_data_path(source)), None
    return source, str(catalog.allowed_data_path(data_dir or ""))


def create(name: str) -> None:
    """Check the form, then start the build (an upload is saved into the new workspace first)."""
    problem = catalog.check_workspace_name(root, name)
    if problem:
        st.error(f"Name: {problem}.")
        return
    try:
        dataset, folder = chosen_data(dataset_kind, source, data_dir, upload is not None)
    except ValueError as err:
        st.error(f"Data: {err}.")
        return
    missing = catalog.missing_data(dataset, folder) if dataset else []
    if missing:
        st.error("Data not found.")
        st.code("\n".join(missing), language=None)
        if dataset_kind != "file":
            st.markdown("Download the public data sets into a folder, then give that folder above:")
            st.code("python -m core fetch-data --dest DIR", language="bash")
        return
    try:
        rc = rc_folder(rc_model)
    except ValueError as err:
        st.error(f"Span model: {err}.")
        return
    if upload is not None:
        dataset = str(catalog.save_upload(root / name, upload.name, upload.getvalue()))
    settings = catalog.settings_for(dataset, folder, backbone.strip(), size, rc_model=rc)
    start_job(PrepareJob(root / name, settings, IndexSettings(dim=int(proj) or None)))
    st.session_state["workspace"] = name
    st.session_state.pop("w_workspace", None)
    st.rerun()


def lacks_data(dataset: str, data_dir: str | None) -> bool:
    """Whether a named data set is missing from the data folder (looked at only under a data root)."""
    try:
        folder = catalog.allowed_data_path(data_dir or str(default_data_dir()))
    except ValueError:
        return False
    return bool(catalog.missing_data(dataset, str(folder)))


if submitted:
    create(name.strip())
elif dataset_kind != "file" and lacks_data(dataset_kind, st.session_state.get("new_data_dir")):
    st.info("The data set is not in the data folder. Fetch it with `python -m core fetch-data --dest DIR` "
            "(needs internet), then set the folder above.")


# ---------------------------------------------------------------------------- import
st.header("Import a fine-tuned model")
st.caption("A classifier fine-tuned elsewhere - a local save_pretrained folder of a BERT, RoBERTa, DistilBERT, "
           "DeBERTa-v2/v3 or ELECTRA sequence classifier - explained on the data it was fine-tuned on. Nothing is "
           "retrained: its labels come from its config (id2label), its accuracy is measured, and the "
           "transformers.Trainer checkpoint-* folders in it serve TracIn (without them, TracIn, Control and TRAK "
           "are unavailable).")
with st.form("import"):
    c1, c2 = st.columns(2)
    imp_name = c1.text_input("Name", placeholder="e.g. my-classifier", key="imp_name")
    imp_model = c2.text_input("Model folder", key="imp_model",
                              help=f"A save_pretrained folder under a data root of this server ({roots}).")
    imp_path = st.text_input("Data file or folder", key="imp_path",
                             help=f"Under a data root ({roots}). JSONL or CSV with text, label (single texts), text, "
                                  "aspect, label, or text_a, text_b (premise, hypothesis), label; optional split.")
    imp_upload = st.file_uploader("…or upload the data file", type=list(catalog.UPLOAD_TYPES), key="imp_upload")
    c3, c4, c5, c6 = st.columns(4)
    imp_format = c3.selectbox("Input format", INPUT_FORMATS, key="imp_format",
                              format_func=lambda f: DESCRIPTIONS.get(f, "from the data's columns"))
    imp_rc = c4.text_input("Reading-comprehension span model (optional)", key="imp_rc", help=RC_HELP)
    imp_layers = c5.number_input("Trainable layers N", 1, 64, 2, key="imp_layers",
                                 help="Gradients are taken w.r.t. the last N layers, the pooler and the head; the "
                                      "layers below are held at each point's values (see the README).")
    imp_proj = c6.number_input("Sketch dimension d (0 = exact)", 0, 65536, IndexSettings().dim, step=1024,
                               key="imp_proj")
    imported = st.form_submit_button("Import and build", type="primary", icon=":material/upload:")


def start_import(name: str) -> None:
    """Check the import form (paths under the data roots, a supported classifier), then start the build."""
    problem = catalog.check_workspace_name(root, name)
    if problem:
        st.error(f"Name: {problem}.")
        return
    try:
        if not imp_model.strip() or not (imp_path.strip() or imp_upload is not None):
            raise ValueError("give the model folder and a data file (or upload one)")
        model = catalog.allowed_data_path(imp_model)
        check_classifier(model)
        data = "upload" if imp_upload is not None else str(catalog.allowed_data_path(imp_path))
        rc = rc_folder(imp_rc)
        settings = ImportSettings(model=str(model), dataset=data, input_format=imp_format, rc_model=rc,
                                  trainable_layers=int(imp_layers))
    except ValueError as err:
        st.error(f"Import: {err}.")
        return
    if imp_upload is not None:
        settings = replace(settings, dataset=str(catalog.save_upload(root / name, imp_upload.name,
                                                                     imp_upload.getvalue())))
    start_job(PrepareJob(root / name, settings, IndexSettings(dim=int(imp_proj) or None)))
    st.session_state["workspace"] = name
    st.session_state.pop("w_workspace", None)
    st.rerun()


if imported:
    start_import(imp_name.strip())
