"""Combining evaluation reports of the same protocol over classifier seeds (workspaces prepared
with --seed 0, 1, 2 ...): each table cell's mean, standard deviation and range across seeds, so a
reading does not rest on one trained model; and, from the reports' per-test rows, each Sag/Lag
and table-4 cell's 95% interval and every two methods' paired difference with seeds and tests
both resampled (:func:`core.stats.seeds_tests_draws`: crossed when every report evaluated the same
tests, as with ``prepare --data-seed`` fixed, nested otherwise)."""
from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from ..stats import ALPHA, draws_summary, holm, seeds_tests_draws
from ..workspace import write_json_atomic, write_text_atomic
from .report import PAIR_RESAMPLES, EvalReport, check_per_test, load_report

CELL_DRAWS = 2000
"""Bootstrap draws of a cell's interval (the pairs take :data:`PAIR_RESAMPLES`, for Holm)."""


def differing(settings: list[dict]) -> list[str]:
    """The evaluate settings in which reports differ. Where the work ran (``ray``) changes no
    number; LDS is combined only where every report has it, and then its settings (subsets,
    alpha, seed) must be the same."""
    keys = {k for s in settings for k in s} - {"ray", "lds"}
    differ = {k for k in keys if any(s.get(k) != settings[0].get(k) for s in settings[1:])}
    if all(s.get("lds") for s in settings) and len({json.dumps(s["lds"], sort_keys=True) for s in settings}) > 1:
        differ.add("lds")
    return sorted(differ)


def _stack(frames: list[pd.DataFrame], value: str) -> pd.DataFrame:
    """Long (row, column, seed, value) from one wide table per seed."""
    parts = []
    for seed, frame in enumerate(frames):
        long = frame.reset_index(names="row").melt(id_vars="row", var_name="column", value_name=value)
        parts.append(long.assign(report=seed))
    return pd.concat(parts, ignore_index=True)


