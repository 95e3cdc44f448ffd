"""Approximate top-K over large indexes: FAISS candidates, exact rescoring.

Exact inner products over every training row stay the default: a query streams the index's
matrices once (:class:`core.training_sides.IndexedSide`), which is fast up to a few hundred
thousand rows on a CPU (see docs/SCALING.md). Past that, each (point, kind) matrix gets a compact
FAISS index that is searched exhaustively: its rows projected onto the ``rank`` leading
eigenvectors of their second moment and stored at 8 bits per coordinate, over the range of all
rows (FAISS
``IndexPreTransform`` of a ``LinearTransform`` and an ``IndexScalarQuantizer``, inner-product
metric). The candidates' scores are then computed exactly from the memory-mapped rows, summed
over the method's points with its weights - so a returned score is never approximate, only the
candidate set is. :func:`recall_at_k` measures what that costs against the exact top-K.

The projection is uncentred on purpose: an inner product, not a distance, is ranked, and FAISS
applies a pre-transform to the queries as well, so centring would subtract the rows' mean from
every query and add a row-dependent term to its scores. The earlier layout, inverted lists with
product quantisation (IVF-PQ), was measured and dropped: its candidates held 9 % of the exact
top-10 at 1M rows (docs/SCALING.md).

Each FAISS file has a record beside it (``ann.{point}.{kind}.json``: the index's fingerprint and
corrected spans, the rows, the layout, the share of the rows' energy the projection keeps);
:func:`check_ann` refuses a search when a file is missing or no longer matches its matrix (the
index rebuilt, a span corrected since), naming the command that rebuilds it.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from numpy.lib.format import open_memmap

from .index import GradientIndex
from .representations import REPRESENTATIONS
from .workspace import fingerprint, write_json_atomic

SAMPLE_ROWS = 20_000  # rows the projection is fitted on
ADD_ROWS = 65_536  # projected rows added to FAISS at a time
LAYOUT = "projection-sq8"
"""The layout this code builds and reads; a FAISS file of another layout is stale."""
LOW_ENERGY = 1 / 3  # a projection keeping less of the rows' energy is flagged (energy_warning)


@dataclass(frozen=True)
class AnnSettings:
    """FAISS layout and search breadth. ``rank`` (building): dimensions the rows are projected onto
    (at most the sketch's); ``candidates`` (searching): rows proposed per matrix before exact
    rescoring, a multiple of K."""

    rank: int = 256
    candidates: int = 20

    def __post_init__(self) -> None:
        if self.rank < 1 or self.candidates < 1:
            raise ValueError("rank and candidates must be at least 1")


def _faiss():
    try:
        import faiss
    except ImportError as err:  # the requirement is pinned; a missing one is an install problem
        raise RuntimeError("approximate top-K needs faiss-cpu (pip install -r requirements.txt)") from err
    return faiss


def check_sketched(dim: int | None) -> int:
    """The sketch dimension of an index FAISS can serve (ValueError for an exact index)."""
    if dim is None:
        raise ValueError("an approximate index needs a sketched gradient index; this one is exact (--proj-dim 0)")
    return dim


def ann_path(index: GradientIndex, point: str, kind: str) -> Path:
    return index.root / f"ann.{point}.{kind}.faiss"


def _record_path(index: GradientIndex, point: str, kind: str) -> Path:
    return index.root / f"ann.{point}.{kind}.json"


def ann_record(index: GradientIndex, point: str, kind: str) -> dict:
    """What a (point, kind) FAISS file was built from and with (see the module docstring)."""
    return json.loads(_record_path(index, point, kind).read_text())


def _matrix_state(index: GradientIndex, point: str, kind: str) -> dict:
    """What a FAISS file must match: the index's fingerprint and rows, for a span kind the
    corrected spans (they change its rows), for a kind formed in a basis its factors, and whether
    the rows are whitened (TRAK's, :mod:`core.whitening`)."""
    rep = REPRESENTATIONS[kind]
    spans = index.meta.get("overrides", {}) if rep.span else None
    basis = index.meta.get("basis_fps", {}).get(rep.basis) if rep.basis else None
    return {"fingerprint": index.meta.get("fingerprint"), "spans": fingerprint(spans), "rows": len(index.ids),
            "basis": basis, "whitened": index.keeps_whitened(point, kind)}


def stale_reason(index: GradientIndex, point: str, kind: str) -> str | None:
    """Why a (point, kind) FAISS file cannot serve the index as it is now (``missing``, or what
    changed since it was built); None when it can."""
    record = _record_path(index, point, kind)
    if not ann_path(index, point, kind).exists() or not record.exists():
        return "missing"
    state, built = _matrix_state(index, point, kind), ann_record(index, point, kind)
    if built.get("layout") != LAYOUT:
        return "it has an earlier FAISS layout"
    if {k: built.get(k) for k in state} | {"whitened": built.get("whitened", False)} == state:
        return None
    if built.get("fingerprint") != state["fingerprint"]:
        return "the index was rebuilt since it was built"
    if built.get("whitened", False) != state["whitened"]:
        return "the TRAK rows were whitened since it was built"
    return ("training spans were corrected" if built.get("spans") != state["spans"] else
            "the EK-FAC factors were fitted again") + " since it was built"


def built_as(index: GradientIndex, point: str, kind: str, settings: AnnSettings) -> bool:
    """Whether the (point, kind) FAISS file is up to date and was built with ``settings``' rank."""
    return stale_reason(index, point, kind) is None and ann_record(index, point, kind).get("rank_asked") == settings.rank


def check_ann(index: GradientIndex, terms: Sequence[tuple[str, str]], rebuild: str) -> None:
    """FileNotFoundError (missing) or ValueError (stale) unless every term's FAISS file matches
    the index as it is now; ``rebuild``: the command that (re)builds them."""
    for point, kind in terms:
        why = stale_reason(index, point, kind)
        if why == "missing":
            raise FileNotFoundError(f"{ann_path(index, point, kind)}: no approximate index; build it with: {rebuild}")
        if why is not None:
            raise ValueError(f"{ann_path(index, point, kind)} is stale ({why}); rebuild it with: {rebuild}")


def leading_directions(sample: np.ndarray, rank: int) -> tuple[np.ndarray, float]:
    """The ``rank`` leading eigenvectors of the rows' second moment ``S^T S`` as a (rank, d)
    float32 matrix, and the share of the sample's squared norm they keep."""
    wide = sample.astype(np.float64)
    second = wide.T @ wide
    values, vectors = np.linalg.eigh(second)  # ascending
    rank = min(rank, len(values))
    total = float(values.sum())
    kept = float(values[-rank:].sum()) / total if total > 0 else 1.0
    return np.ascontiguousarray(vectors[:, ::-1][:, :rank].T, dtype=np.float32), kept


def build_ann(index: GradientIndex, point: str, kind: str, settings: AnnSettings = AnnSettings(), *,
              seed: int = 0) -> Path:
    """Fit the projection on a sample of a (point, kind) matrix, project every row (streamed in
    blocks; corrected spans' overlay rows in place of their base rows), quantise each coordinate
    over a range that holds all rows (none clamped) and save the FAISS index next to the matrix,
    with its record."""
    faiss = _faiss()
    n = len(index.ids)
    d = check_sketched(index.settings.dim)
    rng = np.random.default_rng(seed)
    directions, kept = leading_directions(
        _rows(index, point, kind, np.sort(rng.choice(n, size=min(n, SAMPLE_ROWS), replace=False))), settings.rank)
    rank = len(directions)
    path = ann_path(index, point, kind)
    scratch = path.with_name(path.name + ".rows.npy")  # the projected rows between the two passes
    try:
        projected = open_memmap(scratch, mode="w+", dtype=np.float32, shape=(n, rank))
        low, high = np.full(rank, np.inf, dtype=np.float32), np.full(rank, -np.inf, dtype=np.float32)
        for start, rows in index.blocks(point, kind):
            block = rows.numpy().astype(np.float32, copy=False) @ directions.T
            projected[start : start + len(block)] = block
            low, high = np.minimum(low, block.min(0)), np.maximum(high, block.max(0))
        if (patched := index.overlay(point, kind)) is not None:  # corrected spans' rows replace their base rows
            block = patched[1].numpy().astype(np.float32, copy=False) @ directions.T
            projected[patched[0].numpy()] = block
            low, high = np.minimum(low, block.min(0)), np.maximum(high, block.max(0))
        codes = faiss.IndexScalarQuantizer(rank, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
        codes.train(np.stack([low, high]))  # min-max ranges: exactly those of the rows
        for start in range(0, n, ADD_ROWS):
            codes.add(np.ascontiguousarray(projected[start : start + ADD_ROWS]))
        del projected
    finally:
        scratch.unlink(missing_ok=True)
    transform = faiss.LinearTransform(d, rank, False)
    faiss.copy_array_to_vector(directions.ravel(), transform.A)
    transform.is_trained = True
    ann = faiss.IndexPreTransform(transform, codes)  # queries are projected by FAISS, rows were here
    tmp = path.with_name(path.name + ".tmp")
    faiss.write_index(ann, str(tmp))
    tmp.replace(path)
    write_json_atomic(_record_path(index, point, kind), _matrix_state(index, point, kind) | {
        "layout": LAYOUT, "rank_asked": settings.rank, "rank": rank, "energy_kept": round(kept, 4),
        "sample_rows": min(n, SAMPLE_ROWS)})
    return path


def _rows(index: GradientIndex, point: str, kind: str, positions: np.ndarray) -> np.ndarray:
    """The current rows (overlay applied) at ``positions`` (sorted), float32 (Q, d)."""
    out = index.rows_at(point, kind, positions)
    patched = index.overlay(point, kind)
    if patched is not None:
        where = {int(p): j for j, p in enumerate(patched[0].tolist())}
        for r, pos in enumerate(positions.tolist()):
            if pos in where:
                out[r] = patched[1][where[pos]].numpy()
    return out


class AnnSearch:
    """Approximate top-K of ``sum_p w_p <T_p, X_p(z)>`` over the (point, kind) terms of a method."""

    def __init__(self, index: GradientIndex, terms: Sequence[tuple[str, str]], settings: AnnSettings = AnnSettings()):
        faiss = _faiss()
        self.index, self.settings = index, settings
        self.anns = {}
        for point, kind in terms:
            path = ann_path(index, point, kind)
            if not path.exists():
                raise FileNotFoundError(f"{path}: no approximate index; build it with core.ann.build_ann")
            self.anns[point, kind] = faiss.read_index(str(path))

    def top_k(self, vecs: dict[tuple[str, str], torch.Tensor], weights: dict[tuple[str, str], float],
              k: int) -> tuple[np.ndarray, np.ndarray]:
        """(Q, k) training positions and their exact scores, best first, for test vectors per term."""
        queries = next(iter(vecs.values())).shape[0]
        host = {t: v.detach().float().cpu().numpy() for t, v in vecs.items()}  # the engine's device may be a GPU
        found = [set() for _ in range(queries)]
        for term, ann in self.anns.items():
            _, idx = ann.search(np.ascontiguousarray(weights[term] * host[term]), k * self.settings.candidates)
            for q in range(queries):
                found[q] |= {int(i) for i in idx[q] if i >= 0}
        positions, scores = [], []
        for q in range(queries):
            cand = np.array(sorted(found[q]), dtype=np.int64)
            exact = sum(weights[t] * (_rows(self.index, *t, cand) @ host[t][q]) for t in self.anns)
            order = np.argsort(-exact, kind="stable")[:k]
            positions.append(cand[order])
            scores.append(exact[order])
        return np.stack(positions), np.stack(scores)


def energy_warning(kept: float) -> str | None:
    """What to tell a user whose FAISS projection keeps ``kept`` (the smallest over a method's
    matrices) of the rows' energy: below ``LOW_ENERGY`` the candidates can miss much of the exact
    top-K (full MAMS, rank 256: TRAK's whitened rows kept 18-28 % and its recall@10 was 0.47 at 5
    candidates per K; TRAK++'s kept 66-75 % and IF++'s 78 %, recall about 1.00; docs/SCALING.md)."""
    if kept >= LOW_ENERGY:
        return None
    return (f"the FAISS projection keeps {kept:.0%} of these rows' energy, so its candidates can miss much of "
            "the exact top-K: check with --check-recall, build the files with a higher --ann-rank, or search exactly")


def list_recall(approx: Sequence, exact: Sequence) -> float:
    """Share of an exact list's hits (``train_id``) that an approximate list holds."""
    found = {h.train_id for h in approx}
    return sum(h.train_id in found for h in exact) / len(exact)


def recall_at_k(approx: np.ndarray, exact_scores: np.ndarray, k: int) -> float:
    """Mean share of the exact top-k (from full scores (Q, N)) that the approximate lists hold."""
    exact = np.argsort(-exact_scores, axis=1, kind="stable")[:, :k]
    return float(np.mean([len(set(a[:k].tolist()) & set(e.tolist())) / k for a, e in zip(approx, exact)]))
