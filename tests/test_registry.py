"""The method registry: one spec is all a new method takes, and every spec reaches every surface."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest

from core.__main__ import main
from core.backend import Backend
from core.evaluate import EvalSettings, load_report, run_evaluation
from core.registry import METHODS, MethodSpec
from core.scoring import ScoreSettings, result_key
from tests.brute import brute_force

APP = str(Path(__file__).resolve().parents[1] / "app.py")
GRAD_DOT = MethodSpec("GradDot", "final", "full", "full", "#44AA99", family="reference", dash="dot",
                      help="plain gradient dot product g(z') . g(z) at theta")


@pytest.fixture
def workspace(tiny_workspace, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_workspace, tmp_path / "ws", ignore=shutil.ignore_patterns("store.sqlite*")))


def test_a_new_spec_reaches_the_cli_the_app_the_report_and_equals_brute_force(workspace, tmp_path, capsys,
                                                                               monkeypatch):
    with METHODS.registered(GRAD_DOT):
        backend = Backend(workspace, device="cpu")
        test_id = backend.instances("test")[0].id
        # the command line
        assert main(["explain", "--workspace", str(workspace), "--test-id", test_id, "--method", "graddot",
                     "--label", "gold", "--k", "3", "--json", "--device", "cpu"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out[0]["method"] == "GradDot" and len(out[0]["top"]) == 3
        # scored by the engine as its definition says: g(z') . g(z) at theta, against autograd
        rows = backend.instances("train")[:8]
        got = backend.engine().scores([backend.test_input(test_id, "gold")], GRAD_DOT).values[0, :8].double()
        expected = brute_force(backend, test_id, GRAD_DOT, rows, torch.float64)
        assert float((got - expected).norm() / expected.norm()) < 2e-3
        # the app's method picker
        monkeypatch.setenv("SPANLENS_WORKSPACES", str(workspace.parent))
        at = AppTest.from_file(APP, default_timeout=180)
        at.query_params.update({"workspace": workspace.name, "test": test_id, "methods": "GradDot", "k": "3"})
        at.switch_page("pages/explore.py").run()
        assert not at.exception, [e.value for e in at.exception]
        picker = at.multiselect(key="w_methods")
        assert "GradDot (reference)" in picker.options and picker.value == ["GradDot"]
        assert any("GradDot" in h.value and "#44AA99" in h.value for h in at.html)
        # an evaluation report
        report = run_evaluation(backend, EvalSettings(methods=("GradDot", "TracIn"), ks=(3,), kmax=3, test_limit=4,
                                                      ral=(), faithfulness_runs=0), tmp_path / "out",
                                progress=False, log=lambda _: None)
        assert "GradDot" in report.table3.columns and "GradDot" in (tmp_path / "out" / "report.md").read_text()
    assert "GradDot" not in METHODS


def test_every_spec_has_a_colour_a_cli_name_a_cache_key_and_a_report_column(workspace, tmp_path, capsys):
    from core.backend import index_workspace
    from core.index import IndexSettings
    from core.workspace import Workspace

    specs = list(METHODS)
    assert len({s.colour.lower() for s in specs}) == len(specs)  # distinct colours
    key = lambda s, settings: json.dumps(result_key(s, settings), sort_keys=True)  # noqa: E731
    for s in specs:  # a setting changes exactly the keys of the methods whose numbers it changes
        assert (key(s, ScoreSettings(damping=1.0)) != key(s, ScoreSettings())) == (s.inverse in ("hessian", "ekfac"))
        assert (key(s, ScoreSettings(paper_signs=True)) != key(s, ScoreSettings())) == (s.paper_sign < 0)
        assert (key(s, ScoreSettings(ihvp="lissa")) != key(s, ScoreSettings())) == (s.inverse == "hessian")
    assert main(["explain", "-h"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    for s in specs:
        assert METHODS.resolve(s.name.lower()) is s and s.name in help_text
    every = EvalSettings(methods=("all",), ks=(3,), kmax=3, test_limit=3, ral=(), faithfulness_runs=0)
    report = run_evaluation(Backend(workspace, device="cpu"), every, tmp_path / "first", progress=False,
                            log=lambda _: None)  # without the TRAK rows and EK-FAC factors: those left out, said so
    needing = [s.name for s in specs if s.family in ("TRAK", "EK-FAC")]
    assert needing and not set(needing) & set(report.table3.columns)
    assert all(any(n.startswith(f"{name} left out") for n in report.summary["notes"]) for name in needing)
    index_workspace(Workspace(workspace), IndexSettings(dim=None, batch_size=8), progress=False, log=lambda _: None,
                    extras=["trak", "ekfac"])
    run_evaluation(Backend(workspace, device="cpu"), every, tmp_path / "out", progress=False, log=lambda _: None)
    report = load_report(tmp_path / "out")
    assert list(report.table3.columns) == [*METHODS.names(), "random"]
    assert set(report.curves.series) == {*METHODS.names(), "random"}


def test_specs_are_checked_when_registered():
    with pytest.raises(ValueError, match="points must be one of"):
        MethodSpec("Bad", "epochs", "full", "full", "#123456")
    with pytest.raises(ValueError, match="colour"):
        MethodSpec("Bad", "final", "full", "full", "red")
    with pytest.raises(ValueError, match="same coordinates"):  # an inner product across two bases
        MethodSpec("Bad", "final", "full", "ekfac", "#123456", inverse="ekfac")
    with pytest.raises(ValueError, match="division in the EK-FAC eigenbasis"):  # parameters' coordinates, divided there
        MethodSpec("Bad", "final", "full", "full", "#123456", inverse="ekfac")
    with pytest.raises(ValueError, match="division in the EK-FAC eigenbasis"):
        MethodSpec("Bad", "final", "ekfac", "ekfac", "#123456", inverse="hessian")
    with pytest.raises(ValueError, match="keeps TRAK's training rows whitened"):  # those rows carry the inverse
        MethodSpec("Bad", "ensemble", "trak", "trak", "#123456")
    with pytest.raises(ValueError, match="keeps TRAK's training rows whitened"):
        MethodSpec("Bad", "final", "full", "full", "#123456", inverse="trak")
    with pytest.raises(ValueError, match="taken by 'GroundTruth'"):
        METHODS.register(MethodSpec("Other", "final", "full", "full", "#123456", aliases=("gt",)))
    with pytest.raises(ValueError, match="unknown method 'nope'; choose from IF, IF\\+"):
        METHODS.resolve("nope")
