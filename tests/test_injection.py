"""Hostile review texts and aspects on every page that shows review text.

A workspace is prepared (tiny backbone) from a JSONL data set whose texts and aspects hold
HTML, script tags, Markdown and LaTeX syntax and emoji. Every page must show them literally
(escaped HTML with fixed classes only, highlights on exactly the right characters) and never
hand them to a Markdown-rendering element.
"""
from __future__ import annotations

import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from core.backend import Backend
from core.cases import save_case_study
from core.index import IndexSettings
from core.index_build import build_index
from core.prepare import prepare
from core.spanfix import word_tokens
from core.views import case_html, report_html
from core.workspace import Workspace
from tests.conftest import tiny_settings
from tests.test_app import app_runner, navigation_only  # noqa: F401  (an autouse fixture)

MARK = "qzx"
"""A word in every hostile text and aspect: it must never reach a Markdown element."""
HOSTILE = [
    ("<script>alert(1)</script> the pizza qzx was great but the service was slow", "pizza qzx"),
    ("Prices were $5 and $10; the *wine* qzx was _cheap_ [click](http://x.example) 😀 good", "wine* qzx"),
    ("The 🍕 crust qzx was **soggy** but the `sauce` was fine :red[no] \\ | ~~x~~", "crust qzx"),
    ("<img src=x onerror=alert(2)> staff qzx were rude, the decor was nice", "staff qzx"),
    ("It's $$x^2$$ & <b>bold</b> – the dessert qzx was good &amp; sweet", "dessert qzx"),
    ("The <b>menu</b> qzx was short 😀😀 but tasty", "<b>menu</b> qzx"),
    ("the $price$ qzx was [too] high_ok", "$price$ qzx"),
    ("# Heading qzx: the room was _loud_ *and* hot", "room"),
]
LABELS = ("positive", "negative", "neutral")
ALLOWED_TAGS = {"span", "div", "dl", "dt", "dd", "p", "section", "h2", "style"}


def write_hostile_dataset(path: Path) -> Path:
    """36 instances (24 train, 6 dev, 6 test) from the hostile texts; aspect offsets given."""
    rows = []
    for n in range(36):
        text, aspect = HOSTILE[n % len(HOSTILE)]
        text = f"{text} #{n}"
        start = text.index(aspect)
        split = "train" if n < 24 else "dev" if n < 30 else "test"
        rows.append({"text": text, "aspect": aspect, "label": LABELS[n % 3], "from": start,
                     "to": start + len(aspect), "split": split})
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def build_hostile_workspace(root: Path, data_dir: Path, backbone: Path) -> Path:
    """Prepare the hostile data set with the tiny backbone and an exact index under ``root``."""
    data = write_hostile_dataset(root.parent / "hostile.jsonl")
    ws = root / "hostile"
    settings = tiny_settings(data_dir, backbone, dataset=str(data), train_limit=None, eval_limit=None)
    prepare(settings, ws, progress=False, log=lambda _: None)
    build_index(Workspace(ws), IndexSettings(dim=None, batch_size=8), progress=False, log=lambda _: None)
    return ws


@pytest.fixture(scope="module")
def hostile_root(tmp_path_factory, data_dir, tiny_backbone) -> Path:
    root = tmp_path_factory.mktemp("hostile") / "workspaces"
    build_hostile_workspace(root, data_dir, tiny_backbone)
    return root


@pytest.fixture
def open_page(hostile_root, monkeypatch):
    return app_runner(hostile_root, monkeypatch)


