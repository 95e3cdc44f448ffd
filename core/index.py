"""The on-disk gradient index: query-independent training-side vectors of every parameter point.

For each parameter point (``final``, ``checkpoint-K``, ``variant-I``), each representation kind
(:mod:`core.representations`; ``full`` = g(z) and ``diff`` = g(z) - g(z_-ij) by default) and
every training instance z, the index holds the vector sketched to d dimensions, plus, at the
final model, the CLS embeddings emb(x) and emb(x_-ij) that Sag needs and the Gauss-Newton matrix
sum_n J_n^T (diag p_n - p_n p_n^T) J_n in the sketched space (the fast inverse Hessian).

Lifecycle: only :func:`build_index` builds (the ``prepare`` and ``index`` commands, the app's
build job) and only :func:`patch_spans` patches; :func:`open_index` reads a finished index and
refuses, with the command to run, one that is missing, unfinished or out of date. The build
resumes: rows are written batch by batch and progress recorded every few batches; the
Gauss-Newton sum is saved atomically with the count of batches it holds, which is what a resume
trusts for the final point, so a kill at any moment neither loses nor doubles a batch.

Training spans a person corrected (``overrides``: id -> (start, end)) replace the workspace's
spans. A change to them patches only what depends on those instances' spans - their masked
prefix states, the span rows at every point and ``emb(x_-ij)`` - and leaves the fingerprint as
it is: results that do not use training spans stay valid.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from numpy.lib.format import open_memmap
from tqdm.auto import tqdm

from .ggn import gauss_newton_batch
from .gradients import Projector
from .model import Encoded, HiddenCache, compute_prefix, encode_pairs, length_batches, mask_span
from .points import LoadedModel, load_workspace_model
from .representations import REPRESENTATIONS
from .training_rows import training_gradients
from .workspace import Workspace, fingerprint, write_json_atomic

KIND_GROUPS: dict[str, tuple[str, ...]] = {"grad": ("full", "diff"), "trak": ("trak", "trak-diff")}
"""Representation kinds built together (one pass per point each): every index holds ``grad``;
``trak`` (TRAK's features, with their second-moment matrix per point) is built when asked."""
KINDS = KIND_GROUPS["grad"]
FLUSH_EVERY = 25  # batches between progress records
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
    checkpoints) and the projection (shared); the variant points also on the variants stage.
    The batch size is left out: it changes nothing but float rounding.
    """
    stages = ws.manifest().stages
    stage = lambda name: stages.get(name, {}).get("fingerprint")  # noqa: E731
    shared = fingerprint([stage("spans"), stage("importance"), stage("model")], "countsketch", settings.dim, settings.seed)
    variants = fingerprint(shared, stage("variants"))
    return shared, variants, fingerprint(shared, variants)


def index_fingerprint(ws: Workspace, settings: IndexSettings) -> str:
    """The fingerprint of the whole index (what cached results are keyed by)."""
    return _fingerprints(ws, settings)[2]


def _read_meta(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: damaged ({err}); rebuild the index with `python -m core index`") from None


def _lock_path(root: Path) -> Path:
    return root.parent / ".index.lock"


@contextmanager
def _shared_lock(root: Path) -> Iterator[None]:
    with open(_lock_path(root), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_SH)
        yield


class GradientIndex:
    """A built index, read from ``root``."""

    def __init__(self, root: Path):
        self.root = root
        meta_path = root / "meta.json"
        if not meta_path.exists():
            raise IndexUnavailable(f"{meta_path} is missing: the index was never built or was removed")
        self.meta = _read_meta(meta_path)
        if not self.meta.get("done"):
            raise IndexUnavailable(f"{root}: the index build has not finished")
        self.ids: list[str] = self.meta["ids"]
        self.points: list[str] = self.meta["points"]
        self.groups: list[str] = self.meta.get("groups", ["grad"])
        self.kinds: list[str] = [k for g in self.groups for k in KIND_GROUPS[g]]
        self.settings = saved_settings(meta_path) or IndexSettings()
        self._cache: dict[str, torch.Tensor] = {}

    def _read(self, name: str) -> np.ndarray:
        """A whole matrix file, read under a shared lock (a span patch writes rows in place)."""
        path = self.root / name
        with _shared_lock(self.root):
            try:
                return np.load(path)
            except (OSError, ValueError, EOFError) as err:
                raise ValueError(f"{path}: unreadable ({err}); rebuild the index with `python -m core index`") from None

    def matrix(self, point: str, kind: str) -> torch.Tensor:
        """The (N, d) float32 training-side matrix of a point and kind, kept in memory once read."""
        if kind not in self.kinds:
            raise IndexUnavailable(f"the index holds no {kind!r} rows (it has {', '.join(self.kinds)}); add them with "
                                   f"`python -m core index --workspace {self.root.parent} --kinds {group_of(kind)}`")
        key = f"{point}.{kind}"
        if key not in self._cache:
            self._cache[key] = torch.from_numpy(self._read(f"{key}.npy"))
        return self._cache[key]

    def embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """CLS embeddings at theta of every training input and of its span-masked version."""
        return torch.from_numpy(self._read("emb.full.npy")), torch.from_numpy(self._read("emb.masked.npy"))

    def gauss_newton(self) -> torch.Tensor:
        """The mean Gauss-Newton matrix (d x d, float64) in the projected space."""
        total, count, _ = _load_sum(self.root, "grad", "final")
        return torch.from_numpy(total / max(count, 1))

    def feature_gram(self, point: str) -> torch.Tensor:
        """TRAK's Phi^T Phi at a point: the sum over training instances of phi(z) phi(z)^T (d x d)."""
        self.matrix(point, "trak")  # raises with the command when the index has no TRAK rows
        return torch.from_numpy(_load_sum(self.root, "trak", point)[0])

    def spans_match(self, overrides: Overrides) -> bool:
        """Whether the index holds exactly these corrected training spans (and no patch is pending)."""
        return "patching" not in self.meta and self.meta.get("overrides", {}) == _overrides_json(overrides)

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.iterdir() if p.is_file())


