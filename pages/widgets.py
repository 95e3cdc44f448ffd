"""Widgets shared by the pages: the workspace, test-instance, method, K and label pickers, the
explanation helpers, and the live panel of a background job.

Review text is untrusted: it reaches the page only through ``core.views`` builders rendered with
``st.html``, or as plain-text widget labels from :func:`core.instances.option_label`.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import streamlit as st

from core import catalog
from core.backend import Backend
from core.engine import TestInput
from core.evaluate import EvalReport
from core.explanations import Explanation, Hit
from core.index import IndexUnavailable
from core.instances import (
    InstanceFilter,
    InstanceRecord,
    Instances,
    filter_instances,
    option_label,
)
from core.jobs import Job
from core.metrics import Agreement, agreement
from core.registry import METHODS
from core.views import Html, caption_html, card_html, highlight_html, marks_for
from pages.resources import root
from pages.state import K_MAX, LABELS, remember, seeded, set_url

DEFAULT_METHODS = ["TracIn++", "IF++"]
CURVE_MAX = 100


def caption(text: str) -> None:
    """A caption that may hold dataset strings (ids, aspects): escaped, never Markdown."""
    st.html(caption_html(text))


def workspace_picker() -> catalog.WorkspaceInfo | None:
    """The sidebar picker of workspaces under the root; remembers the choice in the URL."""
    infos = catalog.list_workspaces(root())
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


def test_picker(backend: Backend, page: str) -> InstanceRecord | None:
    """Filters and the picker of a test instance; the choice is kept in the session and URL."""
    records = backend.instances("test")
    if not records:
        st.warning("This workspace has no test instances.")
        return None
    labels = backend.manifest.labels
    with st.expander("Find a test instance", expanded=False):
        c1, c2, c3 = st.columns([2, 1, 1])
        query = c1.text_input("Search text, aspect or id", key=f"{page}_q")
        aspect = None
        if backend.input_format == "aspect":  # single texts have none; a pair's first texts are no filter
            aspect = c2.selectbox("Aspect", [None, *sorted({r.aspect for r in records})], key=f"{page}_aspect",
                                  format_func=lambda a: "any" if a is None else a)
        source = c3.selectbox("Span source", [None, *sorted({r.span_source for r in records})],
                              key=f"{page}_source", format_func=lambda s: "any" if s is None else s)
        c4, c5, c6 = st.columns(3)
        gold = c4.selectbox("Gold label", [None, *labels], key=f"{page}_gold", format_func=lambda s: s or "any")
        pred = c5.selectbox("Predicted label", [None, *labels], key=f"{page}_pred", format_func=lambda s: s or "any")
        outcome = c6.selectbox("Prediction", [None, "correct", "wrong"], key=f"{page}_outcome",
                               format_func=lambda s: s or "any")
    chosen = filter_instances(records, InstanceFilter(query, aspect, gold, pred, outcome, source))
    if not chosen:
        st.warning("No test instance matches these filters.")
        return None
    ids = [r.id for r in chosen]
    by_id = {r.id: r for r in chosen}
    key = seeded("test", ids[0], ids)
    test_id = st.selectbox(f"Test review ({len(ids)} of {len(records)})", ids, key=key,
                           format_func=lambda i: f"{option_label(by_id[i])}  [{i}]")
    remember("test", test_id)
    return by_id[test_id]


def method_controls(page: str, max_methods: int | None = None, default: Sequence[str] = DEFAULT_METHODS,
                    n_train: int = K_MAX) -> tuple[list[str], int]:
    """Method multiselect (every registered method, in its colour's family) and K slider, shared
    through the session and URL."""
    names = METHODS.names()
    c1, c2 = st.columns([3, 1])
    key = seeded("methods", list(default)[:max_methods] if max_methods else list(default), names)
    if max_methods and len(st.session_state[key]) > max_methods:
        st.session_state[key] = st.session_state[key][:max_methods]
    methods = c1.multiselect("Methods", names, key=key, max_selections=max_methods,
                             format_func=lambda m: f"{m} ({METHODS.resolve(m).family})",
                             help="; ".join(f"{s.name}: {s.help}" for s in METHODS))
    top = max(1, min(K_MAX, n_train))
    kkey = seeded("k", min(10, top))
    st.session_state[kkey] = min(max(int(st.session_state[kkey]), 1), top)
    k = c2.slider("K", 1, top, key=kkey, disabled=top == 1) if top > 1 else 1
    remember("methods", methods)
    remember("k", k)
    return methods, k


def label_control(page: str, disabled: bool = False) -> str:
    """Which label the explanations explain: the prediction (default) or the gold label
    (``disabled`` where there is no gold label: a new review always explains its prediction)."""
    key = seeded("label", LABELS[0], list(LABELS))
    label = st.radio("Explain the", LABELS, key=key, horizontal=True, disabled=disabled,
                     format_func=lambda v: {"predicted": "predicted label", "gold": "gold label"}[v],
                     help="For a misclassified review, the predicted label shows what drove the error, the gold "
                          "label what supports the right answer. A new review has no gold label.")
    return remember("label", label)


def available(backend: Backend, methods: Sequence[str]) -> list[str]:
    """The methods whose artifacts the workspace has; a note, with the command, for each other."""
    out = []
    for name in methods:
        try:
            backend.check_methods([METHODS.resolve(name)])
        except IndexUnavailable as err:
            st.warning(str(err), icon=":material/build:")
        else:
            out.append(name)
    return out


def explanations(backend: Backend, test: TestInput, methods: Sequence[str]) -> dict[str, Explanation]:
    """Each method's explanation with the hits the K-curves need (from the store when cached;
    the missing methods are computed together)."""
    if not methods:
        return {}
    with st.spinner(f"Computing {', '.join(methods)} for this review (stored for next time)…"):
        found = backend.explain_many(test, methods, k=min(CURVE_MAX, len(backend.train_ids)))
    return {e.method: e for e in found}


def first_segment(backend: Backend) -> str | None:
    """What the first part of the model's input is called in the workspace (None: single texts)."""
    return {"aspect": "aspect", "single": None, "pair": "first text"}[backend.input_format]


