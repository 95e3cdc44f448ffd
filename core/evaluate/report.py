"""The evaluation's report as data: per-test rows, the paper's tables 3 and 4, K-curves, timings;
written to and read back from a folder of CSV files and ``summary.json``."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from itertools import combinations
from pathlib import Path

import pandas as pd

from .. import metrics
from ..engine import TestInput
from ..stats import ALPHA, bootstrap_ci, holm, paired_difference
from .context import Evaluation
from .counterfactual import lds_table
from .paper import DATASETS, PAPER_SOURCE, PAPER_TABLE3, PAPER_TABLE4
from .settings import Selection


@dataclass
class EvalReport:
    """A finished evaluation: what :func:`run_evaluation` returns and :func:`load_report` reads back.

    ``table3``: rows ``Sag@K``/``Lag@K``/``Ral -p%``, columns methods and ``random`` (x100);
    ``table4``: one row per method (``mean``, ``var_runs``, ``sd_tests`` x100 / x100^2);
    ``curves``: long K-curve table (``series, metric, k, value, low, high``), random included;
    ``table3_ci``: each Sag/Lag cell's 95% bootstrap interval over tests (x100);
    ``table3_pairs``: every two methods' paired difference on each Sag/Lag cell (x100), its interval,
    sign-flip p and Holm's adjustment over the pairs of the cell;
    ``paper_sign``: Sag/Lag (x100) of the methods whose literal formula in the paper has the other
    sign, ranked with the paper's sign; ``lds``: (span-)LDS per method with its interval;
    ``per_test``, ``per_test_curves``, ``faithfulness``, ``ral``, ``lds_per_test``, ``lds_pairs``:
    the rows behind them (fractions).
    """

    out_dir: Path
    summary: dict
    table3: pd.DataFrame
    table4: pd.DataFrame
    curves: pd.DataFrame
    per_test: pd.DataFrame
    per_test_curves: pd.DataFrame
    faithfulness: pd.DataFrame
    ral: pd.DataFrame
    table3_ci: pd.DataFrame
    table3_pairs: pd.DataFrame
    paper_sign: pd.DataFrame
    lds: pd.DataFrame
    lds_per_test: pd.DataFrame
    lds_pairs: pd.DataFrame


def collect(ev: Evaluation, tests: list[TestInput]) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Per-test rows and per-test curves of part 1, and the random baselines."""
    per_test, curves = [], []
    for m in ev.computed:
        rows = ev.store.eval_rows(ev.main_key(m))
        for t in tests:
            row = rows[t.id]
            rec = {"test_id": t.id, "method": m.name, "label": t.label, "top1": row["top"][0]}
            rec |= {f"sag@{k}": row["sag"][k - 1] for k in ev.ks} | {f"lag@{k}": row["lag"][k - 1] for k in ev.ks}
            rec["spearman"] = row.get("spearman")
            rec["seconds"] = row.get("seconds")
            if "sag_paper" in row:
                rec |= {f"sag_paper@{k}": row["sag_paper"][k - 1] for k in ev.ks}
                rec |= {f"lag_paper@{k}": row["lag_paper"][k - 1] for k in ev.ks}
            per_test.append(rec)
            curves += [{"test_id": t.id, "method": m.name, "k": k + 1, "sag": row["sag"][k], "lag": row["lag"][k]}
                       for k in range(ev.kmax)]
    cos, agree = ev.cosines_and_agreement(tests)
    s = ev.settings
    baselines = {name: metrics.random_baseline(values, ev.kmax, draws=s.random_draws, seed=s.seed)
                 for name, values in (("sag", cos), ("lag", agree))}
    return pd.DataFrame(per_test), pd.DataFrame(curves), baselines


def table3(ev: Evaluation, per_test: pd.DataFrame, baselines: dict, ral: pd.DataFrame) -> pd.DataFrame:
    names = [m.name for m in ev.reported]
    means = per_test[per_test.method.isin(names)].groupby("method").mean(numeric_only=True)
    rows: dict[str, dict[str, float]] = {}
    for metric in ("sag", "lag"):
        for k in ev.ks:
            rows[f"{metric.capitalize()}@{k}"] = {**{m: 100 * means.loc[m, f"{metric}@{k}"] for m in names},
                                                  "random": 100 * baselines[metric].expected}
    if len(ral):
        for p in ev.settings.ral:
            at = ral[ral.percent == p]
            row = {m: 100 * float(at[at.method == m].ral.iloc[0]) for m in names}
            row["random"] = 100 * float(at[at.method == "random"].ral.mean())
            rows[f"Ral -{p:g}%"] = row
    return pd.DataFrame(rows).T[[*names, "random"]]


