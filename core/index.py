"""The on-disk gradient index: query-independent training-side vectors of every parameter point.

For each parameter point (``final``, ``checkpoint-K``, ``variant-I``), each representation kind
(:mod:`core.representations`; ``full`` = g(z) and ``diff`` = g(z) - g(z_-ij) by default) and
every training instance z, the index holds the vector sketched to d dimensions, plus, at the
final model, the CLS embeddings emb(x) and emb(x_-ij) that Sag needs and the Gauss-Newton matrix
sum_n J_n^T (diag p_n - p_n p_n^T) J_n in the sketched space (the fast inverse Hessian).

Lifecycle: only :mod:`core.index_build` builds (the ``prepare`` and ``index`` commands, the
app's build job) and patches corrected spans in; :func:`open_index` reads a finished index and
refuses, with the command to run, one that is missing, unfinished or out of date. Matrices are
memory-mapped, never held whole: a query streams them in blocks (:meth:`GradientIndex.products`).
TRAK's whitened rows are kept in float16 over a float32 scale per row (:func:`half_rows`).

Training spans a person corrected (``overrides``: id -> (start, end)) replace the workspace's
spans. The base matrices never change once built: the rows of corrected spans live in small
per-(group, point) overlays read when the index opens, so an open index is a snapshot.
"""
from __future__ import annotations

import fcntl
import json
import mmap
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .points import PointSet, unprepared
from .registry import METHODS
from .workspace import Workspace, fingerprint

KIND_GROUPS: dict[str, tuple[str, ...]] = {"grad": ("full", "diff"), "trak": ("trak", "trak-diff"),
                                           "ekfac": ("ekfac", "ekfac-diff")}
"""Representation kinds built together (one pass per point each): every index holds ``grad``;
``trak`` (TRAK's features, with their second-moment matrix per point) and ``ekfac`` (the
gradients in the EK-FAC eigenbasis, at theta; built after the factors) are built when asked."""
KINDS = KIND_GROUPS["grad"]
WHITENED_GROUP = "trak"
"""The group whose rows the index keeps whitened, multiplied by TRAK's inverse (:mod:`core.whitening`)."""
BLOCK_BYTES = 64 << 20  # a query streams a matrix in blocks of about this size
HALF_GEMM_MAX = 8  # past this many vectors torch's float16 product on a CPU is slower than float32's
WIDEN_ROWS = 512  # half rows widened to float32 this many at a time, into one buffer (it stays in cache)
FLOAT16_MAX = 65504  # a float16 product of vectors of at most 1 in magnitude holds sums up to d
FORMAT = 2  # 2: Gauss-Newton sum saved with its batch count (ggn.npz)

Overrides = dict[str, tuple[int, int]]
"""Corrected training spans: instance id -> (start, end) character offsets."""
Progress = Callable[[float], None]


class IndexUnavailable(FileNotFoundError):
    """No usable index: the message says which command builds it."""


@dataclass(frozen=True)
class IndexSettings:
    """How the index is sketched and built. ``dim=None`` stores exact gradients (small N only)."""

    dim: int | None = 4096
    seed: int = 0
    batch_size: int = 32

    def __post_init__(self) -> None:
        if self.dim is not None and self.dim < 1:
            raise ValueError(f"the sketch dimension must be positive (or None for exact), got {self.dim}")
        if self.batch_size < 1:
            raise ValueError(f"the index batch size must be at least 1, got {self.batch_size}")


def saved_settings(path: Path, key: str = "settings") -> IndexSettings | None:
    """Index settings stored under ``key`` of a JSON file (an index's meta.json by default);
    None when the file, the entry or its fields are missing or unreadable."""
    try:
        saved = dict(json.loads(path.read_text())[key])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None
    if "k" in saved:  # written before the sketch: its exact mode stays exact
        saved["dim"] = None if saved.pop("k") is None else IndexSettings().dim
    try:
        return IndexSettings(**saved)
    except (TypeError, ValueError):
        return None


def index_command(ws: Workspace, settings: IndexSettings | None = None) -> str:
    """The command that builds (or finishes) the workspace's index."""
    extra = ""
    if settings is not None and (settings.dim, settings.seed) != (IndexSettings().dim, IndexSettings().seed):
        extra = f" --proj-dim {settings.dim or 0} --proj-seed {settings.seed}"
    return f"python -m core index --workspace {ws.root}{extra}"


