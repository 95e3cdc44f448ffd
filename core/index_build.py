"""Building the gradient index (resumable) and patching corrected training spans into it.

Only :func:`build_index` builds (the ``prepare`` and ``index`` commands, the app's build job) and
only :func:`patch_spans` patches. The build resumes: rows are written batch by batch and progress
recorded every few batches; the sums a pass accumulates (the Gauss-Newton matrix, TRAK's
Phi^T Phi) are saved atomically with the count of batches they hold, which is what a resume
trusts, so a kill at any moment neither loses nor doubles a batch. A patch recomputes what
depends on the spans of the instances whose correction changed - their masked prefix states,
their span rows at every point and ``emb(x_-ij)`` - into the overlays, and leaves the
fingerprint as it is: results that do not use training spans stay valid.
"""
from __future__ import annotations

import fcntl
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from numpy.lib.format import open_memmap
from tqdm.auto import tqdm

from .artifacts import bases_for, basis_fingerprints, formed_with_current_factors
from .gradients import Basis, Projector
from .index import (
    FORMAT,
    KIND_GROUPS,
    WHITENED_GROUP,
    GradientIndex,
    IndexSettings,
    IndexUnavailable,
    Overrides,
    Progress,
    _fingerprints,
    _load_sum,
    _lock_path,
    _overlay_path,
    _overrides_json,
    _read_meta,
    _save_overlay,
    _save_sum,
    _shared_lock,
    _sum_path,
    check_training_ids,
    group_points,
    index_fingerprint,
    open_index,
    rows_file,
    scales_file,
)
from .index_shards import (
    Chunk,
    pass_chunks,
    pass_sums,
    run_shards,
    shard_chunks,
    shard_ranges,
    training_rows,
)
from .model import (
    Encoded,
    HiddenCache,
    encode_pairs,
    length_batches,
    mask_span,
)
from .parallel import Mapper
from .points import LoadedModel, PointSet, load_workspace_model
from .prefixes import TrainPrefixes
from .representations import REPRESENTATIONS, bases_of
from .training_rows import training_gradients
from .whitening import (
    other_ridge,
    point_inverse,
    unreadable,
    white_overlay,
    whiten_index,
    wide_storage,
)
from .workspace import Workspace, write_json_atomic

FLUSH_EVERY = 25  # batches between progress records