def table3_ci(per_test: pd.DataFrame, methods: list[str], ks: list[int], seed: int) -> pd.DataFrame:
    """Each Sag/Lag cell of table 3 with its 95% bootstrap interval over tests (x100)."""
    return _cells_ci(per_test, methods, ks, seed, "")


PAIR_COLUMNS = ["metric", "a", "b", "difference", "low", "high", "p_value", "p_holm", "significant", "n"]
PAIR_RESAMPLES = 10_000
"""Sign flips (and bootstrap draws) per pair: the smallest p, 1/10,001, stays below 5% after Holm
over the 78 pairs of 13 methods (with 2,000 it would sit at 0.039, just under)."""


def table3_pairs(per_test: pd.DataFrame, methods: list[str], ks: list[int], seed: int) -> pd.DataFrame:
    """Every two of ``methods`` on each Sag/Lag cell: the mean of a - b (``a`` listed first) over
    the tests where both are defined (x100, ``n`` tests) with its 95% bootstrap interval and paired
    sign-flip p; ``significant`` when Holm's adjustment over the testable pairs of that cell
    (``p_holm``) is below 5%."""
    rows = []
    for metric in ("sag", "lag"):
        for k in ks:
            wide = per_test.pivot(index="test_id", columns="method", values=f"{metric}@{k}")
            for a, b in combinations(methods, 2):
                d = paired_difference(100 * wide[a].to_numpy(float), 100 * wide[b].to_numpy(float), seed=seed,
                                      n_resamples=PAIR_RESAMPLES)
                rows.append({"metric": f"{metric.capitalize()}@{k}", "a": a, "b": b, "difference": d["difference"],
                             "low": d["low"], "high": d["high"], "p_value": d["p_value"], "n": d["n"]})
    frame = pd.DataFrame(rows, columns=[c for c in PAIR_COLUMNS if c not in ("p_holm", "significant")])
    frame["p_holm"] = frame.groupby("metric", sort=False).p_value.transform(holm)
    frame["significant"] = frame.p_holm < ALPHA
    return frame[PAIR_COLUMNS]


def paper_sign_table(per_test: pd.DataFrame, methods: list[str], ks: list[int], seed: int) -> pd.DataFrame:
    """Sag@K/Lag@K (x100) of those of ``methods`` the paper writes with the other sign, ranked
    with the paper's sign, each with its 95% interval; empty when the run uses the paper's signs."""
    return _cells_ci(per_test, methods, ks, seed, "_paper")


def _cells_ci(per_test: pd.DataFrame, methods: list[str], ks: list[int], seed: int, suffix: str) -> pd.DataFrame:
    """Sag/Lag cells of ``methods`` with the per-test columns ``{metric}{suffix}@{k}`` (methods
    without them, or with missing values, left out), each with its 95% interval."""
    rows = []
    for name in methods:
        group = per_test[per_test.method == name]
        if f"sag{suffix}@{ks[0]}" not in group or group[f"sag{suffix}@{ks[0]}"].isna().any():
            continue
        for metric in ("sag", "lag"):
            for k in ks:
                value, low, high = bootstrap_ci(100 * group[f"{metric}{suffix}@{k}"].to_numpy(), seed=seed)
                rows.append({"metric": f"{metric.capitalize()}@{k}", "method": name, "value": value, "low": low,
                             "high": high})
    return pd.DataFrame(rows, columns=["metric", "method", "value", "low", "high"])


def table4(faith: pd.DataFrame) -> pd.DataFrame:
    if faith.empty:
        return pd.DataFrame(columns=["mean", "var_runs", "sd_tests", "runs", "tests"])
    order = ["Control", *[m for m in dict.fromkeys(faith.method) if m not in ("Control", "GroundTruth")], "GroundTruth"]
    table = {}
    for m in order:
        runs = [100 * g.spearman.to_numpy() for _, g in faith[faith.method == m].groupby("run")]
        table[m] = metrics.run_statistics(runs)
    return pd.DataFrame(table).T


