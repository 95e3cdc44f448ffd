"""The explanation engine against brute force, leave-one-out retraining, explicit inverses and captum."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from core.artifacts import extras_for
from core.backend import Backend, index_workspace
from core.engine import Engine
from core.engine import TestInput as Query
from core.ggn import gauss_newton_batch
from core.gradients import GradientCollector, Projector, loss_weights
from core.ihvp import DampedInverse, LissaSettings, lissa
from core.index import GradientIndex, IndexSettings
from core.index_build import build_index
from core.model import HiddenCache, SplitModel
from core.registry import METHODS
from core.scoring import ScoreSettings
from core.training_sides import StreamedSide
from core.workspace import Workspace, load_model
from tests.brute import DAMPING, brute_force, float64_engine, sides

EXACT = IndexSettings(dim=None, batch_size=8)
LOW = ScoreSettings(damping=DAMPING)
N_CHECK = 12  # training instances compared against brute force


@pytest.fixture(scope="module")
def backend(tiny_workspace):
    return Backend(tiny_workspace, device="cpu", index_settings=EXACT)


@pytest.fixture(scope="module")
def exact64(tiny_workspace):
    """The streamed exact engine of a separate backend, with model, points and caches in float64."""
    return float64_engine(tiny_workspace)[1]


@pytest.mark.parametrize("name", [s.name for s in METHODS if not extras_for([s])])  # the others: test_trak_ekfac.py
def test_every_method_equals_brute_force(backend, exact64, name):
    """Exact mode (float64 end to end) against autograd on the whole HF model, method by method."""
    method = METHODS.resolve(name)
    test_id = backend.instances("test")[0].id
    train_rows = backend.instances("train")[:N_CHECK]
    expected = brute_force(backend, test_id, method, train_rows, torch.float64)
    got = exact64.scores([backend.test_input(test_id, "gold")], method, LOW).values[0, :N_CHECK].double()
    rel = float((got - expected).norm() / expected.norm())
    assert expected.abs().max() > 0
    assert rel < 1e-4, (name, rel)


@pytest.mark.parametrize("name", ["IF", "IF++", "TracIn", "TracIn+", "GroundTruth"])
def test_float32_index_agrees_with_brute_force(backend, name):
    """The stored (float32, unprojected) index gives the same scores up to float32 cancellation."""
    method = METHODS.resolve(name)
    test_id = backend.instances("test")[0].id
    train_rows = backend.instances("train")[:N_CHECK]
    expected = brute_force(backend, test_id, method, train_rows, torch.float32)
    got = backend.engine().scores([backend.test_input(test_id, "gold")], method, LOW).values[0, :N_CHECK].double()
    assert float((got - expected).norm() / expected.norm()) < 2e-3


def test_projected_index_matches_projected_brute_force(tiny_workspace, tmp_path):
    """A projected index holds P g for the same P that projects dense gradients."""
    import shutil

    root = tmp_path / "ws"
    shutil.copytree(tiny_workspace, root, ignore=shutil.ignore_patterns("index", "store.sqlite*"))
    index_workspace(Workspace(root), IndexSettings(dim=64, batch_size=8), progress=False, log=lambda _: None)
    backend = Backend(root, device="cpu", index_settings=IndexSettings(dim=64, batch_size=8))
    index = backend.index
    assert index.meta["projection"]["sketch"] == "countsketch" and index.meta["dim"] == 64 and index.meta["dim"] < backend.engine(exact=True).projector.dim
    assert Workspace(root).manifest().results["index"]["dim"] == 64  # the rebuild is on record
    projector = backend.engine().projector
    model = load_model(root, "variant-2", device="cpu")
    tok = model.spanlens_tokenizer
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for j, row in enumerate(backend.instances("train")[:3]):
        label = backend.manifest.labels.index(row.label)
        flat = sides(model, tok, row, label, row.span_pair, "train")["diff"]
        dense, offset = {}, 0
        for name in names:
            p = dict(model.named_parameters())[name]
            dense[name] = flat[offset: offset + p.numel()].view_as(p)
            offset += p.numel()
        expected = projector.project_params(dense)
        got = index.matrix("variant-2", "diff")[j]
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-6)


def test_sketch_is_an_unbiased_inner_product(backend):
    """CountSketch: E<Sx, Sy> = <x, y>, with a spread of about sqrt(2/d) |x||y| per seed.

    Positive vectors make every collision add a positive error unless the signs cancel it, so a
    sketch without working signs fails the mean."""
    split = backend.loaded.split
    blocks = Projector(split, None).blocks
    gen = torch.Generator().manual_seed(0)
    x = {b.param: torch.rand(b.shape, generator=gen) for b in blocks}
    y = {b.param: torch.rand(b.shape, generator=gen) + x[b.param] for b in blocks}
    flat = lambda v: torch.cat([v[b.param].reshape(-1) for b in blocks])  # noqa: E731
    truth, scale = float(flat(x) @ flat(y)), float(flat(x).norm() * flat(y).norm())
    dim, seeds = 256, 64
    estimates = torch.tensor([float(Projector(split, dim, seed).project_params(x) @ Projector(split, dim, seed).project_params(y))
                              for seed in range(seeds)])
    spread = (2 / dim) ** 0.5 * scale
    assert abs(float(estimates.mean()) - truth) < 4 * spread / seeds**0.5
    assert float((estimates - truth).abs().max()) < 5 * spread
    assert Projector(split, None).project_params(x).shape[0] == Projector(split, None).params


def test_lone_row_sketch_equals_the_batched_sketch(backend, monkeypatch):
    """A single row's blocks are scattered in parts (to use every thread): same sketch as a batch."""
    import core.gradients as gradients

    monkeypatch.setattr(gradients, "SPLIT_MIN", 1)  # the tiny model's blocks take the lone-row path too
    projector = Projector(backend.loaded.split, 32, seed=1)
    gen = torch.Generator().manual_seed(0)
    split_blocks = 0
    for block in projector.blocks:
        rows = torch.randn(2, block.size, generator=gen)
        together = torch.zeros(2, projector.dim)
        projector.sketch(block, rows, together)
        for r in range(2):
            alone = torch.zeros(1, projector.dim)
            projector.sketch(block, rows[r : r + 1], alone)
            assert torch.allclose(alone[0], together[r], atol=1e-5)
        split_blocks += block.size % gradients.SPLIT_PARTS == 0
    assert split_blocks > 0


