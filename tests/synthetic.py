"""A synthetic gradient index (random rows in the on-disk layout), for scale tests and benchmarks:
the query path reads it exactly as a built index."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from numpy.lib.format import open_memmap

from core.index import FORMAT, KIND_GROUPS

CHUNK_ROWS = 16_384


def synthetic_index(root: Path, n: int, dim: int, points: tuple[str, ...] = ("final",), seed: int = 0, *,
                    filled: tuple[str, ...] = KIND_GROUPS["grad"], rank: int | None = None) -> Path:
    """Write an index of ``n`` random float32 rows of dimension ``dim`` for each point and kind of
    the ``grad`` group under ``root`` (written in chunks: memory stays small). Kinds not in
    ``filled`` stay zeros (sparse files: no disk). ``rank``: rows of a rank-``rank`` factor model
    plus 10 % noise (structure like real gradient rows, which approximate-search indexes need),
    else standard normal."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    basis = None if rank is None else rng.standard_normal((rank, dim), dtype=np.float32) / np.sqrt(rank)
    for point in points:
        for kind in KIND_GROUPS["grad"]:
            mat = open_memmap(root / f"{point}.{kind}.npy", mode="w+", dtype=np.float32, shape=(n, dim))
            for start in range(0, n, CHUNK_ROWS) if kind in filled else ():
                rows = min(CHUNK_ROWS, n - start)
                noise = rng.standard_normal((rows, dim), dtype=np.float32)
                mat[start : start + rows] = noise if basis is None else (
                    rng.standard_normal((rows, len(basis)), dtype=np.float32) @ basis + 0.1 * noise)
            mat.flush()
            del mat
    for kind in ("full", "masked"):
        np.save(root / f"emb.{kind}.npy", rng.standard_normal((n, 8), dtype=np.float32))
    meta = {"ids": [f"s{i}" for i in range(n)], "points": list(points), "groups": ["grad"],
            "group_points": {"grad": list(points)}, "format": FORMAT, "done": True, "dim": dim,
            "projection": {"sketch": "synthetic", "dim": dim, "seed": seed, "params": None, "exact": False},
            "settings": {"dim": dim, "seed": seed, "batch_size": 32}, "fingerprint": "synthetic", "overrides": {},
            "progress": {}, "seconds": 0.0, "examples_per_second": 0.0}
    (root / "meta.json").write_text(json.dumps(meta))
    return root
