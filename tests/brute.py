"""Brute-force references for the engine's scores: autograd on the whole Hugging Face model,
one example at a time, over the trainable subset (no hooks, no sketch, no cache)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from core.artifacts import bases_for, open_ekfac
from core.backend import Backend
from core.engine import Engine
from core.gradients import Projector
from core.model import HiddenCache, collate, encode_pairs, mask_span
from core.training_sides import StreamedSide
from core.workspace import load_model

DAMPING = 1e-4  # far below the tiny model's two large Gauss-Newton eigenvalues (~0.4): the inverse matters


def flat_grad(model, tok, row, label: int, span, masked: bool) -> torch.Tensor:
    """Brute force: autograd on the whole Hugging Face model, one example, trainable subset only."""
    enc = encode_pairs(tok, [(row.aspect, row.text)], 64)[0]
    if masked and span:
        enc = mask_span(enc, span[0], span[1], tok.mask_token_id)
    logits = model(**collate([enc], tok.pad_token_id)).logits
    loss = nn.functional.cross_entropy(logits, torch.tensor([label]))
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])


def sides(model, tok, row, label, span, role):
    g = flat_grad(model, tok, row, label, span, False)
    g_masked = flat_grad(model, tok, row, label, span, True)
    # e: the span's part of the gradient, both sides; the ekfac kinds are the same vectors in the
    # EK-FAC eigenbasis, a rotation, which changes no inner product
    return {"full": g, "diff": g - g_masked, "ekfac": g, "ekfac-diff": g - g_masked}


def brute_force(backend, test_id, method, train_rows, dtype):
    ws = backend.ws
    labels = backend.manifest.labels
    test = backend.by_id[test_id]
    t_span = test.span_pair
    points = {"final": ["final"], "checkpoints": ws.points("checkpoint"), "variants": ws.points("variant")}[method.points]
    lrs = {r["point"]: r["lr"] for r in ws.manifest().stages["model"]["checkpoints"]}
    total = torch.zeros(len(train_rows), dtype=torch.float64)
    for point in points:
        model = load_model(ws, point, device="cpu").to(dtype)
        tok = model.spanlens_tokenizer
        t_vec = sides(model, tok, test, labels.index(test.label), t_span, "test")[method.test].double()
        if method.inverse:
            gram = brute_gauss_newton(backend, model, tok, dtype)
            t_vec = torch.linalg.solve(gram + DAMPING * torch.eye(len(t_vec), dtype=torch.float64), t_vec)
        weight = lrs[point] if method.weights == "lr" else 1.0
        for j, row in enumerate(train_rows):
            x = sides(model, tok, row, labels.index(row.label), row.span_pair, "train")[method.train].double()
            total[j] += weight * float(t_vec @ x)
    return total


_GRAM: dict[str, torch.Tensor] = {}


def brute_gauss_newton(backend, model, tok, dtype) -> torch.Tensor:
    """mean_n J_n^T (diag p - p p^T) J_n with full Jacobians from autograd (at theta, cached)."""
    key = f"{backend.ws.root}:{dtype}"
    if key not in _GRAM:
        _GRAM[key] = compute_gauss_newton(backend, model, tok)
    return _GRAM[key]


def compute_gauss_newton(backend, model, tok) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    rows = backend.instances("train")
    gram = None
    for row in rows:
        enc = encode_pairs(tok, [(row.aspect, row.text)], 64)[0]
        logits = model(**collate([enc], tok.pad_token_id)).logits[0]
        jac = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(logits[c], params, retain_graph=True)])
                           for c in range(len(logits))]).double()
        p = logits.detach().double().softmax(-1)
        part = jac.T @ (torch.diag(p) - torch.outer(p, p)) @ jac
        gram = part if gram is None else gram + part
    return gram / len(rows)


def margin_grad(model, tok, row, label: int, span, masked: bool) -> tuple[torch.Tensor, float]:
    """Brute force: the gradient of the margin log p_y - log(1 - p_y) and 1 - p_y, by autograd."""
    enc = encode_pairs(tok, [(row.aspect, row.text)], 64)[0]
    if masked and span:
        enc = mask_span(enc, span[0], span[1], tok.mask_token_id)
    logp = model(**collate([enc], tok.pad_token_id)).logits[0].log_softmax(-1)
    margin = logp[label] - torch.log1p(-logp[label].exp())
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.cat([g.flatten() for g in torch.autograd.grad(margin, params)]), 1.0 - float(logp[label].detach().exp())


def brute_trak(backend, test_id: str, span_form: bool, train_rows, ridge: float, dtype=torch.float64,
               points: Sequence[str] | None = None, spans: dict | None = None) -> torch.Tensor:
    """TRAK's definition, point by point over ``points`` (default: the checkpoints), with every
    feature from autograd: mean_p phi_p(z')^T (Phi_p^T Phi_p + lambda_p I)^-1 phi_p(z) Q_p(z),
    lambda_p = ridge x mean eigenvalue; span_form: phi(x) - phi(x_-ij) on both sides; ``spans``:
    training spans by id in place of the rows' own."""
    ws, labels = backend.ws, backend.manifest.labels
    test, rows = backend.by_id[test_id], backend.instances("train")
    points = list(points or ws.points("checkpoint"))
    total = torch.zeros(len(train_rows), dtype=torch.float64)
    for point in points:
        model = load_model(ws, point, device="cpu").to(dtype)
        tok = model.spanlens_tokenizer

        def side(row, masked_too: bool) -> tuple[torch.Tensor, float]:
            span = (spans or {}).get(row.id, row.span_pair)
            g, q = margin_grad(model, tok, row, labels.index(row.label), span, False)
            if masked_too:
                g = g - margin_grad(model, tok, row, labels.index(row.label), span, True)[0]
            return g.double(), q

        phi = torch.stack([side(r, False)[0] for r in rows])
        gram = phi.T @ phi
        lam = ridge * float(torch.diagonal(gram).mean())
        t_vec = torch.linalg.solve(gram + lam * torch.eye(len(gram), dtype=torch.float64), side(test, span_form)[0])
        for j, row in enumerate(train_rows):
            x, q = side(row, span_form)
            total[j] += float(t_vec @ x) * q / len(points)
    return total


def float64_engine(workspace: Path) -> tuple[Backend, Engine]:
    """A float64 engine over streamed exact gradients of the workspace (every point), with its
    EK-FAC factors when it has them, and the workspace's backend."""
    own = Backend(workspace, device="cpu")
    loaded = own.loaded
    loaded.split.model.double()
    for params in loaded.points.values():
        for name in params:
            params[name] = params[name].double()
    loaded.use("final")
    full, labels = own.train_cache()
    masked = HiddenCache.load(own.index.root / "prefix-masked.safetensors")
    to64 = lambda c: HiddenCache([s.double() for s in c.states])  # noqa: E731
    projector = Projector(loaded.split, None)
    side = StreamedSide(loaded, projector, to64(full), to64(masked), labels, 8, bases=lambda k: bases_for(own.ws, k))
    return own, Engine(loaded, side, projector, ekfac=lambda: open_ekfac(own.ws))
