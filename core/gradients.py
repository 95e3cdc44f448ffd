"""Per-example gradients of the trainable subset, in batches, projected without a dense P x d matrix.

Every trainable parameter of the top model belongs to a ``Linear`` or a ``LayerNorm``. For a
linear layer the per-example gradient is ``sum_t delta_t a_t^T`` (output gradients times layer
inputs), so forward hooks keep the inputs and tensor hooks the output gradients of one ordinary
batched backward pass, and the per-example gradient is formed from them directly. Projection is
the LoGra factorisation: ``P_out (sum_t delta_t a_t^T) P_in^T = sum_t (P_out delta_t)(P_in a_t)^T``
with Gaussian ``P_in`` (k x in) and ``P_out`` (k x out), entries N(0, 1/k), so inner products are
preserved in expectation and no P x d matrix exists. A side no wider than ``k`` is kept as it is
(identity); ``k=None`` keeps everything (exact mode). LayerNorm vectors get a dense k x H
Gaussian projection. The same map applies to any dense parameter-space vector
(:meth:`Projector.project_params`), e.g. an inverse-Hessian-vector product.

Backward passes take per-example weights over the logits: the weights ``softmax - onehot(y)``
give the cross-entropy gradient, a one-hot weight on class c gives the Jacobian row of logit c.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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
    dim: int  # its width in the (projected) vector


def _gaussian(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(rows, cols, generator=generator) / rows**0.5


class Projector:
    """The factorised random projection of the trainable subset's gradients.

    ``k`` is the per-side width (``None`` = exact: identity everywhere). Matrices are drawn from
    ``seed`` in a fixed module order, so the same (model layout, k, seed) gives the same map.
    """

    def __init__(self, split: SplitModel, k: int | None, seed: int = 0, device: torch.device | str = "cpu"):
        self.k = k
        self.seed = seed
        self.modules: dict[str, nn.Module] = {}
        self.blocks: list[Block] = []
        self.mats: dict[tuple[str, str], torch.Tensor | None] = {}
        generator = torch.Generator().manual_seed(seed)
        full_names = split.top_to_full
        trainable = set(split.trainable)
        covered: set[str] = set()
        for name, module in split.top.named_modules():
            params = {pn: p for pn, p in module.named_parameters(recurse=False) if full_names[f"{name}.{pn}"] in trainable}
            if not params:
                continue
            if isinstance(module, nn.Linear):
                out_f, in_f = module.weight.shape
                p_out = self._side(out_f, generator)
                p_in = self._side(in_f, generator)
                self.mats[(name, "out")], self.mats[(name, "in")] = p_out, p_in
                rows = out_f if p_out is None else p_out.shape[0]
                cols = in_f if p_in is None else p_in.shape[0]
                self.blocks.append(Block(name, "linear-weight", full_names[f"{name}.weight"], (out_f, in_f), rows * cols))
                if module.bias is not None:
                    self.blocks.append(Block(name, "linear-bias", full_names[f"{name}.bias"], (out_f,), rows))
            elif isinstance(module, nn.LayerNorm):
                width = module.normalized_shape[-1]
                p_ln = self._side(width, generator)
                self.mats[(name, "ln")] = p_ln
                dim = width if p_ln is None else p_ln.shape[0]
                for kind, attr in (("ln-weight", "weight"), ("ln-bias", "bias")):
                    if getattr(module, attr) is not None:
                        self.blocks.append(Block(name, kind, full_names[f"{name}.{attr}"], (width,), dim))
            else:
                raise ValueError(
                    f"trainable parameters in {name} ({type(module).__name__}): only Linear and "
                    "LayerNorm layers are supported for batched per-example gradients"
                )
            self.modules[name] = module
            covered |= {f"{name}.{pn}" for pn in params}
        missing = trainable - {full_names[n] for n in covered}
        if missing:
            raise ValueError(f"trainable parameters outside Linear/LayerNorm: {sorted(missing)[:3]}")
        self.mats = {key: None if m is None else m.to(device) for key, m in self.mats.items()}
        self.dim = sum(b.dim for b in self.blocks)

    def _side(self, width: int, generator: torch.Generator) -> torch.Tensor | None:
        if self.k is None or width <= self.k:
            return None
        return _gaussian(self.k, width, generator)

    def describe(self) -> dict:
        return {"k": self.k, "seed": self.seed, "dim": self.dim, "exact": self.k is None}

    @staticmethod
    def _apply(mat: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        """``x @ mat.T`` over the last axis (identity when ``mat`` is None)."""
        return x if mat is None else x @ mat.T

    def project_params(self, vec: dict[str, torch.Tensor]) -> torch.Tensor:
        """Project a dense parameter-space vector (full-model names) into the same space."""
        parts = []
        for b in self.blocks:
            v = vec[b.param].float()
            if b.kind == "linear-weight":
                p_out, p_in = self.mats[(b.module, "out")], self.mats[(b.module, "in")]
                parts.append(self._apply(p_in, self._apply(p_out, v.T).T).reshape(-1))
            elif b.kind == "linear-bias":
                parts.append(self._apply(self.mats[(b.module, "out")], v))
            else:
                parts.append(self._apply(self.mats[(b.module, "ln")], v))
        return torch.cat(parts)


class GradientCollector:
    """Batched per-example (projected) gradients of the top model via hooks.

    Use :meth:`gradients` with cached hidden states and per-example logit weights.
    """

    def __init__(self, split: SplitModel, projector: Projector):
        self.split = split
        self.proj = projector
        self._inputs: dict[str, torch.Tensor] = {}
        self._parts: dict[str, list[torch.Tensor]] = {}
        self._handles: list = []

    # hooks ------------------------------------------------------------------
    def _forward_hook(self, name: str):
        module = self.proj.modules[name]

        def hook(mod: nn.Module, args, output: torch.Tensor):
            x = args[0].detach()
            if x.dim() == 2:  # pooler / head act on one token
                x = x.unsqueeze(1)
            if isinstance(mod, nn.LayerNorm):
                x = nn.functional.layer_norm(x, mod.normalized_shape, None, None, mod.eps)
            else:
                x = Projector._apply(self.proj.mats[(name, "in")], x)
            self._inputs[name] = x
            if output.requires_grad:
                output.register_hook(self._backward_hook(name, module))

        return hook

    def _backward_hook(self, name: str, module: nn.Module):
        def hook(grad: torch.Tensor):
            d = grad.detach()
            if d.dim() == 2:
                d = d.unsqueeze(1)
            a = self._inputs[name]
            out = self._parts.setdefault(name, [])
            if isinstance(module, nn.LayerNorm):
                p = self.proj.mats[(name, "ln")]
                if module.weight is not None:
                    out.append(Projector._apply(p, (d * a).sum(1)))
                if module.bias is not None:
                    out.append(Projector._apply(p, d.sum(1)))
            else:
                d = Projector._apply(self.proj.mats[(name, "out")], d)
                out.append(torch.einsum("bto,bti->boi", d, a).reshape(d.shape[0], -1))
                if module.bias is not None:
                    out.append(d.sum(1))

        return hook

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

    # api --------------------------------------------------------------------
    def _assemble(self) -> torch.Tensor:
        order: dict[str, int] = {}
        pieces = []
        for b in self.proj.blocks:
            k = order.get(b.module, 0)
            pieces.append(self._parts[b.module][k])
            order[b.module] = k + 1
        self._parts.clear()
        return torch.cat(pieces, dim=1)

    def gradients(
        self, h: torch.Tensor, mask: torch.Tensor, weights: Sequence[torch.Tensor]
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Per-example gradients of ``sum_c w[b, c] * logit[b, c]`` for each weight set.

        Each entry of ``weights`` is a (B, C) tensor or a function of the logits that returns one
        (:func:`loss_weights`, :func:`class_weights`). Returns (one (B, d) gradient matrix per
        weight set, logits (B, C), CLS embeddings (B, H)). Must run inside ``with collector:``.
        """
        # Differentiate w.r.t. the input only: the hooks see every output gradient on the way,
        # and autograd skips the batch-summed weight gradients that nobody needs.
        h = h.detach().requires_grad_(True)
        logits, cls = top_forward(self.split, h, mask, with_cls=True)
        outs = []
        for i, w in enumerate(weights):
            w = w(logits.detach()) if callable(w) else w
            torch.autograd.grad(logits, h, grad_outputs=w, retain_graph=i < len(weights) - 1)
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
