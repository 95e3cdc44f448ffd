"""SpanLens: the Streamlit entry point (``streamlit run app.py``).

Navigation between the pages, the style sheet, and the sidebar workspace picker; the view
state (workspace, test id, methods, K, explained label) is read from the URL once per session.
"""
import os

import streamlit as st

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pages import resources, state, widgets  # noqa: E402  (after the environment is set)

st.set_page_config(page_title="SpanLens", page_icon=":material/manage_search:", layout="wide")
st.html(f"<style>{resources.style_sheet()}</style>")

PAGES = [
    st.Page("pages/workspaces.py", title="Workspaces", icon=":material/folder_open:", url_path="workspaces",
            default=True),
    st.Page("pages/explore.py", title="Explore", icon=":material/search:", url_path="explore"),
    st.Page("pages/compare.py", title="Compare", icon=":material/compare:", url_path="compare"),
    st.Page("pages/annotate.py", title="Annotate spans", icon=":material/edit_note:", url_path="annotate"),
    st.Page("pages/cases.py", title="Case studies", icon=":material/bookmarks:", url_path="cases"),
    st.Page("pages/evaluate.py", title="Evaluate", icon=":material/monitoring:", url_path="evaluate"),
]

state.load_url_state()
page = st.navigation(PAGES)
st.sidebar.title("SpanLens")
st.session_state["workspace_info"] = widgets.workspace_picker()
st.sidebar.caption("Sample-based explanations with spans (Zhang et al., ACL 2021).")
page.run()
