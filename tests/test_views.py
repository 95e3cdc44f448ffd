"""core.views: escaping of untrusted text, offsets at the right characters, figures."""
from __future__ import annotations

from html.parser import HTMLParser

import plotly.graph_objects as go
import pytest

from core.views import (
    CSS_CLASSES, METHOD_COLOURS, Html, Mark, card_html, gauge_figure, highlight_html,
    k_curve_figure, score_histogram,
)

HOSTILE = [
    "<script>alert(1)</script>",
    "$x$ and *b* _i_ [l](u)",
    "emoji 😀 food 🍕 here",
    "&amp;",
    "it's \"quoted\" <b onmouseover='x'>bold</b> `code` ~~s~~ :red[r] \\ | # h",
]


class _Collector(HTMLParser):
    """Per character of text content: the set of classes of all open elements."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, set[str]]] = []
        self.chars: list[tuple[str, frozenset[str]]] = []
        self.tags: list[str] = []
        self.classes: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        assert all(name == "class" for name, _ in attrs), attrs
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


def parse(markup: str) -> _Collector:
    collector = _Collector()
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
    assert list(METHOD_COLOURS) == ["IF", "IF+", "IF++", "TracIn", "TracInF", "TracIn+",
                                    "TracIn++", "GroundTruth"]
    assert len(set(c.lower() for c in METHOD_COLOURS.values())) == 8


def test_k_curve_uses_method_colours_and_band() -> None:
    ks = [1, 2, 3]
    curves = {"IF++": [0.5, 0.4, 0.3], "TracIn++": [0.6, 0.5, 0.45], "GroundTruth": [0.7, 0.6, 0.5]}
    fig = k_curve_figure(ks, curves, [0.3] * 3, [0.2] * 3, [0.4] * 3, "Sag@K <i>$a$</i>")
    assert isinstance(fig, go.Figure)
    by_name = {t.name: t for t in fig.data}
    for method, ys in curves.items():
        trace = by_name[method]
        assert trace.line.color == METHOD_COLOURS[method]
        assert list(trace.y) == ys and list(trace.x) == ks
    assert any(t.fill == "tonexty" for t in fig.data)
    assert "<i>" not in fig.layout.title.text and "$" not in fig.layout.title.text


def test_k_curve_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="IF\\+\\+ has 2 values"):
        k_curve_figure([1, 2, 3], {"IF++": [0.1, 0.2]}, [0] * 3, [0] * 3, [0] * 3, "t")
    with pytest.raises(ValueError, match="baseline_low"):
        k_curve_figure([1, 2], {}, [0] * 2, [0], [0] * 2, "t")
    with pytest.raises(ValueError, match="unknown method"):
        k_curve_figure([1], {"LOO": [0.1]}, [0], [0], [0], "t")


def test_gauge_has_delta_against_reference() -> None:
    fig = gauge_figure(0.62, 0.33, "Lag@5 — IF++", colour=METHOD_COLOURS["IF++"])
    ind = fig.data[0]
    assert isinstance(ind, go.Indicator)
    assert ind.value == 0.62 and ind.delta.reference == 0.33 and "delta" in ind.mode
    assert ind.gauge.bar.color == METHOD_COLOURS["IF++"]
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
