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

from core.artifacts import bases_for  # noqa: E402
from core.backend import Backend  # noqa: E402
from core.engine import Engine  # noqa: E402
from core.ggn import gauss_newton_batch  # noqa: E402
from core.gradients import Projector  # noqa: E402
from core.model import HiddenCache, length_batches  # noqa: E402
from core.points import PointSet  # noqa: E402
from core.training_rows import training_gradients  # noqa: E402
from core.training_sides import InMemorySide, StreamedSide, TrainingSide  # noqa: E402

KINDS = ("full", "diff")
"""The representation kinds of a sub-sampled side (those the index holds)."""


def peak_rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def current_rss_mib() -> float | None:
    """The process's resident memory now (Linux /proc; None elsewhere): with :func:`peak_rss_mib`
    after a step, the step's own peak is at least ``peak - current-before``."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


def gold_tests(backend: Backend, records) -> list:
    """Test inputs of ``records`` explaining their GOLD labels (what the README's figures explain)."""
    return [backend.test_input(r.id, "gold") for r in records]


def subset_caches(backend: Backend, rows: list[int]) -> tuple[HiddenCache, HiddenCache, torch.Tensor]:
    """Frozen-prefix states of ``rows`` of the training set, whole and span-masked, and labels
    (read from the index folder, without opening the index)."""
    full, labels = backend.train_cache()
    masked = HiddenCache.load(backend.ws.root / "index" / "prefix-masked.safetensors")
    return HiddenCache([full.states[i] for i in rows]), HiddenCache([masked.states[i] for i in rows]), labels[rows]


def bases(backend: Backend):
    """The workspace's bases by kinds, for a :class:`StreamedSide` (EK-FAC's, read when asked for)."""
    return lambda kinds: bases_for(backend.ws, kinds)


def subset_side(backend: Backend, rows: list[int], points: list[str], dim: int | None,
                batch_size: int = 32, with_gram: bool = False) -> tuple[TrainingSide, Projector, float]:
    """A training side over ``rows`` of the training set: projected matrices built in memory
    (``dim`` set; an :class:`InMemorySide` of ``points``), or streamed exactly (``dim=None``; a
    :class:`StreamedSide`). Returns it, its projector (the engine's test side must use the same
    one) and the build time in seconds (0 for a streamed side, which builds nothing)."""
    full, masked, labels = subset_caches(backend, rows)
    projector = Projector(backend.loaded.split, dim, backend.index.settings.seed, backend.loaded.device)
    if dim is None:
        return StreamedSide(backend.loaded, projector, full, masked, labels, batch_size, bases=bases(backend)), projector, 0.0
    if with_gram and "final" not in points:
        raise ValueError("the Gauss-Newton matrix is taken at theta: include 'final' in the points")
    started = time.perf_counter()
    matrices: dict[tuple[str, str], torch.Tensor] = {}
    gram = torch.zeros(projector.dim, projector.dim, dtype=torch.float64) if with_gram else None
    batches = length_batches(full.lengths(), batch_size)
    for point in points:
        mats = {kind: torch.zeros(len(rows), projector.dim) for kind in KINDS}
        jac = with_gram and point == "final"
        for b in training_gradients(backend.loaded, projector, full, masked, labels, point, batches, kinds=KINDS,
                                    with_jacobian=jac):
            for kind in KINDS:
                mats[kind][b.rows] = b.vectors[kind]
            if jac:
                gram += gauss_newton_batch(b.logits, b.jacobian)
        matrices.update({(point, kind): m for kind, m in mats.items()})
    if gram is not None:
        gram /= len(rows)
    side = InMemorySide(matrices, gram=gram, exact=projector.exact)
    return side, projector, time.perf_counter() - started


def sketched_streamed_side(backend: Backend, rows: list[int], batch_size: int = 32) -> tuple[StreamedSide, Projector]:
    """A streamed training side over ``rows`` in the index's own sketch (its d and seed): the rows
    the index would hold, computed batch by batch with the model as it is (e.g. in train mode)."""
    full, masked, labels = subset_caches(backend, rows)
    settings = backend.index.settings
    projector = Projector(backend.loaded.split, settings.dim, settings.seed, backend.loaded.device)
    return StreamedSide(backend.loaded, projector, full, masked, labels, batch_size, bases=bases(backend)), projector


def engine_over(backend: Backend, side: TrainingSide, projector: Projector, points: PointSet | None = None) -> Engine:
    """An engine of the workspace's model over ``side`` (the workspace's points unless given)."""
    return Engine(backend.loaded, side, projector, points=points, train_cache=backend.train_cache)
