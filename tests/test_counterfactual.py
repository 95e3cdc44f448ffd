"""LDS and span-LDS in an evaluation run: which retrains check which method, caching, the report."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core.__main__ import main
from core.backend import Backend
from core.evaluate import EvalSettings, load_report, run_evaluation
from core.evaluate.counterfactual import kind_of
from core.lds import CacheRetrainer, LdsSettings
from core.registry import METHODS

QUIET = dict(progress=False, log=lambda _: None)


@pytest.fixture
def workspace(tiny_workspace, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_workspace, tmp_path / "ws", ignore=shutil.ignore_patterns("store.sqlite*")))


def test_each_method_is_checked_against_the_retrains_its_sides_call_for():
    assert kind_of(METHODS.resolve("TracIn")) == ("remove", "loss")
    assert kind_of(METHODS.resolve("TracIn+")) == ("mask", "loss")
    assert kind_of(METHODS.resolve("IF++")) == ("mask", "span")
    assert kind_of(METHODS.resolve("TRAK++")) == ("mask", "span")


def test_lds_in_a_run_is_cached_per_subset_and_reported(workspace, tmp_path, monkeypatch):
    settings = EvalSettings(methods=("TracIn", "TracIn++", "GroundTruth"), ks=(3,), kmax=3, test_limit=5, ral=(),
                            faithfulness_runs=0, lds=LdsSettings(subsets=3, alpha=0.5, seed=0))
    calls: list[str] = []
    real = CacheRetrainer.__call__
    monkeypatch.setattr(CacheRetrainer, "__call__", lambda self, subset, i: calls.append(i) or real(self, subset, i))
    report = run_evaluation(Backend(workspace, device="cpu"), settings, tmp_path / "out", **QUIET)
    assert sorted(calls) == ["mask"] * 3 + ["remove"] * 3  # one set of retrains per intervention, shared
    lds = report.lds
    assert list(lds.index) == ["TracIn", "TracIn++", "GroundTruth"]
    assert lds.loc["TracIn", "intervention"] == "remove" and lds.loc["TracIn++", "output"] == "span"
    per_test = report.lds_per_test
    assert len(per_test) == 3 * 5 and (per_test.lds.between(-1, 1) | per_test.lds.isna()).all()
    finite = per_test[per_test.method == "TracIn"].lds.dropna()
    assert lds.loc["TracIn", "lds"] == pytest.approx(finite.mean()) and lds.loc["TracIn", "low"] <= lds.loc["TracIn", "lds"]
    assert (lds.low_subsets <= lds.high_subsets).all()  # the interval with the subsets resampled too
    pairs = report.lds_pairs
    assert set(zip(pairs.a, pairs.b)) == {("TracIn++", "GroundTruth")}  # only methods checked the same way
    assert pairs.p_subsets.between(0, 1).all() and (pairs.p_holm == pairs.p_subsets).all()  # a family of one pair
    assert (pairs.significant == (pairs.p_holm < 0.05)).all()
    text = (tmp_path / "out" / "report.md").read_text()
    assert "## LDS and span-LDS" in text and "[95% CI, tests and subsets]" in text
    calls.clear()
    again = run_evaluation(Backend(workspace, device="cpu"), settings, tmp_path / "out", **QUIET)
    assert calls == []  # every subset's retrain is served from the store
    np.testing.assert_allclose(again.lds_per_test.lds, per_test.lds)
    assert load_report(tmp_path / "out").lds.loc["TracIn", "tests"] == 5


def test_cli_lds_options(workspace, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["evaluate", "--workspace", str(workspace), "--methods", "TracIn", "--k", "3", "--kmax", "3",
                 "--test-limit", "3", "--ral", "none", "--faithfulness-runs", "0", "--lds", "--lds-subsets", "2",
                 "--quiet", "--device", "cpu", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "LDS and span-LDS (x100" in printed and (out / "lds.csv").exists()
    assert not (out / "lds-train").exists()  # the retrains' work folders go once every retrain has finished
    line = next(row for row in printed.splitlines() if row.startswith("TracIn "))
    lds = pd.read_csv(out / "lds.csv", index_col=0).loc["TracIn", "lds"]
    assert f"{100 * lds:.1f}" in line.split(), (line, lds)  # x100, as the report and the page show it
    assert main(["evaluate", "--workspace", str(workspace), "--lds", "--lds-subsets", "1"]) == 2
    assert "--lds-subsets: must be at least 2" in capsys.readouterr().err


def test_the_app_shows_lds_where_users_look(workspace, monkeypatch):
    """Evaluate lists LDS with intervals; Explore puts a method's LDS beside its gauges."""
    from streamlit.testing.v1 import AppTest

    settings = EvalSettings(methods=("TracIn++", "GroundTruth"), ks=(3,), kmax=3, test_limit=4, ral=(),
                            faithfulness_runs=0, lds=LdsSettings(subsets=2, alpha=0.5, seed=0))
    backend = Backend(workspace, device="cpu")
    report = run_evaluation(backend, settings, workspace / "evaluation", **QUIET)  # where the app looks
    monkeypatch.setenv("SPANLENS_WORKSPACES", str(workspace.parent))
    app = str(Path(__file__).resolve().parents[1] / "app.py")

    def run(page: str, **params: str) -> AppTest:
        at = AppTest.from_file(app, default_timeout=180)
        at.query_params.update({"workspace": workspace.name, **params})
        at.switch_page(page).run()
        assert not at.exception, [e.value for e in at.exception]
        return at

    at = run("pages/evaluate.py")
    shown = next(d.value for d in at.dataframe if "LDS" in d.value.columns)
    assert shown.loc["TracIn++", "LDS"] == pytest.approx(100 * report.lds.loc["TracIn++", "lds"])
    at.selectbox(key="pair_lds_a").set_value("GroundTruth").run()
    pair = next(d.value for d in at.dataframe if list(d.value.index) == ["LDS"])  # stored as TracIn++ - GroundTruth
    stored = report.lds_pairs.iloc[0]
    assert (stored.a, stored.b) == ("TracIn++", "GroundTruth")
    assert pair.loc["LDS", "a - b"] == pytest.approx(-100 * stored.difference)
    assert pair.loc["LDS", "CI low, subsets too"] == pytest.approx(-100 * stored.high_subsets)
    assert pair.loc["LDS", "holds"] == stored.significant
    at = run("pages/explore.py", test=backend.instances("test")[0].id, methods="TracIn++,TracIn", k="3")
    notes = [c.value for c in at.caption if ") on this workspace:" in c.value]
    assert len(notes) == 1 and notes[0].startswith(
        f"LDS (mask / span) on this workspace: {100 * report.lds.loc['TracIn++', 'lds']:.1f}")