def open_index(ws: Workspace) -> GradientIndex:
    """The workspace's finished, up-to-date index; IndexUnavailable (with the command) otherwise."""
    root = ws.root / "index"
    saved = saved_settings(root / "meta.json")
    try:
        index = GradientIndex(root)
    except IndexUnavailable as err:
        raise IndexUnavailable(f"{err}; build it with `{index_command(ws, saved)}`") from None
    if index.meta.get("format") != FORMAT:
        raise IndexUnavailable(f"{root} was built by an earlier version of SpanLens; rebuild it with "
                               f"`{index_command(ws, index.settings)}`")
    if index.meta.get("fingerprint") != index_fingerprint(ws, index.settings):
        raise IndexUnavailable(f"{root} was built for an earlier state of the workspace (it was prepared again "
                               f"since); rebuild it with `{index_command(ws, index.settings)}`")
    return index


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
    if group == "grad":
        return root / "ggn.npz" if point == "final" else None
    return root / f"{point}.{group}-gram.npz"


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


# ------------------------------------------------------------------------------ spans

def _training_rows(ws: Workspace) -> list[dict]:
    return [row for row in ws.load_instances() if row["split"] == "train"]


def _span_of(row: dict, overrides: Overrides) -> tuple[int, int] | None:
    """The span in use for a training row: its correction, else its own span."""
    if row["id"] in overrides:
        return tuple(overrides[row["id"]])
    return (row["span"]["start"], row["span"]["end"]) if row.get("span") else None


def _masked_encodings(loaded: LoadedModel, rows: list[dict], overrides: Overrides) -> list[Encoded]:
    """The rows' (aspect, text) pairs with their spans in use masked."""
    tok = loaded.tokenizer
    enc = encode_pairs(tok, [(r["aspect"], r["text"]) for r in rows], loaded.max_length)
    spans = [_span_of(r, overrides) for r in rows]
    return [mask_span(e, *span, tok.mask_token_id) if span else e for e, span in zip(enc, spans)]


def _overrides_json(overrides: Overrides) -> dict[str, list[int]]:
    """Overrides as stored in the index's meta.json (sorted, lists)."""
    return {k: [int(v[0]), int(v[1])] for k, v in sorted(overrides.items())}


# ------------------------------------------------------------------------------ build and patch

