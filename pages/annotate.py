"""Annotate spans: review the detected spans one by one (test first) - Accept, Wrong, or Fix by
choosing first and last words (or exact character offsets) with a live preview. Every verdict
goes straight to the workspace's store; undo, export and import are here too."""
from __future__ import annotations

import tempfile
from pathlib import Path

import pandas as pd
import streamlit as st

from core.spanfix import check_span, review_queue, snap, token_range, word_tokens
from core.views import escape_text, highlight_html, marks_for, review_block
from pages import resources, state, widgets

state.start_page("Annotate spans")
info, backend = resources.require_backend()

QUEUES = {"Test, then training": ["test", "train"], "Test only": ["test"], "Dev only": ["dev"],
          "Training only": ["train"]}

c1, c2, c3 = st.columns([2, 2, 1], vertical_alignment="bottom")
annotator = c1.text_input("Your name (saved with every verdict)", key=state.seeded("annotator", ""),
                          max_chars=60).strip()
state.remember("annotator", annotator)
queue_name = c2.selectbox("Queue", list(QUEUES), key=state.seeded("annotate_queue", "Test, then training"))
state.remember("annotate_queue", queue_name)
unreviewed = c3.toggle("Unreviewed only", key=state.seeded("annotate_unreviewed", True))
state.remember("annotate_unreviewed", unreviewed)

splits = QUEUES[queue_name]
records = backend.instances()
in_splits = [r for r in records if r.split in splits]
reviewed = sum(r.verdict is not None for r in in_splits)
st.progress(reviewed / max(len(in_splits), 1), text=f"{reviewed} of {len(in_splits)} spans reviewed in this queue")
queue = review_queue(records, splits, unreviewed)
ids = [r.id for r in queue]

item_id = st.session_state.get("annotate_item")  # kept when reviewed already (e.g. opened from Explore)
if item_id not in backend.by_id or backend.by_id[item_id].split not in splits:
    item_id = ids[0] if ids else None
if item_id is None:
    st.success("Every span in this queue has a verdict. Choose another queue, or turn off *Unreviewed only*.")
    st.stop()
st.session_state["annotate_item"] = item_id  # a click applies to the review on screen, whatever others did
row = backend.by_id[item_id]
position = ids.index(item_id) if item_id in ids else -1
following = ids[position + 1] if 0 <= position < len(ids) - 1 else (ids[0] if position < 0 and ids else None)


def go(target: str | None) -> None:
    st.session_state["annotate_item"] = target
    state.set_url(item=target)


with st.container(horizontal=True, vertical_alignment="center"):
    if st.button("Previous", icon=":material/arrow_back:", shortcut="Alt+Left", disabled=position <= 0):
        go(ids[position - 1])
        st.rerun()
    if st.button("Next", icon=":material/arrow_forward:", shortcut="Alt+Right", disabled=following is None):
        go(following)
        st.rerun()
    widgets.caption(f"Item {position + 1 if position >= 0 else '–'} of {len(ids)} in the queue · {row.split} · "
                    f"id {row.id}")

current, verdict = row.span_pair, row.verdict
kind = "test-span" if row.split != "train" else "train-span"
aspect = row.aspect_offsets()
st.html(review_block(row.text, aspect, current, kind))
source = "corrected by an annotator" if verdict == "fix" else f"detected by: {row.detected.source if row.detected else 'none'}"
st.caption(f"Aspect and span in use ({source}). Current verdict: **{verdict or 'none'}**.")

if not annotator:
    st.info("Enter your name above to record verdicts.")
    st.stop()


def record(status: str, corrected: tuple[int, int] | None = None) -> None:
    """Write the verdict to the store (and drop the cached results it affects), then move on."""
    backend.annotate_span(item_id, status, annotator, corrected)
    st.session_state["annotate_flash"] = f"Saved: {status}."
    go(following if following != item_id else None)
    st.rerun()


with st.container(horizontal=True):
    if st.button("Accept", type="primary", icon=":material/check:", shortcut="Alt+A", key="accept"):
        record("accept")
    if st.button("Wrong", icon=":material/close:", shortcut="Alt+W", key="wrong"):
        record("wrong")
    if st.button("Undo my last", icon=":material/undo:", shortcut="Alt+U", key="undo"):
        undone = backend.undo_span_annotation(annotator)
        st.session_state["annotate_flash"] = f"Undone: {undone.status}." if undone else "Nothing of yours to undo."
        if undone:
            go(undone.instance_id)
        st.rerun()
if flash := st.session_state.pop("annotate_flash", None):
    st.toast(flash)

st.subheader("Fix the span")
tokens = word_tokens(row.text)
if not tokens:
    st.warning("This text has no words to choose from.")
    st.stop()
first_default, last_default = token_range(tokens, current)
words = [row.text[a:b] for a, b in tokens]
f1, f2 = st.columns(2)
first = f1.selectbox("First word", range(len(tokens)), index=first_default, key=f"first_{item_id}",
                     format_func=lambda i: f"{i + 1} · {words[i]}")
last = f2.selectbox("Last word", range(len(tokens)), index=last_default, key=f"last_{item_id}",
                    format_func=lambda i: f"{i + 1} · {words[i]}")
start, end = snap(tokens, first, last)
if st.toggle("Set exact character offsets", key=f"chars_{item_id}"):
    o1, o2 = st.columns(2)
    start = int(o1.number_input("Start character", 0, len(row.text), start, key=f"start_{item_id}"))
    end = int(o2.number_input("End character (exclusive)", 0, len(row.text), end, key=f"end_{item_id}"))
problem = check_span(row.text, start, end)
if problem:
    st.error(f"Not a usable span: {problem}.")
else:
    st.html('<div class="sl-preview-label">Preview</div>'
            + highlight_html(row.text, marks_for(row.text, aspect, (start, end), kind)))
if st.button("Save fix", icon=":material/save:", shortcut="Alt+S", disabled=bool(problem),
             key="save_fix", help="Alt+S"):
    record("fix", (start, end))
if row.split == "train":
    st.caption("A fixed training span is recorded, patched into the gradient index at once (its rows at every "
               "parameter point), and the cached results that used training spans are dropped.")

with st.expander("History of this instance"):
    history = backend.store.history(item_id)
    if history:
        st.dataframe(pd.DataFrame([{"when": h.created_at[:19].replace("T", " "), "who": h.annotator,
                                    "verdict": h.status, "original": f"{h.original_start}-{h.original_end}",
                                    "corrected": "" if h.corrected_start is None else
                                    f"{h.corrected_start}-{h.corrected_end}", "undone": h.undone}
                                   for h in history]), hide_index=True, key="history")
    else:
        st.caption("No verdict yet.")

with st.expander("Export or import annotations (JSONL)"):
    def export() -> bytes:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "annotations.jsonl"
            backend.store.export_jsonl(path)
            return path.read_bytes()

    st.download_button("Export all annotations", export, file_name=f"{info.name}-annotations.jsonl",
                       mime="application/jsonl", icon=":material/download:")
    upload = st.file_uploader("Import a JSONL export", type=["jsonl"], key="import_file")
    if upload is not None and st.button("Import", key="import"):
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "import.jsonl"
            path.write_bytes(upload.getvalue())
            try:
                count = backend.import_span_annotations(path, annotator)
            except ValueError as err:
                st.error("Nothing imported: the file has an invalid line.")
                st.code(str(err), language=None)
            else:
                st.success(f"Imported {count} verdicts.")
st.html(f'<p class="sl-hint">Keys: {escape_text("Alt+A accept · Alt+W wrong · Alt+S save fix · Alt+U undo · Alt+←/→ previous/next")}</p>')
