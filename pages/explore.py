"""Explore: one review's explanations - top-K training instances per method with spans
highlighted, Sag@K / Lag@K gauges against the random baseline, K-curves and score distributions."""
from __future__ import annotations

import numpy as np
import streamlit as st

from core import explore
from core.backend import Backend
from core.methods import Explanation, Hit, TestInput, resolve_method
from core.views import (METHOD_COLOURS, Html, card_html, gauge_figure, highlight_html, k_curve_figure,
                        score_histogram)
from pages import common

common.start_page("Explore")
info, backend, lock = common.require_backend()

mode = st.radio("Review to explain", ["Test set", "New review"], horizontal=True, key="explore_mode",
                help="Pick a test instance, or type a review and an aspect of your own.")


def new_review() -> TestInput | None:
    """A review typed by the user (kept in the session until replaced)."""
    with st.form("new_review"):
        text = st.text_area("Review text", key="new_text", height=100)
        aspect = st.text_input("Aspect (a word or phrase of the review)", key="new_aspect")
        if st.form_submit_button("Explain", type="primary"):
            try:
                st.session_state["new_input"] = backend.new_input(text, aspect)
            except ValueError as err:
                st.error(str(err))
    return st.session_state.get("new_input")


if mode == "Test set":
    row = common.test_picker(backend, "explore")
    if row is None:
        st.stop()
    test = backend.test_input(row["id"])
    aspect = explore.aspect_offsets(row)
else:
    test = new_review()
    if test is None:
        st.info("Type a review and one of its aspects, then press **Explain**.")
        st.stop()
    aspect = explore.aspect_offsets({"text": test.text, "aspect": test.aspect})

with st.spinner("Running the classifier on this review (stored for next time)…"):
    prof = common.profile(backend, lock, test)
gold = test.label or prof["label"]

left, right = st.columns([3, 2], gap="large")
with left:
    st.html(common.review_block(test.text, aspect, test.span))
    st.html(common.legend())
    source = "a person's fix" if test.id and common.statuses(backend).get(test.id) == "fix" else (
        (backend.by_id[test.id].get("span") or {}).get("source", "none") if test.id else "clause heuristic")
    common.caption(f"Test span from {source}. " + (f"Id {test.id}." if test.id else "New review."))
with right:
    st.html(common.labels_block(backend.manifest.labels, prof["probs"], test.label, prof["label"]))
    if test.id and st.button("Review this test span", icon=":material/edit_note:", key="to_annotate"):
        st.session_state.update(annotate_item=test.id, annotate_queue="Test, then training")
        st.session_state.pop("w_annotate_queue", None)
        st.switch_page("pages/annotate.py")
if test.label is None:
    st.caption("A new review has no gold label: Lag@K counts agreement with the predicted label.")

methods, k = common.method_controls("explore", n_train=len(backend.train_ids))
show_opponents = st.toggle("Show opponents (most negative scores)", key="explore_opponents")
common.set_url(test=test.id, methods=methods, k=k)
if not methods:
    st.info("Choose at least one method.")
    st.stop()

CHARTS = ["Sag@K", "Lag@K", "Scores"]
positions = {train_id: n for n, train_id in enumerate(backend.train_ids)}
train_labels = [backend.by_id[i]["label"] for i in backend.train_ids]
cosines = np.asarray(prof["cosines"])
train_status = common.statuses(backend)


def card(hit: Hit, method: str) -> Html:
    """A training instance with its span (and, for the ++ methods, the test span it is matched to)."""
    row = backend.by_id[hit.train_id]
    text = highlight_html(row["text"], explore.marks_for(row["text"], explore.aspect_offsets(row),
                                                        explore.span_of(row), "train-span"))
    extra = {"aspect": row["aspect"], "id": row["id"]}
    if resolve_method(method).test == "diff" and test.span:
        extra["test span"] = test.text[test.span[0]:test.span[1]]
    if train_status.get(row["id"]) in ("fix", "wrong"):
        extra["note"] = "span marked by an annotator; the index uses the span shown until it is rebuilt"
    return card_html(hit.rank, hit.score, row["label"], text, extra)


def show_method(method: str, exp: Explanation, b: Backend) -> None:
    agree = explore.agreement([positions[h.train_id] for h in exp.top], cosines, train_labels, gold, len(exp.top))
    at = agree.at(k)
    colour = METHOD_COLOURS[method]
    st.html(common.method_heading(method, f"{exp.approx.get('projection', {}).get('dim', '?')}-dim gradients · "
                                          f"computed in {exp.seconds:.2f}s"))
    g1, g2, plots = st.columns([1, 1, 2])
    g1.plotly_chart(gauge_figure(at["sag"], at["sag_random"], f"Sag@{k}", colour=colour,
                                 axis_range=common.cosine_range(at["sag"], at["sag_random"])),
                    key=f"sag_{method}", config={"displayModeBar": False})
    g2.plotly_chart(gauge_figure(at["lag"], at["lag_random"], f"Lag@{k}", colour=colour),
                    key=f"lag_{method}", config={"displayModeBar": False})
    g1.caption(f"random: {at['sag_random']:.3f}")
    g2.caption(f"random: {at['lag_random']:.3f}")
    with plots:  # one chart at a time: each Plotly chart costs the browser time on every review switch
        chart = st.segmented_control("Chart", CHARTS, default=CHARTS[0], required=True, key=f"chart_{method}",
                                     label_visibility="collapsed")
        if chart == "Scores":
            top = exp.top[:k]
            fig = score_histogram(exp.scores, [h.score for h in top], f"{method} scores, top {k} marked",
                                  [b.by_id[h.train_id]["text"] for h in top])
        else:
            metric = agree.sag if chart == "Sag@K" else agree.lag
            band = agree.sag_random if chart == "Sag@K" else agree.lag_random
            fig = common.at_k(k_curve_figure(agree.ks, {method: metric}, *band, chart), k)
        st.plotly_chart(fig, key=f"chart_fig_{method}")
    st.html(common.cards_block([card(h, method) for h in exp.top[:k]]))
    if show_opponents:
        st.markdown(f"**Opponents of {method}** (most negative scores)")
        st.html(common.cards_block([card(h, method) for h in exp.opponents[:k]]))


for method in methods:
    with st.spinner(common.computing(method)):
        explanation = common.explain(backend, lock, test, method)
    with st.container(border=True, key=f"method_{methods.index(method)}"):
        show_method(method, explanation, backend)

with st.expander("Save this view as a case study"):
    with st.form("save_case", clear_on_submit=True):
        title = st.text_input("Title", placeholder="Default: the aspect and the methods")
        note = st.text_area("Note", height=80)
        if st.form_submit_button("Save case study", icon=":material/bookmark_add:"):
            with lock:
                case_id = backend.save_case_study(title.strip() or f"{test.aspect[:40]} · {', '.join(methods)}",
                                                  note, info.name, test, methods, k)
            st.success(f"Saved as case study #{case_id}.")
            st.page_link("pages/cases.py", label="Open case studies", icon=":material/bookmarks:")
