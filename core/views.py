"""Pure builders of escaped HTML: highlighted reviews, cards, page blocks, case studies (no Streamlit).

Review text is untrusted. Every piece of it that reaches HTML goes through :func:`html.escape`
and, in addition, has its Markdown-active characters written as numeric character references,
so it stays literal even if a page renders it through Markdown. Offsets are character offsets
(Python ``str`` indices: code points, so an emoji counts as one character).
"""
from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

KIND_CLASSES: dict[str, str] = {
    "span": "sl-span",
    "test-span": "sl-test-span",
    "train-span": "sl-train-span",
    "aspect": "sl-aspect",
}
"""Mark kind -> CSS class; where marks overlap, the classes appear in this order."""

CARD_CLASSES = ("sl-card", "sl-card-head", "sl-rank", "sl-score", "sl-label", "sl-card-body",
                "sl-extra")
BLOCK_CLASSES = ("sl-review", "sl-probs", "sl-prob", "sl-prob-label", "sl-prob-bar", "sl-prob-value", "sl-tag",
                 "sl-tag-gold", "sl-tag-predicted", "sl-tag-explained", "sl-verdict", "sl-ok", "sl-bad", "sl-method",
                 "sl-swatch", "sl-method-note", "sl-cards", "sl-cols-1", "sl-cols-2", "sl-caption", "sl-legend",
                 "sl-case", "sl-case-meta", "sl-case-note", "sl-case-test", "sl-case-aspect", "sl-case-grid",
                 "sl-case-method", "sl-case-cell", "sl-report")
CSS_CLASSES: frozenset[str] = frozenset({"sl-text", "sl-plain", *KIND_CLASSES.values(),
                                         *CARD_CLASSES, *BLOCK_CLASSES})
"""Every CSS class this module emits (for assets/style.css to match)."""

# Applied after html.escape, so none of these may occur in its output ("&#x27;" has '#').
_MARKDOWN_REFS = str.maketrans({c: f"&#{ord(c)};" for c in "\\`*_{}[]()+-!|~$:"})


class Html(str):
    """HTML built by this module from escaped pieces (the only HTML :func:`card_html` embeds)."""


@dataclass(frozen=True)
class Mark:
    """Highlight ``text[start:end]`` as ``kind`` (a key of :data:`KIND_CLASSES`)."""

    start: int
    end: int
    kind: str

    def __post_init__(self) -> None:
        if self.kind not in KIND_CLASSES:
            raise ValueError(f"unknown mark kind {self.kind!r}; one of {', '.join(KIND_CLASSES)}")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (self.start, self.end)):
            raise ValueError(f"mark offsets must be integers, got ({self.start!r}, {self.end!r})")


def escape_text(text: str) -> str:
    """``text`` as literal HTML text, Markdown-active characters as character references."""
    return html.escape(text, quote=True).translate(_MARKDOWN_REFS)


def highlight_html(text: str, marks: Sequence[Mark]) -> Html:
    """``text`` in ``<span class="sl-text">``, cut at the marks' offsets into flat spans.

    Each piece is a ``<span>`` whose classes are those of every mark covering it (e.g. an
    aspect inside a span gets ``sl-span sl-aspect``), ``sl-plain`` where none does. Raises
    ``ValueError`` for a mark outside ``0 <= start < end <= len(text)``.
    """
    for mark in marks:
        if not 0 <= mark.start < mark.end <= len(text):
            raise ValueError(f"mark {mark} out of range for a text of {len(text)} characters")
    cuts = sorted({0, len(text), *(m.start for m in marks), *(m.end for m in marks)})
    pieces: list[tuple[str, str]] = []  # (classes, raw text); equal neighbours merged
    for a, b in zip(cuts, cuts[1:]):
        kinds = {m.kind for m in marks if m.start <= a and b <= m.end}
        classes = " ".join(c for k, c in KIND_CLASSES.items() if k in kinds) or "sl-plain"
        if pieces and pieces[-1][0] == classes:
            pieces[-1] = (classes, pieces[-1][1] + text[a:b])
        else:
            pieces.append((classes, text[a:b]))
    body = "".join(f'<span class="{classes}">{escape_text(piece)}</span>' for classes, piece in pieces)
    return Html(f'<span class="sl-text">{body}</span>')


def card_html(rank: int, score: float, label: str, text_html: Html,
              extra: Mapping[str, str] | None = None) -> Html:
    """One training-instance card: rank, score, label, highlighted text, optional key/value rows.

    ``text_html`` must come from :func:`highlight_html` (a raw string raises ``TypeError``);
    ``label`` and ``extra`` keys and values are escaped here.
    """
    if not isinstance(text_html, Html):
        raise TypeError("text_html must be built by highlight_html (review text is untrusted)")
    head = (f'<span class="sl-rank">#{int(rank)}</span> '
            f'<span class="sl-score">{float(score):.4g}</span> '
            f'<span class="sl-label">{escape_text(str(label))}</span>')
    rows = "".join(f"<dt>{escape_text(str(k))}</dt><dd>{escape_text(str(v))}</dd>"
                   for k, v in (extra or {}).items())
    tail = f'<dl class="sl-extra">{rows}</dl>' if rows else ""
    return Html(f'<div class="sl-card"><div class="sl-card-head">{head}</div>'
                f'<div class="sl-card-body">{text_html}</div>{tail}</div>')


def marks_for(text: str, aspect: tuple[int, int] | None, span: tuple[int, int] | None, kind: str) -> list[Mark]:
    """Marks for a review: its span as ``kind`` and its aspect mention, where valid."""
    marks = []
    for offsets, mark_kind in ((span, kind), (aspect, "aspect")):
        if offsets and 0 <= offsets[0] < offsets[1] <= len(text):
            marks.append(Mark(offsets[0], offsets[1], mark_kind))
    return marks


