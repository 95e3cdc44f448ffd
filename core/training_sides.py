"""Training sides: where the training-side vectors X_p(z) of the engine's inner products come from.

Every side answers :meth:`TrainingSide.dot_many`: the (Q, N) inner products of test-side
vectors with every training instance's vector of some representation kinds at one parameter
point, :meth:`TrainingSide.gauss_newton`, the mean Gauss-Newton matrix at theta in its space
(the fast inverse), :meth:`TrainingSide.feature_gram`, TRAK's Phi^T Phi at a point, and
:meth:`TrainingSide.whitened`, whether its TRAK rows already carry TRAK's inverse. Three
strategies:

* :class:`IndexedSide`: the sketched rows of the on-disk gradient index (the default);
* :class:`StreamedSide`: per-example gradients computed batch by batch (exact, or sketched with
  the index's projector for points the index does not hold, e.g. new variants);
* :class:`InMemorySide`: given matrices (tests, synthetic data);
* :class:`ShardedSide`: a StreamedSide's passes as tasks (Ray) over shards of the training rows.

:class:`RoutedSide` sends some points to another side.
"""
from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from typing import Protocol

import numpy as np
import torch

from .ggn import gauss_newton_batch
from .gradients import Basis, Projector
from .index import GradientIndex
from .model import HiddenCache, Params, length_batches
from .parallel import Mapper, worker_cache
from .points import LoadedModel
from .training_rows import training_gradients

Requests = Mapping[Hashable, tuple[str, torch.Tensor]]
"""Named requests: key -> (representation kind, test-side vectors (Q, d))."""


class TrainingSide(Protocol):
    exact: bool
    n: int

    def dot_many(self, point: str, requests: Requests) -> dict[Hashable, torch.Tensor]:
        """Inner products (Q, N) of each request's vectors with the training rows of its kind."""

    def gauss_newton(self) -> torch.Tensor:
        """The mean Gauss-Newton matrix at theta (d x d, float64) in this side's space."""

    def feature_gram(self, point: str) -> torch.Tensor:
        """Sum over training instances of phi(z) phi(z)^T (d x d, float64), phi the margin gradient at ``point``."""

    def whitened(self, point: str) -> dict | None:
        """How the TRAK rows at ``point`` were whitened (``ridge``, ``lambda``) when this side keeps
        them multiplied by TRAK's inverse (:mod:`core.whitening`); None when it keeps them as they are."""


class IndexedSide:
    """Training rows from the gradient index, streamed block by block from its memory-mapped
    files (memory bounded whatever N is; on the test vectors' device), corrected spans' rows
    from its overlay."""

    def __init__(self, index: GradientIndex):
        self.index = index
        self.exact = bool(index.meta["projection"].get("exact"))
        self.n = len(index.ids)

    def dot_many(self, point: str, requests: Requests) -> dict[Hashable, torch.Tensor]:
        out = {}
        for kind in dict.fromkeys(kind for kind, _ in requests.values()):
            keys = [key for key, (k, _) in requests.items() if k == kind]
            vecs = torch.cat([requests[key][1].float() for key in keys])  # every request of a kind: one pass
            dots = self.index.products(point, kind, vecs)
            if (patched := self.index.overlay(point, kind)) is not None:
                dots[:, patched[0].to(vecs.device)] = vecs @ patched[1].to(vecs.device).T
            sizes = [requests[key][1].shape[0] for key in keys]
            out |= dict(zip(keys, (part.cpu() for part in torch.split(dots, sizes))))
        return out

    def gauss_newton(self) -> torch.Tensor:
        return self.index.gauss_newton()

    def feature_gram(self, point: str) -> torch.Tensor:
        return self.index.feature_gram(point)

    def whitened(self, point: str) -> dict | None:
        return self.index.whitened(point)


