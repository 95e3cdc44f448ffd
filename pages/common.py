"""Shared widgets and layout of the pages (not a page itself): the workspace picker, the cached
backend, URL state, the test-instance picker and the escaped HTML blocks.

Review text is untrusted: it reaches the page only through ``core.views`` builders rendered
with ``st.html``, or as plain-text widget labels from :func:`core.explore.option_label`.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import streamlit as st
from streamlit.runtime.pages_manager import PagesManager

from core import explore
from core.backend import Backend
from core.evaluate import EvalReport, load_report
from core.methods import TestInput
from core.views import METHOD_COLOURS, Html, escape_text, highlight_html

METHODS: tuple[str, ...] = tuple(METHOD_COLOURS)
DEFAULT_METHODS = ["TracIn++", "IF++"]
K_MAX = 50
"""Largest K offered; K-curves run to the 100 hits each explanation keeps."""
CURVE_MAX = 100
STYLE = Path(__file__).resolve().parents[1] / "assets" / "style.css"


# --------------------------------------------------------------------------- page start, state and URL

def start_page(title: str) -> None:
    """First call of every page: make sure it runs inside app.py's navigation, then its title.

    Streamlit serves ``pages/*.py`` as a legacy multipage app until some run of the process
    calls ``st.navigation``, so a deep link (``/explore?...``) opened first on a fresh server
    would run the page without app.py. Switch the process to app.py's navigation and rerun.
    """
    if PagesManager.uses_pages_directory:
        PagesManager.uses_pages_directory = False
        st.rerun()
    st.title(title)


def load_url_state() -> None:
    """Once per session: seed the view state (workspace, test, methods, K) from the URL."""
    if st.session_state.get("_url_loaded"):
        return
    st.session_state["_url_loaded"] = True
    params = st.query_params
    if params.get("workspace"):
        st.session_state["workspace"] = params["workspace"]
    if params.get("test"):
        st.session_state["test"] = params["test"]
    methods = [m for m in params.get("methods", "").split(",") if m in METHODS]
    if methods:
        st.session_state["methods"] = methods
    if params.get("item"):
        st.session_state["annotate_item"] = params["item"]
    if params.get("k", "").isdigit():
        st.session_state["k"] = min(max(int(params["k"]), 1), K_MAX)


def set_url(**values: Any) -> None:
    """Write view state to the URL (lists comma-joined; ``None`` removes a key)."""
    for key, value in values.items():
        text = None if value is None else ",".join(value) if isinstance(value, (list, tuple)) else str(value)
        if text is None:
            if key in st.query_params:
                del st.query_params[key]
        elif st.query_params.get(key) != text:
            st.query_params[key] = text


def seeded(key: str, default: Any, valid: Sequence[Any] | None = None) -> str:
    """The widget key ``w_<key>``, seeded from the session's ``key`` (kept across pages)."""
    wkey = f"w_{key}"
    value = st.session_state.get(wkey, st.session_state.get(key, default))
    if valid is not None:
        if isinstance(value, list):
            value = [v for v in value if v in valid] or [v for v in default if v in valid]
        elif value not in valid:
            value = default if default in valid else (valid[0] if valid else None)
    st.session_state[wkey] = value
    return wkey


def remember(key: str, value: Any) -> Any:
    """Keep a widget's value under ``key`` for the other pages and the next visit."""
    st.session_state[key] = value
    return value


# --------------------------------------------------------------------------- workspaces and backend

def root() -> Path:
    return explore.workspaces_root()


def workspace_picker() -> explore.WorkspaceInfo | None:
    """The sidebar picker of workspaces under the root; remembers the choice in the URL."""
    infos = explore.list_workspaces(root())
    with st.sidebar:
        if not infos:
            st.caption(f"No workspace under `{root()}` yet: create one on the Workspaces page.")
            st.session_state.pop("workspace", None)
            set_url(workspace=None)
            return None
        names = [i.name for i in infos]
        marks = {"ready": "", "needs index": " (needs index)", "unfinished": " (unfinished)", "empty": " (empty)"}
        by_name = {i.name: i for i in infos}
        ready = [i.name for i in infos if i.ready]
        key = seeded("workspace", ready[0] if ready else names[0], names)
        name = st.selectbox("Workspace", names, key=key, format_func=lambda n: n + marks[by_name[n].status],
                            help=f"Workspaces are folders under `{root()}` (set SPANLENS_WORKSPACES to change it).")
    remember("workspace", name)
    set_url(workspace=name)
    return by_name[name]


def _stamp(path: Path) -> str:
    """Changes whenever the workspace or its index is rebuilt (not when a corrected training span
    is patched into the index: the Backend brings those in itself)."""
    parts = [path / "manifest.json", path / "instances.jsonl"]
    stamp = ":".join(str(p.stat().st_mtime_ns) if p.exists() else "-" for p in parts)
    return f"{stamp}:{explore.index_fingerprint_of(path)}"


@st.cache_resource(max_entries=4, show_spinner=False)
def _open(path: str, stamp: str) -> tuple[Backend, threading.Lock]:
    """One Backend per workspace (and build) per process; the lock serialises model use."""
    return Backend(path, index_settings=explore.index_settings_of(Path(path))), threading.Lock()


def backend_for(info: explore.WorkspaceInfo) -> tuple[Backend, threading.Lock]:
    return _open(str(info.path), _stamp(info.path))


def require_backend() -> tuple[explore.WorkspaceInfo, Backend, threading.Lock]:
    """The picked workspace's backend; stops the page with a hint when there is none ready."""
    info = st.session_state.get("workspace_info")
    if info is None:
        st.info("Pick a workspace in the sidebar, or create one on the **Workspaces** page.")
        st.stop()
    if not info.ready:
        st.warning(f"Workspace `{info.name}` is not ready ({info.status}). Finish it on the **Workspaces** page.")
        st.stop()
    backend, lock = backend_for(info)
    return info, backend, lock


def explain(backend: Backend, lock: threading.Lock, test: TestInput, method: str):
    """The method's explanation with the hits the K-curves need (from the store when cached)."""
    with lock:
        return backend.explain(test, method, k=min(CURVE_MAX, len(backend.train_ids)))


def profile(backend: Backend, lock: threading.Lock, test: TestInput) -> dict:
    with lock:
        return backend.profile(test)


def computing(method: str) -> str:
    return f"Computing {method} for this review (stored for next time)…"


# --------------------------------------------------------------------------- evaluation reports

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


def table3_frame(report: EvalReport) -> Any:
    """Table 3 (x100), formatted for display."""
    return report.table3.style.format("{:.2f}", na_rep="–")


# --------------------------------------------------------------------------- test instances

def statuses(backend: Backend) -> dict[str, str]:
    return {i: a.status for i, a in backend.store.current_annotations().items()}


def test_picker(backend: Backend, page: str) -> dict | None:
    """Filters and the picker of a test instance; the choice is kept in the session and URL."""
    rows = backend.instances("test")
    if not rows:
        st.warning("This workspace has no test instances.")
        return None
    current = statuses(backend)
    labels = backend.manifest.labels
    with st.expander("Find a test instance", expanded=False):
        c1, c2, c3 = st.columns([2, 1, 1])
        query = c1.text_input("Search text, aspect or id", key=f"{page}_q")
        aspects = sorted({r["aspect"] for r in rows})
        aspect = c2.selectbox("Aspect", [None, *aspects], key=f"{page}_aspect",
                              format_func=lambda a: "any" if a is None else a)
        source = c3.selectbox("Span source", [None, *sorted({explore.effective_source(r, current) for r in rows})],
                              key=f"{page}_source", format_func=lambda s: "any" if s is None else s)
        c4, c5, c6 = st.columns(3)
        gold = c4.selectbox("Gold label", [None, *labels], key=f"{page}_gold", format_func=lambda s: s or "any")
        pred = c5.selectbox("Predicted label", [None, *labels], key=f"{page}_pred", format_func=lambda s: s or "any")
        outcome = c6.selectbox("Prediction", [None, "correct", "wrong"], key=f"{page}_outcome",
                               format_func=lambda s: s or "any")
    chosen = explore.filter_instances(rows, explore.InstanceFilter(query, aspect, gold, pred, outcome, source), current)
    if not chosen:
        st.warning("No test instance matches these filters.")
        return None
    ids = [r["id"] for r in chosen]
    by_id = {r["id"]: r for r in chosen}
    key = seeded("test", ids[0], ids)
    test_id = st.selectbox(f"Test review ({len(ids)} of {len(rows)})", ids, key=key,
                           format_func=lambda i: f"{explore.option_label(by_id[i])}  [{i}]")
    remember("test", test_id)
    return by_id[test_id]


def method_controls(page: str, max_methods: int | None = None, default: Sequence[str] = DEFAULT_METHODS,
                    n_train: int = K_MAX) -> tuple[list[str], int]:
    """Method multiselect and K slider, shared through the session and URL."""
    c1, c2 = st.columns([3, 1])
    key = seeded("methods", list(default)[:max_methods] if max_methods else list(default), METHODS)
    if max_methods and len(st.session_state[key]) > max_methods:
        st.session_state[key] = st.session_state[key][:max_methods]
    methods = c1.multiselect("Methods", METHODS, key=key, max_selections=max_methods,
                             help="IF family (dashed), TracIn family (solid); GroundTruth = TracIn++ at theta alone.")
    top = max(1, min(K_MAX, n_train))
    kkey = seeded("k", min(10, top))
    st.session_state[kkey] = min(max(int(st.session_state[kkey]), 1), top)
    k = c2.slider("K", 1, top, key=kkey, disabled=top == 1) if top > 1 else 1
    remember("methods", methods)
    remember("k", k)
    return methods, k


# --------------------------------------------------------------------------- HTML blocks (escaped)

def review_block(text: str, aspect: tuple[int, int] | None, span: tuple[int, int] | None,
                 kind: str = "test-span") -> Html:
    """The review with its aspect and its span (as ``kind``) highlighted, in a card."""
    body = highlight_html(text, explore.marks_for(text, aspect, span, kind))
    return Html(f'<div class="sl-review">{body}</div>')


def labels_block(labels: Sequence[str], probs: Sequence[float], gold: str | None, predicted: str) -> Html:
    """Gold vs predicted label and the class probabilities as bars."""
    rows = []
    for label, p in zip(labels, probs):
        tags = "".join(f'<span class="sl-tag sl-tag-{kind}">{kind}</span>'
                       for kind, on in (("gold", label == gold), ("predicted", label == predicted)) if on)
        rows.append(f'<div class="sl-prob"><span class="sl-prob-label">{escape_text(label)}</span>'
                    f'<span class="sl-prob-bar"><span style="width:{100 * float(p):.1f}%"></span></span>'
                    f'<span class="sl-prob-value">{float(p):.3f}</span><span>{tags}</span></div>')
    verdict = ("" if gold is None else '<div class="sl-verdict sl-ok">correct</div>' if gold == predicted
               else '<div class="sl-verdict sl-bad">wrong</div>')
    return Html(f'<div class="sl-probs">{"".join(rows)}{verdict}</div>')


def method_heading(method: str, note: str = "") -> Html:
    colour = METHOD_COLOURS[method]
    extra = f' <span class="sl-method-note">{escape_text(note)}</span>' if note else ""
    return Html(f'<div class="sl-method" style="border-color:{colour}">'
                f'<span class="sl-swatch" style="background:{colour}"></span>{escape_text(method)}{extra}</div>')


def cards_block(cards: Sequence[Html], columns: int = 2) -> Html:
    return Html(f'<div class="sl-cards sl-cols-{columns}">{"".join(cards)}</div>')


def caption(text: str) -> None:
    """A caption that may hold dataset strings (ids, aspects): escaped, never Markdown."""
    st.html(f'<p class="sl-caption">{escape_text(text)}</p>')


def legend() -> Html:
    """What the highlight colours mean."""
    items = [("sl-aspect", "aspect"), ("sl-test-span", "test span"), ("sl-train-span", "training span")]
    return Html('<div class="sl-legend">' + "".join(
        f'<span class="{cls}">{escape_text(name)}</span>' for cls, name in items) + "</div>")


def cosine_range(*values: float) -> tuple[float, float]:
    """A Sag gauge's axis: [0, 1], or [-1, 1] when a value is negative (cosines)."""
    return (-1.0, 1.0) if min(values) < 0 else (0.0, 1.0)


def at_k(fig: Any, k: int) -> Any:
    """A K-curve figure with the chosen K marked."""
    fig.add_vline(x=k, line={"color": "#999", "width": 1, "dash": "dot"})
    fig.update_layout(height=320, legend={"orientation": "h", "y": -0.25})
    return fig


def style_sheet() -> str:
    return STYLE.read_text(encoding="utf-8")


def job_status(job: explore.Job, *, label: Callable[[explore.Job], str], progress: Callable[[explore.Job], str],
               note: str | None, waiting: str, every: float, seen_key: str) -> None:
    """Live status of a background job; refreshes itself while it runs and reruns the app once
    when it has ended (so the page shows what the job made)."""

    @st.fragment(run_every=every if job.running else None)
    def panel() -> None:
        state = {"running": "running", "done": "complete", "error": "error"}[job.state]
        box = st.status(label(job), state=state, expanded=job.state != "done")  # no `with`: it would end as complete
        box.progress(job.fraction, text=progress(job))
        if job.error:
            box.code(job.error, language=None)
        box.code("\n".join(job.lines[-14:]) or waiting, language=None)
        if job.running and note:
            box.caption(note)
        if not job.running and st.session_state.get(seen_key) != id(job):
            st.session_state[seen_key] = id(job)
            st.rerun(scope="app")

    panel()
