"""Rendering an evaluation report: ``report.md`` (ours beside the paper's numbers), the K-curve
plots (interactive HTML through :mod:`core.figures`, PNG through matplotlib), and writing it all."""
from __future__ import annotations

import json
from collections.abc import Iterable

import numpy as np
import pandas as pd

from ..figures import BASELINE_COLOUR, k_curve_figure
from ..registry import METHODS
from ..workspace import write_json_atomic, write_text_atomic
from .paper import PAPER_SOURCE
from .report import FILES, INDEXED, EvalReport


def write_report(report: EvalReport) -> None:
    """Write the CSVs, ``summary.json``, ``report.md`` and the K-curve plots (HTML, PNG)."""
    write_frames(report, FILES)
    write_json_atomic(report.out_dir / "summary.json", report.summary)
    _plots(report)
    write_text_atomic(report.out_dir / "report.md", report_markdown(report))


def write_frames(report: EvalReport, attrs: Iterable[str]) -> None:
    """Write the report's tables named by ``attrs`` (keys of :data:`FILES`), each atomically. A
    table the evaluation did not compute (empty: no ``--lds``, no Ral, no faithfulness run) is not
    written (nor is any other table with no rows: one method's pairs, no paper-sign rows), and its
    file from an earlier evaluation into the same folder is removed, so that every CSV in the
    folder belongs to this report."""
    for attr in attrs:
        frame: pd.DataFrame = getattr(report, attr)
        path = report.out_dir / FILES[attr]
        if frame.empty:
            path.unlink(missing_ok=True)
        else:
            write_text_atomic(path, frame.to_csv(index=attr in INDEXED))


def curve_figures(report: EvalReport) -> dict:
    """The K-curve figures ``{"sag": Figure, "lag": Figure}`` (plotly, via :mod:`core.figures`)."""
    figs = {}
    for metric, title in (("sag", "Sag@K"), ("lag", "Lag@K")):
        c = report.curves[report.curves.metric == metric]
        rnd = c[c.series == "random"].sort_values("k")
        methods = {m: g.sort_values("k").value.tolist() for m, g in c[c.series != "random"].groupby("series", sort=False)}
        n = report.summary["selection"]["n"]
        figs[metric] = k_curve_figure(rnd.k.tolist(), methods, rnd.value.tolist(), rnd.low.tolist(), rnd.high.tolist(),
                                      f"{title} v. K on {n} test instances")
    return figs


def _plots(report: EvalReport) -> None:
    figs = curve_figures(report)
    parts = [fig.to_html(full_html=False, include_plotlyjs=(i == 0)) for i, fig in enumerate(figs.values())]
    write_text_atomic(report.out_dir / "k_curves.html",
                      "<!DOCTYPE html><html><head><meta charset='utf-8'><title>SpanLens K-curves</title></head><body>"
                      + "".join(parts) + "</body></html>")
    _png(report)


_LINES = {"solid": "-", "dash": "--", "dot": ":", "dashdot": "-.", "longdash": (0, (8, 3))}


def _style(method: str) -> tuple[str, object]:
    """A method's colour and matplotlib line style."""
    colour, dash = METHODS.style(method)
    return colour, _LINES[dash]


def _png(report: EvalReport) -> None:
    """The K-curves as PNG with matplotlib (plotly's PNG export would need a browser)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(12.5, 4.2))
    for ax, metric in zip(axes, ("sag", "lag")):
        c = report.curves[report.curves.metric == metric]
        rnd = c[c.series == "random"].sort_values("k")
        ax.fill_between(rnd.k, rnd.low, rnd.high, color=BASELINE_COLOUR, alpha=0.25, linewidth=0, label="random (band)")
        ax.plot(rnd.k, rnd.value, color=BASELINE_COLOUR, linestyle="-.", label="random (mean)")
        for m, g in c[c.series != "random"].groupby("series", sort=False):
            g = g.sort_values("k")
            ax.plot(g.k, g.value, color=_style(m)[0], linestyle=_style(m)[1], label=m)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("K")
        ax.set_title(f"{metric.capitalize()}@K")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    fig.savefig(report.out_dir / "k_curves.png", dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------ markdown


def _fmt(value) -> str:
    return "–" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.2f}"


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)])


def report_markdown(report: EvalReport) -> str:
    """``report.md``: our table 3 and table 4 beside the paper's, with how they were computed."""
    parts = [_md_header(report), _md_table3(report), _md_paper_sign(report), _md_lds(report), _md_curves(report),
             _md_table4(report), _md_tail(report)]
    return "\n".join(line for part in parts for line in part)


