"""Per-example gradients of the trainable subset, in batches, sketched without a dense P x d matrix.

Every trainable parameter of the top model belongs to a ``Linear`` or a ``LayerNorm``. For a
linear layer the per-example gradient is ``sum_t delta_t a_t^T`` (output gradients times layer
inputs), so forward hooks keep the inputs and tensor hooks the output gradients of one ordinary
batched backward pass, and the per-example gradient is formed from them directly.

Projection is a CountSketch of the whole trainable vector: coordinate i goes to bucket h(i) of
d with a random sign s(i), so ``<Sx, Sy>`` is an unbiased estimate of ``<x, y>`` with variance
about ``2 |x|^2 |y|^2 / d`` whatever the structure of the gradients (``/ d + / d^2`` with the
product signs below), and the map is two index vectors, not a P x d matrix. A Kronecker (LoGra)
projection of each layer, ``P_out G P_in^T``, is cheaper but loses on the low-rank gradients of
the head and pooler (one token): measured on MAMS with the default backbone at d = 3,715,
Spearman against exact scores 0.77 for the Kronecker map against 0.97 for the sketch. A
weight's signs are a product ``s_out(o) s_in(i)`` (still pairwise independent, so still
unbiased; as good as free signs when measured), which lets them be applied to the output
gradients and the inputs before the per-example gradient is formed instead of to the far
larger gradient itself. ``dim=None`` keeps everything (exact mode). The same map applies to any
dense parameter-space vector (:meth:`Projector.project_params`), e.g. an
inverse-Hessian-vector product.

Backward passes take per-example weights over the logits: the weights ``softmax - onehot(y)``
give the cross-entropy gradient, a one-hot weight on class c gives the Jacobian row of logit c.
A backward pass may form its gradients in other coordinates (a :class:`Basis`, EK-FAC's
eigenbasis): each linear layer's output gradients and inputs rotated before the outer product,
and optionally every entry scaled before the sketch.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from .model import SplitModel, top_forward


@dataclass(frozen=True)
class Block:
    """One trainable tensor's place in the gradient vector."""

    module: str  # module name inside the top model
    kind: str  # "linear-weight" | "linear-bias" | "ln-weight" | "ln-bias"
    param: str  # full-model parameter name
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        """Its number of entries."""
        return int(torch.Size(self.shape).numel())


