"""The Gauss-Newton matrix of the cross-entropy loss, from per-example logit Jacobians.

``G = mean_n J_n^T (diag p_n - p_n p_n^T) J_n`` (J_n: the logits' Jacobian w.r.t. the trainable
parameters, p_n the softmax) equals the Hessian for the head and is positive semi-definite. As
``diag p - p p^T = sum_c p_c (e_c - p)(e_c - p)^T``, the rows ``sqrt(p_c) (e_c - p)^T J_n`` are a
factor of it: G is a sum of outer products of per-example "pseudo-gradients".
"""
from __future__ import annotations

import torch


def gauss_newton_factor(logits: torch.Tensor, jacobian: torch.Tensor) -> torch.Tensor:
    """Rows F (B * C, d) with F^T F = sum_b J_b^T (diag p_b - p_b p_b^T) J_b, from J_b (B, C, d)."""
    p = logits.to(jacobian.dtype).softmax(-1)  # (B, C)
    eye = torch.eye(p.shape[1], dtype=p.dtype)
    coeff = (eye[None] - p[:, None, :]) * p[:, :, None].sqrt()  # (B, C, C): row c = sqrt(p_c)(e_c - p)
    return torch.einsum("bck,bkd->bcd", coeff, jacobian).reshape(-1, jacobian.shape[-1])


def gauss_newton_batch(logits: torch.Tensor, jacobian: torch.Tensor) -> torch.Tensor:
    """sum_b J_b^T (diag p_b - p_b p_b^T) J_b from the Jacobians J_b (B, C, d), in float64."""
    factor = gauss_newton_factor(logits, jacobian.double())
    return factor.T @ factor
