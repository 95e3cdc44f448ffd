"""core.views and core.figures: escaping of untrusted text, offsets at the right characters, page
blocks, figures in the registry's method colours, and a style rule for every emitted class."""
from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import plotly.graph_objects as go
import pytest

from core.figures import gauge_figure, k_curve_figure, score_histogram
from core.registry import METHODS
from core.views import (
    CSS_CLASSES,
    Html,
    Mark,
    caption_html,
    card_html,
    cards_block,
    highlight_html,
    labels_block,
    legend_html,
    method_heading,
    review_block,
)

STYLE = Path(__file__).resolve().parents[1] / "assets" / "style.css"

HOSTILE = [
    "<script>alert(1)</script>",
    "$x$ and *b* _i_ [l](u)",
    "emoji 😀 food 🍕 here",
    "&amp;",
    "it's \"quoted\" <b onmouseover='x'>bold</b> `code` ~~s~~ :red[r] \\ | # h",
]


class _Collector(HTMLParser):
    """Per character of text content: the set of classes of all open elements."""

    def __init__(self, styles: bool = False) -> None:
        super().__init__(convert_charrefs=True)
        self.styles = styles  # page blocks may carry fixed inline styles (bar widths, method colours)
        self.stack: list[tuple[str, set[str]]] = []
        self.chars: list[tuple[str, frozenset[str]]] = []
        self.tags: list[str] = []
        self.classes: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        allowed = {"class", "style"} if self.styles else {"class"}
        assert all(name in allowed for name, _ in attrs), attrs
        for name, value in attrs:
            if name == "style":
                assert re.fullmatch(r"(width:\d+\.\d%|(border-color|background):#[0-9A-Fa-f]{6})", value or ""), value
        classes = set(dict(attrs).get("class", "").split())
        self.classes |= classes
        self.stack.append((tag, classes))

    def handle_endtag(self, tag: str) -> None:
        assert self.stack and self.stack[-1][0] == tag
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        active = frozenset().union(*(c for _, c in self.stack))
        self.chars.extend((ch, active) for ch in data)

    def text(self) -> str:
        return "".join(ch for ch, _ in self.chars)

    def with_class(self, cls: str) -> str:
        return "".join(ch for ch, classes in self.chars if cls in classes)


def parse(markup: str, styles: bool = False) -> _Collector:
    collector = _Collector(styles)
    collector.feed(markup)
    collector.close()
    assert collector.stack == []
    return collector


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_text_is_escaped_and_marked_exactly(text: str) -> None:
    start, end = len(text) // 4, len(text) * 3 // 4
    out = highlight_html(text, [Mark(start, end, "span")])
    assert out.startswith('<span class="sl-text">') and out.endswith("</span>")
    doc = parse(out)
    assert set(doc.tags) == {"span"} and doc.classes <= CSS_CLASSES
    assert doc.text() == text
    assert doc.with_class("sl-span") == text[start:end]
    assert doc.with_class("sl-plain") == text[:start] + text[end:]
    text_only = out.replace('<span class="sl-text">', "").replace("</span>", "")
    for tag in ('<span class="sl-plain">', '<span class="sl-span">'):
        text_only = text_only.replace(tag, "")
    for ch in "<>\"'$*_[]`":  # no markup, no Markdown syntax left in the text pieces
        assert ch not in text_only, (ch, text_only)


def test_script_never_becomes_a_tag() -> None:
    out = highlight_html("<script>alert(1)</script>", [Mark(8, 16, "test-span")])
    assert "<script" not in out and "&lt;script&gt;" in out
    assert parse(out).with_class("sl-test-span") == "alert(1)"


def test_entity_text_stays_literal() -> None:
    out = highlight_html("&amp;", [Mark(0, 5, "aspect")])
    assert "&amp;amp;" in out
    assert parse(out).with_class("sl-aspect") == "&amp;"