def curves(ev: Evaluation, per_test_curves: pd.DataFrame, baselines: dict) -> pd.DataFrame:
    names = [m.name for m in ev.reported]
    mean = per_test_curves[per_test_curves.method.isin(names)].groupby(["method", "k"])[["sag", "lag"]].mean()
    records = []
    for metric in ("sag", "lag"):
        for m in names:
            records += [{"series": m, "metric": metric, "k": k, "value": float(mean.loc[(m, k), metric]),
                         "low": None, "high": None} for k in range(1, ev.kmax + 1)]
        b = baselines[metric]
        records += [{"series": "random", "metric": metric, "k": k + 1, "value": float(b.mean[k]),
                     "low": float(b.low[k]), "high": float(b.high[k])} for k in range(ev.kmax)]
    return pd.DataFrame(records)


def computed_seconds(per_test: pd.DataFrame, faith: pd.DataFrame, ral: pd.DataFrame) -> dict[str, float | None]:
    """Seconds spent computing the results in this report, from the rows that hold them (by
    whichever runs computed them); None where some rows predate the record."""
    def total(values: pd.Series) -> float | None:
        return None if values.isna().any() else round(float(values.sum()), 1)

    out = {"sag_lag_scoring_seconds": total(per_test.seconds)}
    later = faith[faith.run > 0]
    if len(later):
        out["faithfulness_seconds"] = total(later.seconds)
    if len(ral):
        out["ral_retrain_seconds"] = total(ral.drop_duplicates("retrain").seconds)  # rows may share a retrain
    return out


def build_report(ev: Evaluation, selection: Selection, per_test: pd.DataFrame, per_test_curves: pd.DataFrame,
                 baselines: dict, faith: pd.DataFrame, ral: pd.DataFrame, lds_rows: pd.DataFrame,
                 lds_pairs: pd.DataFrame, lds_two_way: pd.DataFrame) -> EvalReport:
    backend, s = ev.backend, ev.settings
    dataset = DATASETS.get(str(backend.manifest.settings.get("dataset", "")).lower(), "")
    t3, t4 = table3(ev, per_test, baselines, ral), table4(faith)
    lds = lds_table(lds_rows, ev.settings.seed).join(lds_two_way) if len(lds_rows) else pd.DataFrame()
    seconds = per_test.groupby("method", sort=False).seconds.mean()
    summary = {
        "workspace": str(backend.ws.root), "fingerprint": backend.fingerprint, "dataset": dataset,
        "settings": {**asdict(s), "methods": [m.name for m in ev.reported], "ks": ev.ks, "kmax": ev.kmax},
        "methods": {m.name: {"formula": m.formula, "family": m.family, "paper": m.paper} for m in ev.computed},
        "approximations": {"projection": ev.engine.projector.describe(),
                           "ihvp": f"fast, lambda = {s.damping:g}" if s.ihvp == "fast" else f"lissa, lambda = {s.lissa.lam:g}",
                           "paper_signs": s.paper_signs, "n_train": ev.n,
                           "variant_seeds": [backend.manifest.settings["seed"] + r for r in range(s.faithfulness_runs)]},
        "selection": selection.describe(),
        "table3": json.loads(t3.to_json()), "table4": json.loads(t4.to_json()),
        "lds": json.loads(lds.to_json(orient="index")) if len(lds) else {},
        "random_baseline": {m: {"expected": b.expected, "draws": len(b.draws), "spread_percentiles": list(b.spread)}
                            for m, b in baselines.items()},
        "paper": {"source": PAPER_SOURCE, "table3": PAPER_TABLE3.get(dataset, {}),
                  "table4": PAPER_TABLE4 if dataset == "MAMS" else {}},
        "timings": {"this_run": ev.timings, "computed": computed_seconds(per_test, faith, ral),
                    "seconds_per_test": {m: round(float(v), 4) for m, v in seconds.items()}},
        "notes": ev.notes,
    }
    return EvalReport(ev.out_dir, summary, t3, t4, curves(ev, per_test_curves, baselines), per_test, per_test_curves,
                      faith, ral, lds=lds, lds_per_test=lds_rows, lds_pairs=lds_pairs,
                      **interval_tables(per_test, [m.name for m in ev.reported], ev.ks, s.seed))