def test_projector_covers_exactly_the_trainable_parameters(backend):
    import dataclasses

    split = backend.loaded.split
    assert {b.param for b in Projector(split, None).blocks} == set(split.trainable)
    bias = next(n for n in split.trainable if n.endswith(".bias"))
    part = dataclasses.replace(split, trainable=[n for n in split.trainable if n != bias])  # a weight without its bias
    assert {b.param for b in Projector(part, None).blocks} == set(part.trainable)


def test_empty_span_gives_zero_for_span_methods(backend):
    row = backend.instances("test")[1]
    no_span = Query(row.aspect, row.text, row.label, None, row.id)
    masks_nothing = Query(row.aspect, row.text, row.label, (0, 0), row.id)  # a span of no token
    engine = backend.engine()
    for name in ("IF++", "TracIn++", "GroundTruth"):
        assert torch.count_nonzero(engine.scores([no_span, masks_nothing], METHODS.resolve(name), LOW).values) == 0
    # training side: with every span empty (masked inputs = whole inputs) the + methods give zero
    full, labels = backend.train_cache()
    projector = Projector(backend.loaded.split, None)
    side = StreamedSide(backend.loaded, projector, full, full, labels, 8)
    scores = Engine(backend.loaded, side, projector).scores([backend.test_input(row.id)], METHODS.resolve("TracIn+")).values
    whole = engine.scores([no_span], METHODS.resolve("TracInF")).values  # untouched by spans
    assert float(whole.abs().max()) > 0
    # zero up to float32 rounding (x - x computed in two rows of one batch)
    assert float(scores.abs().max()) < 1e-6 * float(whole.abs().max())


