"""Does LiSSA at the paper's settings estimate (H + lambda I)^-1 v? Checked against the exact answer.

The IF family needs ``u = (H + lambda I)^-1 v`` for a test vector v. SpanLens's LiSSA
(core/ihvp.py) runs the paper's recursion ``h <- v + damping h - scale clip(H_b h)`` with
Hessian-vector products of the cross-entropy on one random training instance per step and
returns ``scale h``, an estimate of u for ``lambda = (1 - damping) / scale``. Its clip rescales
H_b h to norm ``clip`` whenever it is longer (the product before ``scale``).

Here the Hessian's data are ``--hessian-train`` seeded training instances (default 200): the
exact reference is the damped Gauss-Newton inverse over them in the full trainable space, from
their exact logit Jacobians (core/training_rows.py with an unprojected projector and
core/ggn.py's gauss_newton_factor, as benchmarks/fidelity.py forms it): G = F^T F / n and, by
Woodbury, ``(G + lambda I)^-1 v = (v - F^T (n lambda I + F F^T)^-1 F v) / lambda`` (the small
system in float64). LiSSA runs on the same instances (the HiddenCache of those rows and their
labels) at three settings, all with the same lambda:

* ``paper``: clip 100, damping 0.99, scale 0.004, depth 1000 (lambda 2.5), early stop as in core;
* ``no_clip``: the same with clip 1e12;
* ``small_scale``: no clip and a scale small enough for the recursion to contract on every
  training instance: by default min(scale / 10, 1 / (lambda_max + lambda)), lambda_max the
  largest per-instance Gauss-Newton eigenvalue (from the diagonal blocks of F F^T), with
  damping = 1 - lambda scale, enough depth for damping^depth to fall to about 1e-3 (capped by
  ``--max-small-depth``) and the early stop's tolerance scaled with 1 - damping (so it stops
  as close to the fixed point as the paper's does). The clip is off rather than kept at 100
  because the clip bounds ||H_b h|| and a smaller scale makes h, so H_b h, longer: the paper's
  clip would bite more, not less. If this setting lands on the exact answer where ``paper``
  does not, the paper's settings (clip and scale), not LiSSA, are at fault; if it does not,
  clipping is not the whole story (the stochastic steps, or the Hessian's negative curvature).

Test vectors v (``--tests`` seeded test instances with a span, default 5, gold labels), dense at
theta: IF++'s e(z') (rep ``diff``) and IF's g(z') (rep ``full``). Per setting and rep, per test
and as means: the relative error ||u_L - u|| / ||u|| and the cosine of LiSSA's answer u_L to the
exact u, its cosine to v / lambda (the answer if curvature were ignored), ||u_L|| / ||u||, and
LiSSA's steps, clipped steps, converged and diverged. Per rep: the cosine of u to v / lambda and
the relative error of v / lambda (how much curvature matters at this lambda: LiSSA is of use only
where it beats v / lambda). ``curvature`` gives G's largest eigenvalue, trace and the number of
eigenvalues above lambda, and the paper's scale times the largest per-instance eigenvalue (the
recursion without clip diverges on such an instance above 1 + damping, about 2).

What would make the result misleading: the reference is the Gauss-Newton matrix, which equals
the Hessian only for the classification head; for the encoder layers LiSSA's true Hessian adds
terms (and may have negative curvature), so a gap to the reference is partly a gap between the
two matrices, not LiSSA's error. (LiSSA restricted to the head, where the two agree, would
separate them; to keep this simple it is not reported.) Also: few Hessian instances make the
stochastic steps revisit the same instances (a different regime from the whole training set);
early stops end a run before depth (``steps``), and ``converged`` means only that the norm
settled; F takes n x classes x P floats of memory (fidelity.py: 6.7 GB for 150 MAMS instances).

Prints JSON. ``python benchmarks/lissa_check.py --workspace workspaces/mams-full --hessian-train 200 --tests 5``
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict, replace

import numpy as np
import torch
from common import Backend, gold_tests, peak_rss_mib, subset_caches

from core.ggn import gauss_newton_factor
from core.gradients import Projector
from core.ihvp import LissaSettings, lissa
from core.model import length_batches
from core.training_rows import training_gradients

CHUNK = 1 << 18  # columns of F handled at once in float64 (a block of n C x CHUNK)
REPS = {"diff": "IF++ e(z')", "full": "IF g(z')"}


class ExactInverse:
    """(G + lam I)^-1 for G = F^T F / n, by Woodbury over the rows F (float32 storage, float64 sums)."""

    def __init__(self, rows: torch.Tensor, n: int, lam: float):
        self.rows, self.n, self.lam = rows, n, lam
        m = rows.shape[0]
        self.small = torch.zeros(m, m, dtype=torch.float64)
        for s in range(0, rows.shape[1], CHUNK):
            block = rows[:, s : s + CHUNK].double()
            self.small += block @ block.T
        self.factor = torch.linalg.cholesky(self.small + n * lam * torch.eye(m, dtype=torch.float64))

    def _f(self, v: torch.Tensor) -> torch.Tensor:
        return sum(self.rows[:, s : s + CHUNK].double() @ v[s : s + CHUNK] for s in range(0, v.numel(), CHUNK))

    def solve(self, v: torch.Tensor) -> torch.Tensor:
        coef = torch.cholesky_solve(self._f(v)[:, None], self.factor)[:, 0]
        out = v.clone()
        for s in range(0, v.numel(), CHUNK):
            out[s : s + CHUNK] -= self.rows[:, s : s + CHUNK].double().T @ coef
        return out / self.lam

    def curvature(self, classes: int) -> dict:
        eig = torch.linalg.eigvalsh(self.small / self.n)  # G's non-zero eigenvalues
        blocks = [self.small[i : i + classes, i : i + classes] for i in range(0, self.small.shape[0], classes)]
        per_example = max(float(torch.linalg.eigvalsh(b)[-1]) for b in blocks)
        return {"gn_lambda_max": float(eig[-1]), "gn_trace": float(eig.sum()),
                "gn_eigenvalues_above_lambda": int((eig > self.lam).sum()), "per_example_gn_lambda_max": per_example}


def flat(vec: dict[str, torch.Tensor], projector: Projector) -> torch.Tensor:
    """A dense parameter-space vector (full-model names) as one float64 vector in block order."""
    return torch.cat([vec[b.param].detach().double().cpu().reshape(-1) for b in projector.blocks])


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    denom = float(a.norm() * b.norm())
    return float(a @ b) / denom if denom > 0 and math.isfinite(denom) else float("nan")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def settings_for(args, lam_max_example: float) -> dict[str, LissaSettings]:
    paper = LissaSettings(depth=args.depth, seed=args.seed)
    lam = paper.lam
    scale = args.small_scale or min(paper.scale / 10, 1.0 / (lam_max_example + lam))
    scale = float(f"{scale:.2g}")
    damping = 1.0 - lam * scale
    depth = args.small_depth or min(args.max_small_depth, math.ceil(7.0 / (lam * scale)))
    return {"paper": paper, "no_clip": replace(paper, clip=1e12),
            "small_scale": replace(paper, clip=1e12, scale=scale, damping=damping, depth=depth,
                                   tol=paper.tol * (1.0 - damping) / (1.0 - paper.damping))}


def summary(rows: list[dict]) -> dict:
    mean = lambda k: round(float(np.nanmean([r[k] for r in rows])), 4) if rows else None  # noqa: E731
    return {"tests": len(rows), "rel_err_mean": mean("rel_err"), "cos_exact_mean": mean("cos_exact"),
            "cos_v_over_lambda_mean": mean("cos_v_over_lambda"), "norm_ratio_mean": mean("norm_ratio"),
            "steps_mean": mean("steps"), "clipped_steps_mean": mean("clipped_steps"),
            "converged": sum(r["converged"] for r in rows), "diverged": sum(r["diverged"] for r in rows),
            "seconds_mean": mean("seconds"), "per_test": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", required=True)
    parser.add_argument("--hessian-train", type=int, default=200, help="training instances of the Hessian")
    parser.add_argument("--tests", type=int, default=5)
    parser.add_argument("--depth", type=int, default=LissaSettings().depth, help="depth of the paper and no-clip runs")
    parser.add_argument("--small-scale", type=float, default=None, help="scale of the small-scale run (default: auto)")
    parser.add_argument("--small-depth", type=int, default=None, help="depth of the small-scale run (default: auto)")
    parser.add_argument("--max-small-depth", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    backend = Backend(args.workspace)
    loaded = backend.loaded
    rng = random.Random(args.seed)
    n_train = len(backend.train_ids)
    rows = sorted(rng.sample(range(n_train), min(args.hessian_train, n_train)))
    spanned = [r for r in backend.instances("test") if r.span is not None]
    tests = gold_tests(backend, rng.sample(spanned, min(args.tests, len(spanned))))
    full, masked, labels = subset_caches(backend, rows)
    exact_projector = Projector(loaded.split, None, 0, loaded.device)

    started = time.perf_counter()
    classes = len(loaded.labels)
    f_rows = torch.empty(len(rows) * classes, exact_projector.params)  # F, filled in place: n C x P floats, once
    filled = 0
    for b in training_gradients(loaded, exact_projector, full, masked, labels, "final",
                                length_batches(full.lengths(), 16), kinds=("full",), with_jacobian=True):
        f_rows.view(len(rows), classes, -1)[b.rows] = gauss_newton_factor(b.logits, b.jacobian).view(len(b.rows), classes, -1)
        filled += len(b.rows)
    assert filled == len(rows), f"{filled} of {len(rows)} Jacobian rows formed"
    paper_lam = LissaSettings().lam
    exact = ExactInverse(f_rows, len(rows), paper_lam)
    curvature = exact.curvature(classes)
    settings = settings_for(args, curvature["per_example_gn_lambda_max"])
    top = curvature["per_example_gn_lambda_max"]
    curvature["paper_scale_times_per_example_lambda_max"] = round(LissaSettings().scale * top, 4)
    out: dict = {"hessian_train": len(rows), "tests": len(tests), "params": exact_projector.params,
                 "lambda": round(paper_lam, 9),
                 "reference": "exact damped Gauss-Newton inverse (Woodbury)",
                 "reference_seconds": round(time.perf_counter() - started, 1), "curvature": curvature,
                 "settings": {k: {**asdict(s), "lambda": round(s.lam, 6)} for k, s in settings.items()}}

    engine = backend.engine()
    batch = engine.test_batch(tests)
    loaded.use("final")
    for rep, label in REPS.items():
        vectors = []
        for q in range(len(tests)):
            if rep == "diff" and q in batch.spanless:
                continue  # e(z') = 0: nothing to invert
            dense = engine.dense_test_gradient(batch, q, rep)
            vectors.append((q, dense, flat(dense, exact_projector)))
        answers = [exact.solve(v) for _, _, v in vectors]
        pairs = [(u, v) for u, (_, _, v) in zip(answers, vectors)]
        block: dict = {"vector": label, "tests": len(vectors),
                       "exact_cos_v_over_lambda": [round(cosine(u, v), 4) for u, v in pairs],
                       "v_over_lambda_rel_err": [round(rel_err(v / paper_lam, u), 4) for u, v in pairs]}
        for name, s in settings.items():
            results = []
            for u, (q, dense, v) in zip(answers, vectors):
                t0 = time.perf_counter()
                res = lissa(loaded.split, full, labels, dense, s, device=loaded.device)
                seconds = time.perf_counter() - t0
                u_l = flat(res.vector, exact_projector)
                results.append({"test": q, "rel_err": round(rel_err(u_l, u), 4), "cos_exact": round(cosine(u_l, u), 4),
                                "cos_v_over_lambda": round(cosine(u_l, v), 4),
                                "norm_ratio": round(float(u_l.norm() / u.norm()), 4), "steps": res.steps,
                                "clipped_steps": res.clipped_steps, "converged": res.converged,
                                "diverged": res.diverged, "seconds": round(seconds, 2)})
            block[name] = summary(results)
        out[rep] = block
    loaded.use("final")
    out["peak_rss_mib"] = peak_rss_mib()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
