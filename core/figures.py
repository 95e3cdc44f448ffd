"""Plotly figures of the app and the reports: gauges, K-curves, score distributions (no Streamlit).

Text that reaches Plotly (titles, names, hover labels) is untrusted where it comes from reviews
and is escaped the way Plotly decodes it: it knows ``&amp; &lt; &gt;`` and numeric references
only, and treats ``$...$`` as LaTeX. Method colours and dashes come from the method registry.
"""
from __future__ import annotations

import html
import textwrap
from collections.abc import Mapping, Sequence

import plotly.graph_objects as go

from .registry import METHODS

_PLOTLY_REFS = str.maketrans({'"': "&#34;", "'": "&#39;", "$": "&#36;"})
BASELINE_COLOUR = "#808080"
TOP_K_COLOUR = "#D55E00"
HOVER_WIDTH = 60
HOVER_MAX_CHARS = 240


def plot_text(text: str) -> str:
    """``text`` escaped for Plotly titles, names and hover labels (no tags, no LaTeX)."""
    return html.escape(text, quote=False).translate(_PLOTLY_REFS)


def _hover_snippet(text: str) -> str:
    """Untrusted text shortened and wrapped for a hover label, escaped line by line."""
    if len(text) > HOVER_MAX_CHARS:
        text = text[:HOVER_MAX_CHARS - 1] + "…"
    return "<br>".join(plot_text(line) for line in textwrap.wrap(text, HOVER_WIDTH))


def gauge_figure(value: float, reference: float, title: str, *,
                 axis_range: tuple[float, float] = (0.0, 1.0), colour: str | None = None) -> go.Figure:
    """A gauge of ``value`` with its difference to ``reference`` (e.g. Sag@K against random)."""
    indicator = go.Indicator(
        mode="gauge+number+delta", value=value,
        number={"valueformat": ".3f"},
        delta={"reference": reference, "valueformat": ".3f"},
        title={"text": plot_text(title)},
        gauge={"axis": {"range": list(axis_range)},
               "bar": {"color": colour or METHODS.style("TracIn++")[0]},
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
              "baseline_high": baseline_high, **curves}
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
                     line={"color": METHODS.style(m)[0], "dash": METHODS.style(m)[1]},
                     marker={"color": METHODS.style(m)[0], "size": 5})
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