def _fingerprints(ws: Workspace, settings: IndexSettings) -> tuple[str, str, str]:
    """(shared, variants, whole) fingerprints of the index.

    Every point's vectors depend on the spans, the masked inputs, the model stage (final and
    checkpoints) and the projection (shared); the variant points also on the variants stage. An
    independently trained model ``model-M`` is fixed by the model stage and M (its seed), so its
    vectors have the shared fingerprint too; the models stage (which models there are) enters the
    whole only in a workspace that has it. The batch size is left out: it changes nothing but float rounding.
    """
    stages = ws.manifest().stages
    stage = lambda name: stages.get(name, {}).get("fingerprint")  # noqa: E731
    shared = fingerprint([stage("spans"), stage("importance"), stage("model")], "countsketch", settings.dim, settings.seed)
    variants = fingerprint(shared, stage("variants"))
    whole = fingerprint(shared, variants, *([fingerprint(shared, stage("models"))] if "models" in stages else []))
    return shared, variants, whole


def index_fingerprint(ws: Workspace, settings: IndexSettings) -> str:
    """The fingerprint of the whole index (what cached results are keyed by)."""
    return _fingerprints(ws, settings)[2]


def _read_meta(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: damaged ({err}); rebuild the index with `python -m core index`") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: damaged (not a JSON object); rebuild the index with `python -m core index`")
    return meta


def _lock_path(root: Path) -> Path:
    return root.parent / ".index.lock"


@contextmanager
def _shared_lock(root: Path) -> Iterator[None]:
    with open(_lock_path(root), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_SH)
        yield