def build_index(
    ws: Workspace,
    settings: IndexSettings = IndexSettings(),
    *,
    loaded: LoadedModel | None = None,
    device: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    overrides: Overrides | None = None,
    on_progress: Progress | None = None,
    groups: tuple[str, ...] = ("grad",),
) -> GradientIndex:
    """Build (or resume, or reuse) the workspace's gradient index and return it. ``overrides``
    (corrected training spans) are patched in; ``None`` keeps the spans the index holds.
    ``groups`` (:data:`KIND_GROUPS`) are added to those the index holds.

    An index that is up to date is returned under a shared lock, so any number of processes
    may check at once; building takes the lock exclusively, and another builder gets a clear
    error (a span patch waits for another patch instead).
    """
    root = ws.root / "index"
    root.mkdir(parents=True, exist_ok=True)
    whole = index_fingerprint(ws, settings)
    groups = tuple(dict.fromkeys(("grad", *groups)))
    unknown = set(groups) - set(KIND_GROUPS)
    if unknown:
        raise ValueError(f"unknown index kinds {sorted(unknown)}; choose from {', '.join(KIND_GROUPS)}")
    with _shared_lock(root):
        current = _current(root, whole, overrides, groups)
    if current is not None:
        log(f"[index] up to date ({whole})")
        return current
    with open(_lock_path(root), "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            if lock.read() != "patch":
                raise RuntimeError(f"{root} is being built by another process; wait for it to finish") from None
            fcntl.flock(lock, fcntl.LOCK_EX)
        _declare(lock, "build")
        index = _current(root, whole, None, groups) or _build(ws, settings, root, groups, loaded=loaded, device=device,
                                                              progress=progress, log=log, overrides=overrides or {},
                                                              on_progress=on_progress)
        if overrides is not None and not index.spans_match(overrides):
            _declare(lock, "patch")
            index = _patch(ws, index, overrides, loaded or load_workspace_model(ws, device), settings, log)
        _declare(lock, "")
        return index


def _current(root: Path, whole: str, overrides: Overrides | None, groups: tuple[str, ...]) -> GradientIndex | None:
    """The index at ``root`` when it is finished, has this fingerprint, these groups and these spans."""
    try:
        index = GradientIndex(root)
    except (IndexUnavailable, ValueError):
        return None
    if index.meta.get("fingerprint") != whole or index.meta.get("format") != FORMAT or not set(groups) <= set(index.groups):
        return None
    return index if overrides is None or index.spans_match(overrides) else None


def patch_spans(ws: Workspace, overrides: Overrides, loaded: LoadedModel, log: Callable[[str], None] = print) -> GradientIndex:
    """Bring the corrected training spans into the workspace's finished index (waits for another
    patch; refuses while a build runs)."""
    index = open_index(ws)
    if index.spans_match(overrides):
        return index
    return build_index(ws, index.settings, loaded=loaded, log=log, overrides=overrides, progress=False,
                       groups=tuple(index.groups))


def _declare(lock, intent: str) -> None:
    """Say in the lock file what its holder does (``build`` or ``patch``), for a waiting process."""
    lock.seek(0)
    lock.truncate()
    lock.write(intent)
    lock.flush()


def _patch(ws: Workspace, index: GradientIndex, overrides: Overrides, loaded: LoadedModel,
           settings: IndexSettings, log) -> GradientIndex:
    """Recompute what depends on the training spans of the instances whose override changed.

    The ids being patched are recorded before any file is touched and cleared after the last,
    so an interrupted patch is redone (and the index does not claim to match meanwhile)."""
    root, meta = index.root, index.meta
    rows = _training_rows(ws)
    if meta["ids"] != [r["id"] for r in rows]:
        raise ValueError(f"{root}: the index's training rows differ from the workspace's; rebuild it")
    applied, wanted = meta.get("overrides", {}), _overrides_json(overrides)
    changed = {i for i in applied.keys() | wanted.keys() if applied.get(i) != wanted.get(i)}
    changed |= set(meta.get("patching", []))
    where = [n for n, r in enumerate(rows) if r["id"] in changed]
    meta["patching"] = sorted(changed)
    write_json_atomic(root / "meta.json", meta)
    started = time.perf_counter()
    if where:
        masked_cache = HiddenCache.load(root / "prefix-masked.safetensors")
        fresh = compute_prefix(loaded.split, _masked_encodings(loaded, [rows[n] for n in where], overrides),
                               loaded.tokenizer.pad_token_id, device=loaded.device, progress=False)
        for n, state in zip(where, fresh.states):
            masked_cache.states[n] = state
        masked_cache.save(root / "prefix-masked.safetensors")  # a new file: readers (a running evaluation) keep theirs
        _rewrite_span_rows(ws, root, meta, loaded, settings, masked_cache, rows, where)
    meta["overrides"] = wanted
    meta.pop("patching")
    write_json_atomic(root / "meta.json", meta)
    log(f"[index] patched the spans of {len(where)} training instances in {time.perf_counter() - started:.1f}s")
    return GradientIndex(root)


def _rewrite_span_rows(ws: Workspace, root: Path, meta: dict, loaded: LoadedModel, settings: IndexSettings,
                       masked_cache: HiddenCache, rows: list[dict], where: list[int]) -> None:
    """The span rows (every point) and emb(x_-ij) of the instances at ``where``, in place."""
    full_cache = HiddenCache.load(ws.root / "prefix" / "train.safetensors")
    labels = torch.tensor([loaded.labels.index(r["label"]) for r in rows])
    batches = [where[i : i + settings.batch_size] for i in range(0, len(where), settings.batch_size)]
    projector = Projector(loaded.split, settings.dim, settings.seed, loaded.device)
    span_kinds = [k for g in meta["groups"] for k in KIND_GROUPS[g] if REPRESENTATIONS[k].span]
    for point in meta["points"]:
        mats = {k: np.load(root / f"{point}.{k}.npy", mmap_mode="r+") for k in span_kinds}
        emb = np.load(root / "emb.masked.npy", mmap_mode="r+") if point == "final" else None
        for batch in training_gradients(loaded, projector, full_cache, masked_cache, labels, point, batches,
                                        kinds=span_kinds):
            for k in span_kinds:
                mats[k][batch.rows] = batch.vectors[k].numpy()
            if emb is not None:
                emb[batch.rows] = batch.cls_masked.numpy()
        for mat in [*mats.values(), *([emb] if emb is not None else [])]:
            mat.flush()
        del mats, emb


def _build(ws: Workspace, settings: IndexSettings, root: Path, groups: tuple[str, ...], *, loaded: LoadedModel | None,
           device: str | None, progress: bool, log, overrides: Overrides, on_progress: Progress | None) -> GradientIndex:
    shared, variants_fp, whole = _fingerprints(ws, settings)
    meta_path = root / "meta.json"
    meta = _read_meta(meta_path) if meta_path.exists() else {}
    if meta.get("shared") != shared or meta.get("format") != FORMAT:
        shutil.rmtree(root, ignore_errors=True)
        meta = {}
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    loaded = loaded or load_workspace_model(ws, device)
    rows = _training_rows(ws)
    labels = torch.tensor([loaded.labels.index(r["label"]) for r in rows])
    full_cache = HiddenCache.load(ws.root / "prefix" / "train.safetensors")
    masked_cache = _masked_cache(root, loaded, rows, overrides, progress)
    projector = Projector(loaded.split, settings.dim, settings.seed, loaded.device)
    points = loaded.point_set.names()
    point_fps = {p: variants_fp if p.startswith("variant-") else shared for p in points}
    meta = _prepare_files(root, meta, rows, settings, projector, full_cache, points, point_fps, overrides, groups)
    meta.update(points=points, fingerprint=whole, done=False, shared=shared, format=FORMAT)
    write_json_atomic(meta_path, meta)
    batches = length_batches(full_cache.lengths(), settings.batch_size)
    todo = [(g, p) for g in meta["groups"] for p in points if meta["progress"].get(f"{g}:{p}", 0) < len(batches)]
    for number, (group, point) in enumerate(todo):
        report = None if on_progress is None else (
            lambda b, at=number: on_progress((at + b / max(len(batches), 1)) / len(todo)))
        _build_point(root, meta, group, point, loaded, projector, (full_cache, masked_cache, labels), batches,
                     progress, report)
    loaded.use("final")
    elapsed = time.perf_counter() - started
    n = len(rows)
    # seconds add up over the runs that built this index (an interrupted run is not counted)
    meta.update(done=True, seconds=round(meta.get("seconds", 0.0) + elapsed, 1), dim=projector.dim,
                points_built=[f"{g}:{p}" for g, p in todo], examples_per_second=round(n * len(todo) / max(elapsed, 1e-9), 1))
    write_json_atomic(meta_path, meta)
    log(f"[index] built: {n} training instances x {len(points)} points x d={projector.dim} "
        f"({', '.join(meta['groups'])}) in {meta['seconds']:.1f}s")
    return GradientIndex(root)


def _masked_cache(root: Path, loaded: LoadedModel, rows: list[dict], overrides: Overrides, progress: bool) -> HiddenCache:
    """The frozen-prefix states of the span-masked training inputs (made once per index)."""
    path = root / "prefix-masked.safetensors"
    if path.exists():
        return HiddenCache.load(path)
    cache = compute_prefix(loaded.split, _masked_encodings(loaded, rows, overrides), loaded.tokenizer.pad_token_id,
                           device=loaded.device, desc="frozen prefix (masked spans)", progress=progress)
    cache.save(path)  # a fresh index: the overrides go in from the start
    return cache


def _prepare_files(root: Path, meta: dict, rows: list[dict], settings: IndexSettings, projector: Projector,
                   full_cache: HiddenCache, points: list[str], point_fps: dict[str, str],
                   overrides: Overrides, groups: tuple[str, ...]) -> dict:
    """Start (or bring up to date) the index's files and progress records (one per group and
    point, ``group:point``); returns the meta."""
    n, d = len(rows), projector.dim
    if not meta:
        meta = {"ids": [r["id"] for r in rows], "projection": projector.describe(), "groups": [],
                "settings": asdict(settings), "progress": {}, "point_fps": {}, "overrides": _overrides_json(overrides)}
        hidden = full_cache.states[0].shape[1]
        for kind in ("full", "masked"):
            open_memmap(root / f"emb.{kind}.npy", mode="w+", dtype=np.float32, shape=(n, hidden)).flush()
    for point in set(meta.get("points", [])) - set(points):  # points the workspace no longer has
        for group in meta["groups"]:
            _drop(root, meta, group, point)
        meta["point_fps"].pop(point, None)
    new_groups = [g for g in groups if g not in meta["groups"]]
    meta["groups"] = [*meta["groups"], *new_groups]
    for point in points:  # new points, points whose parameters changed and new groups start afresh
        fresh = meta["point_fps"].get(point) != point_fps[point]
        for group in meta["groups"] if fresh else new_groups:
            for kind in KIND_GROUPS[group]:
                open_memmap(root / f"{point}.{kind}.npy", mode="w+", dtype=np.float32, shape=(n, d)).flush()
            meta["progress"][f"{group}:{point}"] = 0
            if (path := _sum_path(root, group, point)) is not None:
                _save_sum(path, torch.zeros(d, d, dtype=torch.float64), 0, 0)
        meta["point_fps"][point] = point_fps[point]
    return meta


def _drop(root: Path, meta: dict, group: str, point: str) -> None:
    """Remove a (group, point) pass's files and progress."""
    for kind in KIND_GROUPS[group]:
        (root / f"{point}.{kind}.npy").unlink(missing_ok=True)
    if (path := _sum_path(root, group, point)) is not None:
        path.unlink(missing_ok=True)
    meta["progress"].pop(f"{group}:{point}", None)


def _build_point(root: Path, meta: dict, group: str, point: str, loaded: LoadedModel, projector: Projector,
                 caches: tuple[HiddenCache, HiddenCache, torch.Tensor], batches: list[list[int]], progress: bool,
                 report: Callable[[int], None] | None) -> None:
    """Write one group's rows at one point, resuming after the last recorded batch (where the
    pass accumulates a sum: after the last batch its file holds, saved before the progress record).

    ``grad`` at theta also writes the CLS embeddings and sums the Gauss-Newton matrix; ``trak``
    sums Phi^T Phi of the (unscaled) margin gradients at every point."""
    key, kinds, sum_path = f"{group}:{point}", KIND_GROUPS[group], _sum_path(root, group, point)
    done = meta["progress"].get(key, 0)
    if sum_path is not None:
        total, n_rows, done = _load_sum(root, group, point)
        total = torch.from_numpy(total)
    jacobian = group == "grad" and point == "final"
    mats = {kind: np.load(root / f"{point}.{kind}.npy", mmap_mode="r+") for kind in kinds}
    emb = {k: np.load(root / f"emb.{k}.npy", mmap_mode="r+") for k in ("full", "masked")} if jacobian else {}
    bar = tqdm(total=len(batches), initial=done, desc=f"index {key}", unit="batch", disable=not progress)
    grads = training_gradients(loaded, projector, *caches, point, batches[done:], kinds=kinds, with_jacobian=jacobian)
    for b, batch in enumerate(grads, start=done):
        for kind in kinds:
            mats[kind][batch.rows] = batch.vectors[kind].numpy()
        if jacobian:
            emb["full"][batch.rows] = batch.cls_full.numpy()
            emb["masked"][batch.rows] = batch.cls_masked.numpy()
            total += gauss_newton_batch(batch.logits, batch.jacobian)
        elif sum_path is not None:
            phi = batch.whole["margin"].double()
            total += phi.T @ phi
        n_rows = n_rows + len(batch.rows) if sum_path is not None else 0
        if (b + 1) % FLUSH_EVERY == 0 or b + 1 == len(batches):
            for mat in [*mats.values(), *emb.values()]:
                mat.flush()
            if sum_path is not None:
                _save_sum(sum_path, total, n_rows, b + 1)
            meta["progress"][key] = b + 1
            write_json_atomic(root / "meta.json", meta)
        bar.update(1)
        if report is not None:
            report(b + 1)
    bar.close()