def _md_header(report: EvalReport) -> list[str]:
    sel, approx = report.summary["selection"], report.summary["approximations"]
    dataset = report.summary["dataset"] or "(not a paper data set)"
    return [
        "# SpanLens evaluation",
        "",
        f"Workspace `{report.summary['workspace']}` (fingerprint `{report.summary['fingerprint']}`), data set {dataset}.",
        f"{sel['n']} test instances (seed {sel['seed']}; {sel['eligible']} eligible; {sel['excluded_wrong']} excluded "
        f"because a person marked their span wrong; {sel['excluded_no_span']} without a span); "
        f"{approx['n_train']} training instances.",
        f"Gradient sketch: {json.dumps(approx['projection'])}; inverse Hessian (IF family): {approx['ihvp']}; "
        f"The paper's literal signs (IF's Eq. 1 minus; -e(z') on the ++ test side): {approx['paper_signs']}.",
        "",
    ]


def _md_table3(report: EvalReport) -> list[str]:
    sel, dataset = report.summary["selection"], report.summary["dataset"] or "(not a paper data set)"
    paper3, t3 = report.summary["paper"]["table3"], report.table3
    methods = [c for c in t3.columns if c != "random"]
    out = [
        "## Table 3: Sag, Lag (x100) and Ral (accuracy points)",
        "",
        f"Each cell: ours / paper ({PAPER_SOURCE}, table 3, {dataset}; '–' where the paper has no such cell: "
        "it has no TracIn, GroundTruth or Control column, and uses K=50 for SentiHood). `random`: the analytic "
        "expectation of a random ranking for Sag/Lag (mean cosine with all training spans; label share), a random "
        "removal of the same size for Ral.",
        "",
        _md_table(["metric", *methods, "random"],
                  [[idx, *[f"{_cell(report, idx, m, row[m])} / {_fmt(paper3.get(idx, {}).get(m))}" for m in methods],
                    _fmt(row["random"])] for idx, row in t3.iterrows()]),
        "",
        "Sag/Lag cells carry their 95% bootstrap interval over test instances (`table3_ci.csv`); two methods whose "
        "intervals overlap may still differ in a paired test, and those whose intervals barely separate may not.",
        "",
        *_md_pairs(report),
    ]
    if len(report.ral):
        base = report.ral.iloc[0]
        out += [f"Ral = accuracy of a retrain on the unchanged training set ({100 * base.baseline_accuracy:.2f}%; "
                f"the workspace's own model: {100 * base.theta_accuracy:.2f}%) minus the accuracy after removing the "
                f"top p% of the method's ranking summed over the {sel['n']} test instances, then retraining with the "
                "workspace's settings (a single retrain each: noisy, as the paper notes).", ""]
    else:
        out += ["Ral was not computed (`--ral none`).", ""]
    return out


def _md_pairs(report: EvalReport) -> list[str]:
    summary = pairs_summary(report)
    return [summary, ""] if summary else []


def pairs_summary(report: EvalReport) -> str:
    """How many paired differences of table 3's cells hold after Holm's correction, per cell
    (empty without pairs)."""
    pairs = report.table3_pairs
    if pairs.empty:
        return ""
    testable = pairs[pairs.p_value.notna()]
    if testable.empty:
        return ""
    held = testable.groupby("metric", sort=False).significant.agg(["sum", "size"])
    counts = "; ".join(f"{metric} {int(row['sum'])} of {int(row['size'])}" for metric, row in held.iterrows())
    return (f"Paired differences of every two methods on the same tests (`table3_pairs.csv`: the mean of a - b, "
            f"its 95% interval, the sign-flip p and Holm's adjustment over the pairs of each cell) significant at 5% "
            f"after Holm: {counts}.")


