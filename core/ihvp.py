"""Inverse-Hessian-vector products for the IF family.

* :func:`lissa`: the stochastic recursion of the paper (section 3.4), in the full space of the
  trainable subset: ``h <- v + damping * h - scale * clip(H_batch h)`` with Hessian-vector
  products of the training loss on random mini-batches, early stop when the norm settles.
  Its fixed point is ``h* = (scale * H + (1 - damping) I)^-1 v``, so ``scale * h*`` estimates
  ``(H + lambda I)^-1 v`` with ``lambda = (1 - damping) / scale`` (2.5 at the paper's settings).
* :class:`DampedInverse`: the fast mode: ``(G + lambda I)^-1`` of the Gauss-Newton matrix G in
  the projected space, exact there (one Cholesky factorisation, then milliseconds per query).

Both default to the same lambda, :data:`DEFAULT_DAMPING` = 2.5 (the paper's LiSSA settings), so
``--ihvp`` changes how ``(H + lambda I)^-1 v`` is estimated, not which quantity it is. A fixed
lambda also keeps the fast mode independent of the sketch: a rule relative to the sketched
spectrum (e.g. 0.1 x its mean eigenvalue) halves with every doubling of d and puts the damping
in the tail of the spectrum, where the sketch distorts it most.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .model import HiddenCache, SplitModel, top_forward


@dataclass(frozen=True)
class LissaSettings:
    """The paper's settings by default."""

    damping: float = 0.99
    scale: float = 0.004
    depth: int = 1000
    clip: float = 100.0
    batch_size: int = 1
    tol: float = 1e-3
    patience: int = 20
    seed: int = 0

    def __post_init__(self) -> None:
        if self.depth < 1 or self.batch_size < 1:
            raise ValueError(f"LiSSA depth and batch size must be at least 1, got {self.depth} and {self.batch_size}")
        if self.scale <= 0:
            raise ValueError(f"LiSSA's scale must be positive, got {self.scale}")
        if not 0 < self.damping < 1:
            raise ValueError(f"LiSSA's damping must lie in (0, 1) (lambda = (1 - damping) / scale), got {self.damping}")
        if self.clip <= 0:
            raise ValueError(f"LiSSA's clip must be positive, got {self.clip}")

    @property
    def lam(self) -> float:
        return (1.0 - self.damping) / self.scale


@dataclass
class LissaResult:
    """``vector`` estimates (H + lam I)^-1 v; ``trace`` is ||h|| after every step."""

    vector: dict[str, torch.Tensor]
    trace: list[float] = field(default_factory=list)
    steps: int = 0
    converged: bool = False
    diverged: bool = False
    clipped_steps: int = 0
    lam: float = 0.0

    def describe(self) -> dict:
        return {"mode": "lissa", "steps": self.steps, "converged": self.converged, "diverged": self.diverged,
                "clipped_steps": self.clipped_steps, "lambda": float(f"{self.lam:.12g}"), "final_norm": self.trace[-1] if self.trace else None}


def hvp(split: SplitModel, h_states: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
        vec: list[torch.Tensor]) -> list[torch.Tensor]:
    """Hessian of the mean cross-entropy on a batch, times ``vec`` (double backward)."""
    params = list(split.top_params().values())
    # the fused attention kernels have no double backward; the plain one does
    with sdpa_kernel(SDPBackend.MATH):
        loss = nn.functional.cross_entropy(top_forward(split, h_states, mask), labels)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        dot = sum((g * v).sum() for g, v in zip(grads, vec))
        return [x.detach() for x in torch.autograd.grad(dot, params)]


def _norm(tensors: list[torch.Tensor]) -> float:
    return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors))))


def lissa(
    split: SplitModel,
    cache: HiddenCache,
    labels: torch.Tensor,
    v: dict[str, torch.Tensor],
    settings: LissaSettings = LissaSettings(),
    *,
    device: torch.device | str = "cpu",
) -> LissaResult:
    """Estimate (H + lam I)^-1 v by the paper's LiSSA recursion over the training cache."""
    training = split.top.training
    split.top.eval()  # no dropout: the Hessian of the model being explained
    try:
        return _recursion(split, cache, labels, v, settings, device)
    finally:
        split.top.train(training)


def _recursion(split: SplitModel, cache: HiddenCache, labels: torch.Tensor, v: dict[str, torch.Tensor],
               settings: LissaSettings, device: torch.device | str) -> LissaResult:
    params = split.top_params()
    names = list(params)
    dtype = next(iter(params.values())).dtype
    v_list = [v[n].to(device, dtype) for n in names]
    h = [x.clone() for x in v_list]
    rng = random.Random(settings.seed)
    result = LissaResult(vector={}, lam=settings.lam)
    window: list[float] = []
    for step in range(1, settings.depth + 1):
        rows = rng.sample(range(len(cache)), min(settings.batch_size, len(cache)))
        hs, mask = cache.batch(rows, device)
        hv = hvp(split, hs, mask, labels[rows].to(device), h)
        norm_hv = _norm(hv)
        if norm_hv > settings.clip:
            torch._foreach_mul_(hv, settings.clip / norm_hv)
            result.clipped_steps += 1
        # h <- v + damping * h - scale * H h
        torch._foreach_mul_(h, settings.damping)
        torch._foreach_add_(h, v_list)
        torch._foreach_add_(h, hv, alpha=-settings.scale)
        norm = _norm(h)
        result.trace.append(norm)
        result.steps = step
        if not math.isfinite(norm) or norm > 1e12:
            result.diverged = True
            break
        window.append(norm)
        if len(window) > settings.patience:
            window.pop(0)
            if (max(window) - min(window)) <= settings.tol * max(window):
                result.converged = True
                break
    result.vector = {n: settings.scale * x for n, x in zip(names, h)}
    return result


DEFAULT_DAMPING: float = LissaSettings().lam
"""lambda of the fast inverse unless chosen: the one LiSSA's default settings imply (2.5)."""


def check_damping(damping: float) -> float:
    """``damping`` as a float (2 and 2.0 give one cache key); ValueError unless positive."""
    if not (isinstance(damping, (int, float)) and damping > 0):
        raise ValueError(f"the damping lambda must be a positive number, got {damping!r}")
    return float(damping)


class DampedInverse:
    """(G + lam I)^-1 for a symmetric PSD matrix G, kept as an explicit matrix.

    Factorised once by Cholesky and inverted from the factor (float64), so that applying it is
    one matrix product: a triangular solve per query walks the d x d factor twice, one row at a
    time (54.6 against 5.1 ms at d = 4,096 on 2 CPU cores: ``benchmarks/new_methods.py``,
    ``solve``). With lam >= :data:`DEFAULT_DAMPING`'s order the matrix is well
    conditioned, and the inverse loses no digits that float32 scores keep."""

    def __init__(self, gram: torch.Tensor, damping: float = DEFAULT_DAMPING):
        self.lam = check_damping(damping)
        matrix = gram.to(torch.float64, copy=True)
        matrix.diagonal().add_(self.lam)
        factor = torch.linalg.cholesky(matrix)
        del matrix  # at most two d x d matrices of its own at once, as with a kept factor
        self._inverse = torch.cholesky_inverse(factor)

    def solve(self, vecs: torch.Tensor) -> torch.Tensor:
        """(G + lam I)^-1 applied to the rows of ``vecs`` (Q, d) (the matrix is symmetric)."""
        return (vecs.double() @ self._inverse).to(vecs.dtype)

    def describe(self) -> dict:
        return {"mode": "fast", "lambda": float(f"{self.lam:.12g}"), "dim": self._inverse.shape[0]}
