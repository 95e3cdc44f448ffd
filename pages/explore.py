"""Explore: one review's explanations - top-K training instances per method with spans
highlighted, Sag@K / Lag@K gauges against the random baseline, K-curves and score distributions."""
from __future__ import annotations

import streamlit as st

from core.cases import save_case_study
from core.catalog import span_source
from core.engine import TestInput
from core.evaluate import lds_note
from core.explanations import Explanation, Hit
from core.figures import gauge_figure, k_curve_figure, score_histogram
from core.metrics import Agreement
from core.registry import METHODS
from core.spans import find_aspect
from core.views import (
    Html,
    cards_block,
    labels_block,
    legend_html,
    method_heading,
    review_block,
)
from pages import resources, state, widgets

state.start_page("Explore")
info, backend = resources.require_backend()

mode = st.radio("Review to explain", ["Test set", "New review"], horizontal=True, key="explore_mode",
                help="Pick a test instance, or type a review and an aspect of your own.")
label_choice = widgets.label_control("explore", disabled=mode == "New review")


def new_review() -> TestInput | None:
    """A review typed by the user (kept in the session until replaced): a text and its aspect, a
    single text, or a text pair, as the workspace's model reads them."""
    fmt = backend.input_format
    with st.form("new_review"):
        aspect = st.text_input("First text", key="new_aspect") if fmt == "pair" else ""
        label = {"aspect": "Review text", "single": "Text", "pair": "Second text (its span is explained)"}[fmt]
        text = st.text_area(label, key="new_text", height=100)
        if fmt == "aspect":
            aspect = st.text_input("Aspect (a word or phrase of the review)", key="new_aspect",
                                   help="On a workspace of category aspects (SentiHood): a target of the review and a "
                                        "category, e.g. LOCATION1 price")
        if st.form_submit_button("Explain", type="primary"):
            try:
                st.session_state["new_input"] = backend.new_input(text, aspect)
            except ValueError as err:
                st.error(str(err))
    return st.session_state.get("new_input")


if mode == "Test set":
    record = widgets.test_picker(backend, "explore")
    if record is None:
        st.stop()
    test = backend.test_input(record.id, label_choice)
    aspect, source = record.aspect_offsets(), record.span_source
else:
    record = None
    test = new_review()
    if test is None:
        st.info("Type a review and one of its aspects, then press **Explain**." if backend.input_format == "aspect"
                else "Type a text, then press **Explain**.")
        st.stop()
    aspect, source = find_aspect(test.text, test.aspect), "clause heuristic"
    if backend.input_format != "aspect":
        aspect, source = None, "the importance rule over its clauses and sentences"

prof = widgets.profile(backend, test)
explained = test.label or prof["label"]  # Lag@K counts agreement with the label explained

left, right = st.columns([3, 2], gap="large")
with left:
    if backend.input_format == "pair":
        widgets.caption(f"First text: {test.aspect}")
    st.html(review_block(test.text, aspect, test.span))
    st.html(legend_html())
    widgets.caption(f"Test span from {source}. " + (f"Id {test.id}." if test.id else "New review."))
    widgets.caption(f"Spans in this workspace: {span_source(backend.manifest)}.")
    if prof["span_masks_nothing"]:
        st.warning("The test span lies past the model's token limit: masking it changes nothing, so the span "
                   "methods score 0 for this review.")
with right:
    st.html(labels_block(backend.manifest.labels, prof["probs"], test.gold, prof["label"], test.label or prof["label"]))
    if test.id and st.button("Review this test span", icon=":material/edit_note:", key="to_annotate"):
        st.session_state.update(annotate_item=test.id, annotate_queue="Test, then training")
        st.session_state.pop("w_annotate_queue", None)
        st.switch_page("pages/annotate.py")
st.caption(f"Lag@K: the share of the top-K training instances labelled {explained} (the label explained).")

methods, k = widgets.method_controls("explore", n_train=len(backend.train_ids))
show_opponents = st.toggle("Show opponents (most negative scores)", key="explore_opponents")
state.set_url(test=test.id, methods=methods, k=k, label=label_choice)
if not methods:
    st.info("Choose at least one method.")
    st.stop()

CHARTS = ["Sag@K", "Lag@K", "Scores"]
report = resources.evaluation_report(info.path)
table = backend.table


def card(hit: Hit, method: str) -> Html:
    return widgets.training_card(table, hit, test, method, widgets.first_segment(backend))


def show_method(method: str, exp: Explanation, agree: Agreement) -> None:
    at = agree.at(k)
    colour = METHODS.resolve(method).colour
    st.html(method_heading(method, colour, f"{exp.approx.get('projection', {}).get('dim', '?')}-dim gradients · "
                                           f"explains {exp.label} · computed in {exp.seconds:.2f}s"))
    g1, g2, plots = st.columns([1, 1, 2])
    g1.plotly_chart(gauge_figure(at["sag"], at["sag_random"], f"Sag@{k}", colour=colour,
                                 axis_range=widgets.cosine_range(at["sag"], at["sag_random"])),
                    key=f"sag_{method}", config={"displayModeBar": False})
    g2.plotly_chart(gauge_figure(at["lag"], at["lag_random"], f"Lag@{k}", colour=colour),
                    key=f"lag_{method}", config={"displayModeBar": False})
    g1.caption(f"random: {at['sag_random']:.3f}")
    g2.caption(f"random: {at['lag_random']:.3f}")
    if note := lds_note(report, method, backend.fingerprint):
        g1.caption(note)
    with plots:  # one chart at a time: each Plotly chart costs the browser time on every review switch
        chart = st.segmented_control("Chart", CHARTS, default=CHARTS[0], required=True, key=f"chart_{method}",
                                     label_visibility="collapsed")
        if chart == "Scores":
            top = exp.top[:k]
            fig = score_histogram(exp.scores, [h.score for h in top], f"{method} scores, top {k} marked",
                                  [table.by_id[h.train_id].text for h in top])
        else:
            metric = agree.sag if chart == "Sag@K" else agree.lag
            band = agree.sag_random if chart == "Sag@K" else agree.lag_random
            fig = widgets.at_k(k_curve_figure(agree.ks, {method: metric}, *band, chart), k)
        st.plotly_chart(fig, key=f"chart_fig_{method}")
    st.html(cards_block([card(h, method) for h in exp.top[:k]]))
    if show_opponents:
        st.markdown(f"**Opponents of {method}** (most negative scores)")
        st.html(cards_block([card(h, method) for h in exp.opponents[:k]]))


methods = widgets.available(backend, methods)
found = widgets.explanations(backend, test, methods)
curves = widgets.agreements(table, found, prof["cosines"], explained)
for number, method in enumerate(methods):
    with st.container(border=True, key=f"method_{number}"):
        show_method(method, found[method], curves[method])

with st.expander("Save this view as a case study"):
    with st.form("save_case", clear_on_submit=True):
        title = st.text_input("Title", placeholder="Default: the aspect and the methods")
        note = st.text_area("Note", height=80)
        if st.form_submit_button("Save case study", icon=":material/bookmark_add:"):
            case_id = save_case_study(backend, title.strip() or f"{test.aspect[:40]} · {', '.join(methods)}",
                                      note, info.name, test, methods, k)
            st.success(f"Saved as case study #{case_id}.")
            st.page_link("pages/cases.py", label="Open case studies", icon=":material/bookmarks:")
