"""View state shared by the pages: the page start, and what is kept in the session and the URL
(workspace, test instance, methods, K, explained label), so a link reproduces a view."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import streamlit as st
from streamlit.runtime.pages_manager import PagesManager

from core.registry import METHODS

K_MAX = 50
"""Largest K offered; K-curves run to the 100 hits each explanation keeps."""
LABELS = ("predicted", "gold")
"""The label an explanation explains: the model's prediction (default), or the gold label."""


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
    """Once per session: seed the view state (workspace, test, methods, K, label) from the URL."""
    if st.session_state.get("_url_loaded"):
        return
    st.session_state["_url_loaded"] = True
    params = st.query_params
    for key, state in (("workspace", "workspace"), ("test", "test"), ("item", "annotate_item")):
        if params.get(key):
            st.session_state[state] = params[key]
    methods = [METHODS.resolve(m).name for m in params.get("methods", "").split(",") if m and m in METHODS]
    if methods:
        st.session_state["methods"] = methods
    if params.get("k", "").isdigit():
        st.session_state["k"] = min(max(int(params["k"]), 1), K_MAX)
    if params.get("label") in LABELS:
        st.session_state["label"] = params["label"]


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