class StreamedSide:
    """Training rows computed batch by batch, one pass per point for every kind requested; on the
    caches ``full`` and ``masked``, or those of each point's bottom (``prefixes``, an imported
    model's checkpoints having their own); kinds in their own coordinates (EK-FAC's) with the
    bases that ``bases(kinds)`` gives."""

    def __init__(self, loaded: LoadedModel, projector: Projector, full: HiddenCache, masked: HiddenCache,
                 labels: torch.Tensor, batch_size: int = 32, *, progress=None, prefixes=None,
                 bases: Callable[[tuple[str, ...]], Mapping[str, Basis]] | None = None):
        self.loaded, self.projector = loaded, projector
        self.bases = bases  # kinds -> the coordinates of those that have their own (core.artifacts.bases_for)
        self.full, self.masked, self.labels, self.batch_size = full, masked, labels, batch_size
        self.prefixes = prefixes  # core.prefixes.TrainPrefixes, or None
        self.exact = projector.exact
        self.n = len(full)
        self.progress = progress  # called with 1 after each batch of a pass
        self._gram: torch.Tensor | None = None
        self._features: dict[str, torch.Tensor] = {}

    def _batches(self) -> list[list[int]]:
        return length_batches(self.full.lengths(), self.batch_size)

    def _caches(self, point: str) -> tuple[HiddenCache, HiddenCache]:
        return self.prefixes.pair(point) if self.prefixes is not None else (self.full, self.masked)

    def dot_many(self, point: str, requests: Requests) -> dict[Hashable, torch.Tensor]:
        out = {key: torch.zeros(vecs.shape[0], self.n, dtype=torch.float64) for key, (_, vecs) in requests.items()}
        tests = {key: vecs.double().cpu() for key, (_, vecs) in requests.items()}
        kinds = tuple(sorted({kind for kind, _ in requests.values()}))
        for batch in training_gradients(self.loaded, self.projector, *self._caches(point), self.labels, point,
                                        self._batches(), kinds=kinds, bases=self.bases and self.bases(kinds)):
            for key, (kind, _) in requests.items():
                out[key][:, batch.rows] = tests[key] @ batch.vectors[kind].double().T
            if self.progress is not None:
                self.progress(1)
        return {key: value.float() for key, value in out.items()}

    def _square(self, limit: int, instead: str) -> torch.Tensor:
        """A zero (d, d) float64 matrix, refused when d (exact: every trainable parameter) is past ``limit``."""
        d = self.projector.dim
        if d > limit:
            over = "the exact gradients" if self.exact else f"a {d}-dimensional sketch"
            raise ValueError(f"a {d} x {d} matrix over {over} is out of reach; {instead}")
        return torch.zeros(d, d, dtype=torch.float64)

    def gauss_newton(self, limit: int = 20_000) -> torch.Tensor:
        if self._gram is None:
            gram = self._square(limit, "use the LiSSA inverse (--ihvp lissa)")
            for batch in training_gradients(self.loaded, self.projector, self.full, self.masked, self.labels, "final",
                                            self._batches(), kinds=("full",), with_jacobian=True):
                gram += gauss_newton_batch(batch.logits, batch.jacobian)
            self._gram = gram / self.n
        return self._gram

    def feature_gram(self, point: str, limit: int = 20_000) -> torch.Tensor:
        if point not in self._features:
            gram = self._square(limit, "TRAK needs a smaller sketch (drop --exact, or a smaller --proj-dim)")
            for batch in training_gradients(self.loaded, self.projector, *self._caches(point), self.labels, point,
                                            self._batches(), kinds=("trak",)):
                phi = batch.whole["margin"].double()
                gram += phi.T @ phi
            self._features[point] = gram
        return self._features[point]

    def whitened(self, point: str) -> None:
        return None


class InMemorySide:
    """Training rows held in memory: ``rows[(point, kind)]`` is (N, d)."""

    def __init__(self, rows: Mapping[tuple[str, str], torch.Tensor], *, exact: bool, gram: torch.Tensor | None = None,
                 feature_grams: Mapping[str, torch.Tensor] | None = None):
        self.rows, self._gram, self.exact = dict(rows), gram, exact
        self.features = dict(feature_grams or {})
        self.n = next(iter(self.rows.values())).shape[0]

    def dot_many(self, point: str, requests: Requests) -> dict[Hashable, torch.Tensor]:
        return {key: vecs.to(self.rows[point, kind].dtype) @ self.rows[point, kind].T
                for key, (kind, vecs) in requests.items()}

    def gauss_newton(self) -> torch.Tensor:
        if self._gram is None:
            raise ValueError("this in-memory training side has no Gauss-Newton matrix")
        return self._gram

    def feature_gram(self, point: str) -> torch.Tensor:
        if point not in self.features:
            raise ValueError(f"this in-memory training side has no TRAK features at {point}")
        return self.features[point]

    def whitened(self, point: str) -> None:
        return None