class Basis(Protocol):
    """Other coordinates for the gradients (:class:`core.ekfac.Eigenbasis`): a linear weight's
    output gradients and inputs rotated before its gradient is formed, and optionally each
    tensor's gradient multiplied entry by entry (flattened) before it is sketched."""

    def rotate(self, param: str, d: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def scale(self, param: str, like: torch.Tensor) -> torch.Tensor | None: ...


CHUNK_ELEMENTS = 1_200_000  # per-example weight gradients formed at once (about 5 MB: cache-sized)
SPLIT_PARTS, SPLIT_MIN = 4, 65_536  # a one-row scatter of a large block goes in this many parts
_KINDS = {nn.Linear: ("linear-weight", "linear-bias"), nn.LayerNorm: ("ln-weight", "ln-bias")}


class Projector:
    """The CountSketch of the trainable subset's gradients into ``dim`` coordinates.

    ``dim=None`` is exact (the identity). Buckets and signs are drawn from ``seed`` block by
    block in module order, so the same (model layout, dim, seed) gives the same map.
    """

    def __init__(self, split: SplitModel, dim: int | None, seed: int = 0, device: torch.device | str = "cpu"):
        if dim is not None and dim < 1:
            raise ValueError(f"projection dimension must be positive, got {dim}")
        self.seed = seed
        self.modules: dict[str, nn.Module] = {}
        self.blocks: list[Block] = []
        full_names = split.top_to_full
        trainable = set(split.trainable)
        covered: set[str] = set()
        for name, module in split.top.named_modules():
            params = {pn for pn, _ in module.named_parameters(recurse=False) if full_names[f"{name}.{pn}"] in trainable}
            if not params:
                continue
            kinds = _KINDS.get(type(module))
            if kinds is None:
                raise ValueError(
                    f"trainable parameters in {name} ({type(module).__name__}): only Linear and "
                    "LayerNorm layers are supported for batched per-example gradients"
                )
            for kind, attr in zip(kinds, ("weight", "bias")):
                if attr in params:
                    self.blocks.append(Block(name, kind, full_names[f"{name}.{attr}"], tuple(getattr(module, attr).shape)))
            self.modules[name] = module
            covered |= {f"{name}.{pn}" for pn in params}
        missing = trainable - {full_names[n] for n in covered}
        if missing:
            raise ValueError(f"trainable parameters outside Linear/LayerNorm: {sorted(missing)[:3]}")
        self.params = sum(b.size for b in self.blocks)
        self.exact = dim is None
        self.dim = self.params if dim is None else dim
        self.buckets: dict[str, torch.Tensor] = {}
        self.signs: dict[str, tuple[torch.Tensor, ...]] = {}  # weights: (s_out, s_in); others: (s,)
        if dim is not None:
            generator = torch.Generator().manual_seed(seed)
            rademacher = lambda n: torch.randint(0, 2, (n,), generator=generator).float().mul_(2).sub_(1).to(device)  # noqa: E731
            for b in self.blocks:
                self.buckets[b.param] = torch.randint(0, dim, (b.size,), generator=generator).to(device)
                self.signs[b.param] = tuple(rademacher(n) for n in (b.shape if b.kind == "linear-weight" else (b.size,)))

    def describe(self) -> dict:
        return {"sketch": "exact" if self.exact else "countsketch", "dim": self.dim, "seed": self.seed,
                "params": self.params, "exact": self.exact}

    def sketch(self, block: Block, signed: torch.Tensor, out: torch.Tensor) -> None:
        """Add the sketch of one block's signed rows (B, size) into ``out`` (B, dim)."""
        buckets = self.buckets[block.param]
        if signed.shape[0] == 1 and not signed.is_cuda and block.size >= SPLIT_MIN and block.size % SPLIT_PARTS == 0:
            # index_add_ scatters one row on one thread; as SPLIT_PARTS rows of its parts it uses them all
            parts = signed.new_zeros(SPLIT_PARTS, self.dim)
            parts.scatter_add_(1, buckets.view(SPLIT_PARTS, -1), signed.reshape(SPLIT_PARTS, -1))
            out += parts.sum(0, keepdim=True)
        else:
            out.index_add_(1, buckets, signed)

    def project_params(self, vec: dict[str, torch.Tensor]) -> torch.Tensor:
        """Project a dense parameter-space vector (full-model names) into the same space."""
        rows = [vec[b.param].float() for b in self.blocks]
        if self.exact:
            return torch.cat([r.reshape(-1) for r in rows])
        out = torch.zeros(1, self.dim, device=rows[0].device)
        for b, row in zip(self.blocks, rows):
            if b.kind == "linear-weight":
                s_out, s_in = self.signs[b.param]
                row = torch.mul(row, s_out[:, None]).mul_(s_in)
            else:
                row = row * self.signs[b.param][0]
            self.sketch(b, row.reshape(1, -1), out)
        return out[0]


class GradientCollector:
    """Batched per-example (sketched) gradients of the top model via hooks.

    Use :meth:`gradients` with cached hidden states and per-example logit weights.
    """

    def __init__(self, split: SplitModel, projector: Projector):
        self.split = split
        self.proj = projector
        self._blocks: dict[str, list[Block]] = {}
        for b in projector.blocks:
            self._blocks.setdefault(b.module, []).append(b)
        self._inputs: dict[str, torch.Tensor] = {}
        self._parts: dict[str, torch.Tensor] = {}  # exact mode: one (B, size) matrix per parameter
        self._sketch: torch.Tensor | None = None  # sketch mode: the (B, dim) sum so far
        self._groups = 1  # consecutive rows summed into one gradient
        self._basis: Basis | None = None  # the coordinates of this backward pass (None: the parameters')
        self._handles: list = []

    # hooks ------------------------------------------------------------------
    def _forward_hook(self, name: str):
        def hook(mod: nn.Module, args, output: torch.Tensor):
            x = args[0].detach()
            if x.dim() == 2:  # pooler / head act on one token
                x = x.unsqueeze(1)
            if isinstance(mod, nn.LayerNorm):
                x = nn.functional.layer_norm(x, mod.normalized_shape, None, None, mod.eps)
            self._inputs[name] = x
            if output.requires_grad:
                output.register_hook(self._backward_hook(name))

        return hook

    def _backward_hook(self, name: str):
        def hook(grad: torch.Tensor):
            d = grad.detach()
            if d.dim() == 2:
                d = d.unsqueeze(1)
            a = self._inputs[name]
            if self._groups > 1:  # a group's rows as one example with their tokens side by side
                d, a = (x.reshape(x.shape[0] // self._groups, -1, x.shape[2]) for x in (d, a))
            for block in self._blocks[name]:
                scale = None if self._basis is None else self._basis.scale(block.param, d)
                if block.kind == "linear-weight":
                    self._weight(block, *(self._basis.rotate(block.param, d, a) if self._basis else (d, a)), scale)
                else:
                    values = (d * a).sum(1) if block.kind == "ln-weight" else d.sum(1)
                    self._add(block, values if scale is None else values * scale)

        return hook

    def _weight(self, block: Block, d: torch.Tensor, a: torch.Tensor, scale: torch.Tensor | None) -> None:
        """Per-example ``sum_t d_t a_t^T`` (times ``scale`` entry by entry); sketched a few rows at
        a time so they stay in cache."""
        if self.proj.exact:
            rows = torch.bmm(d.transpose(1, 2), a).reshape(d.shape[0], -1)
            self._parts[block.param] = rows if scale is None else rows * scale
            return
        s_out, s_in = self.proj.signs[block.param]  # the signs s_out(o) s_in(i), on the factors
        d, a = (d * s_out).transpose(1, 2), a * s_in
        out = self._buffer(d.shape[0], d)
        step = d.shape[0] if d.is_cuda else max(1, CHUNK_ELEMENTS // block.size)  # the GPU takes it whole
        for s in range(0, d.shape[0], step):
            rows = torch.bmm(d[s : s + step], a[s : s + step]).reshape(-1, block.size)
            self.proj.sketch(block, rows if scale is None else rows.mul_(scale), out[s : s + step])

    def _buffer(self, rows: int, like: torch.Tensor) -> torch.Tensor:
        """The (rows, dim) sketch of this backward pass, started at the first block."""
        if self._sketch is None:
            self._sketch = like.new_zeros(rows, self.proj.dim)
        return self._sketch

    def _add(self, block: Block, values: torch.Tensor) -> None:
        """Keep (exact) or sketch one block's per-example rows (B, size), signs applied here."""
        if self.proj.exact:
            self._parts[block.param] = values
        else:
            self.proj.sketch(block, values * self.proj.signs[block.param][0], self._buffer(values.shape[0], values))

    def __enter__(self) -> "GradientCollector":
        for name, module in self.proj.modules.items():
            self._handles.append(module.register_forward_hook(self._forward_hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._inputs.clear()
        self._parts.clear()
        self._sketch = None

    # api --------------------------------------------------------------------
    def _assemble(self) -> torch.Tensor:
        if self.proj.exact:
            out = torch.cat([self._parts[b.param] for b in self.proj.blocks], dim=1)
            self._parts.clear()
        else:
            out, self._sketch = self._sketch, None
        return out

    def gradients(
        self, h: torch.Tensor, mask: torch.Tensor, weights: Sequence[torch.Tensor], groups: int = 1,
        bases: Sequence[Basis | None] | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Per-example gradients of ``sum_c w[b, c] * logit[b, c]`` for each weight set.

        Each entry of ``weights`` is a (B, C) tensor or a function of the logits that returns one
        (:func:`loss_weights`, :func:`class_weights`); ``bases``, one per weight set, the
        coordinates of its gradients (None: the parameters'). ``groups`` > 1 sums each run of
        that many consecutive rows into one gradient (B / groups rows), formed once rather than
        per row. Returns (one (B / groups, d) gradient matrix per weight set, logits (B, C), CLS
        embeddings (B, H)). Must run inside ``with collector:``.
        """
        if h.shape[0] % groups:
            raise ValueError(f"{h.shape[0]} rows do not split into groups of {groups}")
        self._groups = groups
        # Differentiate w.r.t. the input only: the hooks see every output gradient on the way,
        # and autograd skips the batch-summed weight gradients that nobody needs.
        h = h.detach().requires_grad_(True)
        logits, cls = top_forward(self.split, h, mask, with_cls=True)
        outs = []
        bases = bases or [None] * len(weights)
        for i, (w, basis) in enumerate(zip(weights, bases, strict=True)):
            w = w(logits.detach()) if callable(w) else w
            self._basis = basis
            try:
                torch.autograd.grad(logits, h, grad_outputs=w, retain_graph=i < len(weights) - 1)
            finally:
                self._basis = None
            outs.append(self._assemble())
        return outs, logits.detach(), cls.detach()


def loss_weights(labels: torch.Tensor):
    """Logit weights whose backward gives the cross-entropy gradient: ``softmax - onehot``."""

    def weights(logits: torch.Tensor) -> torch.Tensor:
        return logits.softmax(-1) - nn.functional.one_hot(labels.to(logits.device), logits.shape[-1]).to(logits.dtype)

    return weights


def class_weights(c: int):
    """Logit weights selecting class ``c`` (a Jacobian row)."""

    def weights(logits: torch.Tensor) -> torch.Tensor:
        w = torch.zeros_like(logits)
        w[:, c] = 1.0
        return w

    return weights