def review_block(text: str, aspect: tuple[int, int] | None, span: tuple[int, int] | None,
                 kind: str = "test-span") -> Html:
    """The review with its aspect and its span (as ``kind``) highlighted, in a card."""
    return Html(f'<div class="sl-review">{highlight_html(text, marks_for(text, aspect, span, kind))}</div>')


def labels_block(labels: Sequence[str], probs: Sequence[float], gold: str | None, predicted: str,
                 explained: str | None = None) -> Html:
    """Gold, predicted (and explained) labels and the class probabilities as bars."""
    rows = []
    for label, p in zip(labels, probs):
        flags = (("gold", label == gold), ("predicted", label == predicted), ("explained", label == explained))
        tags = "".join(f'<span class="sl-tag sl-tag-{kind}">{kind}</span>' for kind, on in flags if on)
        rows.append(f'<div class="sl-prob"><span class="sl-prob-label">{escape_text(label)}</span>'
                    f'<span class="sl-prob-bar"><span style="width:{100 * float(p):.1f}%"></span></span>'
                    f'<span class="sl-prob-value">{float(p):.3f}</span><span>{tags}</span></div>')
    verdict = ("" if gold is None else '<div class="sl-verdict sl-ok">correct</div>' if gold == predicted
               else '<div class="sl-verdict sl-bad">wrong</div>')
    return Html(f'<div class="sl-probs">{"".join(rows)}{verdict}</div>')


def method_heading(method: str, colour: str, note: str = "") -> Html:
    """A method's heading with its colour swatch (``colour``: '#RRGGBB' from the registry)."""
    if not (len(colour) == 7 and colour.startswith("#") and all(c in "0123456789abcdefABCDEF" for c in colour[1:])):
        raise ValueError(f"colour must be '#RRGGBB', got {colour!r}")
    extra = f' <span class="sl-method-note">{escape_text(note)}</span>' if note else ""
    return Html(f'<div class="sl-method" style="border-color:{colour}">'
                f'<span class="sl-swatch" style="background:{colour}"></span>{escape_text(method)}{extra}</div>')


def cards_block(cards: Sequence[Html], columns: int = 2) -> Html:
    if not all(isinstance(c, Html) for c in cards):
        raise TypeError("cards must be built by card_html")
    return Html(f'<div class="sl-cards sl-cols-{int(columns)}">{"".join(cards)}</div>')


def caption_html(text: str) -> Html:
    """A caption that may hold dataset strings (ids, aspects): escaped, never Markdown."""
    return Html(f'<p class="sl-caption">{escape_text(text)}</p>')


def legend_html() -> Html:
    """What the highlight colours mean."""
    items = [("sl-aspect", "aspect"), ("sl-test-span", "test span"), ("sl-train-span", "training span")]
    return Html('<div class="sl-legend">' + "".join(
        f'<span class="{cls}">{escape_text(name)}</span>' for cls, name in items) + "</div>")


# --------------------------------------------------------------------------- case studies

def _pair(value) -> tuple[int, int] | None:
    return (int(value[0]), int(value[1])) if value else None


def case_html(title: str, note: str, snapshot: Mapping, meta: Mapping[str, object]) -> Html:
    """One case study like the paper's table 5: the test review, then each method's top-1."""
    test = snapshot["test"]
    review = highlight_html(test["text"], marks_for(test["text"], _pair(test["aspect_span"]), _pair(test["span"]), "test-span"))
    facts = " · ".join(f"{escape_text(k)}: {escape_text(str(v))}" for k, v in meta.items())
    label = f"gold {escape_text(str(test.get('label') or '-'))} · predicted {escape_text(str(test.get('pred') or '-'))}"
    if test.get("explained"):
        label += f" · explained {escape_text(str(test['explained']))}"
    cells = []
    for method, entry in snapshot["methods"].items():
        head = f'<div class="sl-case-method">{escape_text(method)}</div>'
        if not entry.get("top"):
            cells.append(f'<div class="sl-case-cell">{head}<p>no training instance</p></div>')
            continue
        hit = entry["top"][0]
        text = highlight_html(hit["text"], marks_for(hit["text"], _pair(hit["aspect_span"]), _pair(hit["span"]), "train-span"))
        extra = {"aspect": hit["aspect"], "train id": hit["id"]}
        if "sag" in entry:
            extra[f"Sag@{snapshot['k']} / Lag@{snapshot['k']}"] = f"{entry['sag']:.3f} / {entry['lag']:.3f}"
        cells.append(f'<div class="sl-case-cell">{head}{card_html(1, hit["score"], hit["label"], text, extra)}</div>')
    return Html(
        f'<section class="sl-case"><h2>{escape_text(title)}</h2>'
        f'<p class="sl-case-meta">{facts}</p>'
        + (f'<p class="sl-case-note">{escape_text(note)}</p>' if note else "")
        + f'<div class="sl-case-test"><div class="sl-case-aspect">aspect: {escape_text(test["aspect"])} · {label}</div>'
        f'{review}</div><div class="sl-case-grid">{"".join(cells)}</div></section>')


def report_html(sections: Sequence[Html], css: str, title: str = "SpanLens case studies") -> str:
    """A standalone HTML document (inline CSS, no scripts) of case-study sections."""
    if "</style" in css.lower():
        raise ValueError("the style sheet must not close its <style> element")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{css}</style></head>"
            f"<body class=\"sl-report\"><h1>{html.escape(title)}</h1>{''.join(sections)}</body></html>\n")
