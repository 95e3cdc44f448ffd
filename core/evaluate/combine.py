"""Combining evaluation reports of the same protocol over classifier seeds (workspaces prepared
with --seed 0, 1, 2 ...): each table cell's mean, standard deviation and range across seeds, so a
reading does not rest on one trained model."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from ..workspace import write_json_atomic, write_text_atomic
from .report import load_report


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
    """Table 3 (and LDS, where every report has it) across reports; writes ``combined_table3.csv``,
    ``combined_lds.csv`` and ``combined.md`` to ``out_dir``; returns the summary written to
    ``combined.json``."""
    if len(folders) < 2:
        raise ValueError("give at least two reports to combine")
    reports = [load_report(f) for f in folders]
    settings = [r.summary["settings"] for r in reports]
    differ = differing(settings)
    if differ:
        raise ValueError(f"the reports differ in {', '.join(differ)}; combine runs of one protocol only "
                         "(the same evaluate options on workspaces that differ in their classifier seed)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table3 = across([r.table3 for r in reports])
    write_text_atomic(out / "combined_table3.csv", table3.to_csv(index=False))
    frames = [r.lds[["lds"]].T.rename(index={"lds": "LDS"}) for r in reports if not r.lds.empty]
    lds = across(frames) if len(frames) == len(reports) else pd.DataFrame()
    write_text_atomic(out / "combined_lds.csv", lds.to_csv(index=False))
    summary = {"reports": [str(f) for f in folders], "workspaces": [r.summary["workspace"] for r in reports],
               "n": len(reports)}
    write_json_atomic(out / "combined.json", summary)
    write_text_atomic(out / "combined.md", _markdown(table3, lds, summary))
    return summary


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


def _markdown(table3: pd.DataFrame, lds: pd.DataFrame, summary: dict) -> str:
    parts = ["# SpanLens evaluation across classifier seeds", "",
             f"{summary['n']} reports: " + ", ".join(f"`{w}`" for w in summary["workspaces"]), "",
             "Each cell: mean ± standard deviation across the reports (one per classifier seed); the per-report "
             "values are in `combined_table3.csv` (min, max).", "", "## Table 3", "", _grid(table3, 1.0), ""]
    if len(lds):
        parts += ["## LDS and span-LDS (x100)", "", _grid(lds, 100.0), ""]
    return "\n".join(parts)