def training_card(table: Instances, hit: Hit, test: TestInput, method: str, first: str | None = "aspect") -> Html:
    """A training instance as a card: its span in use highlighted, its ``first`` input segment (the
    aspect, a pair's first text; None: none), notes on a corrected or truncated span, and (for a
    method with a span test side) the test span it is matched to."""
    r = table.by_id[hit.train_id]
    text = highlight_html(r.text, marks_for(r.text, r.aspect_offsets() if first == "aspect" else None, r.span_pair,
                                            "train-span"))
    extra = ({first: r.aspect} if first else {}) | {"id": r.id}
    if METHODS.resolve(method).test_span and test.span:
        extra["test span"] = test.text[test.span[0]:test.span[1]]
    if r.span_truncated:
        extra["note"] = "span past the token limit: masking it changes nothing, so its span scores are 0"
    if r.verdict in ("fix", "wrong"):
        extra["note"] = ("span corrected by an annotator (the index uses the corrected span)" if r.verdict == "fix"
                         else "span marked wrong by an annotator")
    return card_html(hit.rank, hit.score, r.label, text, extra)


def agreements(table: Instances, explanations: dict[str, Explanation], cosines: Sequence[float],
               label: str) -> dict[str, Agreement]:
    """Sag/Lag K-curves of each explanation's hits; Lag counts agreement with ``label`` (the
    label the explanations explain)."""
    positions = {train_id: n for n, train_id in enumerate(table.train_ids)}
    train_labels = [table.by_id[i].label for i in table.train_ids]
    return {m: agreement([positions[h.train_id] for h in e.top], cosines, train_labels, label, len(e.top))
            for m, e in explanations.items()}


def profile(backend: Backend, test: TestInput) -> dict:
    with st.spinner("Running the classifier on this review (stored for next time)…"):
        return backend.profile(test)


def table3_frame(report: EvalReport) -> Any:
    """Table 3 (x100), formatted for display."""
    return report.table3.style.format("{:.2f}", na_rep="–")


def cosine_range(*values: float) -> tuple[float, float]:
    """A Sag gauge's axis: [0, 1], or [-1, 1] when a value is negative (cosines)."""
    return (-1.0, 1.0) if min(values) < 0 else (0.0, 1.0)


def at_k(fig: Any, k: int) -> Any:
    """A K-curve figure with the chosen K marked."""
    fig.add_vline(x=k, line={"color": "#999", "width": 1, "dash": "dot"})
    fig.update_layout(height=320, legend={"orientation": "h", "y": -0.25})
    return fig


def job_status(job: Job, *, label: Callable[[Job], str], progress: Callable[[Job], str],
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