def _interval(value: float, low: float, high: float) -> str:
    return f"{_fmt(value)} [{_fmt(low)}, {_fmt(high)}]"


def _md_cells(frame: pd.DataFrame, reference: dict, title: str, note: str) -> list[str]:
    """A long (metric, method, value, low, high) table as a grid of 'value [low, high] / paper'."""
    if frame.empty:
        return []
    methods = list(dict.fromkeys(frame.method))
    rows = []
    for metric, group in frame.groupby("metric", sort=False):
        cells = group.set_index("method")
        rows.append([metric, *[f"{_interval(*cells.loc[m, ['value', 'low', 'high']])} / "
                                f"{_fmt(reference.get(metric, {}).get(m))}" for m in methods]])
    return [title, "", note, "", _md_table(["metric", *methods], rows), ""]


def _md_paper_sign(report: EvalReport) -> list[str]:
    return _md_cells(
        report.paper_sign, report.summary["paper"]["table3"], "## The paper's literal signs",
        "IF (Eq. 1's minus) and the ++ methods (test side g(z'_-kl) - g(z')) ranked with the paper's sign, i.e. "
        "their most negative scores first: each cell x100 with its 95% bootstrap interval over tests, then the "
        "paper's number. Compare these with the paper's IF/IF++/TracIn++ columns; table 3 above uses SpanLens' signs.")


def _md_lds(report: EvalReport) -> list[str]:
    if report.lds.empty:
        return []
    lds = report.lds
    rows = [[m, r.intervention, r.output, _interval(100 * r.lds, 100 * r.low, 100 * r.high),
             _interval(100 * r.lds, 100 * r.low_subsets, 100 * r.high_subsets) if "low_subsets" in lds else "-",
             str(int(r.nan))] for m, r in lds.iterrows()]
    s = report.summary["settings"]["lds"]
    out = ["## LDS and span-LDS (x100)", "",
           f"{s['subsets']} random subsets of {100 * s['alpha']:g}% of the training set (seed {s['seed']}: the kept "
           "share for `remove`, the masked share for `mask`); per test instance, the Spearman correlation over "
           "subsets between the method's predicted output and the retrained model's output. The predicted output "
           "is the sum of the method's scores over the subset for `remove` (retrained on the subset) and minus that "
           "sum for `mask` (retrained on everything with the subset's spans masked: masking a proponent's span "
           "lowers the output). `loss`: the test loss (negated); `span`: the test span's importance "
           "loss(z'_-kl) - loss(z') (TRAK++'s test side is a span difference of the margin, so its span-LDS is "
           "checked against a related output, not a rank-equivalent one). The mean over tests comes with its 95% "
           "bootstrap interval over tests; that interval holds the subsets fixed: every test shares the same "
           "retrains, so it leaves out how much the number depends on which subsets were drawn, which can be "
           "several times larger: the next column resamples both (4,000 draws). NaN: tests where the retrained "
           "outputs or the predicted ones did not change across subsets."
           + (f" With {s['subsets']} subsets each test's Spearman takes few distinct values: read these as a smoke "
              "test." if s["subsets"] < 10 else ""), "",
           _md_table(["method", "intervention", "output", "LDS [95% CI, tests]", "[95% CI, tests and subsets]",
                      "NaN tests"], rows), ""]
    if len(report.lds_pairs):
        pairs = report.lds_pairs
        if "p_holm" in pairs:
            out += [(f"Paired differences between methods checked the same way, over the tests where both are defined "
                     f"(`lds_pairs.csv`): {int((pairs.p_subsets < 0.05).sum())} of {len(pairs)} pairs differ at "
                     f"p < 0.05 with tests and subsets resampled (`p_subsets`, uncorrected), "
                     f"{int(pairs.significant.astype(bool).sum())} after Holm's correction over the pairs of each "
                     f"intervention and output (`p_holm`, `significant`). With the subsets held fixed (sign-flip test over tests, `p_value`, "
                     f"uncorrected and too narrow, as above): {int((pairs.p_value < 0.05).sum())}."), ""]
        else:  # a report from before the two-way test decided `significant`
            out += [(f"Paired differences between methods checked the same way (`lds_pairs.csv`): "
                     f"{int(pairs.significant.astype(bool).sum())} of {len(pairs)} pairs differ at p < 0.05 with the "
                     "subsets held fixed (sign-flip test, uncorrected)."), ""]
    return out