def test_emoji_offsets_are_code_points() -> None:
    text = "emoji 😀 food 🍕 here"
    pizza = text.index("🍕")
    assert pizza == 13  # a code point index, not a UTF-16 one (which would be 14)
    out = highlight_html(text, [Mark(pizza, pizza + 1, "train-span"), Mark(6, 7, "aspect"),
                                Mark(pizza + 2, len(text), "span")])
    doc = parse(out)
    assert doc.with_class("sl-train-span") == "🍕"
    assert doc.with_class("sl-aspect") == "😀"
    assert doc.with_class("sl-span") == "here"
    assert doc.text() == text


def test_nested_marks_get_both_classes() -> None:
    text = "The pizza was great but slow service"
    span, aspect = Mark(0, 19, "span"), Mark(4, 9, "aspect")
    doc = parse(highlight_html(text, [aspect, span]))
    both = "".join(ch for ch, c in doc.chars if {"sl-span", "sl-aspect"} <= c)
    assert both == "pizza"
    assert doc.with_class("sl-span") == text[0:19]
    assert doc.with_class("sl-aspect") == "pizza"
    assert doc.with_class("sl-plain") == text[19:]
    assert 'class="sl-span sl-aspect"' in highlight_html(text, [aspect, span])


def test_partial_overlap_and_same_kind_merge() -> None:
    text = "abcdefghij"
    doc = parse(highlight_html(text, [Mark(0, 5, "test-span"), Mark(3, 8, "train-span")]))
    assert doc.with_class("sl-test-span") == "abcde"
    assert doc.with_class("sl-train-span") == "defgh"
    assert "".join(ch for ch, c in doc.chars if {"sl-test-span", "sl-train-span"} <= c) == "de"
    merged = highlight_html(text, [Mark(0, 5, "span"), Mark(3, 8, "span")])
    assert merged.count('class="sl-span"') == 1 and parse(merged).with_class("sl-span") == "abcdefgh"


def test_no_marks_and_empty_text() -> None:
    assert highlight_html("", []) == '<span class="sl-text"></span>'
    assert parse(highlight_html("plain", [])).with_class("sl-plain") == "plain"


@pytest.mark.parametrize("mark", [Mark(-1, 2, "span"), Mark(2, 11, "span"), Mark(3, 3, "span"),
                                  Mark(5, 2, "aspect")])
def test_out_of_range_marks_raise(mark: Mark) -> None:
    with pytest.raises(ValueError, match="out of range"):
        highlight_html("0123456789", [mark])


def test_bad_mark_kind_or_offsets_raise() -> None:
    with pytest.raises(ValueError, match="kind"):
        Mark(0, 1, "bold")
    with pytest.raises(ValueError, match="integers"):
        Mark(0.0, 1, "span")  # type: ignore[arg-type]


def test_card_escapes_label_and_extra() -> None:
    text_html = highlight_html("good *food*", [Mark(5, 11, "train-span")])
    card = card_html(3, 0.123456, "<img src=x onerror=alert(1)>", text_html,
                     {"source": "rc & <b>x</b>", "<k>": "$v$"})
    assert "<img" not in card and "<b>" not in card
    doc = parse(card)
    assert set(doc.tags) <= {"div", "span", "dl", "dt", "dd"} and doc.classes <= CSS_CLASSES
    assert "#3" in doc.text() and "0.1235" in doc.text()
    assert "<img src=x onerror=alert(1)>" in doc.with_class("sl-label")
    assert doc.with_class("sl-train-span") == "*food*"
    assert doc.with_class("sl-extra") == "sourcerc & <b>x</b><k>$v$"
    assert "sl-extra" not in card_html(1, 0.0, "pos", text_html, None)


def test_card_refuses_unescaped_text() -> None:
    with pytest.raises(TypeError):
        card_html(1, 0.5, "positive", "<script>x</script>", None)  # type: ignore[arg-type]
    assert isinstance(highlight_html("x", []), Html)


