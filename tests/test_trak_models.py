"""TRAK over independently trained models (``prepare --models N``): the models stage, TRAK's
ensemble point set, the index's rows at the models, and TRAK against its definition there."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from core import catalog
from core.__main__ import main
from core.backend import index_workspace
from core.index import GradientIndex, IndexSettings
from core.model import load_params
from core.points import PointSet, load_workspace_model
from core.prepare import prepare
from core.prepare_settings import PrepareSettings
from core.registry import METHODS
from core.scoring import TRAK_RIDGE
from core.workspace import Workspace
from tests.brute import brute_trak, float64_engine
from tests.test_app import APP, TIMEOUT, navigation_only  # noqa: F401 (the fixture keeps st.navigation in charge)
from tests.conftest import tiny_settings
from tests.review_data import reviews, small_settings, write_jsonl

EXACT = IndexSettings(dim=None, batch_size=8)
QUIET = {"progress": False, "log": lambda _: None}
MODELS = ("final", "model-2", "model-3")


@pytest.fixture(scope="module")
def ensemble(tiny_workspace, data_dir, tiny_backbone, tmp_path_factory) -> Path:
    """The tiny workspace with two more classifiers (``--models 3``) and its TRAK rows."""
    root = Path(shutil.copytree(tiny_workspace, tmp_path_factory.mktemp("models") / "ws",
                                ignore=shutil.ignore_patterns("store.sqlite*", ".index.lock")))
    prepare(tiny_settings(data_dir, tiny_backbone, models=3), root, **QUIET)
    index_workspace(Workspace(root), EXACT, extras=["trak"], **QUIET)
    return root


def test_the_models_stage_trains_classifiers_beside_theta(ensemble, tiny_workspace):
    manifest = Workspace(ensemble).manifest()
    records = manifest.stages["models"]["records"]
    assert [(r["point"], r["seed"]) for r in records] == [("model-2", 1), ("model-3", 2)]
    assert all(0 <= r["dev_accuracy"] <= 1 and r["best_epoch"] >= 1 for r in records)
    points = PointSet.from_manifest(manifest)
    assert points.groups["ensemble"] == MODELS
    assert points.groups["checkpoints"] == ("checkpoint-1", "checkpoint-2")
    assert points.names().count("final") == 1
    params = {p: load_params(Workspace(ensemble).point_path(p)) for p in MODELS}
    theta_before = load_params(Workspace(tiny_workspace).point_path("final"))
    assert all(torch.equal(params["final"][n], theta_before[n]) for n in theta_before)  # theta is not retrained
    for a, b in (("final", "model-2"), ("final", "model-3"), ("model-2", "model-3")):
        assert any(not torch.equal(params[a][n], params[b][n]) for n in theta_before), (a, b)
    before = Workspace(tiny_workspace).manifest().stages
    assert all(manifest.stages[s]["fingerprint"] == before[s]["fingerprint"] for s in ("model", "variants"))


def test_the_index_holds_trak_rows_at_the_models_and_grad_rows_where_methods_read_them(ensemble):
    index = GradientIndex(Path(ensemble) / "index")
    assert index.group_points["trak"] == list(MODELS)
    assert not {"model-2", "model-3"} & set(index.group_points["grad"])
    assert set(index.group_points["grad"]) >= {"final", "checkpoint-1", "variant-1"}


@pytest.fixture(scope="module")
def engine64(ensemble):
    return float64_engine(ensemble)


@pytest.mark.parametrize("name", ["TRAK", "TRAK++"])
def test_trak_over_the_models_equals_its_definition(engine64, name):
    backend, engine = engine64
    test_id = backend.instances("test")[1].id
    rows = backend.instances("train")[:6]
    expected = brute_trak(backend, test_id, name == "TRAK++", rows, TRAK_RIDGE, points=MODELS)
    scores = engine.scores([backend.test_input(test_id, "gold")], METHODS.resolve(name))
    got = scores.values[0, :6].double()
    assert scores.approx["points"] == list(MODELS)
    assert expected.abs().max() > 0
    assert float((got - expected).norm() / expected.norm()) < 1e-5, name


def test_a_model_is_the_classifier_that_its_seed_trains(tmp_path, tiny_backbone, capsys):
    """model-2 of a workspace with seed 0 is, bit for bit, theta of the same data prepared with
    seed 1; asking for more models later trains only the new ones; --models 1 goes back to the
    checkpoints, and the index must then be rebuilt for TRAK."""
    data = write_jsonl(tmp_path / "reviews.jsonl", reviews(40))
    first, second = tmp_path / "seed0", tmp_path / "seed1"
    prepare(small_settings(data, tiny_backbone, models=2), first, **QUIET)
    prepare(small_settings(data, tiny_backbone, seed=1), second, **QUIET)
    model_2 = load_params(Workspace(first).point_path("model-2"))
    theta_1 = load_params(Workspace(second).point_path("final"))
    assert model_2.keys() == theta_1.keys() and all(torch.equal(model_2[n], theta_1[n]) for n in model_2)

    index_workspace(Workspace(first), EXACT, extras=["trak"], **QUIET)
    lines: list[str] = []
    prepare(small_settings(data, tiny_backbone, models=3), first, progress=False, log=lines.append)
    assert [line.split(" (")[0].strip() for line in lines if line.strip().startswith("model-")] == ["model-3"]
    again = load_params(Workspace(first).point_path("model-2"))
    assert all(torch.equal(again[n], model_2[n]) for n in model_2)
    assert PointSet.from_manifest(Workspace(first).manifest()).groups["ensemble"] == MODELS
    index = index_workspace(Workspace(first), EXACT, extras=["trak"], **QUIET)
    assert index.meta["points_built"] == ["trak:model-3"]  # the kept models keep their rows
    prepare(small_settings(data, tiny_backbone, models=1), first, **QUIET)
    manifest = Workspace(first).manifest()
    assert "models" not in manifest.stages
    assert not (Path(first) / "model" / "model-3.safetensors").exists()
    assert PointSet.from_manifest(manifest).groups["ensemble"] == ("checkpoint-1",)
    test_id = next(r["id"] for r in Workspace(first).load_instances() if r["split"] == "test")
    assert main(["explain", "--workspace", str(first), "--test-id", test_id, "--method", "TRAK", "--device", "cpu"]) == 2
    assert "python -m core index" in capsys.readouterr().err
    index = index_workspace(Workspace(first), EXACT, extras=["trak"], **QUIET)
    assert index.group_points["trak"] == ["checkpoint-1"]


def test_an_unfinished_models_stage_is_refused(ensemble, tmp_path):
    root = Path(shutil.copytree(ensemble, tmp_path / "ws", ignore=shutil.ignore_patterns("store.sqlite*", "index")))
    ws = Workspace(root)
    manifest = ws.manifest()
    manifest.stages["models"]["done"] = False
    ws.save_manifest(manifest)
    with pytest.raises(FileNotFoundError, match="not fully prepared"):
        load_workspace_model(ws)


def test_prepare_refuses_a_models_count_below_one(capsys):
    assert main(["prepare", "--workspace", "unused", "--models", "0"]) == 2
    assert "argument --models" in capsys.readouterr().err  # the option's own check, not an unknown option
    with pytest.raises(ValueError, match=r"models \(--models\) must be a whole number of at least 1"):
        PrepareSettings(models=0)


def test_the_workspaces_page_shows_the_ensemble(ensemble, tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    root = tmp_path / "workspaces"
    shutil.copytree(ensemble, root / "m3", ignore=shutil.ignore_patterns("store.sqlite*", ".index.lock"))
    assert catalog.workspace_info(root / "m3").status == "ready"
    monkeypatch.setenv("SPANLENS_WORKSPACES", str(root))
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.switch_page("pages/workspaces.py").run()
    assert not at.exception
    tables = [d.value for d in at.dataframe if "seed" in d.value.columns]
    assert len(tables) == 1 and list(tables[0].index) == ["model-2", "model-3"]
    assert list(tables[0]["seed"]) == [1, 2]


def test_an_interrupted_models_stage_keeps_the_models_it_had(tmp_path, tiny_backbone, monkeypatch):
    """Models trained before (or within) a stage that was interrupted are not trained again
    when the stage runs next, even with another N."""
    import core.prepare as preparing

    data = write_jsonl(tmp_path / "reviews.jsonl", reviews(40))
    root = tmp_path / "ws"
    prepare(small_settings(data, tiny_backbone, models=2), root, **QUIET)
    model_2 = load_params(Workspace(root).point_path("model-2"))
    real, trained = preparing.train, []

    def interrupted(*args, out_dir, **kwargs):
        trained.append(out_dir.name)
        if out_dir.name == "model-4" and trained.count("model-4") == 1:
            raise RuntimeError("killed")
        return real(*args, out_dir=out_dir, **kwargs)

    monkeypatch.setattr(preparing, "train", interrupted)
    with pytest.raises(RuntimeError, match="killed"):
        prepare(small_settings(data, tiny_backbone, models=4), root, **QUIET)
    prepare(small_settings(data, tiny_backbone, models=5), root, **QUIET)
    assert [t for t in trained if t.startswith("model-")] == ["model-3", "model-4", "model-4", "model-5"]
    again = load_params(Workspace(root).point_path("model-2"))
    assert all(torch.equal(again[n], model_2[n]) for n in model_2)
    assert PointSet.from_manifest(Workspace(root).manifest()).groups["ensemble"] == (
        "final", "model-2", "model-3", "model-4", "model-5")


def test_a_later_prepare_without_models_keeps_them(tmp_path, capsys):
    """Left out, --models is the number the workspace's earlier prepare trained (each model cost a
    training); only an explicit --models 1 removes them; a new workspace gets 1."""
    from core.__main__ import _models, build_parser
    from core.workspace import Manifest, Workspace

    def parse(*extra: str):
        return build_parser().parse_args(["prepare", "--workspace", str(tmp_path / "ws"), *extra])

    assert _models(parse()) == 1
    Workspace(tmp_path / "ws").save_manifest(Manifest(settings={"models": 3}))
    assert _models(parse()) == 3 and "keeping the 2 classifiers besides theta" in capsys.readouterr().out
    assert _models(parse("--models", "1")) == 1 and _models(parse("--models", "4")) == 4