def interval_tables(per_test: pd.DataFrame, methods: list[str], ks: list[int], seed: int) -> dict[str, pd.DataFrame]:
    """The report's tables derived from its per-test rows: ``table3_ci``, ``table3_pairs`` and
    ``paper_sign`` (the :class:`EvalReport` fields)."""
    cells = (per_test, methods, ks, seed)
    return {"table3_ci": table3_ci(*cells), "table3_pairs": table3_pairs(*cells), "paper_sign": paper_sign_table(*cells)}


FILES = {"per_test": "per_test.csv", "per_test_curves": "per_test_curves.csv", "curves": "k_curves.csv",
         "faithfulness": "faithfulness.csv", "ral": "ral.csv", "table3": "table3.csv", "table4": "table4.csv",
         "table3_ci": "table3_ci.csv", "table3_pairs": "table3_pairs.csv", "paper_sign": "paper_sign.csv",
         "lds": "lds.csv",
         "lds_per_test": "lds_per_test.csv", "lds_pairs": "lds_pairs.csv"}
INDEXED = ("table3", "table4", "lds")
"""Files whose first column is the row index."""


def with_intervals(report: EvalReport) -> EvalReport:
    """``report`` with its intervals and paired tests (``table3_ci``, ``table3_pairs``,
    ``paper_sign``) derived again from its per-test rows and recorded settings: a report written
    before every report had them gains them, a current one gets the same tables back."""
    per_test = report.per_test
    if per_test.empty:
        raise ValueError(f"{report.out_dir / FILES['per_test']}: no per-test rows to derive intervals from")
    check_per_test(report)
    settings = report.summary["settings"]
    present = set(per_test.method)
    return replace(report, **interval_tables(per_test, [m for m in settings["methods"] if m in present],
                                             settings["ks"], settings["seed"]))


def check_per_test(report: EvalReport) -> None:
    """ValueError naming the file unless the report's per-test rows are whole: settings with the
    methods, ks and seed; a Sag and Lag column per K; each (test, method) once, with its Sag and
    Lag values (a row cut mid-way has none); and every method on the same tests (a file cut
    short leaves its last method with fewer)."""
    rows, per_test = report.out_dir / FILES["per_test"], report.per_test
    settings = report.summary.get("settings", {})
    absent = [key for key in ("methods", "ks", "seed") if key not in settings]
    if absent or not settings["ks"]:
        raise ValueError(f"{report.out_dir / 'summary.json'}: settings without {', '.join(absent) or 'ks'}")
    missing = sorted({f"{m}@{k}" for m in ("sag", "lag") for k in settings["ks"]} - set(per_test.columns))
    if missing:
        raise ValueError(f"{rows}: no column {', '.join(missing)} (the ks in summary.json)")
    if per_test.duplicated(["test_id", "method"]).any():
        raise ValueError(f"{rows}: a test appears twice for one method")
    values = [f"{m}@{k}" for m in ("sag", "lag") for k in settings["ks"]]
    cut = per_test[values].isna().any(axis=1)
    if cut.any():
        raise ValueError(f"{rows}: {int(cut.sum())} row(s) without their Sag/Lag values (first: "
                         f"{per_test.test_id[cut].iloc[0]}, {per_test.method[cut].iloc[0]}); the file is "
                         "incomplete: run the evaluation again")
    tests = per_test.groupby("method", sort=False).test_id.agg(frozenset)
    short = [m for m, t in tests.items() if t != frozenset(per_test.test_id)]
    if short:
        raise ValueError(f"{rows}: {', '.join(short)} lack rows of tests that other methods have "
                         "(the file is incomplete); run the evaluation again")


def load_report(out_dir: str | Path) -> EvalReport:
    """Read back a report written by :func:`run_evaluation` (what the app's Evaluate page shows)."""
    out = Path(out_dir)
    path = out / "summary.json"
    if not path.exists():
        raise FileNotFoundError(f"{out}: no summary.json; run `python -m core evaluate` first")
    frames = {}
    for attr, name in FILES.items():
        try:
            frames[attr] = pd.read_csv(out / name, index_col=0 if attr in INDEXED else None)
        except (pd.errors.EmptyDataError, FileNotFoundError):  # empty, or a report of an earlier version
            frames[attr] = pd.DataFrame()
        except (pd.errors.ParserError, UnicodeDecodeError) as err:
            raise ValueError(f"{out / name}: unreadable ({err})") from None
    try:
        summary = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err}); run the evaluation again") from None
    if not isinstance(summary, dict):
        raise ValueError(f"{path}: not a JSON object; run the evaluation again")
    return EvalReport(out, summary, **frames)


