"""Compare: 2-4 methods side by side on one test review (same layout, fixed colours), their
top-K overlap and Spearman rank correlation, and the table-3 summary of the evaluation."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from core import metrics
from core.figures import gauge_figure, k_curve_figure
from core.registry import METHODS
from core.views import cards_block, labels_block, method_heading, review_block
from pages import resources, state, widgets

state.start_page("Compare methods")
info, backend = resources.require_backend()

record = widgets.test_picker(backend, "compare")
if record is None:
    st.stop()
label_choice = widgets.label_control("compare")
test = backend.test_input(record.id, label_choice)
prof = widgets.profile(backend, test)
left, right = st.columns([3, 2], gap="large")
left.html(review_block(test.text, record.aspect_offsets(), test.span))
right.html(labels_block(backend.manifest.labels, prof["probs"], test.gold, prof["label"], test.label))

methods, k = widgets.method_controls("compare", max_methods=4, n_train=len(backend.train_ids))
state.set_url(test=test.id, methods=methods, k=k, label=label_choice)
if len(methods) < 2:
    st.info("Choose two to four methods to compare.")
    st.stop()

methods = widgets.available(backend, methods)
if len(methods) < 2:
    st.stop()
explanations = widgets.explanations(backend, test, methods)
table = backend.table
explained = test.label or prof["label"]
agreements = widgets.agreements(table, explanations, prof["cosines"], explained)

columns = st.columns(len(methods), gap="medium")
for column, method in zip(columns, methods):
    exp, at, colour = explanations[method], agreements[method].at(k), METHODS.resolve(method).colour
    with column:
        st.html(method_heading(method, colour))
        g1, g2 = st.columns(2)
        g1.plotly_chart(gauge_figure(at["sag"], at["sag_random"], f"Sag@{k}", colour=colour,
                                     axis_range=widgets.cosine_range(at["sag"], at["sag_random"])),
                        key=f"cmp_sag_{method}", config={"displayModeBar": False})
        g2.plotly_chart(gauge_figure(at["lag"], at["lag_random"], f"Lag@{k}", colour=colour),
                        key=f"cmp_lag_{method}", config={"displayModeBar": False})
        st.html(cards_block([widgets.training_card(table, hit, test, method, widgets.first_segment(backend)) for hit in exp.top[:k]], columns=1))

st.subheader("Agreement between methods")
tops = {m: [h.train_id for h in e.top] for m, e in explanations.items()}
overlap = pd.DataFrame(metrics.pairwise(methods, lambda a, b: metrics.top_k_overlap(tops[a], tops[b], k)),
                       index=methods, columns=methods)
rho = pd.DataFrame(metrics.pairwise(methods, lambda a, b: metrics.spearman(explanations[a].scores,
                                                                          explanations[b].scores)),
                   index=methods, columns=methods)
c1, c2 = st.columns(2)
c1.markdown(f"**Top-{k} overlap** (shared training instances / K)")
c1.dataframe(overlap.style.format("{:.2f}"), key="overlap")
c2.markdown("**Spearman rank correlation** of the scores over the whole training set")
c2.dataframe(rho.style.format("{:.3f}"), key="spearman")

c1, c2 = st.columns(2)
first = agreements[methods[0]]
c1.plotly_chart(widgets.at_k(k_curve_figure(first.ks, {m: agreements[m].sag for m in methods}, *first.sag_random,
                                            "Sag@K"), k), key="cmp_sagk")
c2.plotly_chart(widgets.at_k(k_curve_figure(first.ks, {m: agreements[m].lag for m in methods}, *first.lag_random,
                                            "Lag@K"), k), key="cmp_lagk")

st.subheader("Over the evaluation set (table 3)")
report = resources.evaluation_report(info.path)
if report is None:
    st.caption("No evaluation report for this workspace yet: run one on the **Evaluate** page.")
else:
    st.dataframe(widgets.table3_frame(report), key="table3")
    st.caption(f"Sag and Lag x100 over {report.summary['selection']['n']} test instances; Ral in accuracy points; "
               "`random`: a random ranking's expectation.")
