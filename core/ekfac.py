"""EK-FAC: an eigenvalue-corrected Kronecker-factored Gauss-Newton matrix of the trainable subset.

The influence-function family needs ``(G + lambda I)^-1 v`` for the mean Gauss-Newton matrix

    G = mean_n J_n^T (diag p_n - p_n p_n^T) J_n = mean_n sum_c g_{n,c} g_{n,c}^T,

(J_n: Jacobian of the logits w.r.t. the trainable parameters, p_n the softmax). Since
``diag p - p p^T = sum_c p_c (e_c - p)(e_c - p)^T``, the *pseudo-gradient* ``g_{n,c}`` is the
backward pass of the logit weights ``w_c = sqrt(p_c) (e_c - p)``: one backward pass per class, no
labels needed. Following George et al. (2018) and Grosse et al. (2023, section 2.2.3):

1. Block diagonal: G is kept only within each trainable tensor (no cross-tensor terms).
2. K-FAC, for every linear weight W (out x in): its pseudo-gradient is
   ``G_{n,c} = sum_t delta_t a_t^T`` (output gradients times layer inputs over the tokens t), and
   ``E[vec G vec G^T]`` is taken to be the Kronecker product ``S (x) A`` with
   ``A = mean_n sum_t a_t a_t^T`` and ``S = mean_n sum_c sum_t delta_t delta_t^T``; this ignores
   the dependence between a and delta and the cross-token terms.
3. Eigenvalue correction: with ``A = Q_A diag Q_A^T`` and ``S = Q_S diag Q_S^T`` (float64), the
   K-FAC eigenvalues ``outer(eig_S, eig_A)`` are replaced by G's exact diagonal in the
   eigenbasis ``Q_S (x) Q_A``, ``Lambda[i, j] = mean_n sum_c ((Q_S^T G_{n,c} Q_A)[i, j])^2``
   (the best diagonal in that basis, in Frobenius norm). Then
   ``(G_W + lambda I)^-1 V = Q_S [(Q_S^T V Q_A) / (Lambda + lambda)] Q_A^T``.
4. Every other tensor (LayerNorm weights and biases, linear biases): G's diagonal,
   ``mean_n sum_c g_{n,c}^2`` entry by entry, inverted as ``v / (diag + lambda)``.

For one example with one token per layer, ``G_W = S (x) A`` exactly, so the weight blocks are
exact there. Padded tokens contribute nothing: their inputs a_t (not zero in general) and output
gradients delta_t (zero in a masked attention model) are both masked out.

The fit is two passes over the cached hidden states in eval mode (covariances, then the
correction in the eigenbasis of the first pass). With a ``work_dir`` the float64 partial sums and
the number of batches done are saved atomically every :data:`FLUSH_EVERY` batches, and a
restarted fit of the same model and cache continues from there to the same factors.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .gradients import Block, Projector
from .ihvp import check_damping
from .model import HiddenCache, SplitModel, length_batches, top_forward

FORMAT = "spanlens-ekfac/1"
PARTIAL = "ekfac-partial.safetensors"  # the resumable partial sums inside ``work_dir``
FLUSH_EVERY = 25  # batches between saves of the partial sums
CHUNK_ELEMENTS = 1_000_000  # per-example projected weight gradients formed at once

Tensors = dict[str, torch.Tensor]
Bases = dict[str, tuple[torch.Tensor, torch.Tensor]]  # per linear weight: (Q_S, Q_A)


@dataclass
class EkfacFactors:
    """Eigenbases and corrected eigenvalues per linear weight; a damped diagonal for the rest.

    Keys are full-model parameter names (as ``split.top_params()``); tensors are float64.
    """

    q_out: Tensors  # Q_S (out x out) per linear weight
    q_in: Tensors  # Q_A (in x in) per linear weight
    eigenvalues: Tensors  # Lambda (out x in) per linear weight
    diagonals: Tensors  # G's diagonal (the tensor's shape) for every other trainable tensor
    examples: int
    corrected: bool
    _copies: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # see _cast

    @property
    def names(self) -> list[str]:
        """Every parameter covered: linear weights first, then the diagonal blocks."""
        return [*self.q_out, *self.diagonals]

    def apply(self, vec: Tensors, damping: float) -> Tensors:
        """(G_ekfac + damping I)^-1 vec, for a dense vector over the trainable parameters
        (full-model names, as split.top_params()); each result in its input's dtype and device.

        Float64 input is solved in float64; anything else in float32 with float32 copies of the
        factors (made once per device)."""
        lam = check_damping(damping)
        if set(vec) != set(self.names):
            missing, extra = set(self.names) - set(vec), set(vec) - set(self.names)
            raise ValueError(f"vector does not match the factors: missing {sorted(missing)[:3]}, "
                             f"unexpected {sorted(extra)[:3]}")
        out = {}
        for name, v in vec.items():
            x = v.detach().to(_compute_dtype(v))
            if name in self.q_out:
                q_s, q_a, _ = self._cast(x.dtype, x.device, name)
                x = q_s.T @ x @ q_a
            out[name] = self._solve(name, x, lam).to(v.dtype)
        return out

    def _solve(self, name: str, x: torch.Tensor, lam: float) -> torch.Tensor:
        """The inverse's last step on one tensor: a linear weight's gradient already rotated into
        the eigenbasis is divided by Lambda + lam and rotated back; any other tensor is divided by
        its diagonal + lam."""
        if name in self.q_out:
            q_s, q_a, eig = self._cast(x.dtype, x.device, name)
            return q_s @ (x / (eig + lam)) @ q_a.T
        return x / (self._cast(x.dtype, x.device, name)[0] + lam)

    def _cast(self, dtype: torch.dtype, device: torch.device, name: str) -> tuple[torch.Tensor, ...]:
        """One parameter's factors (Q_S, Q_A, Lambda for a linear weight, else its diagonal) in
        ``dtype`` on ``device``: the stored tensors for their own dtype and device, else a copy
        kept for the next call."""
        tensors = ((self.q_out[name], self.q_in[name], self.eigenvalues[name]) if name in self.q_out
                   else (self.diagonals[name],))
        if all(t.dtype == dtype and t.device == device for t in tensors):
            return tensors
        key = (dtype, str(device), name)
        if key not in self._copies:
            self._copies[key] = tuple(t.to(device=device, dtype=dtype, memory_format=torch.contiguous_format)
                                      for t in tensors)
        return self._copies[key]

    def save(self, path: Path) -> None:
        """One safetensors file with a small JSON description inside, written atomically."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {f"{kind}/{name}": t.detach().cpu().contiguous()
                   for kind, group in self._groups().items() for name, t in group.items()}
        meta = {"format": FORMAT, "examples": self.examples, "corrected": self.corrected,
                "weights": list(self.q_out), "diagonals": list(self.diagonals)}
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"ekfac": json.dumps(meta)})
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "EkfacFactors":
        """Factors saved by :meth:`save`; ValueError naming ``path`` when it cannot be read."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = json.loads((handle.metadata() or {})["ekfac"])
                if meta.get("format") != FORMAT:
                    raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT!r}")
                read = lambda kind, names: {n: handle.get_tensor(f"{kind}/{n}") for n in names}  # noqa: E731
                return cls(read("q_out", meta["weights"]), read("q_in", meta["weights"]),
                           read("eigenvalues", meta["weights"]), read("diagonals", meta["diagonals"]),
                           int(meta["examples"]), bool(meta["corrected"]))
        except (OSError, AttributeError, KeyError, TypeError, ValueError, SafetensorError) as exc:
            raise ValueError(f"{path}: not readable as EK-FAC factors ({type(exc).__name__}: {exc})") from exc

    def _groups(self) -> dict[str, Tensors]:
        return {"q_out": self.q_out, "q_in": self.q_in, "eigenvalues": self.eigenvalues, "diagonals": self.diagonals}


class Eigenbasis:
    """The EK-FAC eigenbasis as coordinates for per-example gradients (the ``ekfac``
    representations, :mod:`core.representations`), for :class:`core.gradients.GradientCollector`.

    A linear weight's gradient sum_t delta_t a_t^T becomes Q_S^T G Q_A, formed as
    sum_t (Q_S^T delta_t)(Q_A^T a_t)^T from the rotated output gradients and inputs (tokens x
    (out^2 + in^2) on top of the gradient's own cost); every other tensor keeps its coordinates.
    A rotation changes no inner product. With ``damping`` the gradient is also divided, entry by
    entry, by Lambda + damping (a linear weight) or the diagonal + damping (any other tensor):
    (G_ekfac + damping I)^-1 applied in these coordinates, so that the test side's
    ``<divided, rotated training row>`` is g(z')^T (G_ekfac + damping I)^-1 g(z) with no rotation
    back. Computed in float32 for anything but float64 (copies of the factors made once)."""

    def __init__(self, factors: EkfacFactors, damping: float | None = None):
        self.factors = factors
        self.damping = None if damping is None else check_damping(damping)
        self._scales: dict[tuple, torch.Tensor] = {}

    def rotate(self, param: str, d: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A linear weight's output gradients and inputs (..., out), (..., in) in its eigenbasis."""
        dtype = _compute_dtype(d)
        q_s, q_a, _ = self.factors._cast(dtype, d.device, param)
        return (d.to(dtype) @ q_s).to(d.dtype), (a.to(dtype) @ q_a).to(a.dtype)

    def scale(self, param: str, like: torch.Tensor) -> torch.Tensor | None:
        """What a tensor's gradient in these coordinates is multiplied by, flattened: 1 / (Lambda +
        damping) or 1 / (diagonal + damping); None without damping."""
        if self.damping is None:
            return None
        key = (like.dtype, str(like.device), param)
        if key not in self._scales:
            curvature = self.factors._cast(_compute_dtype(like), like.device, param)
            eig = curvature[2] if param in self.factors.q_out else curvature[0]
            self._scales[key] = (1.0 / (eig + self.damping)).reshape(-1).to(like.dtype)
        return self._scales[key]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 for float64 tensors, float32 for every other (the factors are stored in float64)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- hooks


class _Taps:
    """Forward hooks keeping each layer's input and, via a hook on its output, the output
    gradient of the latest backward pass; both as (B, T, k) with padded tokens zeroed.

    A 2-D input (pooler, head: one token) is kept as (B, 1, k). For a LayerNorm the input is
    its normalised input (what multiplies its weight)."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = modules
        self.inputs: Tensors = {}
        self.grads: Tensors = {}
        self.mask: torch.Tensor | None = None
        self._handles: list = []

    def start(self, mask: torch.Tensor) -> None:
        """A new forward pass over a batch with this (B, T) attention mask."""
        self.mask = mask
        self.inputs.clear()
        self.grads.clear()

    def _tokens(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return x.unsqueeze(1)
        if x.dim() != 3 or x.shape[1] != self.mask.shape[1]:
            raise ValueError(f"{name}: expected (batch, tokens, features) activations, got {tuple(x.shape)}")
        return x * self.mask[:, :, None].to(x.dtype)

    def _hook(self, name: str):
        def grad_hook(grad: torch.Tensor) -> None:
            self.grads[name] = self._tokens(name, grad.detach())

        def hook(module: nn.Module, args, output: torch.Tensor) -> None:
            if name in self.inputs:
                raise ValueError(f"{name} ran twice in one forward pass: shared layers are not supported")
            x = args[0].detach()
            if isinstance(module, nn.LayerNorm):
                x = nn.functional.layer_norm(x, module.normalized_shape, None, None, module.eps)
            self.inputs[name] = self._tokens(name, x)
            output.register_hook(grad_hook)

        return hook

    def __enter__(self) -> "_Taps":
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in self.modules.items()]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.inputs.clear()
        self.grads.clear()


def pseudo_weights(logits: torch.Tensor) -> torch.Tensor:
    """(C, B, C): entry [c, b] is ``sqrt(p_bc) (e_c - p_b)``, so sum_c w w^T = diag p - p p^T."""
    p = logits.double().softmax(-1)
    eye = torch.eye(p.shape[1], dtype=p.dtype, device=p.device)
    return ((eye[:, None, :] - p[None]) * p.T[:, :, None].sqrt()).to(logits.dtype)


def _pseudo_backwards(split: SplitModel, taps: _Taps, h: torch.Tensor, mask: torch.Tensor) -> Iterator[None]:
    """One forward pass, then one backward pass per class; after each, ``taps`` holds a and delta.

    Differentiating w.r.t. the input only: the hooks see every output gradient on the way and
    autograd skips the batch-summed parameter gradients (the parameters' .grad stay untouched)."""
    taps.start(mask)
    h = h.detach().requires_grad_(True)
    logits = top_forward(split, h, mask)
    weights = pseudo_weights(logits.detach())
    for c, w in enumerate(weights):
        taps.grads.clear()
        torch.autograd.grad(logits, h, grad_outputs=w, retain_graph=c + 1 < len(weights))
        missing = set(taps.modules) - set(taps.grads)
        if missing:
            raise ValueError(f"trainable layers the logits do not depend on: {sorted(missing)[:3]}")
        yield


# ----------------------------------------------------------------------------- the two passes


def _gram(x: torch.Tensor) -> torch.Tensor:
    """sum over examples and tokens of x_t x_t^T, float64, from (B, T, k)."""
    flat = x.reshape(-1, x.shape[-1]).double()
    return flat.T @ flat


def _entries(kind: str, d: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Per-example pseudo-gradient (B, size) of a bias or LayerNorm tensor."""
    return (d * a).sum(1) if kind == "ln-weight" else d.sum(1)


def _squared_gradients(d: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """sum_b ((sum_t d_bt a_bt^T)[i, j])^2 (float64), a few examples at a time."""
    if d.shape[1] == 1:  # one token: the square of an outer product is the outer product of squares
        return d[:, 0].double().square().T @ a[:, 0].double().square()
    out = torch.zeros(d.shape[2], a.shape[2], dtype=torch.float64, device=d.device)
    d = d.transpose(1, 2)
    step = max(1, CHUNK_ELEMENTS // out.numel())
    for s in range(0, d.shape[0], step):
        out += torch.bmm(d[s : s + step], a[s : s + step]).square().sum(0, dtype=torch.float64)
    return out


class _Fitter:
    """The per-batch work of both passes, adding into float64 sums keyed ``kind:param`` with
    kinds A, S (Kronecker factors), D (diagonals) and L (corrected eigenvalues)."""

    def __init__(self, split: SplitModel, taps: _Taps, blocks: list[Block], sums: Tensors):
        self.split, self.taps, self.blocks, self.sums = split, taps, blocks, sums
        self.weights = [b for b in blocks if b.kind == "linear-weight"]

    def covariances(self, h: torch.Tensor, mask: torch.Tensor) -> None:
        """Pass 1: A, S and the diagonals."""
        for c, _ in enumerate(_pseudo_backwards(self.split, self.taps, h, mask)):
            for b in self.blocks:
                a, d = self.taps.inputs[b.module], self.taps.grads[b.module]
                if b.kind == "linear-weight":
                    if c == 0:  # the inputs are the same for every class
                        self.sums[f"A:{b.param}"] += _gram(a)
                    self.sums[f"S:{b.param}"] += _gram(d)
                else:
                    self.sums[f"D:{b.param}"] += _entries(b.kind, d, a).square().sum(0, dtype=torch.float64)

    def corrections(self, h: torch.Tensor, mask: torch.Tensor, bases: Bases) -> None:
        """Pass 2: Lambda, from pseudo-gradients formed in the eigenbasis (bases in the model's dtype)."""
        for _ in _pseudo_backwards(self.split, self.taps, h, mask):
            for b in self.weights:
                q_s, q_a = bases[b.param]
                d, a = self.taps.grads[b.module] @ q_s, self.taps.inputs[b.module] @ q_a
                self.sums[f"L:{b.param}"] += _squared_gradients(d, a)


def _zero_sums(blocks: list[Block], device: torch.device | str) -> Tensors:
    zeros = lambda *shape: torch.zeros(shape, dtype=torch.float64, device=device)  # noqa: E731
    sums = {}
    for b in blocks:
        if b.kind == "linear-weight":
            out, inp = b.shape
            sums.update({f"A:{b.param}": zeros(inp, inp), f"S:{b.param}": zeros(out, out),
                         f"L:{b.param}": zeros(out, inp)})
        else:
            sums[f"D:{b.param}"] = zeros(b.size)
    return sums


def _eigenbases(sums: Tensors, blocks: list[Block], n: int) -> dict[str, tuple[tuple, tuple]]:
    """Per linear weight ((eig_S, Q_S), (eig_A, Q_A)) of the mean factors, float64."""
    return {b.param: (torch.linalg.eigh(sums[f"S:{b.param}"] / n), torch.linalg.eigh(sums[f"A:{b.param}"] / n))
            for b in blocks if b.kind == "linear-weight"}


def _factors(sums: Tensors, blocks: list[Block], eig: dict, n: int, corrected: bool) -> EkfacFactors:
    q_out, q_in, lam, diag = {}, {}, {}, {}
    for b in blocks:
        if b.kind != "linear-weight":
            diag[b.param] = (sums[f"D:{b.param}"] / n).reshape(b.shape).cpu()
            continue
        (e_s, q_s), (e_a, q_a) = eig[b.param]
        q_out[b.param], q_in[b.param] = q_s.cpu(), q_a.cpu()
        kfac = torch.outer(e_s.clamp_min(0), e_a.clamp_min(0))  # K-FAC's own eigenvalues
        lam[b.param] = (sums[f"L:{b.param}"] / n if corrected else kfac).cpu()
    return EkfacFactors(q_out, q_in, lam, diag, n, corrected)


# ----------------------------------------------------------------------------- resumable fit


def _fingerprint(split: SplitModel, cache: HiddenCache, batch_size: int) -> str:
    """What the partial sums depend on: the parameters, the cached states, the batching."""
    digest = hashlib.sha256(json.dumps([batch_size, cache.lengths()]).encode())
    for name, p in split.top_params().items():
        digest.update(name.encode())
        digest.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    sums = torch.stack([s.double().sum() for s in cache.states])
    digest.update(sums.numpy().tobytes())
    return digest.hexdigest()[:16]


def _load_partial(path: Path | None, key: str, sums: Tensors) -> list[int]:
    """Fill ``sums`` from a saved partial fit of the same ``key``; the batches done per pass."""
    from safetensors import SafetensorError, safe_open

    if path is None or not path.exists():
        return [0, 0]
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads((handle.metadata() or {})["partial"])
            if meta.get("fingerprint") != key or set(handle.keys()) != set(sums):
                return [0, 0]
            for name, t in sums.items():
                t.copy_(handle.get_tensor(name))
            return [int(k) for k in meta["done"]]
    except (OSError, AttributeError, KeyError, TypeError, ValueError, SafetensorError):
        return [0, 0]  # unreadable: start afresh (it is only a cache of work)


def _save_partial(path: Path, key: str, sums: Tensors, done: list[int]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.cpu().contiguous() for k, v in sums.items()}, str(tmp),
              metadata={"partial": json.dumps({"fingerprint": key, "done": done})})
    os.replace(tmp, path)


def _run_pass(k: int, step: Callable[[torch.Tensor, torch.Tensor], None], batches: list[list[int]],
              cache: HiddenCache, device: torch.device | str, done: list[int],
              save: Callable[[], None] | None, tick: Callable[[], None]) -> None:
    """Pass ``k`` over the batches not done yet, saving every FLUSH_EVERY batches and at the end."""
    for b in range(done[k], len(batches)):
        h, mask = cache.batch(batches[b], device)
        step(h, mask)
        done[k] = b + 1
        if save is not None and (done[k] % FLUSH_EVERY == 0 or done[k] == len(batches)):
            save()
        tick()


def fit_ekfac(split: SplitModel, cache: HiddenCache, *, batch_size: int = 32, device: torch.device | str = "cpu",
              correct: bool = True, work_dir: Path | None = None, progress: bool = False,
              on_progress: Callable[[float], None] | None = None) -> EkfacFactors:
    """Fit EK-FAC factors of the mean Gauss-Newton matrix over ``cache`` (the model is on ``device``).

    ``correct=False`` skips the second pass (plain K-FAC eigenvalues). With ``work_dir`` the partial
    sums live in ``work_dir / PARTIAL`` (kept afterwards: a repeated fit of the same model and
    cache skips the passes) and a restarted fit resumes from them. ``on_progress``
    gets the fraction done as batches finish (pass 1 fills the first half, pass 2 the second)."""
    if len(cache) == 0:
        raise ValueError("EK-FAC needs at least one training example")
    layout = Projector(split, None)  # the trainable tensors as blocks of Linear / LayerNorm modules
    blocks = layout.blocks
    batches = length_batches(cache.lengths(), batch_size)
    sums = _zero_sums(blocks, device)
    partial = None if work_dir is None else Path(work_dir) / PARTIAL
    key = _fingerprint(split, cache, batch_size)
    done = _load_partial(partial, key, sums)
    passes = 2 if correct else 1
    total = len(batches) * passes
    save = None if partial is None else (lambda: _save_partial(partial, key, sums, done))
    bar = tqdm(total=total, initial=sum(done[:passes]), desc="EK-FAC", unit="batch", disable=not progress)

    def tick() -> None:
        bar.update(1)
        if on_progress is not None:
            on_progress(sum(done[:passes]) / total)

    was_training = split.top.training
    split.top.eval()
    try:
        with _Taps(layout.modules) as taps:
            fitter = _Fitter(split, taps, blocks, sums)
            _run_pass(0, fitter.covariances, batches, cache, device, done, save, tick)
            eig = _eigenbases(sums, blocks, len(cache))
            if correct:
                dtype = next(iter(split.top_params().values())).dtype
                bases = {p: (q_s.to(dtype), q_a.to(dtype)) for p, ((_, q_s), (_, q_a)) in eig.items()}
                _run_pass(1, lambda h, m: fitter.corrections(h, m, bases), batches, cache, device, done, save, tick)
    finally:
        split.top.train(was_training)
        bar.close()
    return _factors(sums, blocks, eig, len(cache), correct)
