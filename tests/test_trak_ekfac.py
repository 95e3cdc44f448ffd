"""TRAK and EK-FAC influence, whole and span (++) forms, against their definitions."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from core.artifacts import open_ekfac
from core.backend import Backend, index_workspace
from core.engine import Engine
from core.gradients import Projector
from core.index import IndexSettings
from core.model import HiddenCache
from core.registry import METHODS
from core.representations import margin_weights, true_class_slack
from core.scoring import TRAK_RIDGE
from core.workspace import Workspace, load_model
from tests.brute import brute_trak, float64_engine, sides

N_CHECK = 8


@pytest.fixture(scope="module")
def workspace(tiny_workspace, tmp_path_factory) -> Path:
    """The tiny workspace with its TRAK rows and EK-FAC factors (exact index)."""
    root = Path(shutil.copytree(tiny_workspace, tmp_path_factory.mktemp("trak") / "ws",
                                ignore=shutil.ignore_patterns("store.sqlite*")))
    index_workspace(Workspace(root), IndexSettings(dim=None, batch_size=8), progress=False, log=lambda _: None,
                    extras=["trak", "ekfac"])
    return root


@pytest.fixture(scope="module")
def engine64(workspace):
    """A float64 engine over streamed exact gradients, with the workspace's EK-FAC factors."""
    return float64_engine(workspace)


def test_margin_weights_are_the_margins_gradient():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3, 0, 2])
    logp = logits.log_softmax(-1).gather(1, labels[:, None])[:, 0]
    margin = logp - torch.log1p(-logp.exp())
    (expected,) = torch.autograd.grad(margin.sum(), logits)
    assert torch.allclose(margin_weights(labels)(logits.detach()), expected, atol=1e-12)
    p_y = logits.detach().softmax(-1).gather(1, labels[:, None])[:, 0]
    assert torch.allclose(true_class_slack(logits.detach(), labels), 1 - p_y)
    confident = torch.tensor([[60.0, 0.0, -60.0]])  # 1 - p_y underflows; the weights stay finite
    assert torch.isfinite(margin_weights(torch.tensor([0]))(confident)).all()


@pytest.mark.parametrize("name", ["TRAK", "TRAK++"])
def test_trak_equals_its_definition(engine64, name):
    backend, engine = engine64
    test_id = backend.instances("test")[0].id
    rows = backend.instances("train")[:N_CHECK]
    expected = brute_trak(backend, test_id, name == "TRAK++", rows, TRAK_RIDGE)
    got = engine.scores([backend.test_input(test_id, "gold")], METHODS.resolve(name)).values[0, :N_CHECK].double()
    assert expected.abs().max() > 0
    assert float((got - expected).norm() / expected.norm()) < 1e-5, name  # float32 scores


def ekfac_definition(backend: Backend, spec, test, rows, damping: float, spans: dict | None = None) -> torch.Tensor:
    """e(z')^T (G_ekfac + lambda I)^-1 e(z) (or with g) in float64: the factors applied to
    autograd's dense test side; ``spans``: training spans by id in place of the rows' own."""
    labels = backend.manifest.labels
    model = load_model(backend.ws, "final", device="cpu").double()
    tok = model.spanlens_tokenizer
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for n, p in model.named_parameters() if p.requires_grad]
    t_flat = sides(model, tok, test, labels.index(test.label), test.span_pair, "test")[spec.test].double()
    dense = dict(zip(names, (t.view(s) for t, s in zip(torch.split(t_flat, [s.numel() for s in shapes]), shapes))))
    applied = open_ekfac(backend.ws).apply(dense, damping)
    t_vec = torch.cat([applied[n].flatten() for n in names])
    spans = spans or {}
    return torch.tensor([float(t_vec @ sides(model, tok, r, labels.index(r.label), spans.get(r.id, r.span_pair),
                                             "train")[spec.train]) for r in rows])


@pytest.mark.parametrize("name", ["EKFAC", "EKFAC++"])
def test_ekfac_influence_equals_its_definition(engine64, name):
    """e(z')^T (G_ekfac + lambda I)^-1 e(z) with the factors applied to autograd's dense test side."""
    from core.scoring import ScoreSettings

    backend, engine = engine64
    spec = METHODS.resolve(name)
    test = backend.by_id[backend.instances("test")[0].id]
    damping = 1e-3
    expected = ekfac_definition(backend, spec, test, backend.instances("train")[:N_CHECK], damping)
    got = engine.scores([backend.test_input(test.id, "gold")], spec, ScoreSettings(damping=damping)).values[0, :N_CHECK]
    assert expected.abs().max() > 0
    assert float((got.double() - expected).norm() / expected.norm()) < 1e-5, name  # float32 scores


