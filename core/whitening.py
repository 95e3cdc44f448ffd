"""TRAK's training rows whitened at index time.

TRAK scores ``phi(z')^T (Phi^T Phi + lambda I)^-1 Q(z) phi(z)`` (:mod:`core.inverses`). The index
keeps each TRAK row already multiplied by that inverse, ``(Phi^T Phi + lambda I)^-1 Q(z) phi(z)``
for both TRAK kinds at each of TRAK's points, so that a query is the test features' inner products
with these rows, with no d x d product of its own. TRAK's reference implementation keeps its
training features the same way. The inverse is formed in float64 from the Gram matrix the point's
pass accumulated; the whitened rows are stored as float16 rows over a float32 scale per row
(:func:`core.index.half_rows`), as TRAK's reference implementation keeps its features in float16:
a query streams half the bytes of float32 rows. Rows whitened before they were kept this way
(``storage`` missing from their record) are converted by the next build.

The step is crash-safe and idempotent. The whitened rows are written beside the rows as computed
(``<point>.<kind>.white.npy``, renamed into place once complete, after their scales
``<point>.<kind>.white.scales.npy``: a float16 file always has its scales) and recorded in the
index's meta (``whitened``: point -> ridge, lambda and storage); only then are the rows as computed
removed, so an interrupted step is redone from them. A patch overlay keeps its rows as computed and their
whitened copies (:func:`core.index.white_key`), the latter always formed from the former.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping
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
    half_rows,
    load_scales,
    rows_file,
    scales_file,
    white_key,
)
from .inverses import trak_inverse
from .scoring import TRAK_RIDGE
from .workspace import write_json_atomic

TRAK_KINDS = KIND_GROUPS[WHITENED_GROUP]
STORAGE = "float16 rows, float32 scale per row"
"""How the index keeps whitened rows (``storage`` in their record)."""


def point_inverse(root: Path, point: str) -> DampedInverse:
    """TRAK's inverse at a point, from the Gram matrix its pass accumulated."""
    return trak_inverse(torch.from_numpy(_load_sum(root, WHITENED_GROUP, point)[0]), TRAK_RIDGE)


def other_ridge(whitened: Mapping[str, dict]) -> set[str]:
    """The points of a ``whitened`` record (point -> ridge and lambda) whitened with a ridge other
    than TRAK's: their rows must be built again (the rows as computed are gone)."""
    return {p for p, w in whitened.items() if w.get("ridge") != TRAK_RIDGE}


def unreadable(root: Path, whitened: Mapping[str, dict], n: int) -> set[str]:
    """The points of a ``whitened`` record kept in float16 whose rows or scales are missing or
    damaged: their rows must be built again (the rows as computed are gone)."""
    broken = set()
    for point in [p for p, w in whitened.items() if w.get("storage") == STORAGE]:
        for kind in TRAK_KINDS:
            try:
                rows = np.load(root / rows_file(point, kind, white=True), mmap_mode="r")
                load_scales(root, point, kind, n)
            except (OSError, ValueError, EOFError):
                broken.add(point)
                continue
            if rows.dtype != np.float16 or rows.shape[0] != n:
                broken.add(point)
    return broken


def wide_storage(whitened: Mapping[str, dict]) -> set[str]:
    """The points of a ``whitened`` record whose whitened rows are kept in float32 (whitened before
    they were kept in float16): the next build converts them."""
    return {p for p, w in whitened.items() if w.get("storage") != STORAGE}


def whiten_rows(inverse: DampedInverse, rows: np.ndarray) -> np.ndarray:
    """Rows (n, d) times the (symmetric) inverse, formed and returned in float64."""
    return inverse.solve(torch.from_numpy(np.asarray(rows, dtype=np.float64))).numpy()


def white_overlay(inverse: DampedInverse, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A TRAK overlay's whitened rows: one entry per kind it holds, keyed by :func:`white_key`."""
    return {white_key(k): whiten_rows(inverse, rows[k]).astype(np.float32) for k in TRAK_KINDS if k in rows}


def whiten_index(root: Path, meta: dict, n_batches: int, progress: bool = True) -> list[str]:
    """Whiten every TRAK point whose pass is complete and that is not whitened yet, and remove the
    rows as computed that a whitened point still has (an interrupted step's); convert whitened rows
    kept in float32 to float16 (:data:`STORAGE`); returns the points whitened and those converted
    (named so)."""
    if WHITENED_GROUP not in meta.get("groups", []):
        return []
    done, wide = [], wide_storage(meta.get("whitened", {}))
    for point in meta["group_points"][WHITENED_GROUP]:
        if point not in meta.get("whitened", {}) and meta["progress"].get(f"{WHITENED_GROUP}:{point}", 0) >= n_batches:
            _whiten_point(root, meta, point, progress)
            done.append(point)
        elif point in wide:
            for kind in TRAK_KINDS:
                white = np.load(root / rows_file(point, kind, white=True), mmap_mode="r")
                if white.dtype != np.float16:  # a conversion interrupted after this kind keeps it
                    _write_half(root, point, kind, white, lambda block: block, progress)
            meta["whitened"][point]["storage"] = STORAGE
            write_json_atomic(root / "meta.json", meta)
            done.append(f"{point} (float32 rows converted to float16)")
        if point in meta.get("whitened", {}):
            for kind in TRAK_KINDS:
                (root / rows_file(point, kind)).unlink(missing_ok=True)
    return done


def _whiten_point(root: Path, meta: dict, point: str, progress: bool) -> None:
    """Write a point's whitened rows and overlay, then record them in the meta."""
    inverse = point_inverse(root, point)
    for kind in TRAK_KINDS:
        computed = np.load(root / rows_file(point, kind), mmap_mode="r")
        _write_half(root, point, kind, computed, lambda block: whiten_rows(inverse, block), progress)
    found = _load_overlay(root, WHITENED_GROUP, point)
    if found is not None:
        rows = {k: v.numpy() for k, v in found[1].items() if k in TRAK_KINDS}
        _save_overlay(_overlay_path(root, WHITENED_GROUP, point), found[0].tolist(), rows | white_overlay(inverse, rows))
    meta.setdefault("whitened", {})[point] = {"ridge": TRAK_RIDGE, "lambda": float(f"{inverse.lam:.12g}"),
                                              "storage": STORAGE}
    write_json_atomic(root / "meta.json", meta)


def _write_half(root: Path, point: str, kind: str, source: np.ndarray, form: Callable[[np.ndarray], np.ndarray],
                progress: bool) -> None:
    """Write ``form`` of the source rows (n, d), block by block, as a point's half whitened rows of a
    kind and their scales: each file renamed into place once complete, the scales first."""
    shape = source.shape
    final, scales_path = root / rows_file(point, kind, white=True), root / scales_file(point, kind)
    tmp = final.with_name(final.name.removesuffix(".npy") + ".tmp.npy")
    out = open_memmap(tmp, mode="w+", dtype=np.float16, shape=shape)
    scales = np.zeros(shape[0], dtype=np.float32)
    step = max(1, BLOCK_BYTES // max(1, shape[1] * 8))
    for start in tqdm(range(0, shape[0], step), desc=f"whiten {point}.{kind}", unit="block", disable=not progress):
        out[start : start + step], scales[start : start + step] = half_rows(form(source[start : start + step]))
    out.flush()
    del out
    scales_tmp = scales_path.with_name(scales_path.name.removesuffix(".npy") + ".tmp.npy")
    np.save(scales_tmp, scales)
    os.replace(scales_tmp, scales_path)
    os.replace(tmp, final)
