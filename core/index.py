"""The on-disk gradient index: query-independent training-side vectors of every parameter point.

For each parameter point (``final``, ``checkpoint-K``, ``variant-I``) and every training
instance z the index holds, projected to d dimensions:

* ``full``: g(z; point)
* ``diff``: g(z; point) - g(z_-ij; point)   (z_-ij: the instance's span masked)

plus, at the final model, the CLS embeddings emb(x) and emb(x_-ij) that Sag needs and the
Gauss-Newton matrix sum_n J_n^T (diag p_n - p_n p_n^T) J_n in the projected space (the fast
inverse Hessian). Matrices are ``.npy`` files opened memory-mapped. The build is resumable: rows
are written batch by batch and progress is recorded every few batches; an index whose
fingerprint differs from the workspace's is rebuilt from scratch.

Training spans a person corrected (``overrides``: id -> (start, end)) replace the workspace's
spans. A change to them patches only what depends on those instances' spans - their masked
prefix states, ``diff`` rows at every point and ``emb(x_-ij)`` - and leaves the fingerprint
as it is: results that do not use training spans stay valid.
"""
from __future__ import annotations

import fcntl
import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from numpy.lib.format import open_memmap
from tqdm.auto import tqdm

from .gradients import GradientCollector, Projector, class_weights, loss_weights
from .model import (
    Encoded,
    HiddenCache,
    SplitModel,
    compute_prefix,
    encode_pairs,
    length_batches,
    load_backbone,
    load_params,
    mask_span,
    pick_device,
    split_model,
)
from .workspace import Workspace, fingerprint, write_json_atomic

KINDS = ("full", "diff")
FLUSH_EVERY = 25  # batches between progress records


@dataclass(frozen=True)
class IndexSettings:
    """How the index is sketched and built. ``dim=None`` stores exact gradients (small N only)."""

    dim: int | None = 4096
    seed: int = 0
    batch_size: int = 32


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
    except TypeError:
        return None


@dataclass
class LoadedModel:
    """A workspace's classifier at theta, with its tokenizer and every parameter point."""

    split: SplitModel
    tokenizer: object
    labels: list[str]
    points: dict[str, dict[str, torch.Tensor]]
    device: torch.device
    max_length: int
    _at: str | None = field(default=None, init=False, repr=False)  # the point of the open `at` body

    def use(self, point: str) -> None:
        """Load a parameter point into the model (a copy into its own tensors)."""
        if self._at is not None:
            raise RuntimeError(f"use({point!r}) inside at({self._at!r}) would write into that stored point")
        self.split.load_state(self.points[point])

    @contextmanager
    def at(self, point: str) -> Iterator[None]:
        """The model at a parameter point for the with-statement body, without copying it in.

        Meanwhile the trainable parameters are the stored tensors themselves, so the body must
        run its backward passes inside and must not change the parameters: ``use`` raises, and an
        in-place change is reported on the way out. Afterwards they are the model's own again."""
        if self._at is not None:
            raise RuntimeError(f"at({point!r}) inside at({self._at!r}): one point at a time")
        params = self.split.top_params()
        stored = self.points[point]
        for name, p in params.items():
            t = stored[name]
            if (t.shape, t.dtype, t.device) != (p.shape, p.dtype, p.device):
                raise ValueError(f"point {point!r}: {name} is {tuple(t.shape)} {t.dtype} on {t.device}, "
                                 f"the model's is {tuple(p.shape)} {p.dtype} on {p.device}")
        own = {name: p.data for name, p in params.items()}
        versions = {name: p._version for name, p in params.items()}
        self._at = point
        try:
            for name, p in params.items():
                p.data = stored[name]
            yield
        finally:
            changed = [name for name, p in params.items() if p._version != versions[name]]
            for name, p in params.items():
                p.data = own[name]
            self._at = None
        if changed:
            raise RuntimeError(f"stored point {point!r} was changed in place inside at(): {changed[:3]}")

    def encode(self, aspect: str, text: str) -> Encoded:
        return encode_pairs(self.tokenizer, [(aspect, text)], self.max_length)[0]