def across(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """Per (row, column) of wide tables: mean, sd (ddof=1; NaN for one report), min, max, n."""
    long = _stack(frames, "value").dropna(subset=["value"])
    out = long.groupby(["row", "column"], sort=False).value.agg(
        mean="mean", sd=lambda v: float(np.std(v, ddof=1)) if len(v) > 1 else float("nan"), min="min", max="max",
        n="count")
    return out.reset_index()


def combine_reports(folders: list[str | Path], out_dir: str | Path) -> dict:
    """Tables 3 and 4 (and LDS, where every report has it) across reports; writes
    ``combined_table3.csv``, ``combined_lds.csv``, the per-test intervals and paired tests
    (``combined_table3_ci.csv``, ``combined_pairs.csv``, ``combined_table4.csv``) and
    ``combined.md`` to ``out_dir``; returns the summary written to ``combined.json``."""
    if len(folders) < 2:
        raise ValueError("give at least two reports to combine")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder; give --out a folder")
    reports = _checked([load_report(f) for f in folders])
    settings = [r.summary["settings"] for r in reports]
    out.mkdir(parents=True, exist_ok=True)
    table3 = across([r.table3 for r in reports])
    write_text_atomic(out / "combined_table3.csv", table3.to_csv(index=False))
    frames = [r.lds[["lds"]].T.rename(index={"lds": "LDS"}) for r in reports if not r.lds.empty]
    lds = across(frames) if len(frames) == len(reports) else pd.DataFrame()
    write_text_atomic(out / "combined_lds.csv", lds.to_csv(index=False))
    seed = int(settings[0].get("seed", 0))
    cells, pairs, crossed = table3_across(reports, seed)
    faith = table4_across(reports, seed)
    for name, frame in (("combined_table3_ci.csv", cells), ("combined_pairs.csv", pairs), ("combined_table4.csv", faith)):
        write_text_atomic(out / name, frame.to_csv(index=False))
    methods = _methods(reports)
    summary = {"reports": [str(f) for f in folders], "workspaces": [r.summary["workspace"] for r in reports],
               "n": len(reports), "design": "crossed" if crossed else "nested",
               "left_out": [m for m in settings[0]["methods"] if m not in methods] if len(cells) else []}
    write_json_atomic(out / "combined.json", summary)
    write_text_atomic(out / "combined.md", _markdown(table3, lds, cells, pairs, faith, summary))
    return summary


def _checked(reports: list[EvalReport]) -> list[EvalReport]:
    """``reports`` when they can be combined: one protocol (the same evaluate settings), whole
    per-test rows, and no classifier twice (the same folder, or :func:`_same_classifier`: with
    identical seeds every difference would look certain)."""
    settings = [r.summary.get("settings", {}) for r in reports]
    differ = differing(settings)
    if differ:
        detail = [f"{r.out_dir} {_methods_detail(s.get('methods'), settings[0].get('methods'))}"
                  for r, s in zip(reports[1:], settings[1:]) if s.get("methods") != settings[0].get("methods")]
        methods = f" ({'; '.join(detail)}, against {reports[0].out_dir})" if detail else ""
        raise ValueError(f"the reports differ in {', '.join(differ)}{methods}; combine runs of one protocol only "
                         "(the same evaluate options on workspaces that differ in their classifier seed)")
    for r in reports:
        if len(r.per_test):
            check_per_test(r)
    for a, b in combinations(reports, 2):
        if a.out_dir.resolve() == b.out_dir.resolve():
            raise ValueError(f"{a.out_dir} is given twice; give each classifier's report once")
        if _same_classifier(a, b):
            raise ValueError(f"{a.out_dir} and {b.out_dir} come from the same classifier (the same workspace "
                             "fingerprint, or the same Sag/Lag per test): workspaces prepared with the same --seed? "
                             "Combine reports of different seeds")
    return reports


def _same_classifier(a: EvalReport, b: EvalReport) -> bool:
    """Whether two reports come from one classifier: the same workspace fingerprint (the model
    stage's settings and seed), or the same Sag/Lag values on every (test, method)."""
    fingerprint = a.summary.get("fingerprint")
    if fingerprint is not None and fingerprint == b.summary.get("fingerprint"):
        return True
    if not len(a.per_test) or len(a.per_test) != len(b.per_test):
        return False
    keys = ["test_id", "method"]
    values = [c for c in a.per_test.columns if c.startswith(("sag@", "lag@"))]
    if values != [c for c in b.per_test.columns if c.startswith(("sag@", "lag@"))]:
        return False
    left, right = (r.per_test.sort_values(keys).reset_index(drop=True) for r in (a, b))
    return left[keys].equals(right[keys]) and np.allclose(left[values].to_numpy(float), right[values].to_numpy(float),
                                                          equal_nan=True)


def _methods_detail(methods: list[str] | None, first: list[str] | None) -> str:
    """How a report's methods differ from the first report's."""
    methods, first = methods or [], first or []
    lacks, adds = [m for m in first if m not in methods], [m for m in methods if m not in first]
    parts = [f"lacks {', '.join(lacks)}" if lacks else "", f"adds {', '.join(adds)}" if adds else ""]
    return " and ".join(p for p in parts if p) or "has the methods in another order"


def _wide(frame: pd.DataFrame, keys: list[str], value: str) -> pd.DataFrame:
    """Per-test rows as (test key) x method, sorted by the key."""
    key = frame[keys].astype(str).agg("|".join, axis=1)
    return frame.assign(_key=key).pivot(index="_key", columns="method", values=value).sort_index()


def _crossed(wides: list[pd.DataFrame]) -> bool:
    """Whether every report has the same tests (then a test's draw is shared by all seeds)."""
    return all(w.index.equals(wides[0].index) for w in wides[1:])


def _cell(per_seed: list[np.ndarray], crossed: bool, draws: int, seed: int) -> dict:
    """Mean over seeds of each seed's mean over its tests, sd across seeds, its seeds-and-tests
    interval with the bootstrap p of 0, and a t-test of 0 over the seeds' means (``p_seeds``)."""
    means = np.array([np.nanmean(v) if np.isfinite(v).any() else np.nan for v in per_seed])
    finite = means[np.isfinite(means)]
    low, high, p = draws_summary(seeds_tests_draws(per_seed, crossed=crossed, n_resamples=draws, seed=seed))
    return {"mean": float(finite.mean()) if len(finite) else float("nan"),
            "sd_seeds": float(np.std(finite, ddof=1)) if len(finite) > 1 else float("nan"),
            "low": low, "high": high, "p_value": p, "p_seeds": seed_t_p(finite), "seeds": len(finite),
            "per_seed": ";".join(f"{m:.4g}" for m in means)}


def seed_t_p(means: np.ndarray) -> float:
    """Two-sided p of a one-sample t-test of 0 over per-seed means (S - 1 degrees of freedom; NaN
    below 2 seeds; seeds that agree exactly give 0, or 1 when they agree on 0)."""
    if len(means) < 2:
        return float("nan")
    if np.ptp(means) == 0:
        return 0.0 if means[0] != 0 else 1.0
    return float(stats.ttest_1samp(means, 0.0).pvalue)


def table3_across(reports: list[EvalReport], seed: int) -> tuple[pd.DataFrame, pd.DataFrame, bool]:
    """Sag/Lag cells (x100) across seeds with intervals, and every two methods' paired
    difference per cell; and whether the design is crossed. A difference holds (``significant``)
    when both its seeds-and-tests bootstrap p and its t-test over the seeds are below 5% after
    Holm over the pairs of the cell: with 3 seeds the bootstrap's seed level has 10 distinct
    draws and cannot reach 0 when every seed's difference has the same sign, so alone it would
    rest on the test noise. Empty tables unless every report has per-test rows."""
    if not all(len(r.per_test) for r in reports):
        return pd.DataFrame(columns=CELL_COLUMNS), pd.DataFrame(columns=PAIR_COLUMNS), False
    ks, methods = reports[0].summary["settings"]["ks"], _methods(reports)
    cells, pairs = [], []
    crossed = True
    for metric in ("sag", "lag"):
        for k in ks:
            wides = [100 * _wide(r.per_test, ["test_id"], f"{metric}@{k}") for r in reports]
            shared = _crossed(wides)
            crossed = crossed and shared
            name = f"{metric.capitalize()}@{k}"
            for m in methods:
                cell = _cell([w[m].to_numpy(float) for w in wides], shared, CELL_DRAWS, seed)
                cells.append({"metric": name, "method": m, **{c: cell[c] for c in CELL_COLUMNS[2:]}})
            for a, b in combinations(methods, 2):
                cell = _cell([(w[a] - w[b]).to_numpy(float) for w in wides], shared, PAIR_RESAMPLES, seed)
                pairs.append({"metric": name, "a": a, "b": b, "difference": cell["mean"],
                              **{c: cell[c] for c in PAIR_COLUMNS[4:] if c in cell}})
    pairs = pd.DataFrame(pairs, columns=[c for c in PAIR_COLUMNS if c not in ("p_holm", "p_seeds_holm", "significant")])
    by_cell = pairs.groupby("metric", sort=False)
    pairs["p_holm"] = by_cell.p_value.transform(holm)
    pairs["p_seeds_holm"] = by_cell.p_seeds.transform(holm)
    pairs["significant"] = (pairs.p_holm < ALPHA) & (pairs.p_seeds_holm < ALPHA)
    return pd.DataFrame(cells, columns=CELL_COLUMNS), pairs[PAIR_COLUMNS], crossed


CELL_COLUMNS = ["metric", "method", "mean", "sd_seeds", "low", "high", "seeds", "per_seed"]
PAIR_COLUMNS = ["metric", "a", "b", "difference", "low", "high", "p_value", "p_seeds", "p_holm", "p_seeds_holm",
                "significant", "sd_seeds", "seeds", "per_seed"]
TABLE4_COLUMNS = ["method", "mean", "sd_seeds", "low", "high", "seeds", "per_seed"]


def _methods(reports: list[EvalReport]) -> list[str]:
    """The methods of table 3 that every report's per-test rows have."""
    present = set.intersection(*(set(r.per_test.method) for r in reports)) if all(
        len(r.per_test) for r in reports) else set()
    return [m for m in reports[0].summary["settings"]["methods"] if m in present]


def table4_across(reports: list[EvalReport], seed: int) -> pd.DataFrame:
    """Table 4 (Spearman with GroundTruth x100) across seeds: per method the mean over seeds of
    each report's mean, and the sd across seeds. With one faithfulness run per report, also the
    seeds-and-tests interval; with more, none (a run draws new tests and variants, a level this
    bootstrap does not resample). Empty unless every report has faithfulness rows."""
    if not all(len(r.faithfulness) for r in reports):
        return pd.DataFrame(columns=TABLE4_COLUMNS)
    one_run = all(r.faithfulness.run.nunique() == 1 for r in reports)
    wides = [100 * _wide(r.faithfulness, ["test_id"] if one_run else ["run", "test_id"], "spearman") for r in reports]
    rows = []
    for m in [m for m in wides[0].columns if all(m in w for w in wides)]:
        if one_run:
            cell = _cell([w[m].to_numpy(float) for w in wides], _crossed(wides), CELL_DRAWS, seed)
        else:
            means = np.array([r.table4.loc[m, "mean"] for r in reports], dtype=np.float64)
            cell = {"mean": float(means.mean()), "sd_seeds": float(np.std(means, ddof=1)), "low": np.nan,
                    "high": np.nan, "seeds": len(means), "per_seed": ";".join(f"{v:.4g}" for v in means)}
        rows.append({"method": m, **cell})
    return pd.DataFrame(rows, columns=TABLE4_COLUMNS)


def _grid(long: pd.DataFrame, scale: float) -> str:
    rows = list(dict.fromkeys(long.row))
    columns = list(dict.fromkeys(long.column))
    cell = long.set_index(["row", "column"])
    lines = ["| | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for row in rows:
        values = []
        for column in columns:
            r = cell.loc[(row, column)] if (row, column) in cell.index else None
            values.append("–" if r is None else f"{scale * r['mean']:.2f} ± {scale * r['sd']:.2f}")
        lines.append(f"| {row} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def _markdown(table3: pd.DataFrame, lds: pd.DataFrame, cells: pd.DataFrame, pairs: pd.DataFrame,
              faith: pd.DataFrame, summary: dict) -> str:
    design = ("crossed: every report evaluated the same tests, so a drawn test is drawn for every seed"
              if summary["design"] == "crossed" else "nested: the reports evaluated different tests, drawn "
              "within each drawn seed")
    parts = ["# SpanLens evaluation across classifier seeds", "",
             f"{summary['n']} reports: " + ", ".join(f"`{w}`" for w in summary["workspaces"]), "",
             ("Each cell: mean ± standard deviation across the reports (one per classifier seed); the per-report "
              "values are in `combined_table3.csv` (min, max)."), "", "## Table 3", "", _grid(table3, 1.0), ""]
    if len(cells):
        parts += ["## Table 3 with intervals over seeds and tests", "",
                  (f"Each Sag/Lag cell x100: the mean over seeds of each seed's mean over its tests, [its 95% "
                   f"bootstrap interval with seeds and tests both resampled ({design}); {CELL_DRAWS} draws], and "
                   f"the sd across seeds. With {summary['n']} seeds the seed level has few distinct draws: the "
                   "intervals are approximate (`combined_table3_ci.csv`, each seed's value in `per_seed`)."), "",
                  _interval_grid(cells, "metric", "method"), ""]
    if len(pairs):
        testable = pairs[pairs.p_value.notna()].assign(
            tests=lambda f: f.p_holm < ALPHA, seeds=lambda f: f.p_seeds_holm < ALPHA)
        held = testable.groupby("metric", sort=False)[["tests", "seeds", "significant"]].sum()
        sizes = testable.groupby("metric", sort=False).size()
        counts = "; ".join(f"{metric} {int(row.significant)} of {sizes[metric]} (bootstrap alone {int(row.tests)}, "
                           f"t-test alone {int(row.seeds)})" for metric, row in held.iterrows())
        parts += [(f"Paired differences of every two methods (`combined_pairs.csv`: the mean over seeds of a - b; its "
                   f"interval and bootstrap p from two-way draws ({PAIR_RESAMPLES}); a t-test over the seeds' "
                   "differences (`p_seeds`, S - 1 degrees of freedom); each p adjusted by Holm over the pairs of the "
                   "cell; each seed's difference in `per_seed`). A difference holds when both adjusted p are below "
                   f"5%: {counts}. With few seeds the t-test has little power: a difference every seed shows can "
                   "fail it."), ""]
    if summary["left_out"]:
        parts += [f"Left out (not in every report's per-test rows): {', '.join(summary['left_out'])}.", ""]
    if len(faith):
        parts += ["## Table 4 across seeds", "",
                  ("Spearman with GroundTruth x100: the mean over seeds of each report's mean [95% interval, seeds "
                   "and tests resampled; none when a report has several faithfulness runs], and the sd across seeds "
                   "(`combined_table4.csv`)."),
                  "", _interval_grid(faith.assign(metric="Spearman"), "method", "metric"), ""]
    if len(lds):
        parts += ["## LDS and span-LDS (x100)", "", _grid(lds, 100.0), ""]
    return "\n".join(parts)


def _interval_grid(frame: pd.DataFrame, rows: str, columns: str) -> str:
    """A long frame with mean, low, high, sd_seeds as a grid of 'mean [low, high] (sd s)'."""
    cell = frame.set_index([rows, columns])
    names = list(dict.fromkeys(frame[columns]))
    lines = ["| | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for row in dict.fromkeys(frame[rows]):
        values = []
        for name in names:
            if (row, name) not in cell.index:
                values.append("–")
                continue
            r = cell.loc[(row, name)]
            values.append(f"{r['mean']:.1f} [{r['low']:.1f}, {r['high']:.1f}] (sd {r['sd_seeds']:.1f})")
        lines.append(f"| {row} | " + " | ".join(values) + " |")
    return "\n".join(lines)
