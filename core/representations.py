"""Gradient representations: what a method puts on each side of its inner product.

A representation is a model output differentiated w.r.t. the trainable parameters, on the whole
input or as a span difference:

* ``full``: g(z) = grad loss(z) (training side), g(z') (test side);
* ``diff``: e(z) = g(z) - g(z_-ij), the span's part of the gradient, where z_-ij has the span's
  tokens replaced by the mask token (training side); e(z') = g(z') - g(z'_-kl) (test side);
* ``trak``: TRAK's features (Park et al. 2023), phi(z) = grad of the margin
  f(z) = log p_y - log(1 - p_y); on the training side scaled by TRAK's Q = 1 - p_y(z);
* ``trak-diff``: the span difference of the margin gradient, phi(z) - phi(z_-ij) (training side
  scaled by Q), phi(z') - phi(z'_-kl) on the test side;
* ``ekfac``, ``ekfac-diff``: g(z) and e(z) in the eigenbasis of the EK-FAC factors
  (:class:`core.ekfac.Eigenbasis`): each linear weight's gradient G as Q_S^T G Q_A, the other
  tensors as they are. A rotation changes no inner product, and in these coordinates the EK-FAC
  inverse is a division (the test side's, before it is sketched), so its queries need no
  rotation back.

An output is a function of the logits whose gradient is formed by backpropagating per-example
logit weights (:mod:`core.gradients`): for the cross-entropy loss, ``softmax - onehot(y)``; for
the margin, ``onehot(y) - softmax over the other classes``. The index stores one matrix per
(parameter point, representation); a representation's name is its index kind.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .gradients import loss_weights

LogitWeights = Callable[[torch.Tensor], torch.Tensor]


def margin_weights(labels: torch.Tensor) -> LogitWeights:
    """Logit weights whose backward gives the gradient of the margin log p_y - log(1 - p_y):
    ``onehot(y) - softmax of the other classes`` (stable however confident the model is)."""

    def weights(logits: torch.Tensor) -> torch.Tensor:
        y = labels.to(logits.device)
        onehot = nn.functional.one_hot(y, logits.shape[-1]).to(logits.dtype)
        others = logits.masked_fill(onehot.bool(), float("-inf")).softmax(-1)
        return onehot - others

    return weights


def true_class_slack(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """TRAK's Q: 1 - p_y for each row (the out-to-loss factor of a training example)."""
    return 1.0 - logits.softmax(-1).gather(1, labels.to(logits.device)[:, None])[:, 0]


OUTPUTS: dict[str, Callable[[torch.Tensor], LogitWeights]] = {"loss": loss_weights, "margin": margin_weights}
"""Model outputs by name: labels -> (logits -> logit weights of the output's gradient)."""


@dataclass(frozen=True)
class Representation:
    """A gradient representation: an output, on the whole input or as a span difference;
    ``train_scale`` ``q``: the training rows are scaled by TRAK's Q = 1 - p_y(z); ``basis``: the
    coordinates the gradient is expressed in (None: the parameters'; ``ekfac``: the EK-FAC
    eigenbasis)."""

    name: str
    output: str
    span: bool
    train_symbol: str
    test_symbol: str
    train_scale: str | None = None
    basis: str | None = None


REPRESENTATIONS: dict[str, Representation] = {
    r.name: r
    for r in (
        Representation("full", "loss", False, "g(z)", "g(z')"),
        Representation("diff", "loss", True, "[g(z) - g(z_-ij)]", "[g(z') - g(z'_-kl)]"),
        Representation("trak", "margin", False, "Q(z) phi(z)", "phi(z')", "q"),
        Representation("trak-diff", "margin", True, "Q(z) [phi(z) - phi(z_-ij)]", "[phi(z') - phi(z'_-kl)]", "q"),
        Representation("ekfac", "loss", False, "g(z)", "g(z')", basis="ekfac"),
        Representation("ekfac-diff", "loss", True, "[g(z) - g(z_-ij)]", "[g(z') - g(z'_-kl)]", basis="ekfac"),
    )
}


def bases_of(kinds) -> set[str]:
    """The coordinates (other than the parameters') that representations of ``kinds`` are formed in."""
    return {REPRESENTATIONS[k].basis for k in kinds} - {None}


def query_weights(rep: Representation, labels: torch.Tensor) -> LogitWeights:
    """Logit weights of a test side over its rows: row q (whole), or rows 2q and 2q + 1 (the input
    and its span-masked copy) weighted +1 and -1, so one grouped backward pass gives
    grad [out(z') - out(z'_-kl)] per test."""
    output = OUTPUTS[rep.output]
    if not rep.span:
        return output(labels)
    base = output(labels.repeat_interleave(2))

    def weights(logits: torch.Tensor) -> torch.Tensor:
        signs = torch.tensor([1.0, -1.0], dtype=logits.dtype, device=logits.device).repeat(len(labels))
        return base(logits) * signs[:, None]

    return weights