def test_queries_leave_the_model_and_its_points_as_they_were(backend):
    """Test sides run at other points without copying them in: afterwards the model is back at
    its own parameters and no stored point has changed, even when the body fails; a body that
    would write into a stored point is stopped or reported."""
    loaded = backend.loaded
    loaded.use("checkpoint-2")  # not theta, so a query that loaded theta and left it shows
    before = loaded.split.state()
    points = {name: {k: v.clone() for k, v in params.items()} for name, params in loaded.points.items()}
    unchanged = lambda: all(torch.equal(loaded.split.state()[k], v) for k, v in before.items())  # noqa: E731
    query = backend.test_input(backend.instances("test")[0].id)
    for name in ("TracIn", "TracIn++", "IF++", "GroundTruth"):
        backend.engine().scores([query], METHODS.resolve(name))
        assert unchanged(), name
    with pytest.raises(RuntimeError, match="body"):
        with loaded.at("checkpoint-1"):
            assert all(torch.equal(loaded.split.state()[k], v) for k, v in points["checkpoint-1"].items())
            raise RuntimeError("body")
    with pytest.raises(RuntimeError, match="would write into that stored point"):
        with loaded.at("checkpoint-1"):
            loaded.use("final")
    assert unchanged()
    assert all(torch.equal(loaded.points[name][k], v) for name, params in points.items() for k, v in params.items())
    with pytest.raises(RuntimeError, match="changed in place"):
        with loaded.at("checkpoint-1"), torch.no_grad():
            next(iter(loaded.split.top_params().values())).mul_(1.0)  # same values, but written
    assert unchanged()
    loaded.use("final")


def test_tracin_equals_captum_tracincp(backend, tmp_path):
    from captum.influence import TracInCP
    from scipy.stats import spearmanr

    split = backend.loaded.split
    full, labels = backend.train_cache()
    h, mask = full.batch(range(len(full)))

    class Top(nn.Module):
        def __init__(self):
            super().__init__()
            self.top = split.top

        def forward(self, hs, m):
            return split.top(inputs_embeds=hs, attention_mask=m).logits

    lrs = {r["point"]: r["lr"] for r in backend.manifest.stages["model"]["checkpoints"]}
    paths = [str(backend.ws.point_path(p)) for p in lrs]

    def load(model, path):
        from core.model import load_params

        split.load_state(load_params(__import__("pathlib").Path(path)))
        return lrs[__import__("pathlib").Path(path).stem]

    tracin = TracInCP(Top(), torch.utils.data.TensorDataset(h, mask, labels), paths, checkpoints_load_func=load,
                      loss_fn=nn.CrossEntropyLoss(reduction="sum"), batch_size=16, sample_wise_grads_per_batch=True)
    tests = backend.instances("test")[:3]
    t_cache = HiddenCache([])
    engine = backend.engine()
    cache = engine.test_batch([backend.test_input(r.id, "gold") for r in tests], masked=False).cache
    t_h, t_m = cache.batch([0, 1, 2])
    t_y = torch.tensor([backend.manifest.labels.index(r.label) for r in tests])
    theirs = tracin.influence((t_h, t_m, t_y)).double()
    backend.loaded.use("final")
    ours = engine.scores([backend.test_input(r.id, "gold") for r in tests], METHODS.resolve("TracIn")).values.double()
    # float32 on both sides, different batching and padding: agreement to float32 rounding
    assert float((ours - theirs).norm() / theirs.norm()) < 1e-3
    assert all(spearmanr(o, t).statistic > 0.99 for o, t in zip(ours, theirs))
    assert len(t_cache) == 0


class LinearTop(nn.Module):
    """A convex model: a linear layer on fixed features, with the top-model calling convention."""

    def __init__(self, features: int, classes: int):
        super().__init__()
        self.classifier = nn.Linear(features, classes)

    def forward(self, inputs_embeds, attention_mask=None, output_hidden_states=False):
        out = type("Out", (), {})()
        out.logits = self.classifier(inputs_embeds[:, 0])
        out.hidden_states = (inputs_embeds,)
        return out