def load_workspace_model(ws: Workspace, device: str | None = None) -> LoadedModel:
    """Load the classifier and all its parameter points (final, checkpoints, variants)."""
    manifest = ws.manifest()
    if not manifest.stage_done("variants", manifest.stages.get("variants", {}).get("fingerprint", "")):
        raise FileNotFoundError(f"{ws.root} is not fully prepared: run `python -m core prepare` first")
    settings = manifest.settings
    dev = pick_device(device)
    model, tokenizer = load_backbone(settings["model"], manifest.labels, settings["seed"])
    split = split_model(model.to(dev), settings["trainable_layers"])
    names = ["final"] + ws.points("checkpoint") + ws.points("variant")
    points = {name: {k: v.to(dev) for k, v in load_params(ws.point_path(name)).items()} for name in names}
    loaded = LoadedModel(split, tokenizer, list(manifest.labels), points, dev, settings["max_length"])
    loaded.use("final")
    return loaded


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


class GradientIndex:
    """A built index, memory-mapped from ``root``."""

    def __init__(self, root: Path):
        self.root = root
        self.meta = json.loads((root / "meta.json").read_text())
        if not self.meta.get("done"):
            raise FileNotFoundError(f"{root}: the index build has not finished; run `python -m core index`")
        self.ids: list[str] = self.meta["ids"]
        self.points: list[str] = self.meta["points"]
        self._cache: dict[str, torch.Tensor] = {}

    def _read(self, name: str) -> np.ndarray:
        """A whole matrix file, read under a shared lock (a span patch writes rows in place)."""
        with open(_lock_path(self.root), "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_SH)
            return np.load(self.root / name)

    def matrix(self, point: str, kind: str) -> torch.Tensor:
        """The (N, d) float32 training-side matrix of a point and kind, kept in memory once read."""
        key = f"{point}.{kind}"
        if key not in self._cache:
            self._cache[key] = torch.from_numpy(self._read(f"{key}.npy"))
        return self._cache[key]

    def embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """CLS embeddings at theta of every training input and of its span-masked version."""
        return torch.from_numpy(self._read("emb.full.npy")), torch.from_numpy(self._read("emb.masked.npy"))

    def gauss_newton(self) -> torch.Tensor:
        """The mean Gauss-Newton matrix (d x d, float64) in the projected space."""
        return torch.from_numpy(np.load(self.root / "ggn.npy"))

    def spans_match(self, overrides: "Overrides") -> bool:
        """Whether the index holds exactly these corrected training spans (and no patch is pending)."""
        return "patching" not in self.meta and self.meta.get("overrides", {}) == _overrides_json(overrides)

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.iterdir() if p.is_file())


def _training_rows(ws: Workspace) -> list[dict]:
    return [row for row in ws.load_instances() if row["split"] == "train"]


Overrides = dict[str, tuple[int, int]]
"""Corrected training spans: instance id -> (start, end) character offsets."""


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


