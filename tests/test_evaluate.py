"""Evaluation runs on the tiny workspace: tables, faithfulness, Ral, resuming, the command line."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from core import metrics
from core.__main__ import main
from core.backend import Backend
from core.engine import Engine
from core.evaluate import (
    EvalSettings,
    load_report,
    retrain_accuracy,
    run_evaluation,
    select_tests,
)
from core.index import IndexSettings
from core.model import HiddenCache, load_backbone, split_model
from core.training import TrainConfig

EXACT = IndexSettings(dim=None, batch_size=8)  # how the tiny workspace's index was built
QUIET = dict(progress=False, log=lambda _: None)


@pytest.fixture
def workspace(tiny_workspace, tmp_path) -> Path:
    """A private copy of the tiny workspace (its store gets written), without the shared store."""
    return Path(shutil.copytree(tiny_workspace, tmp_path / "ws", ignore=shutil.ignore_patterns("store.sqlite*")))


def _mark(backend: Backend, test_id: str, status: str, corrected=None) -> None:
    span = backend.by_id[test_id].span
    backend.store.annotate(test_id, status=status, annotator="tester", original=(span.start, span.end, "heuristic"),
                           corrected=corrected, fingerprint="")


def test_tables_faithfulness_and_selection(workspace, tmp_path):
    backend = Backend(workspace, device="cpu", index_settings=EXACT)
    wrong = backend.instances("test")[0].id
    _mark(backend, wrong, "wrong")
    settings = EvalSettings(methods=("IF++", "TracIn++", "GroundTruth"), ks=(5, 10), kmax=12,
                            test_limit=None, ral=(), faithfulness_runs=2, batch=8)
    events: list[tuple[str, float]] = []
    report = run_evaluation(backend, settings, tmp_path / "out", **QUIET, on_progress=lambda *e: events.append(e))
    fractions = [f for _, f in events]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    n_tests = len(backend.instances("test")) - 1
    assert events[0][0].startswith("Sag/Lag: 8/") and f"Sag/Lag: {n_tests}/{n_tests} tests" in [d for d, _ in events]
    assert any(d.startswith("faithfulness run 2:") for d, _ in events)
    sel = report.summary["selection"]
    assert wrong not in sel["ids"] and sel["excluded_wrong"] == 1 and sel["wrong_ids"] == [wrong]
    assert sel["n"] == len(backend.instances("test")) - 1
    # table 3 = means of the per-test values; curve ends = Sag/Lag at K
    for metric in ("sag", "lag"):
        for k in (5, 10):
            cell = report.table3.loc[f"{metric.capitalize()}@{k}", "TracIn++"]
            rows = report.per_test[report.per_test.method == "TracIn++"]
            assert cell == pytest.approx(100 * rows[f"{metric}@{k}"].mean())
            curve = report.per_test_curves
            at_k = curve[(curve.method == "TracIn++") & (curve.k == k)].set_index("test_id")[metric]
            np.testing.assert_allclose(at_k.loc[rows.test_id].to_numpy(), rows[f"{metric}@{k}"].to_numpy(), atol=1e-6)
    lag_random = report.table3.loc["Lag@5", "random"]
    labels = [r.label for r in backend.instances("train")]
    tests = [backend.by_id[i].label for i in sel["ids"]]
    assert lag_random == pytest.approx(100 * np.mean([labels.count(t) / len(labels) for t in tests]))
    # faithfulness: GroundTruth against itself is 1; deterministic methods do not vary across runs
    # that share their test instances (here every run takes all eligible tests)
    faith = report.faithfulness
    np.testing.assert_allclose(faith[faith.method == "GroundTruth"].spearman, 1.0)
    t4 = report.table4
    assert t4.loc["GroundTruth", "mean"] == pytest.approx(100.0)
    assert list(t4.index[:1]) == ["Control"] and t4.loc["Control", "runs"] == 2
    for m in ("Control", "IF++", "GroundTruth"):
        assert t4.loc[m, "var_runs"] == pytest.approx(0.0, abs=1e-9)
    assert set(faith.run) == {0, 1}
    computed = report.summary["timings"]["computed"]  # what the results cost, from their rows
    assert computed["faithfulness_seconds"] == round(float(faith[faith.run == 1].seconds.sum()), 1)
    assert 0 < computed["faithfulness_seconds"] <= report.summary["timings"]["this_run"]["faithfulness_run1_seconds"] + 0.1
    assert computed["sag_lag_scoring_seconds"] > 0


def test_faithfulness_runs_draw_new_tests(workspace, tmp_path):
    backend = Backend(workspace, device="cpu", index_settings=EXACT)
    assert select_tests(backend, 6, 0).ids == select_tests(backend, 6, 0).ids
    assert select_tests(backend, 6, 0).ids != select_tests(backend, 6, 7919).ids


def test_resume_skips_finished_tests(workspace, tmp_path, monkeypatch):
    calls: list[tuple[str, list[str]]] = []
    original = Engine.scores_many
    stop_at: list[int | None] = [2]

    def counting(self, tests, specs, settings):
        calls.append(([s.name for s in specs], [t.id for t in tests]))
        if stop_at[0] is not None and len(calls) == stop_at[0]:
            raise KeyboardInterrupt
        return original(self, tests, specs, settings)

    monkeypatch.setattr(Engine, "scores_many", counting)
    settings = EvalSettings(methods=("TracIn++",), ks=(5,), kmax=8, test_limit=6, ral=(), faithfulness_runs=1, batch=2)
    backend = Backend(workspace, device="cpu", index_settings=EXACT)
    with pytest.raises(KeyboardInterrupt):
        run_evaluation(backend, settings, tmp_path / "out", **QUIET)
    assert len(calls) == 2 and calls[0][0] == ["TracIn++", "GroundTruth", "Control"]  # batch 1, then interrupted
    first = set(calls[0][1])
    calls.clear()
    stop_at[0] = None
    backend = Backend(workspace, device="cpu", index_settings=EXACT)
    report = run_evaluation(backend, settings, tmp_path / "out", **QUIET)
    assert len(calls) == 2  # the two batches left, each scoring the three methods together
    assert not first & {i for _, ids in calls for i in ids}
    assert len(report.per_test) == 3 * 6
    # all done: nothing recomputed; a corrected test span recomputes that test only
    calls.clear()
    run_evaluation(backend, settings, tmp_path / "out", **QUIET)
    assert calls == []
    fixed = sorted(first)[0]
    span = backend.by_id[fixed].span
    _mark(backend, fixed, "fix", corrected=(span.start, span.end + 1))
    run_evaluation(backend, settings, tmp_path / "out", **QUIET)
    assert {i for _, ids in calls for i in ids} == {fixed}


def test_new_damping_recomputes_the_if_family_only(workspace, tmp_path, monkeypatch):
    """A changed lambda recomputes IF++ (and the GroundTruth it is compared with), never variants."""
    import dataclasses

    import core.evaluate.faithfulness as faithfulness

    settings = EvalSettings(methods=("TracIn++", "IF++"), ks=(5,), kmax=8, test_limit=4, ral=(), faithfulness_runs=2,
                            batch=4, damping=1e-4)
    backend = Backend(workspace, device="cpu", index_settings=EXACT)
    before = run_evaluation(backend, settings, tmp_path / "out", **QUIET).table4
    calls: list[str] = []
    variants: list[int] = []
    scores, make_variants = Engine.scores_many, faithfulness.variants_like
    monkeypatch.setattr(Engine, "scores_many", lambda self, tests, specs, settings: calls.extend(s.name for s in specs)
                        or scores(self, tests, specs, settings))
    monkeypatch.setattr(faithfulness, "variants_like", lambda *a, **kw: variants.append(1) or make_variants(*a, **kw))
    after = run_evaluation(backend, dataclasses.replace(settings, damping=2.5), tmp_path / "out", **QUIET).table4
    assert set(calls) == {"IF++", "GroundTruth"} and not variants
    assert after.loc["TracIn++", "mean"] == before.loc["TracIn++", "mean"]
    assert after.loc["IF++", "runs"] == 2


def test_ral_removing_the_support_lowers_accuracy(tiny_backbone, tmp_path):
    """Three separable classes; removing every class-2 training instance (the top 20 % of a
    ranking that favours them) must cost the class-2 test instances, a random 20 % must not."""
    model, _ = load_backbone(str(tiny_backbone), ["a", "b", "c"], 0)
    split = split_model(model, 1)
    init = split.state()
    g = torch.Generator().manual_seed(0)
    directions = torch.linalg.qr(torch.randn(16, 3, generator=g))[0].T * 4

    def data(counts):
        states = [0.3 * torch.randn(4, 16, generator=g) + directions[c] for c, n in enumerate(counts) for _ in range(n)]
        return HiddenCache(states), torch.tensor([c for c, n in enumerate(counts) for _ in range(n)])

    (train, y), dev, test = data([40, 40, 20]), data([5, 5, 5]), data([10, 10, 10])
    cfg = TrainConfig(epochs=3, batch_size=16, lr=1e-2, seed=0, checkpoints=1)

    def acc(removed, name):
        keep = np.setdiff1d(np.arange(len(y)), removed)
        return retrain_accuracy(split, init, train, y, keep, dev, test, cfg, tmp_path / name)

    scores = (y == 2).double().repeat(3, 1) + 0.01 * torch.rand(3, len(y), generator=g, dtype=torch.double)
    removed = metrics.top_removal(metrics.combined_ranking(scores), 20)
    assert set(y[removed].tolist()) == {2} and len(removed) == 20
    base = acc(np.array([], dtype=int), "base")
    assert base >= 0.9
    assert base - acc(removed, "support") >= 0.25  # the class-2 third of the test set is lost
    assert base - acc(metrics.random_removal(len(y), 20, seed=0), "random") <= 0.1


def test_ral_in_a_run(workspace, tmp_path):
    backend = Backend(workspace, device="cpu", index_settings=EXACT)
    settings = EvalSettings(methods=("TracIn++",), ks=(5,), kmax=5, test_limit=4, ral=(50,), faithfulness_runs=0)
    events: list[tuple[str, float]] = []
    report = run_evaluation(backend, settings, tmp_path / "out", **QUIET, on_progress=lambda *e: events.append(e))
    assert events[-1][0] == "Ral retrains: 3/3 retrains" and events[-1][1] == pytest.approx(1.0)
    assert events[-2][1] == pytest.approx(0.5 + 0.5 * 2 / 3)
    ral = report.ral.set_index("method")
    assert set(ral.index) == {"unchanged", "TracIn++", "random"}
    n = report.summary["approximations"]["n_train"]
    assert ral.loc["TracIn++", "removed"] == ral.loc["random", "removed"] == metrics.removal_count(n, 50)
    # the retrain on the unchanged set reproduces the workspace's training (same start, settings, seed)
    assert ral.loc["unchanged", "accuracy"] == pytest.approx(ral.loc["unchanged", "theta_accuracy"])
    assert report.table3.loc["Ral -50%", "TracIn++"] == pytest.approx(100 * ral.loc["TracIn++", "ral"])
    assert not (tmp_path / "out" / "ral-train").exists()
    assert "Ral -50%" in (tmp_path / "out" / "report.md").read_text()
    again = run_evaluation(backend, settings, tmp_path / "out", **QUIET)  # cached: no retrain
    assert "ral_seconds" not in again.summary["timings"]["this_run"]  # nothing computed, and it says so
    assert again.summary["timings"]["computed"] == report.summary["timings"]["computed"]
    assert report.summary["timings"]["computed"]["ral_retrain_seconds"] == round(float(report.ral.seconds.sum()), 1)
    rounding = 0.05 * (len(report.ral.retrain.unique()) + 1)  # each retrain's seconds and the total are rounded to 0.1
    assert 0 < report.summary["timings"]["computed"]["ral_retrain_seconds"] <= report.summary["timings"]["this_run"]["ral_seconds"] + rounding
    assert again.ral.accuracy.tolist() == report.ral.accuracy.tolist()


def test_equal_removals_share_one_retrain(workspace, tmp_path, monkeypatch):
    """Two methods that remove the same training instances cost one retrain, counted once."""
    backend = Backend(workspace, device="cpu", index_settings=EXACT)
    monkeypatch.setattr(metrics, "combined_ranking", lambda scores: np.arange(scores.shape[1]))  # one ranking for all
    settings = EvalSettings(methods=("TracIn++", "TracIn"), ks=(5,), kmax=5, test_limit=4, ral=(50,), faithfulness_runs=0)
    events: list[tuple[str, float]] = []
    report = run_evaluation(backend, settings, tmp_path / "out", **QUIET, on_progress=lambda *e: events.append(e))
    assert events[-1][0] == "Ral retrains: 3/3 retrains"  # unchanged, the shared removal, random
    ral = report.ral.set_index("method")
    assert ral.loc["TracIn++", "retrain"] == ral.loc["TracIn", "retrain"] != ral.loc["random", "retrain"]
    assert ral.loc["TracIn++", "accuracy"] == ral.loc["TracIn", "accuracy"]
    assert report.summary["timings"]["computed"]["ral_retrain_seconds"] == round(float(report.ral.seconds.sum() - ral.loc["TracIn", "seconds"]), 1)


def test_cli_writes_report(workspace, tmp_path, capsys):
    out = tmp_path / "report"
    out.mkdir()
    (out / "lds.csv").write_text(",lds\nTracIn,0.5\n")  # an earlier evaluation's, with --lds, into the same folder
    rc = main(["evaluate", "--workspace", str(workspace), "--methods", "TracIn++,TracIn", "--k", "5,10", "--kmax", "12",
               "--test-limit", "6", "--out", str(out), "--ral", "none", "--faithfulness-runs", "1", "--quiet",
               "--device", "cpu"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "Table 3" in printed and "Table 4" in printed
    for name in ("per_test.csv", "per_test_curves.csv", "k_curves.csv", "faithfulness.csv", "table3.csv",
                 "table4.csv", "summary.json", "report.md", "k_curves.html", "k_curves.png"):
        assert (out / name).stat().st_size > 0, name
    for name in ("ral.csv", "lds.csv", "lds_per_test.csv", "lds_pairs.csv"):  # not computed: no file, the stale one gone
        assert not (out / name).exists(), name
    report = load_report(out)
    assert report.ral.empty and report.lds.empty and list(report.table3.columns) == ["TracIn++", "TracIn", "random"]
    md = (out / "report.md").read_text()
    assert "78.03" in md and "Zhang et al. 2021, table 3" in md and "60.14" in md  # the paper's numbers
    ours = report.table3.loc["Lag@10", "TracIn++"]
    ci = report.table3_ci.set_index(["metric", "method"]).loc[("Lag@10", "TracIn++")]
    assert ci.low <= ours <= ci.high and ci.value == pytest.approx(ours)
    assert f"{ours:.2f} [{ci.low:.2f}, {ci.high:.2f}] / 78.03" in md  # ours with its interval, then the paper's
    assert f"{report.table3.loc['Lag@10', 'TracIn']:.2f} [" in md and "/ –" in md
    # the paper's literal sign for TracIn++ (opponents first) beside the paper's number
    paper = report.paper_sign.set_index(["metric", "method"]).loc[("Lag@10", "TracIn++")]
    assert f"{paper.value:.2f} [{paper.low:.2f}, {paper.high:.2f}] / 78.03" in md
    # the paired difference of the two methods on each cell, over the same tests
    pairs = report.table3_pairs.set_index("metric")
    assert list(pairs.index) == ["Sag@5", "Sag@10", "Lag@5", "Lag@10"] and set(zip(pairs.a, pairs.b)) == {("TracIn++", "TracIn")}
    wide = report.per_test.pivot(index="test_id", columns="method", values="lag@10")
    lag = pairs.loc["Lag@10"]
    assert lag.difference == pytest.approx(100 * (wide["TracIn++"] - wide["TracIn"]).mean())
    assert lag.low <= lag.difference <= lag.high and lag.p_holm == lag.p_value and 0 < lag.p_value <= 1 and lag.n == 6
    assert "after Holm: Sag@5 " in md and f"Lag@10 {int(lag.significant)} of 1" in md
    html = (out / "k_curves.html").read_text()
    assert "plotly" in html.lower() and "Sag@K" in html and "Lag@K" in html
    # a report of an earlier version, without the interval tables, gains them from its per-test rows
    derived = ("table3_ci.csv", "table3_pairs.csv", "paper_sign.csv")
    before = {name: pd.read_csv(out / name) for name in derived}
    for name in derived:
        (out / name).unlink()
    assert load_report(out).table3_pairs.empty
    capsys.readouterr()
    assert main(["intervals", "--report", str(out)]) == 0
    assert f"Lag@10 {int(lag.significant)} of 1" in capsys.readouterr().out
    for name in derived:
        pd.testing.assert_frame_equal(pd.read_csv(out / name), before[name])


def test_intervals_name_the_file_they_cannot_use(tmp_path, capsys):
    """`intervals` on a folder without per-test rows, or whose rows lack a K of its settings,
    answers in one line naming the file, and writes nothing."""
    def answer() -> str:
        assert main(["intervals", "--report", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        return err

    settings = {"methods": ["A", "B"], "ks": [5, 10], "seed": 0}
    (tmp_path / "summary.json").write_text(json.dumps({"settings": settings}))
    assert f"{tmp_path / 'per_test.csv'}: no per-test rows" in answer()
    rows = pd.DataFrame({"test_id": ["t1", "t1"], "method": ["A", "B"], "sag@5": [0.1, 0.2], "lag@5": [1.0, 0.0]})
    rows.to_csv(tmp_path / "per_test.csv", index=False)
    assert "per_test.csv: no column lag@10, sag@10" in answer()
    (tmp_path / "summary.json").write_text(json.dumps({"settings": {"methods": ["A", "B"], "ks": [5]}}))
    assert "summary.json: settings without seed" in answer()
    (tmp_path / "summary.json").write_text(json.dumps({"settings": settings | {"ks": [5]}}))
    pd.concat([rows, rows]).to_csv(tmp_path / "per_test.csv", index=False)
    assert "per_test.csv: a test appears twice for one method" in answer()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["per_test.csv", "summary.json"]
    (tmp_path / "summary.json").write_text(json.dumps({"settings": settings | {"ks": [5], "methods": ["A", "B", "C"]}}))
    rows.to_csv(tmp_path / "per_test.csv", index=False)
    assert main(["intervals", "--report", str(tmp_path)]) == 0
    assert "left out (no per-test rows): C" in capsys.readouterr().out
    assert set(zip(*pd.read_csv(tmp_path / "table3_pairs.csv")[["a", "b"]].to_numpy().T)) == {("A", "B")}
    assert main(["intervals", "--report", str(tmp_path / "nowhere")]) == 2
    assert "no summary.json" in capsys.readouterr().err


def test_an_atomic_write_that_fails_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    from core import workspace

    target = tmp_path / "table.csv"
    workspace.write_text_atomic(target, "a,b\r\n1,2\n")
    assert target.read_bytes() == b"a,b\r\n1,2\n"  # line ends as given
    monkeypatch.setattr(workspace.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        workspace.write_text_atomic(target, "new")
    assert target.read_bytes() == b"a,b\r\n1,2\n" and [p.name for p in tmp_path.iterdir()] == ["table.csv"]


def test_a_pair_reads_as_a_minus_b_whichever_order_it_was_stored_in():
    from core.evaluate import pair_frame

    pairs = pd.DataFrame({"metric": ["Sag@5", "Lag@5", "Sag@5"], "a": ["A", "B", "A"], "b": ["B", "A", "C"],
                          "difference": [2.0, 3.0, 9.0], "low": [1.0, 1.5, 8.0], "high": [4.0, 5.0, 10.0],
                          "p_value": [0.01, 0.2, 0.01], "p_holm": [0.02, 0.2, 0.02], "significant": [True, False, True],
                          "n": [7, 7, 7]})
    ab = pair_frame(pairs, "A", "B")
    assert list(ab.index) == ["Sag@5", "Lag@5"] and ab["a - b"].tolist() == [2.0, -3.0]
    assert ab["95% CI low"].tolist() == [1.0, -5.0] and ab["95% CI high"].tolist() == [4.0, -1.5]
    assert ab["p (Holm)"].tolist() == [0.02, 0.2] and ab["holds"].tolist() == [True, False]
    assert pair_frame(pairs, "B", "C").empty
    assert pair_frame(pairs, "C", "A", scale=100)["a - b"].tolist() == [-900.0]


def test_table3_pairs_line_tests_up_by_id_and_adjust_within_each_cell():
    """A pair's tests are matched by id (rows in any order), a test either method lacks is left
    out, and Holm's adjustment runs over the pairs of each cell."""
    from core.evaluate.report import table3_pairs
    from core.stats import holm

    rng = np.random.default_rng(0)
    ids, base = [f"t{i}" for i in range(30)], rng.random(30)
    per_test = pd.DataFrame([{"test_id": t, "method": name, "sag@5": base[i] + shift + 0.005 * rng.standard_normal(),
                              "lag@5": base[i]}
                             for name, shift in (("A", 0.2), ("B", 0.0), ("C", -0.05)) for i, t in enumerate(ids)])
    per_test = per_test.sample(frac=1, random_state=0)  # the rows shuffled
    per_test.loc[(per_test.method == "C") & (per_test.test_id == "t3"), "sag@5"] = np.nan
    pairs = table3_pairs(per_test, list("ABC"), [5], 0).set_index(["metric", "a", "b"])
    ab = pairs.loc[("Sag@5", "A", "B")]
    # matched tests differ by 20 +- noise; mismatched ones would spread over +-100
    assert ab.difference == pytest.approx(20, abs=0.5) and ab.high - ab.low < 1 and ab.significant and ab.n == 30
    assert pairs.loc[("Sag@5", "A", "C")].n == pairs.loc[("Sag@5", "B", "C")].n == 29
    sag = pairs.loc["Sag@5"]
    assert np.allclose(sag.p_holm, holm(sag.p_value)) and (sag.p_holm >= sag.p_value).all()
    lag = pairs.loc["Lag@5"]  # the same values for every method: no difference, none significant
    assert (lag.difference == 0).all() and not lag.significant.any()
