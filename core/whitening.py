"""TRAK's training rows whitened at index time.

TRAK scores ``phi(z')^T (Phi^T Phi + lambda I)^-1 Q(z) phi(z)`` (:mod:`core.inverses`). The index
keeps each TRAK row already multiplied by that inverse, ``(Phi^T Phi + lambda I)^-1 Q(z) phi(z)``
for both TRAK kinds at each of TRAK's points, so that a query is the test features' inner products
with these rows, with no d x d product of its own. TRAK's reference implementation keeps its
training features the same way. The inverse is formed in float64 from the Gram matrix the point's
pass accumulated; the whitened rows are stored in float32, as the rows were.

The step is crash-safe and idempotent. The whitened rows are written beside the rows as computed
(``<point>.<kind>.white.npy``, each renamed into place once complete) and recorded in the index's
meta (``whitened``: point -> ridge and lambda); only then are the rows as computed removed, so an
interrupted step is redone from them. A patch overlay keeps its rows as computed and their
whitened copies (:func:`core.index.white_key`), the latter always formed from the former.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from numpy.lib.format import open_memmap
from tqdm.auto import tqdm

from .ihvp import DampedInverse
from .index import (
    BLOCK_BYTES,
    KIND_GROUPS,
    WHITENED_GROUP,
    _load_overlay,
    _load_sum,
    _overlay_path,
    _save_overlay,
    rows_file,
    white_key,
)
from .inverses import trak_inverse
from .scoring import TRAK_RIDGE
from .workspace import write_json_atomic

TRAK_KINDS = KIND_GROUPS[WHITENED_GROUP]


def point_inverse(root: Path, point: str) -> DampedInverse:
    """TRAK's inverse at a point, from the Gram matrix its pass accumulated."""
    return trak_inverse(torch.from_numpy(_load_sum(root, WHITENED_GROUP, point)[0]), TRAK_RIDGE)


def other_ridge(whitened: Mapping[str, dict]) -> set[str]:
    """The points of a ``whitened`` record (point -> ridge and lambda) whitened with a ridge other
    than TRAK's: their rows must be built again (the rows as computed are gone)."""
    return {p for p, w in whitened.items() if w.get("ridge") != TRAK_RIDGE}


def whiten_rows(inverse: DampedInverse, rows: np.ndarray) -> np.ndarray:
    """Rows (n, d) times the (symmetric) inverse, formed in float64, returned in float32."""
    return inverse.solve(torch.from_numpy(np.asarray(rows, dtype=np.float64))).float().numpy()


def white_overlay(inverse: DampedInverse, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A TRAK overlay's whitened rows: one entry per kind it holds, keyed by :func:`white_key`."""
    return {white_key(k): whiten_rows(inverse, rows[k]) for k in TRAK_KINDS if k in rows}


def whiten_index(root: Path, meta: dict, n_batches: int, progress: bool = True) -> list[str]:
    """Whiten every TRAK point whose pass is complete and that is not whitened yet, and remove the
    rows as computed that a whitened point still has (an interrupted step's); returns the points
    whitened."""
    if WHITENED_GROUP not in meta.get("groups", []):
        return []
    done = []
    for point in meta["group_points"][WHITENED_GROUP]:
        if point not in meta.get("whitened", {}) and meta["progress"].get(f"{WHITENED_GROUP}:{point}", 0) >= n_batches:
            _whiten_point(root, meta, point, progress)
            done.append(point)
        if point in meta.get("whitened", {}):
            for kind in TRAK_KINDS:
                (root / rows_file(point, kind)).unlink(missing_ok=True)
    return done


def _whiten_point(root: Path, meta: dict, point: str, progress: bool) -> None:
    """Write a point's whitened rows and overlay, then record them in the meta."""
    inverse = point_inverse(root, point)
    for kind in TRAK_KINDS:
        computed = np.load(root / rows_file(point, kind), mmap_mode="r")
        final = root / rows_file(point, kind, white=True)
        tmp = final.with_name(final.name.removesuffix(".npy") + ".tmp.npy")
        out = open_memmap(tmp, mode="w+", dtype=np.float32, shape=computed.shape)
        step = max(1, BLOCK_BYTES // max(1, computed.shape[1] * 8))
        for start in tqdm(range(0, computed.shape[0], step), desc=f"whiten {point}.{kind}", unit="block",
                          disable=not progress):
            out[start : start + step] = whiten_rows(inverse, computed[start : start + step])
        out.flush()
        del out
        os.replace(tmp, final)
    found = _load_overlay(root, WHITENED_GROUP, point)
    if found is not None:
        rows = {k: v.numpy() for k, v in found[1].items() if k in TRAK_KINDS}
        _save_overlay(_overlay_path(root, WHITENED_GROUP, point), found[0].tolist(), rows | white_overlay(inverse, rows))
    meta.setdefault("whitened", {})[point] = {"ridge": TRAK_RIDGE, "lambda": float(f"{inverse.lam:.12g}")}
    write_json_atomic(root / "meta.json", meta)