def test_reports_combine_across_seeds(workspace, tmp_path):
    from core.evaluate.combine import combine_reports, table3_across

    settings = EvalSettings(methods=("TracIn", "TracIn++"), ks=(3,), kmax=3, test_limit=4, ral=(), faithfulness_runs=0)
    backend = Backend(workspace, device="cpu")
    first = run_evaluation(backend, settings, tmp_path / "a", **QUIET)
    run_evaluation(backend, settings, tmp_path / "b", **QUIET)
    # one classifier twice would make every difference look certain: refused
    with pytest.raises(ValueError, match=r"/a is given twice"):
        combine_reports([tmp_path / "a", tmp_path / "a"], tmp_path / "same")
    with pytest.raises(ValueError, match=r"come from the same classifier \(the same workspace fingerprint"):
        combine_reports([tmp_path / "a", tmp_path / "b"], tmp_path / "same")
    _other_fingerprint(tmp_path / "b")  # as another workspace prepared with the same seed would be
    with pytest.raises(ValueError, match=r"come from the same classifier"):
        combine_reports([tmp_path / "a", tmp_path / "b"], tmp_path / "same")
    assert not (tmp_path / "same").exists()
    # two identical seeds give each report's own paired differences (the statistics alone)
    _, own_pairs, _ = table3_across([load_report(tmp_path / "a"), load_report(tmp_path / "b")], seed=0)
    own = first.table3_pairs.set_index(["metric", "a", "b"])
    for row in own_pairs.itertuples():
        assert row.difference == pytest.approx(own.loc[(row.metric, row.a, row.b), "difference"])
    # a second seed that differs in TracIn's per-test rows only
    rows = pd.read_csv(tmp_path / "b" / "per_test.csv")
    rows.loc[rows.method == "TracIn", "sag@3"] += 0.01
    rows.to_csv(tmp_path / "b" / "per_test.csv", index=False)
    summary = combine_reports([tmp_path / "a", tmp_path / "b"], tmp_path / "both")

    table = pd.read_csv(tmp_path / "both" / "combined_table3.csv").set_index(["row", "column"])
    cell = table.loc[("Lag@3", "TracIn++")]
    assert summary["n"] == 2 and cell["mean"] == pytest.approx(first.table3.loc["Lag@3", "TracIn++"]) and cell.sd == 0
    markdown = (tmp_path / "both" / "combined.md").read_text()
    assert "± 0.00" in markdown and "(bootstrap alone " in markdown
    # the same tests in both: crossed draws
    assert summary["design"] == "crossed"
    cells = pd.read_csv(tmp_path / "both" / "combined_table3_ci.csv").set_index(["metric", "method"])
    assert cells.loc[("Lag@3", "TracIn++"), "mean"] == pytest.approx(first.table3.loc["Lag@3", "TracIn++"])
    assert cells.loc[("Lag@3", "TracIn++"), "sd_seeds"] == 0 and (cells.low <= cells["mean"] + 1e-9).all()
    assert cells.loc[("Sag@3", "TracIn"), "mean"] == pytest.approx(first.table3.loc["Sag@3", "TracIn"] + 0.5)
    pairs = pd.read_csv(tmp_path / "both" / "combined_pairs.csv").set_index(["metric", "a", "b"])
    assert pairs.loc[("Sag@3", "TracIn", "TracIn++"), "difference"] == pytest.approx(
        own.loc[("Sag@3", "TracIn", "TracIn++"), "difference"] + 0.5)
    assert pairs.loc[("Lag@3", "TracIn", "TracIn++"), "difference"] == pytest.approx(
        own.loc[("Lag@3", "TracIn", "TracIn++"), "difference"])
    assert pd.read_csv(tmp_path / "both" / "combined_table4.csv").empty  # no faithfulness runs
    # other tests in one report: nested draws, same means
    nested = tmp_path / "renamed"
    shutil.copytree(tmp_path / "b", nested)
    rows = pd.read_csv(nested / "per_test.csv")
    rows.assign(test_id=rows.test_id + "-other").to_csv(nested / "per_test.csv", index=False)
    assert combine_reports([tmp_path / "a", nested], tmp_path / "nested")["design"] == "nested"
    again = pd.read_csv(tmp_path / "nested" / "combined_table3_ci.csv").set_index(["metric", "method"])
    assert np.allclose(again["mean"], cells["mean"])
    rows.iloc[[0, 0]].to_csv(nested / "per_test.csv", index=False)
    with pytest.raises(ValueError, match=r"renamed/per_test.csv: a test appears twice"):
        combine_reports([tmp_path / "a", nested], tmp_path / "twice")
    (nested / "per_test.csv").unlink()  # a report of an earlier version: the means only
    assert combine_reports([tmp_path / "a", nested], tmp_path / "means")["n"] == 2
    assert pd.read_csv(tmp_path / "means" / "combined_table3_ci.csv").empty
    run_evaluation(backend, EvalSettings(methods=("TracIn",), ks=(3,), kmax=3, test_limit=3, ral=(),
                                         faithfulness_runs=0), tmp_path / "c", **QUIET)
    with pytest.raises(ValueError, match=r"differ in methods, test_limit \(\S+/c lacks TracIn\+\+, against \S+/a\)"):
        combine_reports([tmp_path / "a", tmp_path / "c"], tmp_path / "bad")


