"""Inverse-Hessian strategies for the methods with an inverse (IF, EK-FAC and TRAK families).

A strategy turns test-side vectors (Q, d) at a parameter point, in the training side's space,
into an inverse curvature matrix times them:

* ``hessian`` kind, ``(H + lambda I)^-1`` by one of two estimators (see :mod:`core.ihvp`):
  :class:`FastInverse`, the damped Gauss-Newton matrix of the training side's space inverted
  exactly by Cholesky (milliseconds per query), or :class:`LissaInverse`, the paper's stochastic
  recursion on each test's dense gradient in the full trainable space, then sketched;
* ``ekfac`` kind: :class:`EkfacInverse`, ``(G_ekfac + lambda I)^-1`` of the eigenvalue-corrected
  Kronecker-factored Gauss-Newton matrix (:mod:`core.ekfac`): in the factors' eigenbasis, where
  the training rows of its kinds are kept, a division of the test side's gradient, entry by
  entry, before it is sketched;
* ``trak`` kind: :class:`FeatureInverse`, TRAK's ``(Phi^T Phi + lambda I)^-1`` of the point's
  sketched margin-gradient features, with lambda = :data:`TRAK_RIDGE` x their mean eigenvalue
  (:func:`trak_inverse`); the index applies it to its training rows once (:mod:`core.whitening`).

:func:`make_inverse` picks the strategy a spec's inverse kind and the run's settings ask for.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

from .ekfac import Eigenbasis, EkfacFactors
from .ihvp import DampedInverse, LissaResult, LissaSettings, lissa
from .model import HiddenCache
from .representations import REPRESENTATIONS
from .scoring import TRAK_RIDGE, ScoreSettings

if TYPE_CHECKING:
    from .engine import Engine, TestBatch
    from .training_sides import TrainingSide


class InverseHessian(Protocol):
    reads_vectors: bool
    """Whether :meth:`apply` reads the sketched test vectors (else it forms each test's dense
    gradient itself and is given ``None``)."""

    def apply(self, engine: "Engine", batch: "TestBatch", point: str, rep: str,
              vecs: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
        """The inverse applied to the rows of ``vecs`` (test-side vectors of ``rep`` at ``point``),
        and a description of how (for the result's record)."""


class FastInverse:
    """(G + lambda I)^-1 with G the training side's Gauss-Newton matrix (one factorisation)."""

    reads_vectors = True

    def __init__(self, gram: torch.Tensor, damping: float):
        self.inverse = DampedInverse(gram, damping)

    def apply(self, engine: "Engine", batch: "TestBatch", point: str, rep: str,
              vecs: torch.Tensor) -> tuple[torch.Tensor, dict]:
        return self.inverse.solve(vecs.double().cpu()).float().to(vecs.device), self.inverse.describe()


class LissaInverse:
    """The paper's LiSSA on each test's dense gradient at theta, then projected."""

    reads_vectors = False

    def __init__(self, settings: LissaSettings, train_cache: tuple[HiddenCache, torch.Tensor]):
        self.settings, self.train_cache = settings, train_cache

    def apply(self, engine: "Engine", batch: "TestBatch", point: str, rep: str,
              vecs: None = None) -> tuple[torch.Tensor, dict]:
        loaded = engine.loaded

        def one(q: int) -> tuple[torch.Tensor, dict]:
            dense = engine.dense_test_gradient(batch, q, rep)
            res = lissa(loaded.split, self.train_cache[0], self.train_cache[1], dense, self.settings, device=loaded.device)
            return engine.projector.project_params(res.vector), res.describe() | {"trace": res.trace}

        skipped = LissaResult({}, lam=self.settings.lam, converged=True).describe() | {"trace": []}
        return _per_test(engine, batch, rep, one, skipped, "lissa")


class EkfacInverse:
    """(G_ekfac + lambda I)^-1 at theta as a division in the EK-FAC eigenbasis: the test side's
    gradients formed there (:class:`core.ekfac.Eigenbasis`), divided, then sketched, to meet the
    training rows of the ``ekfac`` kinds, kept in the same coordinates."""

    reads_vectors = False

    def __init__(self, factors: EkfacFactors, damping: float):
        self.basis = Eigenbasis(factors, damping)
        self.info = {"mode": "ekfac", "lambda": float(f"{self.basis.damping:.12g}"), "corrected": factors.corrected,
                     "examples": factors.examples}

    def apply(self, engine: "Engine", batch: "TestBatch", point: str, rep: str,
              vecs: None = None) -> tuple[torch.Tensor, dict]:
        return engine.test_vectors(None, point, rep, batch, basis=self.basis), self.info


def trak_inverse(gram: torch.Tensor, ridge: float = TRAK_RIDGE) -> DampedInverse:
    """TRAK's (Phi^T Phi + lambda I)^-1 of a point's feature Gram matrix, lambda = ``ridge`` x its
    mean eigenvalue (``ridge`` itself when the features are zero)."""
    return DampedInverse(gram, ridge * float(torch.diagonal(gram).mean()) or ridge)


class FeatureInverse:
    """TRAK's (Phi_p^T Phi_p + lambda I)^-1 at each point p: applied to the test features, factorised
    once per point, or, where the training side keeps its rows whitened (the index does: already
    multiplied by it, :mod:`core.whitening`), nothing left to apply at query time."""

    reads_vectors = True

    def __init__(self, side: "TrainingSide", ridge: float = TRAK_RIDGE):
        self.side, self.ridge = side, ridge
        self._inverses: dict[str, DampedInverse] = {}

    def apply(self, engine: "Engine", batch: "TestBatch", point: str, rep: str,
              vecs: torch.Tensor) -> tuple[torch.Tensor, dict]:
        whitened = self.side.whitened(point)
        if whitened is not None:
            if whitened["ridge"] != self.ridge:
                raise ValueError(f"the TRAK rows at {point} were whitened with ridge {whitened['ridge']}, not "
                                 f"{self.ridge}; rebuild them with `python -m core index --with trak`")
            return vecs, {"mode": "trak", "ridge": self.ridge, "lambda": whitened["lambda"], "applied": "training rows"}
        if point not in self._inverses:
            self._inverses[point] = trak_inverse(self.side.feature_gram(point), self.ridge)
        inverse = self._inverses[point]
        return (inverse.solve(vecs.double().cpu()).float().to(vecs.device),
                {"mode": "trak", "ridge": self.ridge, "lambda": inverse.lam})


def _per_test(engine: "Engine", batch: "TestBatch", rep: str, one, skipped: dict, mode: str) -> tuple[torch.Tensor, dict]:
    """``one(q)`` for each test q at theta; zero where a span test side is zero (its span masks
    no token)."""
    engine.loaded.use("final")  # dense gradients (and LiSSA's Hessian-vector products) at theta, on the model itself
    out, info = [], []
    for q in range(batch.labels.shape[0]):
        if batch.masked and q in batch.spanless and REPRESENTATIONS[rep].span:
            out.append(torch.zeros(engine.projector.dim, device=engine.loaded.device))
            info.append(skipped | {"skipped": "the span masks no token"})
            continue
        vec, described = one(q)
        out.append(vec.to(engine.loaded.device))
        info.append(described)
    return torch.stack(out).float(), info[0] if len(info) == 1 else {"mode": mode, "runs": info}


def make_inverse(kind: str, settings: ScoreSettings, engine: "Engine") -> InverseHessian:
    """The strategy for a spec's inverse kind under ``settings``."""
    if kind == "trak":
        return FeatureInverse(engine.side)
    if kind == "ekfac":
        if engine.ekfac is None:
            raise ValueError("EK-FAC needs its factors; build them with `python -m core index --with ekfac`")
        return EkfacInverse(engine.ekfac(), settings.damping)
    if kind != "hessian":
        raise ValueError(f"unknown inverse kind {kind!r}")
    if settings.ihvp == "fast":
        return FastInverse(engine.side.gauss_newton(), settings.damping)
    if engine.train_cache is None:
        raise ValueError("LiSSA needs the training cache (hidden states and labels)")
    return LissaInverse(settings.lissa, engine.train_cache())
