"""Pure builders of escaped highlight HTML and Plotly figures (no Streamlit here).

Review text is untrusted. Every piece of it that reaches HTML goes through :func:`html.escape`
and, in addition, has its Markdown-active characters written as numeric character references,
so it stays literal even if a page renders it through Markdown. Offsets are character offsets
(Python ``str`` indices: code points, so an emoji counts as one character).

Text that reaches Plotly (titles, hover labels) is escaped the way Plotly decodes it: it knows
``&amp; &lt; &gt;`` and numeric references only, and treats ``$...$`` as LaTeX.
"""
from __future__ import annotations

import html
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import plotly.graph_objects as go

KIND_CLASSES: dict[str, str] = {
    "span": "sl-span",
    "test-span": "sl-test-span",
    "train-span": "sl-train-span",
    "aspect": "sl-aspect",
}
"""Mark kind -> CSS class; where marks overlap, the classes appear in this order."""

CARD_CLASSES = ("sl-card", "sl-card-head", "sl-rank", "sl-score", "sl-label", "sl-card-body",
                "sl-extra")
CSS_CLASSES: frozenset[str] = frozenset({"sl-text", "sl-plain", *KIND_CLASSES.values(),
                                         *CARD_CLASSES})
"""Every CSS class this module emits (for assets/style.css to match)."""

# Applied after html.escape, so none of these may occur in its output ("&#x27;" has '#').
_MARKDOWN_REFS = str.maketrans({c: f"&#{ord(c)};" for c in "\\`*_{}[]()+-!|~$:"})
_PLOTLY_REFS = str.maketrans({'"': "&#34;", "'": "&#39;", "$": "&#36;"})

# Okabe & Ito (2008) colour-blind-safe palette; the line dash separates the two families too.
METHOD_COLOURS: dict[str, str] = {
    "IF": "#E69F00",  # orange
    "IF+": "#D55E00",  # vermillion
    "IF++": "#CC79A7",  # reddish purple
    "TracIn": "#F0E442",  # yellow
    "TracInF": "#56B4E9",  # sky blue
    "TracIn+": "#009E73",  # bluish green
    "TracIn++": "#0072B2",  # blue
    "GroundTruth": "#000000",  # black
}
METHOD_DASHES: dict[str, str] = {
    m: "dot" if m == "GroundTruth" else "dash" if m.startswith("IF") else "solid"
    for m in METHOD_COLOURS
}
BASELINE_COLOUR = "#808080"
TOP_K_COLOUR = METHOD_COLOURS["IF+"]
HOVER_WIDTH = 60
HOVER_MAX_CHARS = 240


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


def plot_text(text: str) -> str:
    """``text`` escaped for Plotly titles, names and hover labels (no tags, no LaTeX)."""
    return html.escape(text, quote=False).translate(_PLOTLY_REFS)


def _hover_snippet(text: str) -> str:
    """Untrusted text shortened and wrapped for a hover label, escaped line by line."""
    if len(text) > HOVER_MAX_CHARS:
        text = text[:HOVER_MAX_CHARS - 1] + "…"
    return "<br>".join(plot_text(line) for line in textwrap.wrap(text, HOVER_WIDTH))


def _method(name: str) -> str:
    if name not in METHOD_COLOURS:
        raise ValueError(f"unknown method {name!r}; one of {', '.join(METHOD_COLOURS)}")
    return name


def gauge_figure(value: float, reference: float, title: str, *,
                 axis_range: tuple[float, float] = (0.0, 1.0), colour: str | None = None) -> go.Figure:
    """A gauge of ``value`` with its difference to ``reference`` (e.g. Sag@K against random)."""
    indicator = go.Indicator(
        mode="gauge+number+delta", value=value,
        number={"valueformat": ".3f"},
        delta={"reference": reference, "valueformat": ".3f"},
        title={"text": plot_text(title)},
        gauge={"axis": {"range": list(axis_range)},
               "bar": {"color": colour or METHOD_COLOURS["TracIn++"]},
               "threshold": {"value": reference, "line": {"color": BASELINE_COLOUR, "width": 3},
                             "thickness": 0.9}},
    )
    fig = go.Figure(indicator)
    fig.update_layout(height=220, margin={"l": 20, "r": 20, "t": 50, "b": 10})
    return fig


def k_curve_figure(ks: Sequence[int], curves: Mapping[str, Sequence[float]],
                   baseline_mean: Sequence[float], baseline_low: Sequence[float],
                   baseline_high: Sequence[float], title: str) -> go.Figure:
    """Metric@K for each method (in its colour) over a shaded random-ranking baseline band."""
    ks = list(ks)
    series = {"baseline_mean": baseline_mean, "baseline_low": baseline_low,
              "baseline_high": baseline_high, **{_method(m): ys for m, ys in curves.items()}}
    for name, ys in series.items():
        if len(ys) != len(ks):
            raise ValueError(f"{name} has {len(ys)} values for {len(ks)} values of K")
    band = {"color": BASELINE_COLOUR, "width": 0}
    fig = go.Figure([
        go.Scatter(x=ks, y=list(baseline_high), mode="lines", line=band, hoverinfo="skip",
                   showlegend=False, legendgroup="baseline"),
        go.Scatter(x=ks, y=list(baseline_low), mode="lines", line=band, fill="tonexty",
                   fillcolor="rgba(128, 128, 128, 0.25)", hoverinfo="skip",
                   name="random (band)", legendgroup="baseline"),
        go.Scatter(x=ks, y=list(baseline_mean), mode="lines", name="random (mean)",
                   line={"color": BASELINE_COLOUR, "dash": "dashdot"}, legendgroup="baseline"),
        *(go.Scatter(x=ks, y=list(ys), mode="lines+markers", name=plot_text(m),
                     line={"color": METHOD_COLOURS[m], "dash": METHOD_DASHES[m]},
                     marker={"color": METHOD_COLOURS[m], "size": 5})
          for m, ys in curves.items()),
    ])
    fig.update_layout(title={"text": plot_text(title)}, xaxis_title="K", hovermode="x unified",
                      margin={"l": 40, "r": 20, "t": 50, "b": 40})
    return fig


def score_histogram(scores: Sequence[float], top_k_scores: Sequence[float], title: str,
                    top_k_texts: Sequence[str] | None = None) -> go.Figure:
    """Histogram of all training scores with the top-K marked; ``top_k_texts`` feed their hovers."""
    top = list(top_k_scores)
    if top_k_texts is not None and len(top_k_texts) != len(top):
        raise ValueError(f"{len(top_k_texts)} texts for {len(top)} top-K scores")
    hover = [f"#{i} score {s:.4g}" for i, s in enumerate(top, start=1)]
    if top_k_texts is not None:
        hover = [f"{h}<br>{_hover_snippet(t)}" for h, t in zip(hover, top_k_texts)]
    fig = go.Figure([
        go.Histogram(x=list(scores), name="all training instances",
                     marker={"color": BASELINE_COLOUR}),
        go.Scatter(x=top, y=[0] * len(top), mode="markers", name=f"top {len(top)}",
                   marker={"color": TOP_K_COLOUR, "symbol": "line-ns-open", "size": 18,
                           "line": {"width": 2, "color": TOP_K_COLOUR}},
                   hovertext=hover, hoverinfo="text"),
    ])
    fig.update_layout(title={"text": plot_text(title)}, xaxis_title="score", yaxis_title="count",
                      bargap=0.05, margin={"l": 40, "r": 20, "t": 50, "b": 40})
    return fig