def _cell(report: EvalReport, metric: str, method: str, value: float) -> str:
    """A table-3 cell, with its interval where there is one (Sag/Lag)."""
    ci = report.table3_ci
    if ci.empty:
        return _fmt(value)
    hit = ci[(ci.metric == metric) & (ci.method == method)]
    return _interval(value, hit.low.iloc[0], hit.high.iloc[0]) if len(hit) else _fmt(value)


def lds_frame(report: EvalReport) -> pd.DataFrame:
    """The LDS table for display: x100, with its interval and what each method is checked against."""
    if report.lds.empty:
        return pd.DataFrame()
    lds = report.lds
    frame = pd.DataFrame({"checked by": lds.intervention + " / " + lds.output, "LDS": 100 * lds.lds,
                          "95% CI low": 100 * lds.low, "95% CI high": 100 * lds.high}, index=lds.index)
    if "low_subsets" in lds:  # tests and subsets resampled (reports from before it lack it)
        frame["CI low, subsets too"], frame["CI high, subsets too"] = 100 * lds.low_subsets, 100 * lds.high_subsets
    return frame.assign(tests=lds.tests, **{"NaN tests": lds.nan})


def table3_intervals_frame(report: EvalReport) -> pd.DataFrame:
    """Table 3's Sag/Lag cells as 'value [low, high]' (x100, 95% bootstrap interval over tests),
    metrics by methods, for display; empty when the report has no intervals."""
    ci = report.table3_ci
    if ci.empty:
        return pd.DataFrame()
    cells = ci.assign(cell=[_interval(v, lo, hi) for v, lo, hi in zip(ci.value, ci.low, ci.high)])
    return cells.pivot(index="metric", columns="method", values="cell").reindex(
        index=list(dict.fromkeys(ci.metric)), columns=list(dict.fromkeys(ci.method)))


FLIPPED = (("low", "high"), ("low_subsets", "high_subsets"))
"""Interval bounds of a pairs table, which swap and change sign when a pair is read as b - a."""
PAIR_DISPLAY = {"difference": "a - b", "low": "95% CI low", "high": "95% CI high",
                "low_subsets": "CI low, subsets too", "high_subsets": "CI high, subsets too", "p_value": "p",
                "p_subsets": "p, subsets too", "p_holm": "p (Holm)", "significant": "holds", "n": "tests"}


def oriented_pairs(pairs: pd.DataFrame, a: str, b: str) -> pd.DataFrame:
    """The rows of a pairs table (``table3_pairs``, ``lds_pairs``) comparing ``a`` with ``b``,
    each read as a - b whichever order it was stored in (p values are symmetric)."""
    same = pairs[(pairs.a == a) & (pairs.b == b)]
    flipped = pairs[(pairs.a == b) & (pairs.b == a)].copy()
    flipped["difference"] = -flipped.difference
    for low, high in FLIPPED:
        if low in flipped:
            flipped[low], flipped[high] = -flipped[high], -flipped[low]
    flipped[["a", "b"]] = [a, b]
    return pd.concat([same, flipped]).sort_index()


def pair_frame(pairs: pd.DataFrame, a: str, b: str, scale: float = 1.0) -> pd.DataFrame:
    """``a`` against ``b`` for display: per cell (``metric``; one ``LDS`` row for LDS pairs) the
    difference a - b and its interval times ``scale``, the p values and whether it holds after
    Holm; empty when the table has no such pair."""
    rows = oriented_pairs(pairs, a, b)
    out = rows[[c for c in PAIR_DISPLAY if c in rows]].copy()
    for column in ("difference", *(c for pair in FLIPPED for c in pair)):
        if column in out:
            out[column] = scale * out[column]
    out.index = pd.Index(rows.metric if "metric" in rows else ["LDS"] * len(rows), name="cell")
    return out.rename(columns=PAIR_DISPLAY)