# ------------------------------------------------------------------------------ spans

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
    mapper: Mapper | None = None,
    whiten: bool = True,
) -> GradientIndex:
    """Build (or resume, or reuse) the workspace's gradient index and return it. ``overrides``
    (corrected training spans) are patched in; ``None`` keeps the spans the index holds.
    ``groups`` (:data:`KIND_GROUPS`) are added to those the index holds. With a ``mapper``
    (:mod:`core.parallel`: Ray) the passes are computed as shard tasks (:mod:`core.index_shards`),
    their rows the same as in one process. ``whiten=False`` (a span patch) takes an index whose
    TRAK rows are not whitened yet as it is (:mod:`core.whitening`: a build whitens them).

    An index that is up to date is returned under a shared lock, so any number of processes
    may check at once; building takes the lock exclusively, and another builder gets a clear
    error (a span patch, or a build that finds a patch or a check in progress, waits instead).
    """
    root = ws.root / "index"
    root.mkdir(parents=True, exist_ok=True)
    whole = index_fingerprint(ws, settings)
    groups = tuple(dict.fromkeys(("grad", *groups)))
    unknown = set(groups) - set(KIND_GROUPS)
    if unknown:
        raise ValueError(f"unknown index kinds {sorted(unknown)}; choose from {', '.join(KIND_GROUPS)}")
    with _shared_lock(root):
        current = _current(ws, root, whole, overrides, groups, whiten)
    if current is not None:
        log(f"[index] up to date ({whole})")
        return current
    with open(_lock_path(root), "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a builder is refused at once; a patch or a check is waited for
            lock.seek(0)
            if lock.read() == "build":
                raise RuntimeError(f"{root} is being built by another process; wait for it to finish") from None
            fcntl.flock(lock, fcntl.LOCK_EX)
        index = _current(ws, root, whole, None, groups, whiten)
        if index is None:
            _declare(lock, "build")
            index = _build(ws, settings, root, groups, loaded=loaded, device=device, progress=progress, log=log,
                           overrides=overrides or {}, on_progress=on_progress, mapper=mapper)
        if overrides is not None and not index.spans_match(overrides):
            _declare(lock, "patch")
            index = _patch(ws, index, overrides, loaded or load_workspace_model(ws, device), settings, log)
        _declare(lock, "")
        return index


def _current(ws: Workspace, root: Path, whole: str, overrides: Overrides | None,
             groups: tuple[str, ...], whiten: bool = True) -> GradientIndex | None:
    """The index at ``root`` when it is finished, has this fingerprint, these groups, rows formed
    with the workspace's factors (EK-FAC's), TRAK's rows whitened with TRAK's ridge (``whiten``;
    whitened with another ridge in any case) and these spans."""
    try:
        index = GradientIndex(root)
    except (IndexUnavailable, ValueError):
        return None
    if index.meta.get("fingerprint") != whole or index.meta.get("format") != FORMAT or not set(groups) <= set(index.groups):
        return None
    if not formed_with_current_factors(ws, index):
        return None
    points = index.group_points.get(WHITENED_GROUP, [])
    whitened = {p: w for p in points if (w := index.whitened(p)) is not None}
    # TRAK's rows whitened with another ridge, not yet (built before whitening, or interrupted), or
    # kept in float32 (whitened before they were kept in float16): a build brings them up to date
    if other_ridge(whitened) or (whiten and (len(whitened) < len(points) or wide_storage(whitened))):
        return None
    return index if overrides is None or index.spans_match(overrides) else None


def patch_spans(ws: Workspace, overrides: Overrides, loaded: LoadedModel, log: Callable[[str], None] = print) -> GradientIndex:
    """Bring the corrected training spans into the workspace's finished index (waits for another
    patch; refuses while a build runs)."""
    index = open_index(ws)
    if index.spans_match(overrides):
        return index
    return build_index(ws, index.settings, loaded=loaded, log=log, overrides=overrides, progress=False,
                       groups=tuple(index.groups), whiten=False)


def _declare(lock, intent: str) -> None:
    """Say in the lock file what its holder does (``build`` or ``patch``), for a waiting process."""
    lock.seek(0)
    lock.truncate()
    lock.write(intent)
    lock.flush()


def _patch(ws: Workspace, index: GradientIndex, overrides: Overrides, loaded: LoadedModel,
           settings: IndexSettings, log) -> GradientIndex:
    """Bring corrected training spans in: recompute what depends on the spans of the instances
    whose override changed - their masked prefix states, and their span rows at every point and
    emb(x_-ij) - into the patch overlays (the base matrices never change once built).

    The ids being patched are recorded before any file is touched and cleared after the last,
    so an interrupted patch is redone (and the index does not claim to match meanwhile)."""
    root, meta = index.root, index.meta
    rows = training_rows(ws)
    check_training_ids(index, [r["id"] for r in rows], ws.instances_path)
    applied, wanted = meta.get("overrides", {}), _overrides_json(overrides)
    changed = {i for i in applied.keys() | wanted.keys() if applied.get(i) != wanted.get(i)}
    changed |= set(meta.get("patching", []))
    where = [n for n, r in enumerate(rows) if r["id"] in changed]
    bases = bases_for(ws, index.kinds)  # before any write: missing factors refuse
    meta["patching"] = sorted(changed)
    write_json_atomic(root / "meta.json", meta)
    started = time.perf_counter()
    if where:
        prefixes = TrainPrefixes(ws, loaded)
        prefixes.patch(where, _masked_encodings(loaded, [rows[n] for n in where], overrides))  # on every bottom
        computed = _span_rows(meta, loaded, settings, prefixes, rows, where, bases)
        for group, point in _pairs(meta):
            _rewrite_overlay(root, meta, group, point, rows, wanted, computed, index)
    meta["overrides"] = wanted
    meta.pop("patching")
    write_json_atomic(root / "meta.json", meta)
    log(f"[index] patched the spans of {len(where)} training instances in {time.perf_counter() - started:.1f}s")
    return GradientIndex(root)


def _span_rows(meta: dict, loaded: LoadedModel, settings: IndexSettings, prefixes: TrainPrefixes,
               rows: list[dict], where: list[int], bases: dict[str, Basis]) -> dict[int, dict[str, np.ndarray]]:
    """Per position in ``where``: its span rows at every point ("point.kind") and emb(x_-ij)."""
    labels = torch.tensor([loaded.labels.index(r["label"]) for r in rows])
    batches = [where[i : i + settings.batch_size] for i in range(0, len(where), settings.batch_size)]
    projector = Projector(loaded.split, settings.dim, settings.seed, loaded.device)
    out: dict[int, dict[str, np.ndarray]] = {n: {} for n in where}
    for point in meta["points"]:
        span_kinds = [k for g, p in _pairs(meta) if p == point for k in KIND_GROUPS[g] if REPRESENTATIONS[k].span]
        for batch in training_gradients(loaded, projector, *prefixes.pair(point), labels, point, batches,
                                        kinds=span_kinds, bases=bases):
            for j, n in enumerate(batch.rows):
                out[n] |= {f"{point}.{k}": batch.vectors[k][j].numpy() for k in span_kinds}
                if point == "final":
                    out[n]["final.emb.masked"] = batch.cls_masked[j].numpy()
    return out


def _rewrite_overlay(root: Path, meta: dict, group: str, point: str, rows: list[dict], wanted: dict[str, list[int]],
                     computed: dict[int, dict[str, np.ndarray]], index: GradientIndex) -> None:
    """A group's overlay at a point after a patch: a row for every instance whose wanted span
    differs from the span the base rows hold; fresh rows where it changed, the old overlay's elsewhere."""
    base = meta.get("base_overrides", {}).get(f"{group}:{point}", meta.get("overrides", {}))
    ids = [r["id"] for r in rows]
    positions = [n for n, i in enumerate(ids) if wanted.get(i) != base.get(i)]
    kinds = [k for k in KIND_GROUPS[group] if REPRESENTATIONS[k].span] + (["emb.masked"] if (group, point) ==
                                                                            ("grad", "final") else [])
    old = index._overlays.get((group, point))
    old_at = {} if old is None else {int(n): j for j, n in enumerate(old[0].tolist())}
    out: dict[str, list[np.ndarray]] = {kind: [] for kind in kinds}
    for n in positions:
        for kind in kinds:
            out[kind].append(computed[n][f"{point}.{kind}"] if n in computed else old[1][kind][old_at[n]].numpy())
    rows = {k: np.stack(v) for k, v in out.items() if v}
    if rows and point in meta.get("whitened", {}) and group == WHITENED_GROUP:
        rows |= white_overlay(point_inverse(root, point), rows)
    _save_overlay(_overlay_path(root, group, point), positions, rows)


def _build(ws: Workspace, settings: IndexSettings, root: Path, groups: tuple[str, ...], *, loaded: LoadedModel | None,
           device: str | None, progress: bool, log, overrides: Overrides, on_progress: Progress | None,
           mapper: Mapper | None) -> GradientIndex:
    shared, variants_fp, whole = _fingerprints(ws, settings)
    meta_path = root / "meta.json"
    meta = _read_meta(meta_path) if meta_path.exists() else {}
    stale = meta.get("shared") != shared or meta.get("format") != FORMAT
    # the coordinates of every group it will hold (EK-FAC's factors), before any file is touched
    held = [] if stale else meta.get("groups", [])
    kinds = [k for g in dict.fromkeys([*held, *groups]) for k in KIND_GROUPS[g]]
    bases, basis_fps = bases_for(ws, kinds), basis_fingerprints(ws, kinds)
    if stale:
        shutil.rmtree(root, ignore_errors=True)
        meta = {}
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    loaded = loaded or load_workspace_model(ws, device)
    rows = training_rows(ws)
    labels = torch.tensor([loaded.labels.index(r["label"]) for r in rows])
    prefixes = TrainPrefixes(ws, loaded, lambda: _masked_encodings(loaded, rows, overrides), progress=progress)
    full_cache = prefixes.pair("final")[0]
    projector = Projector(loaded.split, settings.dim, settings.seed, loaded.device)
    points = loaded.point_set.names()
    point_fps = {p: variants_fp if p.startswith("variant-") else shared for p in points}
    meta = _prepare_files(root, meta, rows, settings, projector, full_cache, loaded.point_set, point_fps, overrides,
                          groups, basis_fps)
    meta.update(points=points, fingerprint=whole, done=False, shared=shared, format=FORMAT)
    write_json_atomic(meta_path, meta)
    batches = length_batches(full_cache.lengths(), settings.batch_size)
    todo = [(g, p) for g, p in _pairs(meta) if meta["progress"].get(f"{g}:{p}", 0) < len(batches)]
    for number, (group, point) in enumerate(todo):
        report = None if on_progress is None else (
            lambda b, at=number: on_progress((at + b / max(len(batches), 1)) / len(todo)))
        full, masked = prefixes.pair(point)  # made here when missing: shard tasks only read them

        def chunks_from(done: int, group: str = group, point: str = point) -> Iterable[Chunk]:
            if mapper is None:
                return pass_chunks(loaded, projector, full, masked, labels, group, point, batches[done:], done, bases)
            shards = shard_ranges(done, len(batches))
            run_shards(mapper, ws, whole, settings.dim, settings.seed, group, point, batches, shards,
                       progress=progress)
            return shard_chunks(root, group, point, shards)

        _write_pass(root, meta, group, point, len(batches), chunks_from, flush_each=mapper is not None,
                    progress=progress, report=report)
    shutil.rmtree(root / "shards", ignore_errors=True)
    loaded.use("final")
    passes = time.perf_counter() - started
    whitened = whiten_index(root, meta, len(batches), progress)
    _finish(root, meta, todo, len(rows), projector.dim, passes, time.perf_counter() - started, whitened, log)
    return GradientIndex(root)


def _finish(root: Path, meta: dict, todo: list[tuple[str, str]], n: int, dim: int, passes: float, elapsed: float,
            whitened: list[str], log) -> None:
    """Record a finished build (its passes, their rate, the seconds of every run) and say what it did."""
    # seconds add up over the runs that built this index (an interrupted run is not counted)
    meta.update(done=True, seconds=round(meta.get("seconds", 0.0) + elapsed, 1), dim=dim,
                points_built=[f"{g}:{p}" for g, p in todo])
    if todo or "examples_per_second" not in meta:  # a run that only whitened keeps the passes' rate
        meta["examples_per_second"] = round(n * len(todo) / max(passes, 1e-9), 1)
    write_json_atomic(root / "meta.json", meta)
    log(f"[index] built: {n} training instances x {len(todo)} passes ({', '.join(meta['points_built']) or 'none'}), "
        f"d={dim}, in {elapsed:.1f}s ({meta['seconds']:.1f}s over every run of this index)"
        + (f"; TRAK rows whitened at {', '.join(whitened)} in {elapsed - passes:.1f}s" if whitened else ""))


def _pairs(meta: dict) -> list[tuple[str, str]]:
    """Every (group, point) the index builds, in build order."""
    return [(g, p) for g in meta["groups"] for p in meta["group_points"][g]]


def _prepare_files(root: Path, meta: dict, rows: list[dict], settings: IndexSettings, projector: Projector,
                   full_cache: HiddenCache, point_set: PointSet, point_fps: dict[str, str],
                   overrides: Overrides, groups: tuple[str, ...], basis_fps: dict[str, str | None]) -> dict:
    """Start (or bring up to date) the index's files and progress records (one per group and
    point, ``group:point``; a group at the points :func:`group_points` gives); returns the meta.
    A group formed in a basis starts afresh when its factors are not those its rows hold."""
    points = point_set.names()
    n, d = len(rows), projector.dim
    if not meta:
        meta = {"ids": [r["id"] for r in rows], "projection": projector.describe(), "groups": [],
                "settings": asdict(settings), "progress": {}, "point_fps": {}, "overrides": _overrides_json(overrides)}
        hidden = full_cache.states[0].shape[1]
        for kind in ("full", "masked"):
            open_memmap(root / f"emb.{kind}.npy", mode="w+", dtype=np.float32, shape=(n, hidden)).flush()
    meta.setdefault("base_overrides", {})
    old = meta.get("group_points") or {g: meta.get("points", []) for g in meta["groups"]}
    new_groups = [g for g in groups if g not in meta["groups"]]
    meta["groups"] = [*meta["groups"], *new_groups]
    wanted = {g: group_points(g, point_set) for g in meta["groups"]}
    built = {(g, p) for g, ps in old.items() for p in ps}
    for group, point in sorted(built):
        if point not in wanted.get(group, []):  # points the workspace (or the group) no longer has
            _drop(root, meta, group, point)
    for point in set(meta["point_fps"]) - set(points):
        meta["point_fps"].pop(point)
    meta["group_points"] = wanted
    rebased = {g for g in meta["groups"]
               if any(meta.get("basis_fps", {}).get(b) != basis_fps[b] for b in bases_of(KIND_GROUPS[g]))}
    meta["basis_fps"] = {b: basis_fps[b] for g in meta["groups"] for b in sorted(bases_of(KIND_GROUPS[g]))}
    whitened = meta.get("whitened", {})
    redone = {(WHITENED_GROUP, p) for p in other_ridge(whitened) | unreadable(root, whitened, n)}
    # new points, points whose parameters changed, new groups, new factors and TRAK rows whitened
    # with another ridge or damaged start afresh
    for point in points:
        fresh = meta["point_fps"].get(point) != point_fps[point]
        for group in [g for g in meta["groups"] if point in wanted[g] and (fresh or (g, point) not in built
                                                                             or g in rebased or (g, point) in redone)]:
            if group == WHITENED_GROUP:
                meta.setdefault("whitened", {}).pop(point, None)
            for kind in KIND_GROUPS[group]:
                _remove_rows(root, point, kind)  # a new file: a reader's mapping keeps the old
                open_memmap(root / rows_file(point, kind), mode="w+", dtype=np.float32, shape=(n, d)).flush()
            meta["progress"][f"{group}:{point}"] = 0
            meta["base_overrides"][f"{group}:{point}"] = meta["overrides"]  # the spans its rows will hold
            _overlay_path(root, group, point).unlink(missing_ok=True)
            if (path := _sum_path(root, group, point)) is not None:
                _save_sum(path, torch.zeros(d, d, dtype=torch.float64), 0, 0)
        meta["point_fps"][point] = point_fps[point]
    return meta


def _remove_rows(root: Path, point: str, kind: str) -> None:
    """Remove a point's rows of a kind: as computed, whitened, and the whitened rows' scales."""
    for name in (rows_file(point, kind), rows_file(point, kind, white=True), scales_file(point, kind)):
        (root / name).unlink(missing_ok=True)


def _drop(root: Path, meta: dict, group: str, point: str) -> None:
    """Remove a (group, point) pass's files and progress."""
    for kind in KIND_GROUPS[group]:
        _remove_rows(root, point, kind)
    if group == WHITENED_GROUP:
        meta.get("whitened", {}).pop(point, None)
    if (path := _sum_path(root, group, point)) is not None:
        path.unlink(missing_ok=True)
    _overlay_path(root, group, point).unlink(missing_ok=True)
    meta["progress"].pop(f"{group}:{point}", None)
    meta.get("base_overrides", {}).pop(f"{group}:{point}", None)


def _write_pass(root: Path, meta: dict, group: str, point: str, n_batches: int,
                chunks_from: Callable[[int], Iterable[Chunk]], *, flush_each: bool, progress: bool,
                report: Callable[[int], None] | None) -> None:
    """Write one group's rows at one point, resuming after the last recorded batch (where the
    pass accumulates a sum: after the last batch its file holds, saved before the progress
    record). ``chunks_from(done)`` gives the rest of the pass's rows (:class:`Chunk`), in order;
    the records are written every :data:`FLUSH_EVERY` batches, or after each chunk."""
    key, kinds, sum_path = f"{group}:{point}", KIND_GROUPS[group], _sum_path(root, group, point)
    done, total, n_rows = meta["progress"].get(key, 0), None, 0
    if sum_path is not None:
        saved, n_rows, done = _load_sum(root, group, point)
        total = torch.from_numpy(saved)
    mats = {kind: np.load(root / rows_file(point, kind), mmap_mode="r+") for kind in kinds}
    emb = ({k: np.load(root / f"emb.{k}.npy", mmap_mode="r+") for k in ("full", "masked")}
           if pass_sums(group, point)[0] else {})
    bar = tqdm(total=n_batches, initial=done, desc=f"index {key}", unit="batch", disable=not progress)
    for chunk in chunks_from(done):
        bar.update(chunk.end - done)
        done = chunk.end
        for kind in kinds:
            mats[kind][chunk.rows] = chunk.vectors[kind]
        if chunk.cls is not None:
            emb["full"][chunk.rows], emb["masked"][chunk.rows] = chunk.cls
        if sum_path is not None:
            total += chunk.total
            n_rows += len(chunk.rows)
        if flush_each or chunk.end % FLUSH_EVERY == 0 or chunk.end == n_batches:
            for mat in [*mats.values(), *emb.values()]:
                mat.flush()
            if sum_path is not None:
                _save_sum(sum_path, total, n_rows, chunk.end)
            meta["progress"][key] = chunk.end
            write_json_atomic(root / "meta.json", meta)
        if report is not None:
            report(chunk.end)
    bar.close()
