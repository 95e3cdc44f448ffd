"""Gradient representations: what a method puts on each side of its inner product.

A representation is a model output differentiated w.r.t. the trainable parameters, on the whole
input or as a span difference:

* ``full``: g(z) = grad loss(z) (training side), g(z') (test side);
* ``diff``: e(z) = g(z) - g(z_-ij), the span's part of the gradient, where z_-ij has the span's
  tokens replaced by the mask token (training side); e(z') = g(z') - g(z'_-kl) (test side).

An output is a function of the logits whose gradient is formed by backpropagating per-example
logit weights (:mod:`core.gradients`): for the cross-entropy loss, ``softmax - onehot(y)``. The
index stores one matrix per (parameter point, representation); a representation's name is its
index kind.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .gradients import loss_weights

LogitWeights = Callable[[torch.Tensor], torch.Tensor]
OUTPUTS: dict[str, Callable[[torch.Tensor], LogitWeights]] = {"loss": loss_weights}
"""Model outputs by name: labels -> (logits -> logit weights of the output's gradient)."""


@dataclass(frozen=True)
class Representation:
    """A gradient representation: an output, on the whole input or as a span difference."""

    name: str
    output: str
    span: bool
    train_symbol: str
    test_symbol: str


REPRESENTATIONS: dict[str, Representation] = {
    r.name: r
    for r in (
        Representation("full", "loss", False, "g(z)", "g(z')"),
        Representation("diff", "loss", True, "[g(z) - g(z_-ij)]", "[g(z') - g(z'_-kl)]"),
    )
}


def representation(name: str) -> Representation:
    if name not in REPRESENTATIONS:
        raise ValueError(f"unknown representation {name!r}; one of {', '.join(REPRESENTATIONS)}")
    return REPRESENTATIONS[name]


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