def test_method_colours_fixed_and_distinct() -> None:
    assert METHODS.names() == ["IF", "IF+", "IF++", "TracIn", "TracInF", "TracIn+", "TracIn++", "GroundTruth",
                               "Control", "EKFAC", "EKFAC++", "TRAK", "TRAK++"]
    colours = METHODS.colours()
    assert colours["IF++"] == "#CC79A7" and colours["TracIn++"] == "#0072B2" and colours["GroundTruth"] == "#000000"
    assert len(set(c.lower() for c in colours.values())) == len(METHODS)
    dashes = METHODS.dashes()  # the line dash separates the families too
    assert {dashes[m] for m in ("IF", "IF+", "IF++")} == {"dash"}
    assert {dashes[m] for m in ("TracIn", "TracInF", "TracIn+", "TracIn++")} == {"solid"}
    assert dashes["GroundTruth"] == "dot" and dashes["Control"] not in ("dash", "solid")
    assert {dashes[m] for m in ("EKFAC", "EKFAC++", "TRAK", "TRAK++")} == {"longdash"}
    assert METHODS.resolve("gt").name == "GroundTruth" and METHODS.resolve("IF++").colour == colours["IF++"]


def test_k_curve_uses_method_colours_and_band() -> None:
    ks = [1, 2, 3]
    curves = {"IF++": [0.5, 0.4, 0.3], "TracIn++": [0.6, 0.5, 0.45], "GroundTruth": [0.7, 0.6, 0.5]}
    fig = k_curve_figure(ks, curves, [0.3] * 3, [0.2] * 3, [0.4] * 3, "Sag@K <i>$a$</i>")
    assert isinstance(fig, go.Figure)
    by_name = {t.name: t for t in fig.data}
    for method, ys in curves.items():
        trace = by_name[method]
        assert (trace.line.color, trace.line.dash) == METHODS.style(method)
        assert list(trace.y) == ys and list(trace.x) == ks
    assert any(t.fill == "tonexty" for t in fig.data)
    assert "<i>" not in fig.layout.title.text and "$" not in fig.layout.title.text


def test_k_curve_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="IF\\+\\+ has 2 values"):
        k_curve_figure([1, 2, 3], {"IF++": [0.1, 0.2]}, [0] * 3, [0] * 3, [0] * 3, "t")
    with pytest.raises(ValueError, match="baseline_low"):
        k_curve_figure([1, 2], {}, [0] * 2, [0], [0] * 2, "t")
    # a method no longer registered (an old report's) is drawn black and solid, its name escaped
    old = k_curve_figure([1], {"<b>LOO</b>": [0.1]}, [0], [0], [0], "t").data[-1]
    assert (old.line.color, old.line.dash) == ("#000000", "solid") and old.name == "&lt;b&gt;LOO&lt;/b&gt;"


def test_gauge_has_delta_against_reference() -> None:
    fig = gauge_figure(0.62, 0.33, "Lag@5 — IF++", colour=METHODS.resolve("IF++").colour)
    ind = fig.data[0]
    assert isinstance(ind, go.Indicator)
    assert ind.value == 0.62 and ind.delta.reference == 0.33 and "delta" in ind.mode
    assert ind.gauge.bar.color == METHODS.resolve("IF++").colour
    assert list(ind.gauge.axis.range) == [0.0, 1.0]
    assert list(gauge_figure(-0.2, 0.0, "Sag", axis_range=(-1.0, 1.0)).data[0].gauge.axis.range) == [-1, 1]


