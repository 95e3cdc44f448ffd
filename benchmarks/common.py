"""Shared pieces of the benchmarks: a sub-sampled training side of a prepared workspace."""
from __future__ import annotations

import os
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from core.backend import Backend  # noqa: E402
from core.gradients import Projector  # noqa: E402
from core.index import GradientIndex, training_gradients  # noqa: E402
from core.methods import TrainingSide  # noqa: E402
from core.model import HiddenCache, length_batches  # noqa: E402


def peak_rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


class SubsetIndex(GradientIndex):
    """An in-memory gradient index over a subset of the training set (for benchmarks)."""

    def __init__(self, matrices: dict[str, torch.Tensor], gram: torch.Tensor | None, ids: list[str]):
        self.ids, self.meta, self._cache, self._gram = ids, {"done": True}, matrices, gram
        self.points = sorted({k.split(".")[0] for k in matrices})

    def gauss_newton(self) -> torch.Tensor:
        assert self._gram is not None
        return self._gram


def subset_caches(backend: Backend, rows: list[int]) -> tuple[HiddenCache, HiddenCache, torch.Tensor]:
    """Frozen-prefix states of ``rows`` of the training set, whole and span-masked, and labels
    (read from the index folder, without building the index)."""
    full, labels = backend.train_cache
    masked = HiddenCache.load(backend.ws.root / "index" / "prefix-masked.safetensors")
    return HiddenCache([full.states[i] for i in rows]), HiddenCache([masked.states[i] for i in rows]), labels[rows]


def subset_side(backend: Backend, rows: list[int], points: list[str], dim: int | None,
                batch_size: int = 32, with_gram: bool = False) -> tuple[TrainingSide, float]:
    """A training side over ``rows`` of the training set: projected matrices built in memory
    (``dim`` set), or streamed exactly (``dim=None``). Returns it and the build time in seconds."""
    from core.index import gauss_newton_batch

    full, masked, labels = subset_caches(backend, rows)
    projector = Projector(backend.loaded.split, dim, backend.index_settings.seed, backend.loaded.device)
    if dim is None:
        return TrainingSide(backend.loaded, projector, None, full, masked, labels, batch_size), 0.0
    started = time.perf_counter()
    matrices: dict[str, torch.Tensor] = {}
    gram = torch.zeros(projector.dim, projector.dim, dtype=torch.float64) if with_gram else None
    batches = length_batches(full.lengths(), batch_size)
    for point in points:
        mats = {kind: torch.zeros(len(rows), projector.dim) for kind in ("full", "diff")}
        jac = with_gram and point == "final"
        for b in training_gradients(backend.loaded, projector, full, masked, labels, point, batches, with_jacobian=jac):
            mats["full"][b.rows], mats["diff"][b.rows] = b.full, b.diff
            if jac:
                gram += gauss_newton_batch(b.logits, b.jacobian)
        matrices.update({f"{point}.{kind}": m for kind, m in mats.items()})
    if gram is not None:
        gram /= len(rows)
    index = SubsetIndex(matrices, gram, [backend.train_ids[i] for i in rows])
    return TrainingSide(backend.loaded, projector, index), time.perf_counter() - started
