"""TRAK's training rows whitened at index time (core.whitening) and kept in float16 over a scale
per row: the index's TRAK and TRAK++ equal their definitions with nothing applied at query time;
an index built before whitening, or whitened in float32, scores the same and is brought up to date
by the next build; a corrected span's overlay is whitened."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from core.ann import _rows
from core.backend import Backend, index_workspace
from core.index import (
    HALF_GEMM_MAX,
    GradientIndex,
    IndexSettings,
    half_rows,
    rows_file,
    scales_file,
)
from core.index_build import build_index
from core.registry import METHODS
from core.scoring import TRAK_RIDGE
from core.whitening import STORAGE, point_inverse, whiten_rows
from core.workspace import Workspace
from tests.brute import brute_trak

N_CHECK = 6
TRAK_KINDS = ("trak", "trak-diff")
QUIET = {"progress": False, "log": lambda _: None}
HALF = 5e-3  # relative error of scores over rows kept in float16 (11 significant bits; measured 1.2e-3)
TOLERANCE = {"TRAK": HALF, "TRAK++": 1e-2}  # TRAK++: x - x_masked cancels in the float32 rows as computed


@pytest.fixture(scope="module")
def workspace(tiny_workspace, tmp_path_factory) -> Path:
    """The tiny workspace with its TRAK rows (exact index)."""
    root = Path(shutil.copytree(tiny_workspace, tmp_path_factory.mktemp("white") / "ws",
                                ignore=shutil.ignore_patterns("store.sqlite*")))
    index_workspace(Workspace(root), IndexSettings(dim=None, batch_size=8), extras=["trak"], **QUIET)
    return root


def _copy(workspace: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(workspace, tmp_path / "ws", ignore=shutil.ignore_patterns("store.sqlite*")))


def _scores(root: Path) -> dict[str, tuple[torch.Tensor, dict]]:
    backend = Backend(root, device="cpu")
    gold = backend.test_input(backend.instances("test")[0].id, "gold")
    out = backend.engine().scores_many([gold], [METHODS.resolve(n) for n in TOLERANCE])
    return {n: (s.values[0].double(), s.approx["ihvp"]) for n, s in out.items()}


def _unwhiten(root: Path) -> None:
    """Turn the index back into one built before whitening: the rows as computed (the whitened
    ones times Phi^T Phi + lambda I), no whitened files, no record."""
    index = root / "index"
    meta = json.loads((index / "meta.json").read_text())
    opened = GradientIndex(index)
    for point in meta["group_points"]["trak"]:
        inverse = point_inverse(index, point)
        matrix = torch.linalg.inv(inverse._inverse)  # Phi^T Phi + lambda I
        for kind in TRAK_KINDS:
            white = opened.matrix(point, kind).double()
            np.save(index / rows_file(point, kind), (white @ matrix).float().numpy())
            (index / rows_file(point, kind, white=True)).unlink()
            (index / scales_file(point, kind)).unlink()
    meta.pop("whitened")
    meta.pop("examples_per_second")  # as a first build killed while whitening leaves it
    (index / "meta.json").write_text(json.dumps(meta))


def test_the_index_keeps_trak_rows_whitened_and_they_give_the_definition(workspace):
    backend = Backend(workspace, device="cpu")
    index = backend.index
    points = index.group_points["trak"]
    assert points == backend.ws.points("checkpoint")
    for point in points:
        assert index.whitened(point)["ridge"] == TRAK_RIDGE and index.whitened(point)["lambda"] > 0
        assert index.whitened(point)["storage"] == STORAGE
        for kind in TRAK_KINDS:  # the rows as computed are gone once whitened: no second copy on disk
            assert np.load(index.root / rows_file(point, kind, white=True), mmap_mode="r").dtype == np.float16
            assert (index.root / scales_file(point, kind)).exists()
            assert not (index.root / rows_file(point, kind)).exists()
    test_id = backend.instances("test")[0].id
    rows = backend.instances("train")[:N_CHECK]
    for name, (values, ihvp) in _scores(workspace).items():
        assert ihvp["applied"] == "training rows"  # nothing applied to the test side
        expected = brute_trak(backend, test_id, name == "TRAK++", rows, TRAK_RIDGE)
        assert expected.abs().max() > 0
        assert float((values[:N_CHECK] - expected).norm() / expected.norm()) < TOLERANCE[name], name


def test_an_index_built_before_whitening_scores_the_same_and_the_next_build_whitens_it(workspace, tmp_path):
    root = _copy(workspace, tmp_path)
    whitened = _scores(root)
    _unwhiten(root)
    index = root / "index"
    point = json.loads((index / "meta.json").read_text())["group_points"]["trak"][0]
    # an interrupted whitening: a whitened file in place but not recorded is not read
    np.save(index / rows_file(point, "trak", white=True), np.zeros_like(np.load(index / rows_file(point, "trak"))))
    before = _scores(root)
    for name, (values, ihvp) in before.items():
        assert "applied" not in ihvp  # the inverse applied to the test side instead
        assert float((values - whitened[name][0]).norm() / values.norm()) < HALF, name
    # a span correction patches such an index as it is: no build (no whitening) on the way
    backend = Backend(root, device="cpu")
    row = backend.instances("train")[2]
    backend.annotate_span(row.id, "fix", "tester", (0, 4) if row.span_pair != (0, 4) else (2, 9))
    meta = json.loads((index / "meta.json").read_text())
    assert "whitened" not in meta and (index / rows_file(point, "trak")).exists()
    with np.load(index / f"patch.trak.{point}.npz") as overlay:
        assert set(overlay.files) == {"positions", "trak-diff"}
    patched = _scores(root)
    assert "applied" not in patched["TRAK++"][1]
    lines: list[str] = []
    index_workspace(Workspace(root), IndexSettings(dim=None, batch_size=8), extras=["trak"], progress=False,
                    log=lines.append)
    assert any("TRAK rows whitened at" in line for line in lines)
    meta = json.loads((index / "meta.json").read_text())
    assert set(meta["whitened"]) == set(meta["group_points"]["trak"])
    assert meta["examples_per_second"] == 0.0 and Workspace(root).manifest().results["index"]["examples_per_second"] == 0.0
    assert not [p for p in index.glob("*.npy") if ".trak" in p.name and ".white." not in p.name]
    assert not list(index.glob("*.tmp.npy"))
    for name, (values, ihvp) in _scores(root).items():
        assert ihvp["applied"] == "training rows"
        assert float((values - patched[name][0]).norm() / values.norm()) < HALF, name
    lines.clear()
    build_index(Workspace(root), IndexSettings(dim=None, batch_size=8), groups=("trak",), progress=False,
                log=lines.append)
    assert lines == [f"[index] up to date ({meta['fingerprint']})"]


def test_half_rows_keep_every_rows_precision_whatever_its_size():
    rows = np.random.default_rng(0).standard_normal((5, 64)) * np.array([1e-9, 1e-4, 1.0, 1e3, 0.0])[:, None]
    half, scales = half_rows(rows)
    assert half.dtype == np.float16 and scales.dtype == np.float32
    back = half.astype(np.float64) * scales[:, None]
    for r in range(4):  # 11 significant bits in every row, the tiniest and the largest alike
        assert np.abs(back[r] - rows[r]).max() <= 2**-11 * np.abs(rows[r]).max(), r
    assert scales[4] == 0 and not back[4].any()


def test_half_rows_read_back_and_multiply_as_their_float32_values(workspace):
    index = GradientIndex(workspace / "index")
    point = index.group_points["trak"][0]
    for kind in TRAK_KINDS:
        stored = np.load(index.root / rows_file(point, kind, white=True))
        wide = stored.astype(np.float32) * np.load(index.root / scales_file(point, kind))[:, None]
        assert stored.dtype == np.float16 and np.array_equal(index.matrix(point, kind).numpy(), wide)
        positions = np.array([0, 3, 5])
        assert np.array_equal(index.rows_at(point, kind, positions), wide[positions])
        for q in (1, HALF_GEMM_MAX + 4):  # a float16 product; past HALF_GEMM_MAX the rows widened to float32
            vecs = torch.randn(q, wide.shape[1], generator=torch.Generator().manual_seed(q))
            exact = vecs.double() @ torch.from_numpy(wide).double().T
            error = float((index.products(point, kind, vecs).double() - exact).norm() / exact.norm())
            assert error < (HALF if q <= HALF_GEMM_MAX else 1e-5), (kind, q, error)


def test_rows_whitened_in_float32_score_the_same_and_the_next_build_converts_them(workspace, tmp_path):
    root = _copy(workspace, tmp_path)
    half = _scores(root)
    index = root / "index"
    meta = json.loads((index / "meta.json").read_text())
    points, opened = meta["group_points"]["trak"], GradientIndex(index)
    for point in points:  # as an index whitened before the rows were kept in float16 left them
        for kind in TRAK_KINDS:
            np.save(index / rows_file(point, kind, white=True), opened.matrix(point, kind).numpy())
            (index / scales_file(point, kind)).unlink()
        meta["whitened"][point].pop("storage")
    (index / "meta.json").write_text(json.dumps(meta))
    # a conversion interrupted between its two renames: scales beside float32 rows are not read
    np.save(index / scales_file(points[0], "trak"), np.full(len(meta["ids"]), 7.0, dtype=np.float32))
    for name, (values, ihvp) in _scores(root).items():
        assert ihvp["applied"] == "training rows"
        assert float((values - half[name][0]).norm() / values.norm()) < HALF, name
    lines: list[str] = []
    build_index(Workspace(root), IndexSettings(dim=None, batch_size=8), groups=("trak",), progress=False,
                log=lines.append)
    assert any(f"{points[-1]} (float32 rows converted to float16)" in line for line in lines), lines
    meta = json.loads((index / "meta.json").read_text())
    assert {meta["whitened"][p]["storage"] for p in points} == {STORAGE} and not list(index.glob("*.tmp.npy"))
    for point in points:
        for kind in TRAK_KINDS:
            assert np.load(index / rows_file(point, kind, white=True), mmap_mode="r").dtype == np.float16
    for name, (values, _) in _scores(root).items():
        assert float((values - half[name][0]).norm() / values.norm()) < 1e-4, name
    (index / scales_file(points[0], "trak-diff")).unlink()  # lost: the index is refused, then built again
    with pytest.raises(ValueError, match=r"white\.scales\.npy: unreadable"):
        GradientIndex(index)
    lines.clear()
    build_index(Workspace(root), IndexSettings(dim=None, batch_size=8), groups=("trak",), progress=False,
                log=lines.append)
    assert any(f"trak:{points[0]})" in line and f"TRAK rows whitened at {points[0]} in" in line for line in lines), lines
    for name, (values, _) in _scores(root).items():
        assert float((values - half[name][0]).norm() / values.norm()) < 1e-4, name


def test_rows_whitened_with_another_ridge_are_refused_and_built_again(workspace, tmp_path):
    root = _copy(workspace, tmp_path)
    whitened = _scores(root)
    meta_path = root / "index" / "meta.json"
    meta = json.loads(meta_path.read_text())
    point = meta["group_points"]["trak"][-1]
    meta["whitened"][point]["ridge"] = 0.5  # as if TRAK_RIDGE had been 0.5 when they were whitened
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=rf"the TRAK rows at {point} were whitened with ridge 0.5"):
        _scores(root)
    lines: list[str] = []
    build_index(Workspace(root), IndexSettings(dim=None, batch_size=8), groups=("trak",), progress=False,
                log=lines.append)
    assert any(f"trak:{point})" in line and f"TRAK rows whitened at {point} in" in line for line in lines), lines
    assert json.loads(meta_path.read_text())["whitened"][point]["ridge"] == TRAK_RIDGE
    for name, (values, _) in _scores(root).items():
        assert float((values - whitened[name][0]).norm() / values.norm()) < 1e-5, name


def test_a_corrected_training_span_whitens_its_trak_overlay(workspace, tmp_path):
    root = _copy(workspace, tmp_path)
    backend = Backend(root, device="cpu")
    test_id = backend.instances("test")[0].id
    before = _scores(root)["TRAK++"][0]
    j = 2
    row = backend.instances("train")[j]
    new = (0, 4) if row.span_pair != (0, 4) else (2, 9)
    backend.annotate_span(row.id, "fix", "tester", new)
    for point in backend.ws.points("checkpoint"):
        with np.load(root / "index" / f"patch.trak.{point}.npz") as overlay:
            assert set(overlay.files) == {"positions", "trak-diff", "trak-diff.white"}
            white = whiten_rows(point_inverse(root / "index", point), overlay["trak-diff"]).astype(np.float32)
            np.testing.assert_allclose(overlay["trak-diff.white"], white, rtol=0, atol=0)
        index = GradientIndex(root / "index")  # the rows a FAISS search rescores: the overlay's in place
        rows = _rows(index, point, "trak-diff", np.array([1, j]))
        assert np.array_equal(rows[1], white[0]) and np.array_equal(rows[0], index.rows_at(point, "trak-diff", np.array([1]))[0])
    after = _scores(root)["TRAK++"][0]
    expected = float(brute_trak(backend, test_id, True, [row], TRAK_RIDGE, spans={row.id: new})[0])
    scale = float(before.abs().max())
    assert abs(float(after[j]) - expected) < 1e-2 * scale
    assert abs(float(before[j]) - float(after[j])) > 5e-2 * scale  # the new span changed the score
    others = torch.arange(len(before)) != j
    assert torch.allclose(after[others], before[others], atol=1e-6 * scale)