class RoutedSide:
    """``default`` for every point but those in ``routes`` (point -> side)."""

    def __init__(self, default: TrainingSide, routes: Mapping[str, TrainingSide]):
        self.default, self.routes = default, dict(routes)
        self.exact = default.exact
        self.n = default.n

    def dot_many(self, point: str, requests: Requests) -> dict[Hashable, torch.Tensor]:
        return self.routes.get(point, self.default).dot_many(point, requests)

    def gauss_newton(self) -> torch.Tensor:
        return self.default.gauss_newton()

    def feature_gram(self, point: str) -> torch.Tensor:
        return self.routes.get(point, self.default).feature_gram(point)

    def whitened(self, point: str) -> dict | None:
        return self.routes.get(point, self.default).whitened(point)


SHARD_ROWS = 1_000
"""Training rows per task of a :class:`ShardedSide` (fewer when that would make one shard)."""


class ShardedSide:
    """A :class:`StreamedSide` for points the index does not hold (a faithfulness run's new
    variants, their parameters in ``points``), its passes run as tasks of ``pool``
    (:mod:`core.parallel`), one per shard of the training rows.

    ``workspace`` is (root, index fingerprint): a task opens the workspace once per worker,
    refuses an index that changed, streams its rows at the point with the index's projector and
    batch size, and returns their inner products, placed here by row; so the result is a
    StreamedSide's up to rounding (batches of other lengths). ``progress`` is called with the
    number of training rows of each finished task."""

    def __init__(self, pool: Mapper, workspace: tuple[str, str], points: Mapping[str, Params], n: int, *,
                 exact: bool = False, progress: Callable[[int], None] | None = None, shard_rows: int = SHARD_ROWS):
        self.pool, self.workspace, self.points = pool, workspace, dict(points)
        self.n, self.exact, self.progress = n, exact, progress
        size = max(1, min(shard_rows, -(-n // 2)))
        self.shards = [(start, min(start + size, n)) for start in range(0, n, size)]

    def dot_many(self, point: str, requests: Requests) -> dict[Hashable, torch.Tensor]:
        out = {key: torch.empty(vecs.shape[0], self.n) for key, (_, vecs) in requests.items()}
        here = {key: (kind, vecs.detach().cpu()) for key, (kind, vecs) in requests.items()}
        for (start, stop), part in self.pool.map(_shard_dots, self.shards, self.workspace, point, self.points[point], here):
            for key, values in part.items():
                out[key][:, start:stop] = torch.from_numpy(values)
            if self.progress is not None:
                self.progress(stop - start)
        return out

    def gauss_newton(self) -> torch.Tensor:
        raise ValueError("a sharded side streams points the index lacks; the Gauss-Newton matrix is the index's")

    def feature_gram(self, point: str) -> torch.Tensor:
        raise ValueError("a sharded side streams points the index lacks; TRAK's features are the index's")

    def whitened(self, point: str) -> None:
        return None


def _shard_dots(shard: tuple[int, int], workspace: tuple[str, str], point: str, params: Params,
                requests: Requests) -> dict[Hashable, np.ndarray]:
    """One shard's inner products in a task: its training rows streamed at ``point``."""
    from .backend import Backend

    root, fingerprint = workspace
    backend = worker_cache(("backend", root, fingerprint), lambda: Backend(root))  # as Sag/Lag tasks open it
    if backend.fingerprint != fingerprint:
        raise RuntimeError(f"{root}: its index changed during the evaluation; run it again")
    masked = worker_cache(("masked-prefix", root, fingerprint),
                          lambda: HiddenCache.load(backend.index.root / "prefix-masked.safetensors"))
    full, labels = backend.train_cache()
    rows = list(range(*shard))
    subset = lambda cache: HiddenCache([cache.states[i] for i in rows])  # noqa: E731
    loaded = backend.loaded
    loaded.points[point] = params
    try:
        side = StreamedSide(loaded, backend.engine().projector, subset(full), subset(masked), labels[rows],
                            backend.index.settings.batch_size)
        return {key: values.numpy() for key, values in side.dot_many(point, requests).items()}
    finally:
        loaded.points.pop(point, None)
