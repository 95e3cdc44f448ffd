"""The index build split into shards, for Ray (``prepare``/``index --ray``).

A shard is a run of consecutive batches of one (group, point) pass - the very batches the
single-process build makes, so its rows are the same bit for bit (given the same threads per
process). Each shard is a task (:mod:`core.parallel`) that opens the workspace from its path once
per worker process (model, points, frozen-prefix caches: nothing large is pickled), computes its
rows and writes them - with its part of the pass's sum (the Gauss-Newton matrix, TRAK's
Phi^T Phi) and, at theta, the CLS embeddings - to its own file, atomically; a shard whose file is
there is skipped, so an interrupted or partly failed build resumes. The driver then copies the
shards, in order, into the index's matrices (:func:`shard_chunks`) and removes them.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .artifacts import bases_for, basis_fingerprints
from .ggn import gauss_newton_batch
from .gradients import Basis, Projector
from .index import KIND_GROUPS
from .parallel import Mapper, worker_cache
from .points import LoadedModel, load_workspace_model
from .prefixes import TrainPrefixes
from .training_rows import training_gradients
from .workspace import Workspace

SHARD_BATCHES = 16  # batches per shard


@dataclass
class Chunk:
    """Rows of a pass ready to be written: their positions, vectors by kind, the CLS embeddings
    (theta's ``grad`` pass only), the chunk's part of the pass's sum (None when it has none), and
    the pass's batch count once it is written."""

    rows: np.ndarray
    vectors: dict[str, np.ndarray]
    cls: tuple[np.ndarray, np.ndarray] | None
    total: torch.Tensor | None
    end: int


def training_rows(ws: Workspace) -> list[dict]:
    """The workspace's training instances, in index order."""
    return [row for row in ws.load_instances() if row["split"] == "train"]


def pass_sums(group: str, point: str) -> tuple[bool, bool]:
    """(whether the pass writes CLS embeddings and sums the Gauss-Newton matrix, whether it sums
    Phi^T Phi): ``grad`` at theta and every ``trak`` pass."""
    return group == "grad" and point == "final", group == "trak"


def pass_chunks(loaded: LoadedModel, projector: Projector, full: object, masked: object, labels: torch.Tensor,
                group: str, point: str, batches: list[list[int]], first: int,
                bases: Mapping[str, Basis] | None = None) -> Iterator[Chunk]:
    """The rows of ``batches`` (numbered from ``first``) of a pass, one chunk per batch (``bases``:
    the coordinates of the group's kinds that have their own, :func:`core.artifacts.bases_for`)."""
    jacobian, phi_sum = pass_sums(group, point)
    grads = training_gradients(loaded, projector, full, masked, labels, point, batches, kinds=KIND_GROUPS[group],
                               with_jacobian=jacobian, bases=bases)
    for b, batch in enumerate(grads, start=first):
        total = None
        if jacobian:
            total = gauss_newton_batch(batch.logits, batch.jacobian)
        elif phi_sum:
            phi = batch.whole["margin"].double()
            total = phi.T @ phi
        cls = (batch.cls_full.numpy(), batch.cls_masked.numpy()) if jacobian else None
        yield Chunk(np.asarray(batch.rows, dtype=np.int64), {k: batch.vectors[k].numpy() for k in KIND_GROUPS[group]},
                    cls, total, b + 1)


def shard_ranges(done: int, total: int, size: int | None = None) -> list[tuple[int, int]]:
    """The shards (first batch, end batch) of a pass that has ``done`` of ``total`` batches
    (``size`` batches each, default :data:`SHARD_BATCHES`)."""
    size = size or SHARD_BATCHES
    return [(b, min(b + size, total)) for b in range(done, total, size)]


def shard_path(root: Path, group: str, point: str, shard: tuple[int, int]) -> Path:
    return root / "shards" / f"{group}.{point}.{shard[0]:07d}-{shard[1]:07d}.npz"


def run_shards(mapper: Mapper, ws: Workspace, fingerprint: str, dim: int | None, seed: int, group: str, point: str,
               batches: list[list[int]], shards: list[tuple[int, int]], *, progress: bool = True) -> None:
    """Compute every shard whose file is missing, as tasks of ``mapper`` (``fingerprint``: the
    index's, so that a worker never reuses a model it opened for another)."""
    root = ws.root / "index"
    (root / "shards").mkdir(exist_ok=True)
    todo = [s for s in shards if not shard_path(root, group, point, s).exists()]
    results = mapper.map(shard_task, todo, str(ws.root), fingerprint, dim, seed, group, point, batches)
    for _ in tqdm(results, total=len(todo), desc=f"shards {group}:{point}", unit="shard", disable=not progress):
        pass


def _worker_state(ws_root: str, fingerprint: str, dim: int | None, seed: int) -> tuple:
    """(model, training caches, projector, labels) of a workspace, opened once per worker process."""
    def make() -> tuple:
        ws = Workspace(ws_root)
        loaded = load_workspace_model(ws)
        labels = torch.tensor([loaded.labels.index(r["label"]) for r in training_rows(ws)])
        return loaded, TrainPrefixes(ws, loaded), Projector(loaded.split, dim, seed, loaded.device), labels
    return worker_cache(("index", ws_root, fingerprint, dim, seed), make)


def shard_task(shard: tuple[int, int], ws_root: str, fingerprint: str, dim: int | None, seed: int, group: str,
               point: str, batches: list[list[int]]) -> str:
    """One shard's rows, sum and embeddings, written to its file atomically; its path."""
    loaded, prefixes, projector, labels = _worker_state(ws_root, fingerprint, dim, seed)
    ws = Workspace(ws_root)
    bases = worker_cache(("bases", ws_root, fingerprint, group, *basis_fingerprints(ws, KIND_GROUPS[group]).values()),
                         lambda: bases_for(ws, KIND_GROUPS[group]))
    chunks = list(pass_chunks(loaded, projector, *prefixes.pair(point), labels, group, point,
                              batches[shard[0] : shard[1]], shard[0], bases))
    out = {"positions": np.concatenate([c.rows for c in chunks])}
    for kind in KIND_GROUPS[group]:
        out[kind] = np.concatenate([c.vectors[kind] for c in chunks])
    if chunks[0].cls is not None:
        out["cls_full"] = np.concatenate([c.cls[0] for c in chunks])
        out["cls_masked"] = np.concatenate([c.cls[1] for c in chunks])
    if chunks[0].total is not None:
        out["sum"] = sum(c.total for c in chunks).numpy()
    path = shard_path(Path(ws_root) / "index", group, point, shard)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, **out)
    os.replace(tmp, path)
    return str(path)


def shard_chunks(root: Path, group: str, point: str, shards: list[tuple[int, int]]) -> Iterator[Chunk]:
    """The computed shards of a pass as chunks, in order."""
    for shard in shards:
        with np.load(shard_path(root, group, point, shard)) as data:
            cls = (data["cls_full"], data["cls_masked"]) if "cls_full" in data.files else None
            total = torch.from_numpy(data["sum"]) if "sum" in data.files else None
            yield Chunk(data["positions"], {k: data[k] for k in KIND_GROUPS[group]}, cls, total, shard[1])
