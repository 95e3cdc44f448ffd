"""Inverse-Hessian strategies for the methods with an inverse (the IF family).

A strategy turns test-side vectors (Q, d), in the training side's space, into
``(H + lambda I)^-1`` times them. Two estimators of the same quantity (see :mod:`core.ihvp`):

* :class:`FastInverse`: the damped Gauss-Newton matrix of the training side's space, inverted
  exactly by Cholesky (milliseconds per query);
* :class:`LissaInverse`: the paper's stochastic recursion on each test's dense gradient in the
  full trainable space, then sketched like the training rows.

:func:`make_inverse` picks the strategy a spec's inverse kind and the run's settings ask for;
another estimator (e.g. EK-FAC) is one more class with ``apply`` and ``describe``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

from .ihvp import DampedInverse, LissaResult, LissaSettings, lissa
from .model import HiddenCache
from .scoring import ScoreSettings

if TYPE_CHECKING:
    from .engine import Engine, TestBatch


class InverseHessian(Protocol):
    def apply(self, engine: "Engine", batch: "TestBatch", rep: str, vecs: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """(H + lambda I)^-1 applied to the rows of ``vecs`` (test-side vectors of ``rep``), and
        a description of how (for the result's record)."""


class FastInverse:
    """(G + lambda I)^-1 with G the training side's Gauss-Newton matrix (one factorisation)."""

    def __init__(self, gram: torch.Tensor, damping: float):
        self.inverse = DampedInverse(gram, damping)

    def apply(self, engine: "Engine", batch: "TestBatch", rep: str, vecs: torch.Tensor) -> tuple[torch.Tensor, dict]:
        return self.inverse.solve(vecs.double().cpu()).float(), self.inverse.describe()


class LissaInverse:
    """The paper's LiSSA on each test's dense gradient at theta, then projected."""

    def __init__(self, settings: LissaSettings, train_cache: tuple[HiddenCache, torch.Tensor]):
        self.settings, self.train_cache = settings, train_cache

    def apply(self, engine: "Engine", batch: "TestBatch", rep: str, vecs: torch.Tensor) -> tuple[torch.Tensor, dict]:
        loaded = engine.loaded
        out, info = [], []
        loaded.use("final")  # LiSSA's Hessian-vector products run on the model itself, at theta
        for q in range(vecs.shape[0]):
            if batch.masked and q in batch.spanless and rep != "full":  # e(z') = 0: so is its inverse
                out.append(torch.zeros(engine.projector.dim))
                info.append(LissaResult({}, lam=self.settings.lam, converged=True).describe()
                            | {"trace": [], "skipped": "the span masks no token"})
                continue
            dense = engine.dense_test_gradient(batch, q, rep)
            res = lissa(loaded.split, self.train_cache[0], self.train_cache[1], dense, self.settings, device=loaded.device)
            out.append(engine.projector.project_params(res.vector))
            info.append(res.describe() | {"trace": res.trace})
        return torch.stack(out).float(), info[0] if len(info) == 1 else {"mode": "lissa", "runs": info}


def make_inverse(kind: str, settings: ScoreSettings, engine: "Engine") -> InverseHessian:
    """The strategy for a spec's inverse kind under ``settings``."""
    if kind != "hessian":
        raise ValueError(f"unknown inverse kind {kind!r}")
    if settings.ihvp == "fast":
        return FastInverse(engine.side.gauss_newton(), settings.damping)
    if engine.train_cache is None:
        raise ValueError("LiSSA needs the training cache (hidden states and labels)")
    return LissaInverse(settings.lissa, engine.train_cache())