class Parsed(HTMLParser):
    """Tags, attributes, and per character of text the classes of its enclosing elements."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[set[str]] = []
        self.chars: list[tuple[str, frozenset[str]]] = []
        self.tags: list[tuple[str, list[tuple[str, str | None]]]] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags.append((tag, attrs))
        self.stack.append(set((dict(attrs).get("class") or "").split()))

    def handle_endtag(self, tag: str) -> None:
        if self.stack:
            self.stack.pop()

    def handle_data(self, data: str) -> None:
        active = frozenset().union(*self.stack) if self.stack else frozenset()
        self.chars.extend((ch, active) for ch in data)


def parse(fragment: str) -> Parsed:
    parsed = Parsed()
    parsed.feed(fragment)
    parsed.close()
    return parsed


def texts_in(fragment: str) -> list[tuple[str, str, str]]:
    """Each ``sl-text`` block: (its text, the characters marked as a span, those marked aspect)."""
    out, parsed = [], parse(fragment)
    text, span, aspect, inside = [], [], [], False
    for ch, classes in parsed.chars + [("", frozenset())]:
        if "sl-text" in classes:
            inside = True
            text.append(ch)
            if classes & {"sl-test-span", "sl-train-span"}:
                span.append(ch)
            if "sl-aspect" in classes:
                aspect.append(ch)
        elif inside:
            out.append(("".join(text), "".join(span), "".join(aspect)))
            text, span, aspect, inside = [], [], [], False
    return out


def check_page(at: AppTest, backend: Backend, extra: dict[str, str] | None = None) -> int:
    """Assert the page's safety; return how many hostile review texts it showed (``extra``: texts
    not in the data set, with their aspects)."""
    aspects = {r.text: r.aspect for r in backend.instances()} | dict(extra or {})
    shown = 0
    for element in at.html:
        body = element.value
        parsed = parse(body)
        for tag, attrs in parsed.tags:  # only our fixed structure: no script, no handlers, no links
            assert tag in ALLOWED_TAGS, (tag, body[:200])
            assert {name for name, _ in attrs} <= {"class", "style"}, attrs
            assert all(MARK not in (value or "") for _, value in attrs)
        assert "<script" not in body and "<img" not in body and "<b>" not in body
        for text, span, aspect in texts_in(body):
            if MARK not in text:
                continue
            assert text in aspects, f"text not shown literally: {text!r}"
            shown += 1
            assert aspect in ("", aspects[text]), (aspect, aspects[text])
            if span:  # a span is a contiguous piece of the text, one of the spans in play
                assert span in text
    # nothing hostile in Markdown-rendered elements, widget labels or Plotly text
    markdown = [e.value for kind in ("markdown", "caption", "title", "header", "subheader", "info", "warning",
                                     "error", "success", "toast") for e in getattr(at, kind)]
    labels = [w.label for kind in ("selectbox", "multiselect", "text_input", "text_area", "button", "toggle",
                                   "slider", "radio", "number_input") for w in getattr(at, kind)]
    labels += [o for r in at.radio for o in r.options] + [e.label for e in at.expander] + [t.label for t in at.tabs]
    for value in markdown + labels:
        assert MARK not in value, value
    for chart in at.get("plotly_chart"):
        spec = chart.proto.spec
        assert "<script" not in spec and "<img" not in spec and "$price$" not in spec
    return shown


def backend_of(root: Path) -> Backend:
    return Backend(root / "hostile")


def test_explore_and_compare_show_hostile_text_literally(open_page, hostile_root):
    backend = backend_of(hostile_root)
    for row in backend.instances("test"):
        at = open_page("pages/explore.py", test=row.id, methods="TracIn++,IF", k="4")
        assert check_page(at, backend) >= 1 + 8  # the review and the cards
        review = [h.value for h in at.html if 'class="sl-review"' in h.value][0]
        text, span, aspect = texts_in(review)[0]
        assert text == row.text
        assert span == text[row.span.start:row.span.end]
        assert aspect == row.aspect
        # the picker shows the text as plain text (selectbox options are not Markdown)
        assert any(row.text[:20] in o for o in at.selectbox(key="w_test").options)
    at = open_page("pages/compare.py", test=row.id, methods="IF++,TracIn++", k="3")
    assert check_page(at, backend) >= 1 + 6
    at.radio(key="w_label").set_value("gold").run()  # explaining the gold label changes no safety
    assert not at.exception and at.query_params["label"] == "gold"
    assert check_page(at, backend) >= 1 + 6


def test_a_new_hostile_review(open_page, hostile_root):
    backend = backend_of(hostile_root)
    at = open_page("pages/explore.py", methods="TracIn++", k="2")
    at.radio(key="explore_mode").set_value("New review").run()
    text = "<script>alert(3)</script> the $fish$ qzx was *raw* 😀 [x](y) _z_"
    at.text_area(key="new_text").set_value(text)
    at.text_input(key="new_aspect").set_value("$fish$ qzx")
    [b for b in at.form_submit_button if b.label == "Explain"][0].click().run()
    assert not at.exception
    review = [h.value for h in at.html if 'class="sl-review"' in h.value][0]
    shown, span, aspect = texts_in(review)[0]
    assert shown == text and aspect == "$fish$ qzx" and "$fish$ qzx" in span
    assert check_page(at, backend, {text: "$fish$ qzx"}) == 3  # the review and two cards


def test_annotate_shows_hostile_text_and_words_literally(open_page, hostile_root):
    backend = backend_of(hostile_root)
    at = open_page("pages/annotate.py")
    at.text_input(key="w_annotator").set_value("<b>eve</b> qzx").run()
    row = backend.instances("test")[0]
    assert check_page(at, backend) >= 2  # the review and the preview
    first = at.selectbox(key=f"first_{row.id}")
    words = [o.split(" · ", 1)[1] for o in first.options]
    assert words[:4] == ["the", "$", "price", "$"] and "[" in words  # plain-text options, not Markdown
    # fix the span from the second word to the last; the preview marks exactly those characters
    tokens = word_tokens(row.text)
    last = len(tokens) - 1
    at.selectbox(key=f"first_{row.id}").set_value(1)
    at.selectbox(key=f"last_{row.id}").set_value(last).run()
    preview = [h.value for h in at.html if "Preview" in h.value][0]
    _, span, _ = texts_in(preview)[0]
    assert span == row.text[tokens[1][0]:tokens[last][1]]
    at.button(key="save_fix").click().run()
    assert backend.by_id[row.id].span_pair == (tokens[1][0], tokens[last][1])
    assert backend.by_id[row.id].span_source == "corrected"
    assert backend.store.current_annotations()[row.id].annotator == "<b>eve</b> qzx"
    check_page(at, backend)


def test_case_study_page_and_report_are_escaped(open_page, hostile_root, tmp_path):
    backend = backend_of(hostile_root)
    test = backend.test_input(backend.instances("test")[1].id)
    save_case_study(backend, "<script>alert(4)</script> qzx", "*note* $x$ qzx 😀", "hostile", test,
                    ["TracIn++", "IF++"], 3)
    at = open_page("pages/cases.py")
    assert check_page(at, backend) >= 3  # the test review and two top-1 cards
    body = "\n".join(h.value for h in at.html)
    assert "&lt;script&gt;alert&#40;4&#41;&lt;/script&gt; qzx" in body
    case = backend.store.list_cases()[0]
    report = report_html([case_html(case.title, case.note, case.snapshot, {"case": "1"})],
                         (Path(__file__).resolve().parents[1] / "assets" / "style.css").read_text())
    parsed = parse(report.split("</head>", 1)[1])
    assert {tag for tag, _ in parsed.tags} <= ALLOWED_TAGS | {"body", "h1", "html"}
    assert report.count("<script") == 0 and "<style>" in report
    text = "".join(ch for ch, _ in parsed.chars)
    assert "<script>alert(4)</script> qzx" in text and "*note* $x$ qzx 😀" in text


def test_workspace_and_evaluate_pages_stay_clean(open_page, hostile_root):
    backend = backend_of(hostile_root)
    for page in ("pages/workspaces.py", "pages/evaluate.py"):
        at = open_page(page)
        check_page(at, backend)
    shutil.rmtree(hostile_root / "hostile" / "evaluation", ignore_errors=True)