def build_index(
    ws: Workspace,
    settings: IndexSettings = IndexSettings(),
    *,
    loaded: LoadedModel | None = None,
    device: str | None = None,
    progress: bool = True,
    log=print,
    overrides: Overrides | None = None,
) -> GradientIndex:
    """Build (or resume, or reuse) the workspace's gradient index and return it. ``overrides``
    (corrected training spans) are patched in; ``None`` keeps the spans the index holds.

    One process builds at a time: another one finds the lock and gets a clear error, except
    that a patch of corrected spans waits for another patch to finish.
    """
    root = ws.root / "index"
    root.mkdir(parents=True, exist_ok=True)
    with open(_lock_path(root), "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            if lock.read() != "patch":
                raise RuntimeError(f"{root} is being built by another process; wait for it to finish") from None
            fcntl.flock(lock, fcntl.LOCK_EX)
        _declare(lock, "build")
        index = _build_index(ws, settings, root, loaded=loaded, device=device, progress=progress, log=log,
                             overrides=overrides or {})
        if overrides is not None and not index.spans_match(overrides):
            _declare(lock, "patch")
            index = _patch_spans(ws, index, overrides, loaded or load_workspace_model(ws, device), settings, log)
        _declare(lock, "")
        return index


def _lock_path(root: Path) -> Path:
    return root.parent / ".index.lock"


def _declare(lock, intent: str) -> None:
    """Say in the lock file what its holder does (``build`` or ``patch``), for a waiting process."""
    lock.seek(0)
    lock.truncate()
    lock.write(intent)
    lock.flush()


def _patch_spans(ws: Workspace, index: GradientIndex, overrides: Overrides, loaded: LoadedModel,
                 settings: IndexSettings, log) -> GradientIndex:
    """Recompute what depends on the training spans of the instances whose override changed.

    The ids being patched are recorded before any file is touched and cleared after the last,
    so an interrupted patch is redone (and the index does not claim to match meanwhile)."""
    root, meta = index.root, index.meta
    rows = _training_rows(ws)
    if meta["ids"] != [r["id"] for r in rows]:
        raise ValueError(f"{root}: the index's training rows differ from the workspace's; rebuild it")
    applied = meta.get("overrides", {})
    wanted = _overrides_json(overrides)
    changed = {i for i in applied.keys() | wanted.keys() if applied.get(i) != wanted.get(i)}
    changed |= set(meta.get("patching", []))
    where = [n for n, r in enumerate(rows) if r["id"] in changed]
    meta["patching"] = sorted(changed)
    write_json_atomic(root / "meta.json", meta)
    started = time.perf_counter()
    if where:
        masked_path = root / "prefix-masked.safetensors"
        masked_cache = HiddenCache.load(masked_path)
        fresh = compute_prefix(loaded.split, _masked_encodings(loaded, [rows[n] for n in where], overrides),
                               loaded.tokenizer.pad_token_id, device=loaded.device, progress=False)
        for n, state in zip(where, fresh.states):
            masked_cache.states[n] = state
        masked_cache.save(masked_path)  # a new file: readers (a running evaluation) keep theirs
        full_cache = HiddenCache.load(ws.root / "prefix" / "train.safetensors")
        labels = torch.tensor([loaded.labels.index(r["label"]) for r in rows])
        step = settings.batch_size
        batches = [where[i : i + step] for i in range(0, len(where), step)]
        projector = Projector(loaded.split, settings.dim, settings.seed, loaded.device)
        for point in meta["points"]:
            diff = np.load(root / f"{point}.diff.npy", mmap_mode="r+")
            emb = np.load(root / "emb.masked.npy", mmap_mode="r+") if point == "final" else None
            for batch in training_gradients(loaded, projector, full_cache, masked_cache, labels, point, batches):
                diff[batch.rows] = batch.diff.numpy()
                if emb is not None:
                    emb[batch.rows] = batch.cls_masked.numpy()
            diff.flush()
            if emb is not None:
                emb.flush()
            del diff, emb
    meta["overrides"] = wanted
    meta.pop("patching")
    write_json_atomic(root / "meta.json", meta)
    log(f"[index] patched the spans of {len(where)} training instances in {time.perf_counter() - started:.1f}s")
    return GradientIndex(root)


def _build_index(ws: Workspace, settings: IndexSettings, root: Path, *, loaded: LoadedModel | None,
                 device: str | None, progress: bool, log, overrides: Overrides) -> GradientIndex:
    shared, variants_fp, whole = _fingerprints(ws, settings)
    meta_path = root / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    if meta.get("shared") != shared:
        shutil.rmtree(root, ignore_errors=True)
        meta = {}
    elif meta.get("fingerprint") == whole and meta.get("done"):
        log(f"[index] up to date ({whole})")
        return GradientIndex(root)
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    loaded = loaded or load_workspace_model(ws, device)
    split, tok = loaded.split, loaded.tokenizer
    rows = _training_rows(ws)
    n = len(rows)
    labels = torch.tensor([loaded.labels.index(r["label"]) for r in rows])
    full_cache = HiddenCache.load(ws.root / "prefix" / "train.safetensors")
    masked_path = root / "prefix-masked.safetensors"
    if masked_path.exists():
        masked_cache = HiddenCache.load(masked_path)
    else:  # a fresh index: the overrides go in from the start
        masked_cache = compute_prefix(split, _masked_encodings(loaded, rows, overrides), tok.pad_token_id,
                                      device=loaded.device, desc="frozen prefix (masked spans)", progress=progress)
        masked_cache.save(masked_path)
    projector = Projector(split, settings.dim, settings.seed, loaded.device)
    d = projector.dim
    points = list(loaded.points)
    point_fps = {p: variants_fp if p.startswith("variant-") else shared for p in points}
    if not meta:
        meta = {"shared": shared, "ids": [r["id"] for r in rows], "projection": projector.describe(),
                "settings": asdict(settings), "progress": {}, "point_fps": {},
                "overrides": _overrides_json(overrides)}
        hidden = full_cache.states[0].shape[1]
        for kind in ("full", "masked"):
            open_memmap(root / f"emb.{kind}.npy", mode="w+", dtype=np.float32, shape=(n, hidden)).flush()
        np.save(root / "ggn.npy", np.zeros((d, d)))
    for point in set(meta.get("points", [])) - set(points):  # points the workspace no longer has
        for kind in KINDS:
            (root / f"{point}.{kind}.npy").unlink(missing_ok=True)
        meta["progress"].pop(point, None)
        meta["point_fps"].pop(point, None)
    for point in points:  # new points, and points whose parameters changed, start afresh
        if meta["point_fps"].get(point) != point_fps[point]:
            for kind in KINDS:
                open_memmap(root / f"{point}.{kind}.npy", mode="w+", dtype=np.float32, shape=(n, d)).flush()
            meta["progress"][point] = 0
            meta["point_fps"][point] = point_fps[point]
    meta.update(points=points, fingerprint=whole, done=False)
    write_json_atomic(meta_path, meta)
    batches = length_batches(full_cache.lengths(), settings.batch_size)
    todo = [p for p in points if meta["progress"].get(p, 0) < len(batches)]
    for point in todo:
        done = meta["progress"].get(point, 0)
        at_theta = point == "final"
        mats = {kind: np.load(root / f"{point}.{kind}.npy", mmap_mode="r+") for kind in KINDS}
        if at_theta:
            ggn = torch.from_numpy(np.load(root / "ggn.npy"))
            emb = {kind: np.load(root / f"emb.{kind}.npy", mmap_mode="r+") for kind in ("full", "masked")}
        bar = tqdm(total=len(batches), initial=done, desc=f"index {point}", unit="batch", disable=not progress)
        grads = training_gradients(loaded, projector, full_cache, masked_cache, labels, point, batches[done:],
                                   with_jacobian=at_theta)
        for b, batch in enumerate(grads, start=done):
            idx = batch.rows
            mats["full"][idx] = batch.full.numpy()
            mats["diff"][idx] = batch.diff.numpy()
            if at_theta:
                emb["full"][idx] = batch.cls_full.numpy()
                emb["masked"][idx] = batch.cls_masked.numpy()
                ggn += gauss_newton_batch(batch.logits, batch.jacobian)
            if (b + 1) % FLUSH_EVERY == 0 or b + 1 == len(batches):
                for mat in mats.values():
                    mat.flush()
                if at_theta:
                    for mat in emb.values():
                        mat.flush()
                    np.save(root / "ggn.npy", ggn.numpy())
                meta["progress"][point] = b + 1
                write_json_atomic(meta_path, meta)
            bar.update(1)
        bar.close()
        del mats
    loaded.use("final")
    if meta["progress"].get("final") == len(batches) and not meta.get("ggn_normalised"):
        np.save(root / "ggn.npy", np.load(root / "ggn.npy") / max(n, 1))
        meta["ggn_normalised"] = True
    elapsed = time.perf_counter() - started
    # seconds add up over the runs that built this index (an interrupted run is not counted)
    meta.update(done=True, seconds=round(meta.get("seconds", 0.0) + elapsed, 1), dim=d, points_built=todo,
                examples_per_second=round(n * len(todo) / max(elapsed, 1e-9), 1))
    write_json_atomic(meta_path, meta)
    log(f"[index] built: {n} training instances x {len(points)} points x d={d} in {meta['seconds']:.1f}s")
    return GradientIndex(root)


@dataclass
class GradientBatch:
    """Training-side vectors of one batch at one parameter point (all on the CPU)."""

    rows: list[int]
    full: torch.Tensor  # g(z)                      (B, d)
    diff: torch.Tensor  # g(z) - g(z_-ij)            (B, d)
    logits: torch.Tensor  # of the whole inputs      (B, C)
    cls_full: torch.Tensor  # emb(x)                 (B, H)
    cls_masked: torch.Tensor  # emb(x_-ij)           (B, H)
    jacobian: torch.Tensor | None = None  # J(z)     (B, C, d), when asked


def training_gradients(
    loaded: LoadedModel,
    projector: Projector,
    full_cache: HiddenCache,
    masked_cache: HiddenCache,
    labels: torch.Tensor,
    point: str,
    batches: list[list[int]],
    *,
    with_jacobian: bool = False,
) -> Iterator[GradientBatch]:
    """Per-example (projected) training-side vectors at ``point``, batch by batch.

    Each batch runs the whole inputs and their span-masked versions together (one backward
    pass, or one per class when the Jacobian is asked for: the loss gradient is then formed
    from it). The model is back at theta afterwards.
    """
    n_classes = len(loaded.labels)
    loaded.use(point)
    try:
        with GradientCollector(loaded.split, projector) as collector:
            for idx in batches:
                h1, m1 = full_cache.batch(idx, loaded.device)
                h2, m2 = masked_cache.batch(idx, loaded.device)
                h, m = torch.cat([h1, h2]), torch.cat([m1, m2])
                y = labels[idx].repeat(2)
                nb = len(idx)
                jac = None
                if with_jacobian:
                    rows, logits, cls = collector.gradients(h, m, [class_weights(c) for c in range(n_classes)])
                    jac = torch.stack(rows, dim=1).cpu()
                    g = torch.einsum("bc,bcd->bd", loss_weights(y)(logits.cpu()), jac)
                else:
                    (g,), logits, cls = collector.gradients(h, m, [loss_weights(y)])
                    g = g.cpu()
                cls = cls.cpu()
                yield GradientBatch(list(idx), g[:nb], g[:nb] - g[nb:], logits[:nb].cpu(), cls[:nb], cls[nb:],
                                    None if jac is None else jac[:nb])
    finally:
        loaded.use("final")


def gauss_newton_factor(logits: torch.Tensor, jacobian: torch.Tensor) -> torch.Tensor:
    """Rows F (B * C, d) with F^T F = sum_b J_b^T (diag p_b - p_b p_b^T) J_b, from J_b (B, C, d)."""
    p = logits.to(jacobian.dtype).softmax(-1)  # (B, C)
    # diag(p) - p p^T = sum_c p_c (e_c - p)(e_c - p)^T, so rows sqrt(p_c) (e_c - p)^T J are a factor
    eye = torch.eye(p.shape[1], dtype=p.dtype)
    coeff = (eye[None] - p[:, None, :]) * p[:, :, None].sqrt()  # (B, C, C): row c = sqrt(p_c)(e_c - p)
    return torch.einsum("bck,bkd->bcd", coeff, jacobian).reshape(-1, jacobian.shape[-1])


def gauss_newton_batch(logits: torch.Tensor, jacobian: torch.Tensor) -> torch.Tensor:
    """sum_b J_b^T (diag p_b - p_b p_b^T) J_b from the Jacobians J_b (B, C, d), in float64."""
    factor = gauss_newton_factor(logits, jacobian.double())
    return factor.T @ factor