class GradientIndex:
    """A built index, read from ``root``: its matrices memory-mapped (pages shared through the OS,
    never held whole), with the rows of corrected training spans from the patch overlays, read
    once when the index is opened (a snapshot: a later patch is seen by the next open)."""

    def __init__(self, root: Path):
        self.root = root
        meta_path = root / "meta.json"
        if not meta_path.exists():
            raise IndexUnavailable(f"{meta_path} is missing: the index was never built or was removed")
        self.meta = _read_meta(meta_path)
        if not self.meta.get("done"):
            raise IndexUnavailable(f"{root}: the index build has not finished")
        missing = [key for key in ("ids", "points") if key not in self.meta]
        if missing:
            raise ValueError(f"{meta_path}: damaged (no {', '.join(missing)}); rebuild the index with "
                             "`python -m core index`")
        self.ids: list[str] = self.meta["ids"]
        self.points: list[str] = self.meta["points"]
        self.groups: list[str] = self.meta.get("groups", ["grad"])
        self.kinds: list[str] = [k for g in self.groups for k in KIND_GROUPS[g]]
        self.group_points: dict[str, list[str]] = self.meta.get("group_points") or {g: self.points for g in self.groups}
        self.settings = saved_settings(meta_path) or IndexSettings()
        self._whitened: dict[str, dict] = {p: w for p, w in self.meta.get("whitened", {}).items()
                                           if p in self.group_points.get(WHITENED_GROUP, [])}
        self._maps: dict[str, np.ndarray] = {}
        self._overlays = {(g, p): _load_overlay(root, g, p) for g in self.groups for p in self.group_points[g]}
        self._scales: dict[tuple[str, str], torch.Tensor] = {}  # half rows' scales, read with their mapping
        # every file mapped now, half rows' scales read now: a rebuild replaces files, never these mappings
        for p, k in [(p, k) for g in self.groups for p in self.group_points[g] for k in KIND_GROUPS[g]]:
            if self._map(self.file_of(p, k)).dtype == np.float16:
                self._scales[p, k] = torch.from_numpy(load_scales(root, p, k, len(self.ids)))

    def keeps_whitened(self, point: str, kind: str) -> bool:
        """Whether the index keeps a point's rows of a kind whitened."""
        return point in self._whitened and group_of(kind) == WHITENED_GROUP

    def file_of(self, point: str, kind: str) -> str:
        """The file name of a point's rows of a kind (the whitened rows where the index keeps them)."""
        return rows_file(point, kind, self.keeps_whitened(point, kind))

    def whitened(self, point: str) -> dict | None:
        """How the TRAK rows at ``point`` were whitened (``ridge``, ``lambda``, ``storage``), or None
        where they are kept as computed (an index built before whitening, until ``index`` runs again)."""
        return self._whitened.get(point)

    def _map(self, name: str) -> np.ndarray:
        """A matrix file, memory-mapped read-only (once)."""
        if name not in self._maps:
            path = self.root / name
            try:
                self._maps[name] = np.load(path, mmap_mode="r")
            except (OSError, ValueError, EOFError) as err:
                raise ValueError(f"{path}: unreadable ({err}); rebuild the index with `python -m core index`") from None
        return self._maps[name]

    def _check(self, kind: str, point: str | None = None) -> None:
        if kind not in self.kinds or (point is not None and point not in self.group_points[group_of(kind)]):
            raise IndexUnavailable(f"the index holds no {kind!r} rows{f' at {point}' if point else ''} (it has "
                                   f"{', '.join(self.kinds)}); add them with "
                                   f"`python -m core index --workspace {self.root.parent} --with {group_of(kind)}`")

    def _stored(self, point: str, kind: str, rows: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """A point's rows of a kind as the file stores them (float32, or half rows over their
        scales), in blocks of ``rows`` rows (start, block)."""
        self._check(kind, point)
        mapped = self._map(self.file_of(point, kind))
        row_bytes = max(1, mapped.shape[1] * mapped.itemsize)
        rows = rows or max(1, BLOCK_BYTES // row_bytes)
        for start in range(0, mapped.shape[0], rows):
            with warnings.catch_warnings():  # read-only pages: never written through
                warnings.simplefilter("ignore", UserWarning)
                yield start, torch.from_numpy(mapped[start : start + rows])
            _release(mapped, start * row_bytes, rows * row_bytes)

    def blocks(self, point: str, kind: str, rows: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """The (N, d) float32 matrix of a point and kind in blocks of ``rows`` rows (start, block),
        read from the mapped file without the overlay (see :meth:`overlay`)."""
        scales = self._scales.get((point, kind))
        for start, block in self._stored(point, kind, rows):
            yield start, block if scales is None else block.float() * scales[start : start + len(block), None]

    def products(self, point: str, kind: str, vecs: torch.Tensor) -> torch.Tensor:
        """Inner products (Q, N) of float32 vectors (Q, d) with a point's rows of a kind, without
        the overlay. Half rows (:func:`half_rows`) are multiplied in float16 on the CPU when there
        are at most ``HALF_GEMM_MAX`` vectors, scaled to at most 1 in magnitude so that no sum
        passes d (torch sums the float16 products in float32 there); otherwise (more vectors, a
        GPU, or d past float16's largest value) they are widened to float32 ``WIDEN_ROWS`` rows at
        a time."""
        out = torch.empty(vecs.shape[0], len(self.ids), device=vecs.device)
        scales = self._scales.get((point, kind))
        half = (scales is not None and vecs.device.type == "cpu" and vecs.shape[0] <= HALF_GEMM_MAX
                and vecs.shape[1] <= FLOAT16_MAX)
        size = vecs.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) if half else None
        shrunk = (vecs / size).half() if half else vecs
        wide = None if half or scales is None else vecs.new_empty(WIDEN_ROWS, vecs.shape[1])  # reused: no allocations
        for start, block in self._stored(point, kind):
            block = block.to(vecs.device, non_blocking=True)
            if half:
                out[:, start : start + len(block)] = (block @ shrunk.T).T
            elif wide is None:
                out[:, start : start + len(block)] = vecs @ block.T
            else:
                for at in range(0, len(block), WIDEN_ROWS):
                    rows = wide[: min(WIDEN_ROWS, len(block) - at)].copy_(block[at : at + WIDEN_ROWS])
                    out[:, start + at : start + at + len(rows)] = vecs @ rows.T
        if scales is None:
            return out
        return (out * size if half else out) * scales.to(vecs.device)[None]

    def rows_at(self, point: str, kind: str, positions: np.ndarray) -> np.ndarray:
        """A point's float32 rows of a kind at ``positions`` (Q, d), without the overlay."""
        self._check(kind, point)
        out = np.asarray(self._map(self.file_of(point, kind))[positions], dtype=np.float32)
        scales = self._scales.get((point, kind))
        return out if scales is None else out * scales.numpy()[positions, None]

    def overlay(self, point: str, kind: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(positions, rows) of the corrected training spans that replace base rows (whitened
        where the base rows are), or None."""
        self._check(kind, point)
        found, key = self._overlays[group_of(kind), point], white_key(kind) if self.keeps_whitened(point, kind) else kind
        if found is not None and kind in found[1] and key not in found[1]:
            raise ValueError(f"{_overlay_path(self.root, group_of(kind), point)}: no whitened {kind!r} rows; "
                             "rebuild the index with `python -m core index`")
        return None if found is None or key not in found[1] else (found[0], found[1][key])

    def matrix(self, point: str, kind: str) -> torch.Tensor:
        """The whole (N, d) matrix of a point and kind, overlay applied (a copy: small indexes,
        tests and benchmarks; queries stream :meth:`products`)."""
        out = torch.cat([block.clone() for _, block in self.blocks(point, kind)])
        if (patched := self.overlay(point, kind)) is not None:
            out[patched[0]] = patched[1]
        return out

    def embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """CLS embeddings at theta of every training input and of its span-masked version."""
        full, masked = (torch.from_numpy(np.array(self._map(f"emb.{k}.npy"))) for k in ("full", "masked"))
        found = self._overlays["grad", "final"]
        if found is not None:
            masked[found[0]] = found[1]["emb.masked"]
        return full, masked

    def gauss_newton(self) -> torch.Tensor:
        """The mean Gauss-Newton matrix (d x d, float64) in the projected space."""
        total, count, _ = _load_sum(self.root, "grad", "final")
        return torch.from_numpy(total / max(count, 1))

    def feature_gram(self, point: str) -> torch.Tensor:
        """TRAK's Phi^T Phi at a point: the sum over training instances of phi(z) phi(z)^T (d x d)."""
        self._check("trak", point)
        return torch.from_numpy(_load_sum(self.root, "trak", point)[0])

    def spans_match(self, overrides: Overrides) -> bool:
        """Whether the index holds exactly these corrected training spans (and no patch is pending)."""
        return "patching" not in self.meta and self.meta.get("overrides", {}) == _overrides_json(overrides)

    def size_bytes(self) -> int:
        """Bytes of the index's files, without the optional FAISS indexes (``ann.*``, see
        :mod:`core.ann`), so the figure does not depend on which searches were built."""
        return sum(p.stat().st_size for p in self.root.iterdir() if p.is_file() and not p.name.startswith("ann."))


def _release(mapped: np.ndarray, start: int, length: int) -> None:
    """Drop a block's pages from this process (they stay in the OS page cache, shared): a query's
    resident memory stays about one block, whatever the matrix's size."""
    raw = getattr(mapped, "_mmap", None)
    if raw is None or not hasattr(mmap, "MADV_DONTNEED"):
        return
    first = mapped.offset % mmap.ALLOCATIONGRANULARITY + start  # the array's place in the mapping
    aligned = first - first % mmap.PAGESIZE
    raw.madvise(mmap.MADV_DONTNEED, aligned, min(length + first - aligned, len(raw) - aligned))


def open_index(ws: Workspace) -> GradientIndex:
    """The workspace's finished, up-to-date index; IndexUnavailable (with the command) otherwise."""
    root = ws.root / "index"
    saved = saved_settings(root / "meta.json")
    try:
        index = GradientIndex(root)
    except IndexUnavailable as err:
        if not ws.manifest().prepared():  # `index` would refuse too: prepare first
            raise IndexUnavailable(f"{err}; {unprepared(ws)}") from None
        raise IndexUnavailable(f"{err}; build it with `{index_command(ws, saved)}`") from None
    if index.meta.get("format") != FORMAT:
        raise IndexUnavailable(f"{root} was built by an earlier version of SpanLens; rebuild it with "
                               f"`{index_command(ws, index.settings)}`")
    if index.meta.get("fingerprint") != index_fingerprint(ws, index.settings):
        raise IndexUnavailable(f"{root} was built for an earlier state of the workspace (it was prepared again "
                               f"since); rebuild it with `{index_command(ws, index.settings)}`")
    return index


def check_training_ids(index: GradientIndex, ids: list[str], source: Path) -> None:
    """ValueError unless the index's rows are the training instances ``ids`` of ``source``, in
    order (an edited or reordered instances file would attach scores to the wrong reviews)."""
    if index.ids != ids:
        first = next((n for n, (a, b) in enumerate(zip(index.ids, ids)) if a != b), min(len(ids), len(index.ids)))
        raise ValueError(f"{source}: its {len(ids)} training instances are not the {len(index.ids)} the index was "
                         f"built on, in the same order (first difference at training row {first}); the file was "
                         "changed after `prepare`: restore it as prepare wrote it, or prepare a new workspace")


def group_points(group: str, points: PointSet) -> list[str]:
    """The points a kind group is built at: those of the point sets of the registered methods
    that read its kinds (``grad``: theta, the checkpoints and the variants; ``trak``: TRAK's
    ensemble; ``ekfac``: theta)."""
    sets = {s.points for s in METHODS if group_of(s.train) == group or group_of(s.test) == group}
    return [p for p in points.names() if any(p in points.groups.get(name, ()) for name in sets)]


def rows_file(point: str, kind: str, white: bool = False) -> str:
    """The file name of a point's rows of a kind (``white``: whitened, :mod:`core.whitening`)."""
    return f"{point}.{kind}.white.npy" if white else f"{point}.{kind}.npy"


def scales_file(point: str, kind: str) -> str:
    """The file name of the scales of a point's half rows of a kind (:func:`half_rows`)."""
    return f"{point}.{kind}.white.scales.npy"


def load_scales(root: Path, point: str, kind: str, n: int) -> np.ndarray:
    """The float32 scales of a point's ``n`` half rows of a kind (:func:`half_rows`); ValueError,
    with the command that rebuilds them, when the file is missing, unreadable or of another size."""
    path = root / scales_file(point, kind)
    try:
        scales = np.load(path)
    except (OSError, ValueError, EOFError) as err:
        raise ValueError(f"{path}: unreadable ({err}); rebuild the index with `python -m core index`") from None
    if scales.shape != (n,):
        raise ValueError(f"{path}: {scales.shape} scales for {n} rows; rebuild the index with `python -m core index`")
    return scales.astype(np.float32)


def half_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows (n, d) as float16 rows over a float32 scale per row, each row's largest magnitude: each
    entry is kept to within 2^-12 of its row's largest, whatever the row's size (entries under
    2^-24 of it become 0; a row of zeros has scale 0). TRAK's reference implementation keeps its
    features in float16 too."""
    wide = np.asarray(rows, dtype=np.float64)
    scales = np.abs(wide).max(axis=1)
    return (wide / np.where(scales > 0, scales, 1.0)[:, None]).astype(np.float16), scales.astype(np.float32)


def white_key(kind: str) -> str:
    """The key of a kind's whitened rows in a patch overlay (beside its rows as computed)."""
    return f"{kind}.white"


def group_of(kind: str) -> str:
    """The kind group that builds a representation kind."""
    for group, kinds in KIND_GROUPS.items():
        if kind in kinds:
            return group
    raise ValueError(f"no index group builds {kind!r} rows")


# ------------------------------------------------------------------------------ sum files

def _sum_path(root: Path, group: str, point: str) -> Path | None:
    """The matrix a (group, point) pass accumulates: the Gauss-Newton sum (grad, final), TRAK's
    Phi^T Phi (trak, every point); None where the pass accumulates nothing."""
    if group == "trak":
        return root / f"{point}.{group}-gram.npz"
    return root / "ggn.npz" if (group, point) == ("grad", "final") else None


def _load_sum(root: Path, group: str, point: str) -> tuple[np.ndarray, int, int]:
    """(sum, rows, batches) of a sum file."""
    path = _sum_path(root, group, point)
    if path.exists():
        try:
            with np.load(path) as data:
                return data["sum"], int(data["rows"]), int(data["batches"])
        except (OSError, ValueError, KeyError, EOFError) as err:
            raise ValueError(f"{path}: unreadable ({err}); rebuild the index with `python -m core index`") from None
    raise ValueError(f"{path} is missing; rebuild the index with `python -m core index`")


def _save_sum(path: Path, total: torch.Tensor, rows: int, batches: int) -> None:
    """A sum with the rows and batches it holds, in one file written atomically."""
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, sum=total.numpy(), rows=np.int64(rows), batches=np.int64(batches))
    os.replace(tmp, path)


def _overlay_path(root: Path, group: str, point: str) -> Path:
    return root / f"patch.{group}.{point}.npz"


def _load_overlay(root: Path, group: str, point: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
    """The patch overlay of a group's rows at a point: (positions, {kind or "emb.masked": rows}), or None."""
    path = _overlay_path(root, group, point)
    if not path.exists():
        return None
    try:
        with np.load(path) as data:
            return torch.from_numpy(data["positions"]), {k: torch.from_numpy(data[k]) for k in data.files if k != "positions"}
    except (OSError, ValueError, KeyError, EOFError) as err:
        raise ValueError(f"{path}: unreadable ({err}); rebuild the index with `python -m core index`") from None


def _save_overlay(path: Path, positions: list[int], rows: dict[str, np.ndarray]) -> None:
    """Write an overlay atomically (none: the file is removed)."""
    if not positions:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, positions=np.asarray(positions, dtype=np.int64), **rows)
    os.replace(tmp, path)


def _overrides_json(overrides: Overrides) -> dict[str, list[int]]:
    """Overrides as stored in the index's meta.json (sorted, lists)."""
    return {k: [int(v[0]), int(v[1])] for k, v in sorted(overrides.items())}
