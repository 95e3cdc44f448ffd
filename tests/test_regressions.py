"""Regression tests for defects found in review (issue 11), each failing on the code before the fix."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from core.__main__ import main
from core.backend import Backend
from core.evaluate import EvalSettings, run_evaluation

QUIET = dict(progress=False, log=lambda _: None)


@pytest.fixture
def workspace(tiny_workspace, tmp_path) -> Path:
    """A private copy of the tiny workspace, without its store."""
    return Path(shutil.copytree(tiny_workspace, tmp_path / "ws", ignore=shutil.ignore_patterns("store.sqlite*")))


def _lag(workspace: Path, out: Path, paper_signs: bool) -> float:
    settings = EvalSettings(methods=("TracIn++",), ks=(3,), kmax=3, test_limit=6, ral=(), faithfulness_runs=0,
                            paper_signs=paper_signs)
    report = run_evaluation(Backend(workspace, device="cpu"), settings, out, **QUIET)
    return float(report.table3.loc["Lag@3", "TracIn++"])


def test_paper_signs_are_part_of_every_flipped_methods_key(workspace, tmp_path):
    """Defect 1: --paper-signs flips TracIn++'s ranking, so it must not reuse the rows computed without it."""
    ours = _lag(workspace, tmp_path / "a", paper_signs=False)
    flipped = _lag(workspace, tmp_path / "b", paper_signs=True)
    shutil.rmtree(workspace / "store.sqlite", ignore_errors=True)
    for suffix in ("", "-wal", "-shm"):
        (workspace / f"store.sqlite{suffix}").unlink(missing_ok=True)
    fresh = _lag(workspace, tmp_path / "c", paper_signs=True)
    assert flipped == pytest.approx(fresh)
    assert flipped != pytest.approx(ours)


def test_later_faithfulness_runs_score_through_the_engine(workspace, tmp_path):
    """Defect 2: run 1 scores the variant methods with the paper's signs too, as run 0 and
    GroundTruth do, so TracIn++ keeps its (high) correlation with GroundTruth in every run."""
    settings = EvalSettings(methods=("TracIn++",), ks=(3,), kmax=3, test_limit=6, ral=(), faithfulness_runs=2,
                            paper_signs=True)
    report = run_evaluation(Backend(workspace, device="cpu"), settings, tmp_path / "out", **QUIET)
    faith = report.faithfulness
    for run in (0, 1):
        rho = faith[(faith.run == run) & (faith.method == "TracIn++")].spearman
        assert rho.mean() > 0.5, (run, rho.tolist())


def test_later_faithfulness_runs_make_variants_as_the_workspace_did(workspace, tmp_path, monkeypatch):
    """Defect 3: new variants of faithfulness run r >= 1 use the workspace's variant optimizer."""
    import core.training

    manifest = json.loads((workspace / "manifest.json").read_text())
    manifest["settings"]["variant_optimizer"] = "sgd"
    (workspace / "manifest.json").write_text(json.dumps(manifest))
    seen: list[str] = []
    real = core.training.make_variants

    def spy(*args, **kwargs):
        seen.append(kwargs.get("optimizer", "adamw"))
        return real(*args, **kwargs)

    monkeypatch.setattr(core.training, "make_variants", spy)
    for module in [m for name, m in list(__import__("sys").modules.items()) if name.startswith("core.")]:
        if getattr(module, "make_variants", None) is real:
            monkeypatch.setattr(module, "make_variants", spy)
    settings = EvalSettings(methods=("TracInF",), ks=(3,), kmax=3, test_limit=4, ral=(), faithfulness_runs=2)
    run_evaluation(Backend(workspace, device="cpu"), settings, tmp_path / "out", **QUIET)
    assert seen and set(seen) == {"sgd"}


def test_evaluate_reports_control(workspace, tmp_path, capsys):
    """Defect 4: Control has a colour, a column and a curve like every method."""
    out = tmp_path / "out"
    rc = main(["evaluate", "--workspace", str(workspace), "--methods", "Control,TracIn++", "--k", "3", "--kmax", "3",
               "--test-limit", "4", "--ral", "none", "--faithfulness-runs", "0", "--quiet", "--device", "cpu",
               "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert "Control" in (out / "table3.csv").read_text() and (out / "k_curves.png").stat().st_size > 0


def test_cli_shows_a_corrected_training_span(workspace, capsys):
    """Defect 5: after a training span is corrected, explanations highlight the span in use."""
    backend = Backend(workspace, device="cpu")
    test_id = backend.instances("test")[0].id
    first = backend.explain(test_id, "TracIn", k=3).top[0].train_id
    text = backend.by_id[first].text
    backend.annotate_span(first, "fix", "tester", (0, 3))
    assert main(["explain", "--workspace", str(workspace), "--test-id", test_id, "--method", "TracIn", "--k", "3",
                 "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert f"[{text[:3]}]{text[3:]}"[:60] in printed


def test_opening_a_backend_never_rebuilds_its_index(workspace, tmp_path):
    """Defect 6: a Backend opened without index settings uses the index as built (here d = 64)."""
    from core.index import IndexSettings
    from core.index_build import build_index
    from core.workspace import Workspace

    build_index(Workspace(workspace), IndexSettings(dim=64, batch_size=8), **QUIET)
    meta = workspace / "index" / "meta.json"
    before = (meta.read_text(), meta.stat().st_mtime_ns)
    backend = Backend(workspace, device="cpu")
    exp = backend.explain(backend.instances("test")[0].id, "TracIn", k=3)
    assert exp.approx["projection"]["dim"] == 64
    assert (meta.read_text(), meta.stat().st_mtime_ns) == before
    assert np.isfinite(exp.scores).all()