def _convex_problem(n=40, features=5, classes=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, features, generator=gen)
    true_w = torch.randn(classes, features, generator=gen) * 2
    y = (x[:, 0] @ true_w.T + 0.8 * torch.randn(n, classes, generator=gen)).argmax(-1)
    top = LinearTop(features, classes)
    split = SplitModel(top, None, top, ["classifier.weight", "classifier.bias"],
                       {"classifier.weight": "classifier.weight", "classifier.bias": "classifier.bias"})
    return split, HiddenCache(list(x)), y


def _fit(split, cache, y, l2, keep=None, start=None):
    rows = keep if keep is not None else list(range(len(cache)))
    h, m = cache.batch(rows)
    params = list(split.top_params().values())
    if start is not None:
        split.load_state(start)
    opt = torch.optim.LBFGS(params, lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(split.top(inputs_embeds=h).logits, y[rows]) + 0.5 * l2 * sum((p ** 2).sum() for p in params)
        loss.backward()
        return loss

    opt.step(closure)
    return split.state()


def test_influence_function_agrees_with_leave_one_out(tmp_path):
    torch.set_default_dtype(torch.float64)
    try:
        l2 = 0.05
        split, cache, y = _convex_problem()
        theta = _fit(split, cache, y, l2)
        test_x = torch.randn(1, 1, 5, generator=torch.Generator().manual_seed(9))
        test_y = torch.tensor([1])

        def test_loss():
            with torch.no_grad():
                return float(nn.functional.cross_entropy(split.top(inputs_embeds=test_x).logits, test_y))

        base = test_loss()
        projector = Projector(split, None)
        n = len(cache)
        h, m = cache.batch(range(n))
        with GradientCollector(split, projector) as col:
            (g_train,), logits, _ = col.gradients(h, m, [loss_weights(y)])
            jac, _, _ = col.gradients(h, m, [(lambda c: (lambda lg: torch.nn.functional.one_hot(torch.full((len(lg),), c), 3).to(lg.dtype)))(c) for c in range(3)])
            (g_test,), _, _ = col.gradients(test_x, torch.ones(1, 1, dtype=torch.long), [loss_weights(test_y)])
        gram = gauss_newton_batch(logits, torch.stack(jac, 1)) / n
        # the Hessian of mean CE + (l2/2)|w|^2 (the bias is not decayed in the fit either... it is here: keep it simple)
        inverse = DampedInverse(gram, damping=l2)
        scores = (inverse.solve(g_test) @ g_train.T)[0]
        actual = []
        for i in range(n):
            _fit(split, cache, y, l2, keep=[j for j in range(n) if j != i], start=theta)
            actual.append(test_loss() - base)
            split.load_state(theta)
        # removing z changes the test loss by about (1/n) g(z')^T H^-1 g(z)
        pearson = float(np.corrcoef(scores.numpy(), np.array(actual) * n)[0, 1])
        assert pearson >= 0.9, pearson
    finally:
        torch.set_default_dtype(torch.float32)


def test_lissa_converges_to_explicit_inverse():
    torch.set_default_dtype(torch.float64)
    try:
        split, cache, y = _convex_problem(n=30)
        _fit(split, cache, y, 0.05)
        names = list(split.top_params())
        gen = torch.Generator().manual_seed(3)
        v = {n: torch.randn(p.shape, generator=gen) for n, p in split.top_params().items()}
        settings = LissaSettings(depth=3000, batch_size=len(cache), tol=1e-9, patience=50)
        result = lissa(split, cache, y, v, settings)
        assert result.converged and not result.diverged and result.trace
        h, m = cache.batch(range(len(cache)))
        params = list(split.top_params().values())
        flat = torch.cat([p.flatten() for p in params])

        def loss_of(flat_w):
            w = flat_w[: params[0].numel()].view_as(params[0])
            b = flat_w[params[0].numel():]
            return nn.functional.cross_entropy(h[:, 0] @ w.T + b, y)

        hessian = torch.autograd.functional.hessian(loss_of, flat.detach())
        v_flat = torch.cat([v[n].flatten() for n in names])
        explicit = torch.linalg.solve(hessian + settings.lam * torch.eye(len(flat)), v_flat)
        got = torch.cat([result.vector[n].flatten() for n in names])
        rel = float((got - explicit).norm() / explicit.norm())
        assert rel < 0.05, rel
        # the fast mode's default lambda is LiSSA's: the same quantity (G = H for a linear softmax head)
        before = hessian.clone()
        fast = DampedInverse(hessian).solve(v_flat[None])[0]
        assert float((fast - explicit).norm() / explicit.norm()) < 1e-8
        assert torch.equal(hessian, before)  # the damping is added to a copy
        with pytest.raises(ValueError, match="positive"):
            DampedInverse(hessian, damping=0.0)
    finally:
        torch.set_default_dtype(torch.float32)


def test_lissa_reports_divergence():
    split, cache, y = _convex_problem(n=10)
    v = {n: torch.ones_like(p) * 1e3 for n, p in split.top_params().items()}
    result = lissa(split, cache, y, v, LissaSettings(depth=200, damping=0.99, scale=100.0, clip=1e30))  # |0.99 - 100 lambda_max| > 1
    assert result.diverged and not result.converged and result.steps < 200


def test_index_resumes_after_interruption(tiny_workspace, tmp_path, monkeypatch):
    import shutil

    import core.index_build as index_mod

    root = tmp_path / "ws"
    shutil.copytree(tiny_workspace, root, ignore=shutil.ignore_patterns("store.sqlite*"))
    reference = GradientIndex(root / "index")
    settings = IndexSettings(dim=None, batch_size=8)
    shutil.rmtree(root / "index")
    monkeypatch.setattr(index_mod, "FLUSH_EVERY", 1)
    calls = {"n": 0}
    import core.index_shards as passes

    original = passes.gauss_newton_batch

    def flaky(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(*args)

    monkeypatch.setattr(passes, "gauss_newton_batch", flaky)
    with pytest.raises(KeyboardInterrupt):
        build_index(Workspace(root), settings, progress=False, log=lambda _: None)
    assert not (root / "index" / "meta.json").exists() or not __import__("json").loads((root / "index" / "meta.json").read_text())["done"]
    lines = []
    resumed = build_index(Workspace(root), settings, progress=False, log=lines.append)
    for point in reference.points:
        for kind in ("full", "diff"):
            assert torch.allclose(resumed.matrix(point, kind), reference.matrix(point, kind), atol=1e-6)
    assert torch.allclose(resumed.gauss_newton(), reference.gauss_newton(), rtol=1e-6)
    again = build_index(Workspace(root), settings, progress=False, log=lines.append)
    assert "up to date" in lines[-1] and again.meta["fingerprint"] == resumed.meta["fingerprint"]
    # a different projection is a different index: rebuilt, not reused
    other = build_index(Workspace(root), IndexSettings(dim=64, batch_size=8), progress=False, log=lines.append)
    assert other.meta["fingerprint"] != resumed.meta["fingerprint"] and other.meta["dim"] < resumed.meta["dim"]


def test_explanations_are_served_from_the_store(tiny_workspace, tmp_path, monkeypatch):
    import shutil

    root = tmp_path / "ws"
    shutil.copytree(tiny_workspace, root, ignore=shutil.ignore_patterns("store.sqlite*"))
    backend = Backend(root, device="cpu", index_settings=EXACT)
    test_id = backend.instances("test")[2].id
    first = backend.explain(test_id, "TracIn++", k=5)
    assert [h.rank for h in first.top] == [1, 2, 3, 4, 5]
    assert first.top[0].score >= first.top[-1].score and first.opponents[0].score <= first.opponents[-1].score
    assert len(first.scores) == len(backend.train_ids) and first.test_span is not None

    def boom(*a, **k):
        raise AssertionError("recomputed instead of served from the store")

    monkeypatch.setattr(Engine, "scores_many", boom)
    again = Backend(root, device="cpu", index_settings=EXACT).explain(test_id, "tracin++", k=5)
    assert [h.train_id for h in again.top] == [h.train_id for h in first.top]
    with pytest.raises(AssertionError, match="recomputed"):
        backend.explain(test_id, "TracIn++", k=5, use_cache=False)


def test_explain_lists_more_than_the_kept_hits_when_asked(tiny_workspace, tmp_path, monkeypatch):
    """A k past the stored minimum (KEEP) is computed once with k hits, then served from the store."""
    import shutil

    import core.backend as backend_module

    root = tmp_path / "ws"
    shutil.copytree(tiny_workspace, root, ignore=shutil.ignore_patterns("store.sqlite*"))
    monkeypatch.setattr(backend_module, "KEEP", 3)
    backend = Backend(root, device="cpu", index_settings=EXACT)
    test_id = backend.instances("test")[1].id
    wide = backend.explain(test_id, "TracIn", k=12)
    assert [h.rank for h in wide.top] == list(range(1, 13)) and len(wide.opponents) == 12

    def boom(*a, **k):
        raise AssertionError("recomputed instead of served from the store")

    monkeypatch.setattr(Engine, "scores_many", boom)
    again = backend.explain(test_id, "TracIn", k=12)
    assert [h.train_id for h in again.top] == [h.train_id for h in wide.top]
    assert [h.train_id for h in backend.explain(test_id, "TracIn", k=4).top] == [h.train_id for h in wide.top[:4]]


def test_corrected_training_span_patches_its_rows_only(tiny_workspace, tmp_path, monkeypatch):
    """Fixing a training span re-scores that instance with the new span (brute force), keeps
    every other row, recomputes only span-dependent results, and undo restores the original."""
    import shutil

    root = tmp_path / "ws"
    shutil.copytree(tiny_workspace, root, ignore=shutil.ignore_patterns("store.sqlite*"))
    backend = Backend(root, device="cpu", index_settings=EXACT)
    test = backend.instances("test")[0]
    gold = backend.test_input(test.id, "gold")
    before = torch.tensor(backend.explain(gold, "GroundTruth", k=3).scores)
    backend.explain(gold, "TracIn", k=3)
    j = 2
    row = backend.instances("train")[j]
    new = (0, 4) if row.span_pair != (0, 4) else (2, 9)
    backend.annotate_span(row.id, "fix", "tester", new)
    assert backend.index.meta["overrides"] == {row.id: list(new)}  # patched at once

    calls: list[str] = []
    real_scores = Engine.scores_many
    monkeypatch.setattr(Engine, "scores_many", lambda self, tests, specs, settings: calls.extend(s.name for s in specs)
                        or real_scores(self, tests, specs, settings))
    backend.explain(gold, "TracIn", k=3)  # uses no spans: still served from the store
    after = torch.tensor(backend.explain(gold, "GroundTruth", k=3).scores)
    assert calls == ["GroundTruth"]
    assert backend.by_id[row.id].span_pair == new and backend.by_id[row.id].span_source == "corrected"

    model = load_model(root, "final", device="cpu")
    tok, labels = model.spanlens_tokenizer, backend.manifest.labels
    t_vec = sides(model, tok, test, labels.index(test.label), test.span_pair, "test")["diff"]
    expected = float(t_vec @ sides(model, tok, row, labels.index(row.label), new, "train")["diff"])
    scale = float(before.abs().max())
    assert abs(float(after[j]) - expected) < 1e-4 * scale
    assert abs(float(before[j]) - float(after[j])) > 1e-3 * scale  # the span really changed the score
    others = torch.arange(len(before)) != j
    assert torch.allclose(after[others], before[others], atol=1e-6 * scale)

    # another process sees the patched index as it is; undo patches the row back
    fresh = Backend(root, device="cpu", index_settings=EXACT)
    assert fresh.index.spans_match({row.id: new})
    fresh.undo_span_annotation("tester")
    restored = torch.tensor(fresh.explain(gold, "GroundTruth", k=3).scores)
    assert torch.allclose(restored, before, atol=1e-6 * scale)


def test_interrupted_span_patch_is_redone(tiny_workspace, tmp_path, monkeypatch):
    """A patch that dies half-way leaves the index marked as not matching; the next use redoes
    it. Corrections of test spans never touch the index."""
    import shutil

    import core.index_build as index_module

    root = tmp_path / "ws"
    shutil.copytree(tiny_workspace, root, ignore=shutil.ignore_patterns("store.sqlite*"))
    backend = Backend(root, device="cpu", index_settings=EXACT)
    reference = backend.index.matrix("final", "diff").clone()
    backend.annotate_span(backend.instances("test")[0].id, "fix", "tester", (0, 3))
    assert backend.index.meta.get("overrides") == {}  # a test span: the index is not patched

    row = backend.instances("train")[1]
    real = index_module.training_gradients

    def dies_at_second_point(*args, **kwargs):
        if args[5] != "final":
            raise KeyboardInterrupt("stopped mid-patch")
        return real(*args, **kwargs)

    monkeypatch.setattr(index_module, "training_gradients", dies_at_second_point)
    with pytest.raises(KeyboardInterrupt):
        backend.annotate_span(row.id, "fix", "tester", (0, 5))  # the verdict is stored, then the patch dies
    meta = json.loads((root / "index" / "meta.json").read_text())
    assert meta["patching"] == [row.id] and meta["overrides"] == {}
    assert not GradientIndex(root / "index").spans_match({row.id: (0, 5)})

    monkeypatch.setattr(index_module, "training_gradients", real)
    fresh = Backend(root, device="cpu", index_settings=EXACT)
    fresh.explain(fresh.instances("test")[0].id, "TracIn", k=3)  # explaining brings the stored fix in first
    index = fresh.index
    assert "patching" not in index.meta and index.meta["overrides"] == {row.id: [0, 5]}
    changed = (index.matrix("final", "diff") - reference).abs().sum(1) > 0
    assert changed.tolist() == [n == 1 for n in range(len(reference))]


def test_cli_explains_several_methods(tiny_workspace, tmp_path, capsys, monkeypatch):
    """`explain --method` takes repeated and comma-separated names; bad options fail before any
    work, and so does a sketch other than the index's (it would rebuild the index on the way)."""
    import shutil

    from core.__main__ import main

    root = tmp_path / "ws"
    shutil.copytree(tiny_workspace, root, ignore=shutil.ignore_patterns("store.sqlite*"))
    test_id = Backend(root, device="cpu", index_settings=EXACT).instances("test")[1].id
    base = ["explain", "--workspace", str(root), "--test-id", test_id, "--device", "cpu", "--k", "3"]
    assert main([*base, "--method", "TracIn++, IF++", "--method", "gt", "--json"]) == 0  # the index as built: exact
    out = json.loads(capsys.readouterr().out)
    assert [e["method"] for e in out] == ["TracIn++", "IF++", "GroundTruth"]
    assert all(len(e["top"]) == 3 and all(h["text"] for h in e["top"]) for e in out)
    assert all(e["approx"]["projection"]["exact"] for e in out)
    row = Backend(root, device="cpu", index_settings=EXACT).by_id[test_id]
    assert out[0]["test"]["gold"] == row.label and out[0]["test"]["text"] == row.text
    assert out[0]["test"]["explained"] == out[0]["test"]["predicted"] == out[0]["label"]  # the default: predicted
    assert out[0]["test"]["predicted"] in json.loads((root / "manifest.json").read_text())["labels"]
    monkeypatch.setattr(Backend, "__init__", lambda *a, **k: pytest.fail("loaded the workspace despite a bad option"))
    for extra, message in ((["--method", "TracIn++,nope"], "unknown method 'nope'"),
                           (["--method", "IF", "--proj-dim", "64"], "its index is built with d = exact"),
                           (["--method", "IF", "--k", "0"], "argument --k: must be at least 1, got 0"),
                           (["--method", "IF", "--test-text", "x", "--aspect", "y"], "give either --test-id"),
                           (["--method", "IF++", "--ihvp", "lissa", "--lissa-depth", "0"],
                            "argument --lissa-depth: must be at least 1")):
        assert main([*base, *extra]) == 2, extra
        assert message in capsys.readouterr().err


def test_lissa_settings_are_checked_and_the_model_mode_restored():
    with pytest.raises(ValueError, match="damping must lie in"):
        LissaSettings(damping=1.5)
    with pytest.raises(ValueError, match="clip must be positive"):
        LissaSettings(clip=0)
    split, cache, y = _convex_problem(n=6)
    split.top.train()
    lissa(split, cache, y, {n: torch.ones_like(p) for n, p in split.top_params().items()}, LissaSettings(depth=3))
    assert split.top.training
