"""Case studies: saved views, each shown like the paper's table 5 (every method's top-1 beside
the test review), exported one by one or all together as a standalone HTML report."""
from __future__ import annotations

import streamlit as st

from core.store import Case
from core.views import Html, case_html, report_html
from pages import resources, state

state.start_page("Case studies")
info, backend = resources.require_backend()

cases = backend.store.list_cases()
if not cases:
    st.info("No case study yet. On **Explore**, open *Save this view as a case study*.")
    st.stop()


def section(case: Case) -> Html:
    meta = {"case": f"#{case.id}", "workspace": case.workspace, "test": case.test_id, "K": case.k,
            "saved": case.created_at[:16].replace("T", " ")}
    return case_html(case.title, case.note, case.snapshot, meta)


def report(chosen: list[Case], title: str) -> str:
    return report_html([section(c) for c in chosen], resources.style_sheet(), title)


st.download_button(f"Export all {len(cases)} as an HTML report",
                   lambda: report(cases, f"SpanLens case studies: {info.name}"),
                   file_name=f"{info.name}-case-studies.html", mime="text/html", icon=":material/download:",
                   key="export_all")
st.caption(f"{len(cases)} case studies in this workspace, newest first. Reports are single HTML files with inline "
           "styles and no scripts.")

for case in cases:
    with st.container(border=False, key=f"case_{case.id}"):
        st.html(section(case))
        row = st.container(horizontal=True)
        row.download_button("Export HTML", report([case], case.title), file_name=f"case-{case.id}.html",
                            mime="text/html", icon=":material/download:", key=f"export_{case.id}")
        if row.button("Open in Explore", icon=":material/search:", key=f"open_{case.id}",
                      disabled=case.test_id not in backend.by_id):
            shown = case.snapshot.get("test", {})  # the label the case explained: gold where it was not the prediction
            gold = shown.get("explained") is not None and shown.get("explained") == shown.get("label") != shown.get("pred")
            st.session_state.update(test=case.test_id, methods=case.methods, k=case.k, explore_mode="Test set",
                                    label="gold" if gold else "predicted")
            for key in ("w_test", "w_methods", "w_k", "w_label"):
                st.session_state.pop(key, None)
            st.switch_page("pages/explore.py")
        if row.button("Delete", icon=":material/delete:", key=f"delete_{case.id}"):
            backend.store.delete_case(case.id)
            st.rerun()