def test_histogram_hover_text_is_escaped() -> None:
    texts = ["<script>alert(1)</script> $x$ <b>bold</b>", "a " * 300]
    fig = score_histogram([0.1, 0.2, 0.9, 1.5], [1.5, 0.9], "Scores", top_k_texts=texts)
    hist, top = fig.data
    assert isinstance(hist, go.Histogram) and list(hist.x) == [0.1, 0.2, 0.9, 1.5]
    assert list(top.x) == [1.5, 0.9] and top.hoverinfo == "text"
    first = top.hovertext[0]
    assert first.startswith("#1 score 1.5<br>")
    body = first.split("<br>", 1)[1]
    assert "<" not in body.replace("<br>", "") and "$" not in body
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in body and "&#36;x&#36;" in body
    assert len(top.hovertext[1]) < 400 and "…" in top.hovertext[1]
    with pytest.raises(ValueError, match="texts"):
        score_histogram([0.1], [0.1], "t", top_k_texts=[])


# --------------------------------------------------------------------------- page blocks

def test_review_block_marks_span_and_aspect() -> None:
    text = "The <b>pizza</b> was great but $slow$"
    doc = parse(review_block(text, (4, 16), (0, 26)))
    assert doc.classes <= CSS_CLASSES and "sl-review" in doc.classes and doc.text() == text
    assert doc.with_class("sl-test-span") == text[:26] and doc.with_class("sl-aspect") == "<b>pizza</b>"
    trained = parse(review_block(text, None, (4, 16), "train-span"))
    assert trained.with_class("sl-train-span") == "<b>pizza</b>" and trained.with_class("sl-aspect") == ""
    assert parse(review_block(text, (4, 99), None)).with_class("sl-aspect") == ""  # invalid offsets: no mark


def test_labels_block_tags_gold_predicted_and_explained() -> None:
    def tags(out: str) -> dict[str, list[str]]:
        rows = re.findall(r'sl-prob-label">(.*?)</span>.*?<span>(.*?)</span></div>', out)
        return {label: re.findall(r"sl-tag-(\w+)", tag_html) for label, tag_html in rows}

    labels = ["positive", "negative", "<i>neutral</i>"]
    wrong = labels_block(labels, [0.2, 0.7, 0.1], "positive", "negative", "negative")
    assert parse(wrong, styles=True).classes <= CSS_CLASSES and "<i>" not in wrong
    assert tags(wrong) == {"positive": ["gold"], "negative": ["predicted", "explained"], "&lt;i&gt;neutral&lt;/i&gt;": []}
    assert "sl-bad" in wrong and "sl-ok" not in wrong
    gold = labels_block(labels, [0.2, 0.7, 0.1], "positive", "negative", "positive")
    assert tags(gold)["positive"] == ["gold", "explained"] and tags(gold)["negative"] == ["predicted"]
    new = labels_block(labels, [0.6, 0.3, 0.1], None, "positive")  # a new review: no gold, no verdict
    assert "sl-verdict" not in new and "sl-tag-explained" not in new and "sl-tag-gold" not in new


def test_method_heading_caption_and_cards_block_are_escaped() -> None:
    heading = method_heading("IF++", METHODS.resolve("IF++").colour, "explains <b>$neg$</b>")
    doc = parse(heading, styles=True)
    assert doc.classes <= CSS_CLASSES and "<b>" not in heading and "$" not in heading
    assert doc.with_class("sl-method-note") == "explains <b>$neg$</b>" and "#CC79A7" in heading
    with pytest.raises(ValueError, match="RRGGBB"):
        method_heading("IF", "red;background:url(x)")
    assert parse(caption_html("id *x* <script>")).text() == "id *x* <script>"
    assert parse(legend_html()).classes <= CSS_CLASSES
    card = card_html(1, 0.5, "positive", highlight_html("ok", []))
    assert parse(cards_block([card], columns=1)).classes <= CSS_CLASSES
    with pytest.raises(TypeError):
        cards_block(["<div>raw</div>"])  # type: ignore[list-item]


def test_every_emitted_class_has_a_style_rule() -> None:
    css = STYLE.read_text(encoding="utf-8")
    unstyled = sorted(c for c in CSS_CLASSES if not re.search(r"\." + re.escape(c) + r"(?![\w-])", css))
    assert unstyled == []
