"""An index that is read, not loaded: queries stream it with memory bounded whatever its size, and
an approximate top-K (FAISS) proposes candidates that are then scored exactly."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from core.ann import (
    AnnSearch,
    AnnSettings,
    ann_record,
    build_ann,
    leading_directions,
    recall_at_k,
)
from core.index import GradientIndex, _overlay_path, _save_overlay
from core.training_sides import IndexedSide
from tests.synthetic import synthetic_index

ROOT = Path(__file__).resolve().parents[1]
QUERY = """
import json, sys
import numpy as np, torch
from core.index import GradientIndex, _overlay_path, _save_overlay
from core.training_sides import IndexedSide
side = IndexedSide(GradientIndex(__import__("pathlib").Path(sys.argv[1])))
vecs = torch.from_numpy(np.random.default_rng(1).standard_normal((2, side.index.settings.dim), dtype=np.float32))
dots = side.dot_many("final", {"q": ("full", vecs)})["q"].numpy()
peak = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))  # this image's own peak
print(json.dumps({"rss_mib": int(peak.split()[1]) / 1024,
                  "sum": float(dots.astype(np.float64).sum()), "top": dots.argmax(1).tolist()}))
"""


def test_a_query_streams_an_index_larger_than_its_memory_budget(tmp_path):
    """A 1 GiB matrix queried by a fresh process that stays far below 1 GiB of resident memory,
    with the exact answer (checked against numpy here, chunk by chunk)."""
    n, dim, budget_mib = 262_144, 1024, 700
    root = synthetic_index(tmp_path / "index", n, dim)
    assert (root / "final.full.npy").stat().st_size > 1024 * 2**20 > budget_mib * 2**20
    out = subprocess.run([sys.executable, "-c", QUERY, str(root)], capture_output=True, text=True, cwd=ROOT,
                         check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    mapped = np.load(root / "final.full.npy", mmap_mode="r")
    vecs = np.random.default_rng(1).standard_normal((2, dim), dtype=np.float32)
    parts = [np.asarray(mapped[s : s + 65536]) @ vecs.T for s in range(0, n, 65536)]
    expected = np.concatenate(parts).T
    assert got["top"] == expected.argmax(1).tolist()
    assert abs(got["sum"] - float(expected.astype(np.float64).sum())) < 1e-3 * float(np.abs(expected).sum())
    assert got["rss_mib"] < budget_mib, got["rss_mib"]


def test_approximate_top_k_rescores_its_candidates_exactly(tmp_path, monkeypatch):
    """FAISS proposes candidates; their returned scores are exact (corrected spans' overlay rows,
    in three different blocks of the build's stream, included), and the exact top-10 is mostly
    among them (recall@10 against the exact ranking)."""
    monkeypatch.setattr("core.index.BLOCK_BYTES", 1000 * 64 * 4)  # blocks of 1,000 rows
    n, dim = 4000, 64
    rng = np.random.default_rng(0)
    root = synthetic_index(tmp_path / "index", n, dim, points=("final", "checkpoint-1"))
    patched = [5, 17, 3000]  # three corrected spans: their span rows now point along one direction
    _save_overlay(_overlay_path(root, "grad", "checkpoint-1"), patched,
                  {"diff": np.tile(np.linspace(1.0, 2.0, dim, dtype=np.float32), (3, 1)) * 8})
    index = GradientIndex(root)
    terms = [("final", "full"), ("checkpoint-1", "diff")]
    settings = AnnSettings(rank=dim, candidates=20)
    for point, kind in terms:
        build_ann(index, point, kind, settings)
    vecs = {t: torch.from_numpy(rng.standard_normal((3, dim), dtype=np.float32)) for t in terms}
    vecs[terms[1]][0] = torch.linspace(1.0, 2.0, dim)  # a query that the patched rows answer best
    weights = {terms[0]: 0.1, terms[1]: 1.0}
    positions, scores = AnnSearch(index, terms, settings).top_k(vecs, weights, k=10)
    side = IndexedSide(index)
    exact = sum(weights[t] * side.dot_many(t[0], {"q": (t[1], vecs[t])})["q"].numpy().astype(np.float64)
                for t in terms)
    np.testing.assert_allclose(scores, np.take_along_axis(exact, positions, 1), rtol=1e-4, atol=1e-3)
    assert set(positions[0, :3].tolist()) == set(patched)  # the overlay's rows, not the base rows
    assert recall_at_k(positions, exact, 10) >= 0.9
    # opponents: the same search with the weights negated finds the lowest exact scores
    low, low_scores = AnnSearch(index, terms, settings).top_k(vecs, {t: -w for t, w in weights.items()}, k=10)
    np.testing.assert_allclose(-low_scores, np.take_along_axis(exact, low, 1), rtol=1e-4, atol=1e-3)
    assert recall_at_k(low, -exact, 10) >= 0.9 and not set(low[0].tolist()) & set(patched)


def test_the_projection_keeps_inner_products_with_the_rows_span_however_far_their_mean_lies():
    """Rows of rank 6 around a mean far from the origin: the 6 leading directions of the uncentred
    second moment keep all their energy and every inner product with a vector in their span (a
    centred projection would lose the mean's direction)."""
    rng = np.random.default_rng(3)
    rows = (rng.standard_normal((400, 5)) @ rng.standard_normal((5, 48)) + 30.0 * rng.standard_normal(48))
    directions, kept = leading_directions(rows.astype(np.float32), 6)
    assert directions.shape == (6, 48) and kept > 1 - 1e-6
    queries = rng.standard_normal((3, 400)) @ rows  # in the rows' span
    projected = (rows @ directions.T) @ (queries @ directions.T).T
    np.testing.assert_allclose(projected, rows @ queries.T, rtol=1e-4, atol=1e-3 * np.abs(rows @ queries.T).max())


def test_a_low_rank_projection_finds_the_exact_top_k_of_low_rank_rows(tmp_path):
    """6,000 rows of rank 8 plus 10 % noise at d = 128, projected onto 8 dimensions (16x fewer) at
    8 bits: the exact top-10 of random queries is among 5 x 10 candidates (recall@10 >= 0.95, for
    the lowest scores too), and the record says what the projection keeps."""
    n, dim = 6000, 128
    root = synthetic_index(tmp_path / "index", n, dim, filled=("full",), rank=8)
    index = GradientIndex(root)
    settings = AnnSettings(rank=8, candidates=5)
    build_ann(index, "final", "full", settings)
    record = ann_record(index, "final", "full")
    assert record["rank"] == 8 and record["layout"] == "projection-sq8" and 0.95 < record["energy_kept"] < 1
    term = ("final", "full")
    vecs = torch.from_numpy(np.random.default_rng(4).standard_normal((8, dim), dtype=np.float32))
    exact = IndexedSide(index).dot_many("final", {"q": ("full", vecs)})["q"].numpy()
    search = AnnSearch(index, [term], settings)
    top, _ = search.top_k({term: vecs}, {term: 1.0}, k=10)
    low, _ = search.top_k({term: vecs}, {term: -1.0}, k=10)
    assert recall_at_k(top, exact, 10) >= 0.95 and recall_at_k(low, -exact, 10) >= 0.95


def test_every_row_is_quantised_within_its_coordinates_range(tmp_path, monkeypatch):
    """The 8-bit ranges are those of all rows, not of the sample the projection is fitted on: a
    row outside the sample is never clamped (it could be a top proponent)."""
    import faiss

    monkeypatch.setattr("core.ann.SAMPLE_ROWS", 100)
    n, dim = 3000, 16
    root = synthetic_index(tmp_path / "index", n, dim, filled=("full",))
    index = GradientIndex(root)
    ann = faiss.read_index(str(build_ann(index, "final", "full", AnnSettings(rank=dim))))
    directions = faiss.vector_to_array(faiss.downcast_VectorTransform(ann.chain.at(0)).A).reshape(dim, dim)
    trained = faiss.vector_to_array(faiss.downcast_index(ann.index).sq.trained)
    low, width = trained[:dim], trained[dim:]
    projected = index.matrix("final", "full").numpy() @ directions.T
    assert np.all(projected >= low - 1e-4) and np.all(projected <= low + width + 1e-4)
    assert ann_record(index, "final", "full")["sample_rows"] == 100
