"""Approximate top-K over large indexes: FAISS candidates, exact rescoring.

Exact inner products over every training row stay the default: a query streams the index's
matrices once (:class:`core.training_sides.IndexedSide`), which is fast up to a few hundred
thousand rows on a CPU (see docs/SCALING.md). Past that, an inverted-file index with product
quantisation (FAISS ``IVF{lists},PQ{m}``, inner-product metric) over each (point, kind) matrix
proposes candidates, and the candidates' scores are then computed exactly from the
memory-mapped rows, summed over the method's points with its weights - so a returned score is
never approximate, only the candidate set is. :func:`recall_at_k` measures what that costs
against the exact top-K: on synthetic low-rank rows this layout's candidates missed most of
the exact top-10 (recall@10 0.09 at 1M rows; docs/SCALING.md), so the search is experimental.

Each FAISS file has a record beside it (``ann.{point}.{kind}.json``: the index's fingerprint and
corrected spans, the rows, the layout); :func:`check_ann` refuses a search when a file is missing
or no longer matches its matrix (the index rebuilt, a span corrected since), naming the command
that rebuilds it.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .index import GradientIndex
from .representations import REPRESENTATIONS
from .workspace import fingerprint, write_json_atomic

TRAIN_SAMPLE = 50_000  # rows the quantisers are trained on


@dataclass(frozen=True)
class AnnSettings:
    """FAISS index layout and search breadth. ``lists``: inverted lists (None: about 4 sqrt(N));
    ``pq``: sub-quantisers (d must be divisible by it); ``nprobe``: lists searched per query;
    ``candidates``: rows proposed per point before exact rescoring (a multiple of K)."""

    lists: int | None = None
    pq: int = 64
    nprobe: int = 32
    candidates: int = 10

    def __post_init__(self) -> None:
        if self.pq < 1 or self.nprobe < 1 or self.candidates < 1 or (self.lists is not None and self.lists < 1):
            raise ValueError("lists, pq, nprobe and candidates must be at least 1")


def _faiss():
    try:
        import faiss
    except ImportError as err:  # the requirement is pinned; a missing one is an install problem
        raise RuntimeError("approximate top-K needs faiss-cpu (pip install -r requirements.txt)") from err
    return faiss


def check_layout(dim: int | None, settings: AnnSettings) -> int:
    """The sketch dimension, when FAISS can index it with ``settings`` (ValueError otherwise)."""
    if dim is None:
        raise ValueError("an approximate index needs a sketched gradient index; this one is exact (--proj-dim 0)")
    if dim % settings.pq:
        raise ValueError(f"the sketch dimension {dim} is not divisible by {settings.pq} (FAISS's sub-quantisers); "
                         f"use a --proj-dim that is, e.g. {max(settings.pq, dim // settings.pq * settings.pq)}")
    return dim


def ann_path(index: GradientIndex, point: str, kind: str) -> Path:
    return index.root / f"ann.{point}.{kind}.faiss"


def _record_path(index: GradientIndex, point: str, kind: str) -> Path:
    return index.root / f"ann.{point}.{kind}.json"


def _matrix_state(index: GradientIndex, kind: str) -> dict:
    """What a FAISS file must match: the index's fingerprint and rows, for a span kind the
    corrected spans (they change its rows), and for a kind formed in a basis its factors."""
    rep = REPRESENTATIONS[kind]
    spans = index.meta.get("overrides", {}) if rep.span else None
    basis = index.meta.get("basis_fps", {}).get(rep.basis) if rep.basis else None
    return {"fingerprint": index.meta.get("fingerprint"), "spans": fingerprint(spans), "rows": len(index.ids),
            "basis": basis}


def stale_reason(index: GradientIndex, point: str, kind: str) -> str | None:
    """Why a (point, kind) FAISS file cannot serve the index as it is now (``missing``, or what
    changed since it was built); None when it can."""
    record = _record_path(index, point, kind)
    if not ann_path(index, point, kind).exists() or not record.exists():
        return "missing"
    state, built = _matrix_state(index, kind), json.loads(record.read_text())
    if {k: built.get(k) for k in state} == state:
        return None
    if built.get("fingerprint") != state["fingerprint"]:
        return "the index was rebuilt"
    return "training spans were corrected" if built.get("spans") != state["spans"] else "the EK-FAC factors were fitted again"


def check_ann(index: GradientIndex, terms: Sequence[tuple[str, str]], rebuild: str) -> None:
    """FileNotFoundError (missing) or ValueError (stale) unless every term's FAISS file matches
    the index as it is now; ``rebuild``: the command that (re)builds them."""
    for point, kind in terms:
        why = stale_reason(index, point, kind)
        if why == "missing":
            raise FileNotFoundError(f"{ann_path(index, point, kind)}: no approximate index; build it with: {rebuild}")
        if why is not None:
            raise ValueError(f"{ann_path(index, point, kind)} is stale ({why} since it was built); rebuild it with: {rebuild}")


def build_ann(index: GradientIndex, point: str, kind: str, settings: AnnSettings = AnnSettings(), *,
              seed: int = 0) -> Path:
    """Train and fill a FAISS IVF-PQ inner-product index over a (point, kind) matrix (rows streamed
    in blocks; corrected spans' overlay rows included) and save it next to the matrix."""
    faiss = _faiss()
    n = len(index.ids)
    d = check_layout(index.settings.dim, settings)
    lists = settings.lists or max(1, min(n // 39, int(4 * np.sqrt(n))))
    # built directly: index_factory's IVF-PQ trained 25x slower here (polysemous/precomputed-table setup)
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(n, size=min(n, max(TRAIN_SAMPLE, 39 * lists)), replace=False))
    bits = int(min(8, max(1, np.log2(len(sample)))))  # 2^bits codes per sub-quantiser: no more than the sample
    ann = faiss.IndexIVFPQ(faiss.IndexFlatIP(d), d, lists, settings.pq, bits, faiss.METRIC_INNER_PRODUCT)
    ann.cp.min_points_per_centroid = ann.pq.cp.min_points_per_centroid = 1  # small samples are expected: no warnings
    ann.train(_rows(index, point, kind, sample))
    for start, block in index.blocks(point, kind):
        ann.add(np.ascontiguousarray(block.numpy(), dtype=np.float32))
    patched = index.overlay(point, kind)
    if patched is not None:  # the rows of corrected spans replace their base rows
        ids = patched[0].numpy().astype(np.int64)
        ann.remove_ids(ids)
        ann.add_with_ids(np.ascontiguousarray(patched[1].numpy(), dtype=np.float32), ids)
    path = ann_path(index, point, kind)
    tmp = path.with_name(path.name + ".tmp")
    faiss.write_index(ann, str(tmp))
    tmp.replace(path)
    write_json_atomic(_record_path(index, point, kind), _matrix_state(index, kind) | {"lists": lists, "pq": settings.pq, "bits": bits})
    return path


def _rows(index: GradientIndex, point: str, kind: str, positions: np.ndarray) -> np.ndarray:
    """The current rows (overlay applied) at ``positions`` (sorted), float32 (Q, d)."""
    mapped = index._map(f"{point}.{kind}.npy")
    out = np.asarray(mapped[positions], dtype=np.float32)
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
            ann = faiss.read_index(str(path))
            faiss.extract_index_ivf(ann).nprobe = settings.nprobe
            self.anns[point, kind] = ann

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


def recall_at_k(approx: np.ndarray, exact_scores: np.ndarray, k: int) -> float:
    """Mean share of the exact top-k (from full scores (Q, N)) that the approximate lists hold."""
    exact = np.argsort(-exact_scores, axis=1, kind="stable")[:, :k]
    return float(np.mean([len(set(a[:k].tolist()) & set(e.tolist())) / k for a, e in zip(approx, exact)]))
