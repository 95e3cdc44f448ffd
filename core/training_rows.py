"""Per-example training-side vectors of a batch at one parameter point.

What the gradient index stores and what a streamed (exact) training side computes on the fly:
for every training instance, each requested representation (:mod:`core.representations`) of
its gradient, sketched by the projector, plus the logits and the CLS embeddings of the whole
and span-masked inputs (Sag needs them) and, when asked, the logits' Jacobian (the Gauss-Newton
matrix needs it).
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from .gradients import Basis, GradientCollector, Projector, class_weights
from .model import HiddenCache
from .points import LoadedModel
from .representations import OUTPUTS, REPRESENTATIONS, Representation, true_class_slack


@dataclass
class GradientBatch:
    """Training-side vectors of one batch at one parameter point (all on the CPU)."""

    rows: list[int]
    vectors: dict[str, torch.Tensor]  # representation -> (B, d)
    whole: dict[str, torch.Tensor]  # output -> its gradient on the whole inputs, unscaled, unrotated (B, d)
    logits: torch.Tensor  # of the whole inputs      (B, C)
    cls_full: torch.Tensor  # emb(x)                 (B, H)
    cls_masked: torch.Tensor  # emb(x_-ij)           (B, H)
    jacobian: torch.Tensor | None = None  # J(z)     (B, C, d), when asked


def training_gradients(
    loaded: LoadedModel,
    projector: Projector,
    full_cache: HiddenCache,
    masked_cache: HiddenCache,
    labels: torch.Tensor,
    point: str,
    batches: Sequence[Sequence[int]],
    *,
    kinds: Sequence[str] = ("full", "diff"),
    with_jacobian: bool = False,
    bases: Mapping[str, Basis] | None = None,
) -> Iterator[GradientBatch]:
    """Per-example (projected) training-side vectors of ``kinds`` at ``point``, batch by batch.

    Each batch runs the whole inputs and their span-masked versions together: one backward pass
    per output and coordinates (a kind with a ``basis`` reads it from ``bases``), or one per
    class when the Jacobian is asked for (the outputs' gradients are then formed from it; for
    kinds in the parameters' coordinates only). The model is back at theta afterwards.
    """
    reps = [REPRESENTATIONS[k] for k in kinds]
    sources = list(dict.fromkeys((r.output, r.basis) for r in reps))  # one backward pass each
    missing = sorted({b for _, b in sources if b is not None} - set(bases or {}))
    if missing:
        raise ValueError(f"the {', '.join(kinds)} rows need the {' and '.join(missing)} basis")
    if with_jacobian and any(b is not None for _, b in sources):
        raise ValueError("the Jacobian is formed in the parameters' coordinates only")
    n_classes = len(loaded.labels)
    loaded.use(point)
    try:
        with GradientCollector(loaded.split, projector) as collector:
            for idx in batches:
                h1, m1 = full_cache.batch(idx, loaded.device)
                h2, m2 = masked_cache.batch(idx, loaded.device)
                h, m = torch.cat([h1, h2]), torch.cat([m1, m2])
                y = labels[list(idx)].repeat(2)
                nb = len(idx)
                jac = None
                if with_jacobian:
                    rows, logits, cls = collector.gradients(h, m, [class_weights(c) for c in range(n_classes)])
                    jac = torch.stack(rows, dim=1).cpu()
                    logits = logits.cpu()
                    grads = {(o, b): torch.einsum("bc,bcd->bd", OUTPUTS[o](y)(logits), jac) for o, b in sources}
                else:
                    rows, logits, cls = collector.gradients(h, m, [OUTPUTS[o](y) for o, _ in sources],
                                                            bases=[b and bases[b] for _, b in sources])
                    grads = {source: g.cpu() for source, g in zip(sources, rows)}
                logits = logits[:nb].cpu()
                vectors = {r.name: _vector(r, grads[r.output, r.basis], logits, y[:nb].cpu(), nb) for r in reps}
                cls = cls.cpu()
                whole = {o: g[:nb] for (o, b), g in grads.items() if b is None}
                yield GradientBatch(list(idx), vectors, whole, logits, cls[:nb], cls[nb:],
                                    None if jac is None else jac[:nb])
    finally:
        loaded.use("final")


def _vector(rep: Representation, grad: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, nb: int) -> torch.Tensor:
    """A representation's rows from an output's gradients on the whole (first ``nb``) and masked rows."""
    rows = grad[:nb] - grad[nb:] if rep.span else grad[:nb]
    return rows * true_class_slack(logits, labels)[:, None] if rep.train_scale == "q" else rows