def lds_note(report: EvalReport | None, method: str, fingerprint: str) -> str | None:
    """One line on how far to trust a method on this workspace, from its LDS (None: not computed,
    or computed on another build of the workspace, index fingerprint ``fingerprint``)."""
    if report is None or report.lds.empty or method not in report.lds.index:
        return None
    if report.summary.get("fingerprint") != fingerprint:
        return None
    r = report.lds.loc[method]
    kind = f"LDS ({r.intervention} / {r.output})"
    if "low_subsets" in report.lds and np.isfinite(r.low_subsets):
        interval, held = f"[{100 * r.low_subsets:.1f}, {100 * r.high_subsets:.1f}]", "tests and retrain subsets resampled"
    else:
        interval, held = f"[{100 * r.low:.1f}, {100 * r.high:.1f}]", "interval with the retrains' subsets held fixed"
    return (f"{kind} on this workspace: {100 * r.lds:.1f} {interval} "
            f"(x100; {int(r.tests)} tests, {held}; 0 = no better than chance at predicting retraining)")


def _md_curves(report: EvalReport) -> list[str]:
    band = report.summary["random_baseline"]["sag"]
    return ["## Figure 1: K-curves", "",
            "`k_curves.html` (interactive) and `k_curves.png`; the numbers are in `k_curves.csv` (per test: "
            f"`per_test_curves.csv`). The grey band is the {band['spread_percentiles']} percentile range of "
            f"{band['draws']} random rankings. The paper's figure 1 is an image; its values are not in its text.", "",
            "![K-curves](k_curves.png)", ""]


def _md_table4(report: EvalReport) -> list[str]:
    t4, paper4 = report.table4, report.summary["paper"]["table4"]
    if not len(t4):
        return []
    runs = int(t4["runs"].iloc[0])
    var = (lambda v: "undefined") if runs < 2 else _fmt  # noqa: E731  (one run: no variance across runs)
    return ["## Table 4: Spearman correlation with the ground truth (x100)", "",
            _md_table(["method", "mean", "var (runs)", "sd (tests)", "paper mean", "paper var"],
                      [[m, _fmt(r["mean"]), var(r["var_runs"]), _fmt(r["sd_tests"]),
                        _fmt(paper4.get(m, {}).get("mean")), _fmt(paper4.get(m, {}).get("var"))]
                       for m, r in t4.iterrows()]),
            "",
            f"{runs} run(s). mean: mean over runs of each run's mean Spearman over its test instances; var (runs): "
            "variance (ddof=1) across runs of those means (undefined for one run); sd (tests): standard deviation "
            "over every (run, test) value. The paper does not say which variance it reports. Run 0 uses the test "
            "instances above and the workspace's variants; run r >= 1 draws a new test sample and makes new variants "
            "the way the workspace made its own (seed + r) for the variant-based methods. Checkpoint methods (Control, "
            "TracIn), GroundTruth and the IF family with the fast inverse are deterministic: their variance across "
            "runs comes from the test samples alone (0 when every run has the same tests). With `--ihvp lissa`, run r "
            "uses LiSSA seed + r. GroundTruth against itself is 1 (100) by construction.", ""]


def _md_tail(report: EvalReport) -> list[str]:
    out = ["## Timings", "", "Seconds. `this_run`: this run's total and the phases it computed (a fully cached "
           "re-run computes none); `computed`: what the results in this report cost to compute, summed from "
           "their stored rows whichever run computed them (null where rows predate that record); "
           "`seconds_per_test`: scoring time per test instance, by method (methods scored together share the "
           "time evenly).", "", "```", json.dumps(report.summary["timings"], indent=1), "```", ""]
    if report.summary["notes"]:
        out += ["## Notes", "", *[f"- {n}" for n in report.summary["notes"]], ""]
    return out + ["## Settings", "", "```", json.dumps(report.summary["settings"], indent=1, default=str), "```", ""]
