"""Compare: 2-4 methods side by side on one test review (same layout, fixed colours), their
top-K overlap and Spearman rank correlation, and the table-3 summary of the evaluation."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from core import explore, metrics
from core.views import METHOD_COLOURS, card_html, gauge_figure, highlight_html, k_curve_figure
from pages import common

common.start_page("Compare methods")
info, backend, lock = common.require_backend()

row = common.test_picker(backend, "compare")
if row is None:
    st.stop()
test = backend.test_input(row["id"])
with st.spinner("Running the classifier on this review (stored for next time)…"):
    prof = common.profile(backend, lock, test)
left, right = st.columns([3, 2], gap="large")
left.html(common.review_block(test.text, explore.aspect_offsets(row), test.span))
right.html(common.labels_block(backend.manifest.labels, prof["probs"], test.label, prof["label"]))

methods, k = common.method_controls("compare", max_methods=4, n_train=len(backend.train_ids))
common.set_url(test=test.id, methods=methods, k=k)
if len(methods) < 2:
    st.info("Choose two to four methods to compare.")
    st.stop()

explanations = {}
for method in methods:
    with st.spinner(common.computing(method)):
        explanations[method] = common.explain(backend, lock, test, method)
positions = {train_id: n for n, train_id in enumerate(backend.train_ids)}
train_labels = [backend.by_id[i]["label"] for i in backend.train_ids]
agreements = {m: explore.agreement([positions[h.train_id] for h in e.top], prof["cosines"], train_labels,
                                   test.label, len(e.top)) for m, e in explanations.items()}

columns = st.columns(len(methods), gap="medium")
for column, method in zip(columns, methods):
    exp, at = explanations[method], agreements[method].at(k)
    with column:
        st.html(common.method_heading(method))
        g1, g2 = st.columns(2)
        g1.plotly_chart(gauge_figure(at["sag"], at["sag_random"], f"Sag@{k}", colour=METHOD_COLOURS[method],
                                     axis_range=common.cosine_range(at["sag"], at["sag_random"])),
                        key=f"cmp_sag_{method}", config={"displayModeBar": False})
        g2.plotly_chart(gauge_figure(at["lag"], at["lag_random"], f"Lag@{k}", colour=METHOD_COLOURS[method]),
                        key=f"cmp_lag_{method}", config={"displayModeBar": False})
        cards = []
        for hit in exp.top[:k]:
            train = backend.by_id[hit.train_id]
            text = highlight_html(train["text"], explore.marks_for(train["text"], explore.aspect_offsets(train),
                                                                  explore.span_of(train), "train-span"))
            cards.append(card_html(hit.rank, hit.score, train["label"], text, {"aspect": train["aspect"]}))
        st.html(common.cards_block(cards, columns=1))

st.subheader("Agreement between methods")
tops = {m: [h.train_id for h in e.top] for m, e in explanations.items()}
overlap = pd.DataFrame(explore.pairwise(methods, lambda a, b: explore.top_k_overlap(tops[a], tops[b], k)),
                       index=methods, columns=methods)
rho = pd.DataFrame(explore.pairwise(methods, lambda a, b: metrics.spearman(explanations[a].scores,
                                                                          explanations[b].scores)),
                   index=methods, columns=methods)
c1, c2 = st.columns(2)
c1.markdown(f"**Top-{k} overlap** (shared training instances / K)")
c1.dataframe(overlap.style.format("{:.2f}"), key="overlap")
c2.markdown("**Spearman rank correlation** of the scores over the whole training set")
c2.dataframe(rho.style.format("{:.3f}"), key="spearman")

c1, c2 = st.columns(2)
first = agreements[methods[0]]
c1.plotly_chart(common.at_k(k_curve_figure(first.ks, {m: agreements[m].sag for m in methods}, *first.sag_random,
                                           "Sag@K"), k), key="cmp_sagk")
c2.plotly_chart(common.at_k(k_curve_figure(first.ks, {m: agreements[m].lag for m in methods}, *first.lag_random,
                                           "Lag@K"), k), key="cmp_lagk")

st.subheader("Over the evaluation set (table 3)")
report = common.evaluation_report(info.path)
if report is None:
    st.caption("No evaluation report for this workspace yet: run one on the **Evaluate** page.")
else:
    st.dataframe(common.table3_frame(report), key="table3")
    st.caption(f"Sag and Lag x100 over {report.summary['selection']['n']} test instances; Ral in accuracy points; "
               "`random`: a random ranking's expectation.")