def test_a_corrected_training_span_patches_the_ekfac_rows(workspace, tmp_path):
    """The ekfac rows the index built give EKFAC++ by its definition; fixing a training span
    re-forms that instance's row in the eigenbasis (the index's ekfac overlay): EKFAC++ then
    equals its definition with the new span, the other rows as they were."""
    from core.ihvp import DEFAULT_DAMPING

    root = Path(shutil.copytree(workspace, tmp_path / "ws", ignore=shutil.ignore_patterns("store.sqlite*")))
    backend = Backend(root, device="cpu")
    spec = METHODS.resolve("EKFAC++")
    test = backend.by_id[backend.instances("test")[0].id]
    gold = backend.test_input(test.id, "gold")
    before = backend.engine().scores([gold], spec).values[0].double()
    built = ekfac_definition(backend, spec, test, backend.instances("train")[:N_CHECK], DEFAULT_DAMPING)
    assert float((before[:N_CHECK] - built).norm() / built.norm()) < 1e-4  # the exact index's rows, float32
    j = 2
    row = backend.instances("train")[j]
    new = (0, 4) if row.span_pair != (0, 4) else (2, 9)
    backend.annotate_span(row.id, "fix", "tester", new)
    assert (root / "index" / "patch.ekfac.final.npz").exists()
    after = backend.engine().scores([gold], spec).values[0].double()
    expected = ekfac_definition(backend, spec, test, [row], DEFAULT_DAMPING, {row.id: new})[0]
    scale = float(before.abs().max())
    assert abs(float(after[j]) - float(expected)) < 1e-4 * scale
    assert abs(float(before[j]) - float(after[j])) > 1e-3 * scale  # the new span changed the score
    others = torch.arange(len(before)) != j
    assert torch.allclose(after[others], before[others], atol=1e-6 * scale)


def test_trak_on_logistic_regression_equals_the_closed_form():
    """Binary logistic regression on fixed features x: phi(z) = s(z) (x) [x, 1] with s = e_y - e_other,
    so TRAK is the closed form x'^T (X^T X + lambda I)^-1 x (1 - p) in those coordinates."""
    from core.engine import TestBatch
    from core.model import SplitModel
    from core.points import LoadedModel, PointSet
    from core.training_sides import InMemorySide

    torch.manual_seed(0)
    n, f = 30, 4
    x = torch.randn(n, 1, f, dtype=torch.float64)
    y = (x[:, 0, 0] + 0.5 * torch.randn(n, dtype=torch.float64) > 0).long()
    top = nn.Linear(f, 2).double()

    class Top(nn.Module):
        def __init__(self):
            super().__init__()
            self.classifier = top

        def forward(self, inputs_embeds, attention_mask=None, output_hidden_states=False):
            out = type("Out", (), {})()
            out.logits = self.classifier(inputs_embeds[:, 0])
            out.hidden_states = (inputs_embeds,)
            return out

    module = Top()
    names = {"classifier.weight": "classifier.weight", "classifier.bias": "classifier.bias"}
    split = SplitModel(module, None, module, list(names), names)
    loaded = LoadedModel(split, None, ["a", "b"], {"final": split.state()}, torch.device("cpu"), 8,
                         PointSet({"final": ("final",), "ensemble": ("final",)}))
    projector = Projector(split, None)
    # the closed form, in the features' own coordinates
    with torch.no_grad():
        logits = top(x[:, 0])
    p_y = logits.softmax(-1).gather(1, y[:, None])[:, 0]
    sign = torch.where(y == 1, 1.0, -1.0).double()  # s(z)[1]; s(z)[0] = -s(z)[1]
    feats = torch.cat([x[:, 0], torch.ones(n, 1, dtype=torch.float64)], 1)
    phi = torch.cat([torch.einsum("n,nf->nf", -sign, feats), torch.einsum("n,nf->nf", sign, feats)], 1)  # rows of W, then ...
    # reorder to the projector's layout: weight (2 x f) row-major, then bias (2)
    phi = torch.cat([phi[:, :f], phi[:, f + 1:2 * f + 1], phi[:, f:f + 1], phi[:, 2 * f + 1:]], 1)
    gram = phi.T @ phi
    lam = TRAK_RIDGE * float(torch.diagonal(gram).mean())
    test_x, test_y = torch.randn(1, 1, f, dtype=torch.float64), torch.tensor([1])
    t_sign = 1.0
    t_feats = torch.cat([test_x[:, 0], torch.ones(1, 1, dtype=torch.float64)], 1)[0]
    t_phi = torch.cat([-t_sign * t_feats[:f], t_sign * t_feats[:f], -t_sign * t_feats[f:], t_sign * t_feats[f:]])
    closed = (torch.linalg.solve(gram + lam * torch.eye(len(gram), dtype=torch.float64), t_phi) @ phi.T) * (1 - p_y)
    # the engine: the features from hooks, the rows scaled by Q, the kernel, the ridge
    side = InMemorySide({("final", "trak"): phi * (1 - p_y)[:, None]}, exact=True, feature_grams={"final": gram})
    engine = Engine(loaded, side, projector)
    batch = TestBatch(HiddenCache(list(test_x)), test_y, False, [])
    engine.test_batch = lambda tests, masked=True: batch
    got = engine.scores([None], METHODS.resolve("TRAK")).values[0]
    assert torch.allclose(got.double(), closed, rtol=1e-6, atol=1e-9)


