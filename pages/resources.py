"""Cached resources of the app's server process: one Backend per workspace build, evaluation
reports, the style sheet. A Backend carries its own lock (``backend.lock``), so sessions share it."""
from __future__ import annotations

from pathlib import Path

import streamlit as st

from core import catalog
from core.backend import Backend
from core.evaluate import EvalReport, load_report

STYLE = Path(__file__).resolve().parents[1] / "assets" / "style.css"


def root() -> Path:
    return catalog.workspaces_root()


def _stamp(path: Path) -> str:
    """Changes whenever the workspace or its index is rebuilt (not when a corrected training span
    is patched into the index: the Backend follows those itself)."""
    parts = [path / "manifest.json", path / "instances.jsonl"]
    stamp = ":".join(str(p.stat().st_mtime_ns) if p.exists() else "-" for p in parts)
    return f"{stamp}:{catalog.index_fingerprint_of(path)}"


@st.cache_resource(max_entries=4, show_spinner=False)
def _open(path: str, stamp: str) -> Backend:
    """One Backend per workspace (and build) per process."""
    return Backend(path)


def require_backend() -> tuple[catalog.WorkspaceInfo, Backend]:
    """The picked workspace's backend; stops the page with a hint when there is none ready."""
    info = st.session_state.get("workspace_info")
    if info is None:
        st.info("Pick a workspace in the sidebar, or create one on the **Workspaces** page.")
        st.stop()
    if not info.ready:
        st.warning(f"Workspace `{info.name}` is not ready ({info.status}). Finish it on the **Workspaces** page.")
        st.stop()
    backend = _open(str(info.path), _stamp(info.path))
    try:
        backend.index  # opened, and checked against the workspace's files, once per build
    except ValueError as err:  # a damaged or edited file, named in the message
        st.error(str(err))
        st.stop()
    return info, backend


def evaluation_dir(path: Path) -> Path:
    """Where the workspace's evaluation report lives (the `python -m core evaluate` default)."""
    return path / "evaluation"


@st.cache_data(max_entries=8, show_spinner=False)
def _report(out: str, stamp: int) -> EvalReport:
    return load_report(out)


def evaluation_report(path: Path) -> EvalReport | None:
    """The workspace's saved evaluation report, or ``None`` when there is none yet."""
    summary = evaluation_dir(path) / "summary.json"
    return _report(str(summary.parent), summary.stat().st_mtime_ns) if summary.exists() else None


def style_sheet() -> str:
    return STYLE.read_text(encoding="utf-8")