def _other_fingerprint(report: Path) -> None:
    """Give a report another workspace fingerprint (a stand-in for another classifier's)."""
    summary = json.loads((report / "summary.json").read_text())
    (report / "summary.json").write_text(json.dumps(summary | {"fingerprint": "another classifier"}))


def test_combine_names_what_is_wrong_with_a_report(workspace, tmp_path):
    """A report cut short, a damaged summary or an --out that is a file: refused, naming the file,
    before anything is written."""
    from core.evaluate.combine import combine_reports

    settings = EvalSettings(methods=("TracIn", "TracIn++"), ks=(3,), kmax=3, test_limit=4, ral=(), faithfulness_runs=0)
    backend = Backend(workspace, device="cpu")
    for name in ("a", "b"):
        run_evaluation(backend, settings, tmp_path / name, **QUIET)
    rows = pd.read_csv(tmp_path / "b" / "per_test.csv")
    rows.loc[rows.method == "TracIn", "sag@3"] += 0.01
    rows.to_csv(tmp_path / "b" / "per_test.csv", index=False)
    reports = [tmp_path / "a", tmp_path / "b"]
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"/file: exists and is not a folder"):
        combine_reports(reports, tmp_path / "file")
    text = (tmp_path / "b" / "per_test.csv").read_text()
    (tmp_path / "b" / "per_test.csv").write_text(text[: text.rindex("\n", 0, len(text) - 1) + 1])  # last row lost
    with pytest.raises(ValueError, match=r"b/per_test.csv: TracIn\+* lack rows of tests that other methods have"):
        combine_reports(reports, tmp_path / "out")
    rows.assign(**{"lag@3": rows["lag@3"].where(rows.index < len(rows) - 1)}).to_csv(tmp_path / "b" / "per_test.csv",
                                                                                  index=False)  # a row cut mid-way
    with pytest.raises(ValueError, match=r"b/per_test.csv: 1 row\(s\) without their Sag/Lag values"):
        combine_reports(reports, tmp_path / "out")
    rows.drop(columns="sag@3").to_csv(tmp_path / "b" / "per_test.csv", index=False)
    with pytest.raises(ValueError, match=r"b/per_test.csv: no column sag@3"):
        combine_reports(reports, tmp_path / "out")
    summary = tmp_path / "b" / "summary.json"
    summary.write_text(summary.read_text()[:40])
    with pytest.raises(ValueError, match=r"b/summary.json: not valid JSON"):
        combine_reports(reports, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _seed_report(values: dict[str, list[float]], runs: int = 1):
    """A stand-in report of one seed: per-test Sag@3/Lag@3 and faithfulness rows of each method."""
    from types import SimpleNamespace

    rows = [{"test_id": f"t{i}", "method": m, "sag@3": v, "lag@3": v} for m, vs in values.items()
            for i, v in enumerate(vs)]
    faith = pd.DataFrame([{"run": r, "test_id": f"t{i}", "method": m, "spearman": v} for r in range(runs)
                          for m, vs in values.items() for i, v in enumerate(vs)])
    table4 = faith.groupby("method").spearman.mean().mul(100).to_frame("mean")
    return SimpleNamespace(per_test=pd.DataFrame(rows), faithfulness=faith, table4=table4,
                           summary={"settings": {"ks": [3], "methods": list(values)}})


def test_a_pair_holds_across_seeds_only_when_the_seeds_agree():
    """Seed differences of 0.1, 0.2 and 5 points with no test noise: the two-way bootstrap alone
    would call it significant (its seed level cannot reach 0); the t-test over the seeds (p 0.39)
    does not. Three seeds that agree (5 +- 0.1) hold."""
    from core.evaluate.combine import table3_across

    base = np.linspace(0.2, 0.8, 20)
    def reports(gaps):
        return [_seed_report({"A": list(base + gap / 100), "B": list(base)}) for gap in gaps]

    _, spread, crossed = table3_across(reports([0.1, 0.2, 5.0]), seed=0)
    row = spread.set_index("metric").loc["Sag@3"]
    assert crossed and row.p_value < 0.01 and row.p_seeds == pytest.approx(0.39, abs=0.01) and not row.significant
    cells, agree, _ = table3_across(reports([4.9, 5.0, 5.1]), seed=0)
    assert agree.significant.all() and agree.difference.tolist() == pytest.approx([5.0, 5.0])
    assert cells.set_index(["metric", "method"]).loc[("Lag@3", "A"), "seeds"] == 3


def test_table4_combines_over_seeds_with_an_interval():
    from core.evaluate.combine import table4_across

    def seed(values, runs=1):
        return _seed_report({"TracIn++": values, "GroundTruth": [1.0] * len(values)}, runs)

    table = table4_across([seed([0.5, 0.7, 0.9]), seed([0.6, 0.8, 1.0]), seed([0.2, 0.4, 0.6])], seed=0)
    row = table.set_index("method").loc["TracIn++"]
    assert row["mean"] == pytest.approx(100 * np.mean([0.7, 0.8, 0.4]))
    assert row.sd_seeds == pytest.approx(100 * np.std([0.7, 0.8, 0.4], ddof=1)) and row.seeds == 3
    assert row.low < row["mean"] < row.high and row.per_seed == "70;80;40"
    assert table.set_index("method").loc["GroundTruth", ["mean", "low", "high"]].tolist() == [100.0] * 3
    runs = table4_across([seed([0.5, 0.7], runs=2), seed([0.1, 0.3], runs=2)], seed=0).set_index("method")
    assert runs.loc["TracIn++", "mean"] == pytest.approx(40.0) and np.isnan(runs.loc["TracIn++", "low"])
    empty = _seed_report({"TracIn++": [0.5]})
    empty.faithfulness = pd.DataFrame()
    assert table4_across([seed([0.5]), empty], seed=0).empty


def test_reports_with_other_lds_settings_do_not_combine():
    from core.evaluate.combine import differing

    lds = {"subsets": 50, "alpha": 0.5, "seed": 0}
    base = {"methods": ["TracIn"], "ray": None}
    assert differing([base | {"lds": lds}, base | {"lds": None}, base | {"lds": lds, "ray": {"cpus": 2}}]) == []
    assert differing([base | {"lds": lds}, base | {"lds": None}, base | {"lds": lds | {"alpha": 0.9}}]) == []  # LDS left out
    assert differing([base | {"lds": lds}, base | {"lds": lds | {"alpha": 0.9}}]) == ["lds"]
    assert differing([base | {"lds": lds}, {"methods": ["IF"], "lds": lds}]) == ["methods"]


def test_lds_does_not_depend_on_the_paper_signs(workspace, tmp_path):
    """LDS reads scores in SpanLens' signs: --paper-signs (which flips IF++ and the ++ forms in
    table 3) leaves every method's LDS as it is."""
    base = dict(methods=("TracIn++", "IF++"), ks=(3,), kmax=3, test_limit=4, ral=(), faithfulness_runs=0,
                lds=LdsSettings(subsets=3, alpha=0.5, seed=0))
    ours = run_evaluation(Backend(workspace, device="cpu"), EvalSettings(**base), tmp_path / "ours", **QUIET)
    paper = run_evaluation(Backend(workspace, device="cpu"), EvalSettings(**base, paper_signs=True), tmp_path / "paper",
                           **QUIET)
    np.testing.assert_allclose(paper.lds_per_test.lds, ours.lds_per_test.lds, atol=1e-12)


def test_the_retrains_key_follows_what_a_retrain_depends_on(workspace, tmp_path, monkeypatch):
    """Retrains are keyed by the spans and model stages, the training settings and the tests, not
    by the index's fingerprint: another sketch (or another models stage) reuses them."""
    from core.evaluate.counterfactual import retrainer_for

    backend = Backend(workspace, device="cpu")
    key = retrainer_for(backend, tmp_path)[2]
    monkeypatch.setattr(Backend, "fingerprint", property(lambda self: "an index at another --proj-dim"))
    assert retrainer_for(backend, tmp_path)[2] == key
    backend.manifest.stages["model"]["fingerprint"] = "another trained classifier"
    assert retrainer_for(backend, tmp_path)[2] != key