def test_ekfac_methods_take_part_in_later_faithfulness_runs(workspace, tmp_path):
    """A faithfulness run with new variants scores EKFAC with the workspace's factors too."""
    from core.evaluate import EvalSettings, run_evaluation

    settings = EvalSettings(methods=("EKFAC++", "TracIn++"), ks=(3,), kmax=3, test_limit=3, ral=(),
                            faithfulness_runs=2)
    report = run_evaluation(Backend(workspace, device="cpu"), settings, tmp_path / "out", progress=False,
                            log=lambda _: None)
    faith = report.faithfulness
    assert set(faith[faith.run == 1].method) >= {"EKFAC++", "TracIn++"} and faith.spearman.notna().all()


def test_a_streamed_side_refuses_square_matrices_past_the_limit():
    """Exact (unsketched) training sides refuse a d x d matrix they could not hold, for the
    Gauss-Newton matrix and TRAK's feature kernel alike, before any pass over the data."""
    from types import SimpleNamespace

    from core.training_sides import StreamedSide

    side = StreamedSide(None, SimpleNamespace(dim=50, exact=True), [], [], torch.zeros(0))
    with pytest.raises(ValueError, match="50 x 50 .*LiSSA"):
        side.gauss_newton(limit=10)
    with pytest.raises(ValueError, match="50 x 50 .*TRAK needs a smaller sketch"):
        side.feature_gram("final", limit=10)


def test_ekfac_forms_only_its_own_test_vectors(workspace, monkeypatch):
    """EK-FAC forms its test side once, in its eigenbasis with the division inside: scoring it
    alone forms no test vectors in the parameters' coordinates (a wasted backward pass per
    query); a method beside it that reads them still gets them, and the EK-FAC scores agree
    either way (to rounding)."""
    backend = Backend(workspace, device="cpu")
    engine = backend.engine()
    made: list[tuple[str, bool]] = []
    original = engine.test_vectors
    monkeypatch.setattr(engine, "test_vectors",
                        lambda *a, **k: made.append((a[2], k.get("basis") is not None)) or original(*a, **k))
    tests = [backend.test_input(backend.instances("test")[0].id, "gold")]
    alone = engine.scores(tests, METHODS.resolve("EKFAC++"))
    assert made == [("ekfac-diff", True)]
    together = engine.scores_many(tests, [METHODS.resolve("EKFAC++"), METHODS.resolve("IF++")])
    assert made == [("ekfac-diff", True), ("ekfac-diff", True), ("diff", False)]
    assert alone.values.abs().max() > 0
    torch.testing.assert_close(alone.values, together["EKFAC++"].values, rtol=1e-6, atol=0)


def test_ekfac_rows_wait_for_the_factors_and_methods_name_the_command(tiny_workspace, tmp_path):
    """The index's ekfac rows are formed in the factors' eigenbasis: asked for without the
    factors, the build refuses with the command before it touches a file; with the factors but
    without the rows, or with rows formed with other factors, EKFAC is refused with the same
    command, which then builds just the rows."""
    from core.artifacts import build_ekfac
    from core.index import IndexUnavailable
    from core.index_build import build_index

    root = Path(shutil.copytree(tiny_workspace, tmp_path / "ws", ignore=shutil.ignore_patterns("store.sqlite*")))
    ws = Workspace(root)
    quiet = {"progress": False, "log": lambda _: None}
    before = {p.name: p.stat().st_mtime_ns for p in (root / "index").iterdir()}
    with pytest.raises(IndexUnavailable, match=r"no EK-FAC factors.*`python -m core index --workspace .* --with ekfac`"):
        build_index(ws, IndexSettings(), groups=("ekfac",), **quiet)
    assert {p.name: p.stat().st_mtime_ns for p in (root / "index").iterdir()} == before
    build_ekfac(ws, **quiet)
    backend = Backend(root, device="cpu")
    with pytest.raises(IndexUnavailable, match=r"EKFAC\+\+ needs the workspace's ekfac artifacts; build them with `python "
                                               r"-m core index --workspace .* --with ekfac`"):
        backend.check_methods([METHODS.resolve("EKFAC++")])
    index_workspace(ws, backend.index.settings, extras=["ekfac"], **quiet)
    index = Backend(root, device="cpu").index
    assert "ekfac" in index.groups and index.group_points["ekfac"] == ["final"]
    assert index.meta["points_built"] == ["ekfac:final"]  # the grad rows were up to date
    Backend(root, device="cpu").check_methods([METHODS.resolve("EKFAC++")])
    # factors fitted again (another fingerprint): the rows formed with the old ones are refused, then rebuilt
    meta_path = root / "ekfac" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps(meta | {"factors": "refitted"}))
    with pytest.raises(IndexUnavailable, match="--with ekfac"):
        Backend(root, device="cpu").check_methods([METHODS.resolve("EKFAC")])
    index_workspace(ws, index.settings, extras=["ekfac"], **quiet)
    index = Backend(root, device="cpu").index
    assert index.meta["points_built"] == ["ekfac:final"] and index.meta["basis_fps"] == {"ekfac": "refitted"}
    Backend(root, device="cpu").check_methods([METHODS.resolve("EKFAC")])
