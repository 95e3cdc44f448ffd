"""The one facade that the pages and the command line call.

A :class:`Backend` opens a prepared workspace, reads how its gradient index was built, loads the
model and its parameter points once, and serves explanations from the workspace's SQLite store,
computing each (index fingerprint, method, settings, test) only once.

The index has an explicit lifecycle: opening a backend or reading its index never builds
anything; :func:`index_workspace` builds (the ``prepare``/``index`` commands and the app's build
job), and :meth:`Backend.sync_spans` patches people's corrected training spans into it (after an
annotation, and before explaining when another process annotated). One backend may be shared by
threads: :attr:`Backend.lock` serialises the model's use.
"""
from __future__ import annotations

import functools
import json
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from .ann import (
    AnnSearch,
    AnnSettings,
    ann_record,
    build_ann,
    built_as,
    check_ann,
    energy_warning,
)
from .artifacts import (
    bases_for,
    build_ekfac,
    check_extras,
    extras_for,
    formed_with_current_factors,
    open_ekfac,
    with_command,
)
from .engine import Engine, TestInput
from .explanations import Explanation, Hit, rank
from .gradients import Projector
from .index import (
    GradientIndex,
    IndexSettings,
    IndexUnavailable,
    Overrides,
    check_training_ids,
    index_command,
    open_index,
)
from .index_build import build_index, patch_spans
from .instances import InstanceRecord, Instances
from .model import HiddenCache, compute_prefix, logit_drops, mask_span, predict
from .new_inputs import CategoryAspects, new_span, resolve_aspect
from .parallel import Mapper
from .points import LoadedModel, PointSet, load_workspace_model
from .prefixes import TrainPrefixes
from .registry import METHODS, MethodSpec
from .scoring import ScoreSettings, result_key
from .store import Store
from .training_sides import IndexedSide, StreamedSide
from .workspace import Workspace, fingerprint

KEEP = 100
"""Hits kept per stored explanation at least (the app's K-curves run to 100); more when asked."""
PROFILE = "profile"
"""The results-cache method name under which :meth:`Backend.profile` stores its answers."""


class MethodUnavailable(IndexUnavailable):
    """A method this workspace cannot run; the message says why and what would make it run."""


def index_workspace(ws: Workspace, settings: IndexSettings, *, device: str | None = None, progress: bool = True,
                    log=print, on_progress=None, extras: Sequence[str] = (), mapper: Mapper | None = None) -> GradientIndex:
    """Build (or bring up to date) the workspace's index with its corrected training spans, and
    the ``extras`` (:data:`core.artifacts.EXTRAS`: TRAK rows, EK-FAC factors and rows); record the index's
    size and timing in the manifest. ``mapper``: the passes as shard tasks (Ray)."""
    extras = check_extras(extras)
    fixes: Overrides = {}
    if ws.store_path.exists():
        with Store(ws.store_path) as store:
            fixes = Instances(ws.load_instances(), store.current_annotations()).fixed_train_spans()
    share = 0.2 if "ekfac" in extras else 0.0  # the factors first: the ekfac rows are formed in their eigenbasis
    if "ekfac" in extras:
        build_ekfac(ws, device=device, batch_size=settings.batch_size, progress=progress, log=log,
                    on_progress=None if on_progress is None else (lambda f: on_progress(share * f)))
    index = build_index(ws, settings, device=device, progress=progress, log=log, overrides=fixes,
                        on_progress=None if on_progress is None else (lambda f: on_progress(share + (1 - share) * f)),
                        groups=tuple(extras), mapper=mapper)
    record_index(ws, index)
    return index


def record_index(ws: Workspace, index: GradientIndex) -> None:
    """Record the index's size and timing in the workspace's manifest (written only on a change)."""
    record = {"dim": index.meta["dim"], "seconds": index.meta["seconds"], "bytes": index.size_bytes(),
              "examples_per_second": index.meta["examples_per_second"]}
    manifest = ws.manifest()
    if manifest.results.get("index") != record:
        manifest.results["index"] = record
        ws.save_manifest(manifest)


class Backend:
    """Explanations for one workspace, cached in its store."""

    def __init__(self, workspace: str | Path, *, device: str | None = None,
                 index_settings: IndexSettings | None = None):
        self.ws = Workspace(workspace)
        if not self.ws.exists():
            raise FileNotFoundError(f"{self.ws.root}: no manifest.json; run `python -m core prepare` first")
        self.device = device
        self.manifest = self.ws.manifest()
        self.store = Store(self.ws.store_path)
        self.lock = threading.RLock()
        self._rows = self.ws.load_instances()
        self._instances: tuple[tuple, Instances] | None = None
        self._index: tuple[int, GradientIndex] | None = None
        self._engines: dict[bool, Engine] = {}
        if index_settings is not None:
            self._check_settings(index_settings)

    def _check_settings(self, wanted: IndexSettings) -> None:
        """The index as built is the one used: other sketch settings are an error, never a rebuild."""
        built = self.index.settings
        if (wanted.dim, wanted.seed) != (built.dim, built.seed):
            raise ValueError(f"{self.ws.root}: its index is built with d = {built.dim or 'exact'}, seed {built.seed}; "
                             f"rebuild it first with `{index_command(self.ws, wanted)}` (as long as the first build)")

    # instances -----------------------------------------------------------------------------
    @property
    def table(self) -> Instances:
        """The instance records, rebuilt when the store's annotations changed."""
        version = self.store.annotations_version()
        if self._instances is None or self._instances[0] != version:
            self._instances = (version, Instances(self._rows, self.store.current_annotations()))
        return self._instances[1]

    @property
    def by_id(self) -> dict[str, InstanceRecord]:
        return self.table.by_id

    @property
    def train_ids(self) -> list[str]:
        return self.table.train_ids

    def instances(self, split: str | None = None) -> list[InstanceRecord]:
        return self.table.split(split)

    def record(self, instance_id: str) -> InstanceRecord:
        return self.table.get(instance_id, self.ws.root)

    def test_input(self, test_id: str, label: str = "predicted") -> TestInput:
        """A stored instance as a test input (its span in use) explaining ``label``."""
        record = self.record(test_id)
        return record.test_input(self._explained_label(label, new=False) or "predicted")

    @property
    def input_format(self) -> str:
        """What the model reads (:mod:`core.formats`): ``aspect``, ``single`` or ``pair``."""
        return self.manifest.stages.get("data", {}).get("input_format", "aspect")

    def new_input(self, text: str, aspect: str = "", label: str = "predicted") -> TestInput:
        """A text not in the dataset, with the span ``prepare`` would give it (:mod:`core.new_inputs`).
        (aspect, text): the aspect a word or phrase of the text, or "TARGET CATEGORY" for a
        workspace of category aspects (SentiHood). A single text (``aspect`` ignored) or a pair
        (``aspect``: its first text)."""
        fmt = self.input_format
        aspect = "" if fmt == "single" else aspect
        if not text.strip() or (fmt != "single" and not aspect.strip()):
            raise ValueError({"aspect": "both a text and an aspect are needed", "single": "a text is needed",
                              "pair": "both texts of the pair are needed"}[fmt])
        resolved = resolve_aspect(text, aspect, CategoryAspects.of(self._rows)) if fmt == "aspect" else None
        aspect = resolved.aspect if resolved else aspect
        self.loaded.encode(aspect, text)  # ValueError when the aspect alone exceeds the token limit
        explained = self._explained_label(label, new=True)

        def logit_drop(spans: list[tuple[int, int]]) -> list[float]:
            with self.lock, self.loaded.at("final"):
                return logit_drops(self.loaded.split, self.loaded.tokenizer, self.loaded.encode(aspect, text), spans,
                                   device=self.loaded.device)

        span = new_span(text, resolved, self.manifest.settings, logit_drop)
        return TestInput(aspect, text, explained, span, None)

    def _explained_label(self, label: str, *, new: bool) -> str | None:
        """``label`` as the workspace names it (case-insensitive); ``None`` for the predicted label."""
        names = {n.lower(): n for n in ("predicted", *(() if new else ("gold",)), *self.manifest.labels)}
        if label.lower() == "gold" and new:
            raise ValueError("a new review has no gold label: explain the predicted label or name one")
        if label.lower() not in names:
            raise ValueError(f"unknown label {label!r}; use {'predicted' if new else 'predicted, gold'} or one of "
                             f"{', '.join(self.manifest.labels)}")
        name = names[label.lower()]
        return None if name == "predicted" else name

    # the model and the index ---------------------------------------------------------------
    @property
    def loaded(self) -> LoadedModel:
        if not hasattr(self, "_loaded"):
            self._loaded = load_workspace_model(self.ws, self.device)
        return self._loaded

    @property
    def index(self) -> GradientIndex:
        """The finished index as it is on disk (reopened when another process changed it)."""
        meta = self.ws.root / "index" / "meta.json"
        stamp = meta.stat().st_mtime_ns if meta.exists() else -1
        if self._index is None or self._index[0] != stamp:
            index = open_index(self.ws)
            check_training_ids(index, [r["id"] for r in self._rows if r["split"] == "train"], self.ws.instances_path)
            self._index = (stamp, index)
            self._engines.clear()  # they hold the previous rows
        return self._index[1]

    @property
    def fingerprint(self) -> str:
        return self.index.meta["fingerprint"]

    def sync_spans(self) -> GradientIndex:
        """Patch the store's corrected training spans into the index when it lacks them."""
        fixes = self.table.fixed_train_spans()
        if not self.index.spans_match(fixes):
            with self.lock:
                patch_spans(self.ws, fixes, self.loaded, log=lambda _: None)
        return self.index

    def engine(self, exact: bool = False) -> Engine:
        """The engine over the index's rows (or, ``exact``, over streamed exact gradients)."""
        index = self.index
        if exact not in self._engines:
            loaded = self.loaded
            if exact:
                full, labels = self.train_cache()
                masked = HiddenCache.load(index.root / "prefix-masked.safetensors")
                projector = Projector(loaded.split, None, 0, loaded.device)
                prefixes = TrainPrefixes(self.ws, loaded) if loaded.own_bottoms() else None  # imported checkpoints
                side = StreamedSide(loaded, projector, full, masked, labels, index.settings.batch_size,
                                    prefixes=prefixes, bases=functools.cache(lambda kinds: bases_for(self.ws, kinds)))
            else:
                projector = Projector(loaded.split, index.settings.dim, index.settings.seed, loaded.device)
                side = IndexedSide(index)
            self._engines[exact] = Engine(loaded, side, projector, train_cache=self.train_cache,
                                          ekfac=lambda: open_ekfac(self.ws))
        return self._engines[exact]

    def check_methods(self, specs: Sequence[MethodSpec]) -> None:
        """MethodUnavailable, with the reason, when these methods need parameter points the
        workspace has none of (an imported model without Trainer checkpoints); IndexUnavailable,
        with the command that builds them, when they need extras (TRAK rows; EK-FAC factors and
        the index's rows formed with them) the workspace lacks."""
        lacking = [s for s in specs if not PointSet.from_manifest(self.manifest).groups.get(s.points)]
        if lacking:
            names = ", ".join(s.name for s in lacking)
            why = self.manifest.stages.get("model", {}).get("checkpoints_missing", "this workspace has none")
            wanted = "checkpoints" if lacking[0].points == "ensemble" else lacking[0].points  # no models: its fallback
            raise MethodUnavailable(f"{names} need{'s' if len(lacking) == 1 else ''} the model's training "
                                    f"{wanted}: {why}")
        index = self.index
        have = {"trak": "trak" in index.groups,  # the ekfac rows must be those of the factors there now
                "ekfac": "ekfac" in index.groups and formed_with_current_factors(self.ws, index)}
        missing = [e for e in extras_for(specs) if not have[e]]
        if missing:
            names = ", ".join(s.name for s in specs if set(extras_for([s])) & set(missing))
            raise IndexUnavailable(f"{names} need{'s' if ',' not in names else ''} the workspace's "
                                   f"{' and '.join(missing)} artifacts; build them with "
                                   f"`{with_command(self.ws, missing)}`")

    def available_methods(self) -> list[str]:
        """The registered methods this workspace can run now (points and artifacts present)."""
        out = []
        for spec in METHODS:
            try:
                self.check_methods([spec])
            except IndexUnavailable:  # MethodUnavailable included
                continue
            out.append(spec.name)
        return out

    def train_cache(self) -> tuple[HiddenCache, torch.Tensor]:
        """Frozen-prefix states and labels of the training inputs (loaded once)."""
        if not hasattr(self, "_train_cache"):
            cache = HiddenCache.load(self.ws.root / "prefix" / "train.safetensors")
            table = self.table
            labels = torch.tensor([self.manifest.labels.index(table.by_id[i].label) for i in table.train_ids])
            self._train_cache = (cache, labels)
        return self._train_cache

    # explanations --------------------------------------------------------------------------
    def result_settings(self, test: TestInput, spec: MethodSpec, settings: ScoreSettings) -> dict:
        """What an explanation's cached result is keyed by, besides the index fingerprint."""
        extra = {"span": test.span, "label": test.label or "predicted",
                 "text": None if test.id else [test.aspect, test.text]}
        if spec.uses_spans:
            extra["train_spans"] = fingerprint(sorted(self.index.meta.get("overrides", {}).items()))
        return result_key(spec, settings, **extra)

    def explain(self, test: str | TestInput, method: str, *, k: int = 10,
                settings: ScoreSettings = ScoreSettings(), use_cache: bool = True) -> Explanation:
        """Top-k proponents and opponents of a test input under ``method`` (cached)."""
        return self.explain_many(test, [method], k=k, settings=settings, use_cache=use_cache)[0]

    def explain_many(self, test: str | TestInput, methods: Sequence[str], *, k: int = 10,
                     settings: ScoreSettings = ScoreSettings(), use_cache: bool = True) -> list[Explanation]:
        """Explanations of several methods; the missing ones are scored together (shared work once)."""
        specs = list(dict.fromkeys(METHODS.resolve(m) for m in methods))
        test_input = self.test_input(test) if isinstance(test, str) else test
        self.check_methods(specs)
        with self.lock:
            self.sync_spans()
            keys = {s.name: self.result_settings(test_input, s, settings) for s in specs}
            found: dict[str, Explanation] = {}
            if use_cache:
                for s in specs:
                    cached = self.store.get_result(self.fingerprint, s.name, keys[s.name], test_input.id or "new")
                    if cached is not None and cached["k"] >= k:
                        found[s.name] = Explanation.from_dict(cached)
            missing = [s for s in specs if s.name not in found]
            if missing:
                found |= self._compute(test_input, missing, settings, keys, use_cache, max(KEEP, k))
        return [found[s.name].cut(k) for s in specs]

    def _compute(self, test: TestInput, specs: list[MethodSpec], settings: ScoreSettings, keys: dict,
                 store: bool, keep: int = KEEP) -> dict[str, Explanation]:
        engine = self.engine(settings.exact)
        label = test.label or self.profile(test)["label"]
        scored = engine.scores_many([test], specs, settings)
        out = {}
        for s in specs:
            values = scored[s.name].values[0]
            exp = Explanation(s.name, test.id, test.span, keep, rank(values, self.train_ids, keep),
                              rank(values, self.train_ids, keep, opponents=True), [float(f"{v:.7g}") for v in values.tolist()],
                              scored[s.name].approx, round(scored[s.name].seconds, 4), label)
            if store:
                self.store.put_result(self.fingerprint, s.name, keys[s.name], test.id or "new", exp.to_dict(),
                                      depends_on_train_spans=s.uses_spans)
            out[s.name] = exp
        return out

    # approximate top-K (core.ann) --------------------------------------------------------------
    def ann_terms(self, methods: Sequence[str]) -> list[tuple[str, str]]:
        """The (point, training kind) matrices the methods read: what their FAISS indexes cover."""
        points = PointSet.from_manifest(self.manifest)
        specs = [METHODS.resolve(m) for m in methods]
        return list(dict.fromkeys((p, s.train) for s in specs for p in points.of(s.points, s.name)))

    def ann_command(self, methods: Sequence[str]) -> str:
        return f"python -m core index --workspace {self.ws.root} --ann {','.join(methods)}"

    def build_ann(self, methods: Sequence[str], settings: AnnSettings = AnnSettings(), *, log=print) -> list[Path]:
        """FAISS indexes over every matrix the methods read that lacks an up-to-date one built
        with ``settings``' rank (the index must be finished); the paths built."""
        self.check_methods([METHODS.resolve(m) for m in methods])
        with self.lock:
            index = self.sync_spans()
            paths = []
            for point, kind in self.ann_terms(methods):
                if built_as(index, point, kind, settings):
                    log(f"[ann] {point}.{kind}: up to date")
                    continue
                paths.append(build_ann(index, point, kind, settings, seed=index.settings.seed))
                log(f"[ann] {point}.{kind}: {paths[-1].name}")
        return paths

    def explain_approximate(self, test: str | TestInput, method: str, *, k: int = 10,
                            settings: ScoreSettings = ScoreSettings(), search: AnnSettings = AnnSettings()) -> Explanation:
        """Top-k proponents and opponents from FAISS candidates rescored exactly (:mod:`core.ann`).
        Not stored, and without the full score vector (``scores`` is empty)."""
        spec = METHODS.resolve(method)
        test_input = self.test_input(test) if isinstance(test, str) else test
        if settings.exact:
            raise ValueError("an approximate search runs over the sketched index; drop --exact")
        self.check_methods([spec])
        with self.lock:
            index = self.sync_spans()
            terms = self.ann_terms([spec.name])
            check_ann(index, terms, self.ann_command([spec.name]))
            started = time.perf_counter()
            vectors, weights, approx = self.engine().terms([test_input], spec, settings)
            found = AnnSearch(index, terms, search)
            top = found.top_k(vectors, weights, k)
            low = found.top_k(vectors, {t: -w for t, w in weights.items()}, k)
            seconds = time.perf_counter() - started
            records = [ann_record(index, *t) for t in terms]  # those of the files searched
        ids = self.train_ids
        hits = lambda found, sign: [Hit(r + 1, ids[int(p)], sign * float(v))  # noqa: E731
                                    for r, (p, v) in enumerate(zip(found[0][0], found[1][0]))]
        label = test_input.label or self.profile(test_input)["label"]
        kept = min(r["energy_kept"] for r in records)
        approx |= {"top_k": {"mode": "faiss candidates (projected rows, 8 bits), exact rescoring",
                             "rank": sorted({r["rank"] for r in records}), "candidates": search.candidates,
                             "energy_kept": kept} | ({"warning": w} if (w := energy_warning(kept)) else {})}
        return Explanation(spec.name, test_input.id, test_input.span, k, hits(top, 1.0), hits(low, -1.0), [],
                           approx, round(seconds, 4), label)

    # for the app's pages -------------------------------------------------------------------
    def profile(self, test: TestInput) -> dict:
        """The model's view of ``test`` (cached in the store): predicted label, class
        probabilities, and the cosine of its span's embedding with every training span's
        (emb(span) = emb(x) - emb(x_-ij), CLS at theta; the quantity Sag@K averages)."""
        from .metrics import cosine_to

        index = self.sync_spans()
        settings = {"span": test.span, "text": None if test.id else [test.aspect, test.text],
                    "train_spans": fingerprint(sorted(index.meta.get("overrides", {}).items()))}
        key = test.id or "new"
        cached = self.store.get_result(self.fingerprint, PROFILE, settings, key)
        if cached is not None:
            return cached
        with self.lock:
            tok = self.loaded.tokenizer
            enc = self.loaded.encode(test.aspect, test.text)
            masked = mask_span(enc, test.span[0], test.span[1], tok.mask_token_id) if test.span else enc
            cache = compute_prefix(self.loaded.split, [enc, masked], tok.pad_token_id, device=self.loaded.device,
                                   progress=False)
            with torch.no_grad(), self.loaded.at("final"):
                logits, cls = predict(self.loaded.split, cache, device=self.loaded.device, with_cls=True)
        full, masked_emb = index.embeddings()
        result = {"label": self.manifest.labels[int(logits[0].argmax())],
                  "probs": [round(p, 6) for p in logits[0].softmax(-1).tolist()],
                  "cosines": [round(float(c), 6) for c in cosine_to(full - masked_emb, cls[0] - cls[1])],
                  "span_masks_nothing": masked == enc}
        self.store.put_result(self.fingerprint, PROFILE, settings, key, result, depends_on_train_spans=True)
        return result

    def annotate_span(self, instance_id: str, status: str, annotator: str,
                      corrected: tuple[int, int] | None = None) -> int:
        """Record a verdict on an instance's span, drop the cached results it affects and, for a
        training instance, patch the index. Returns the annotation's id."""
        record = self.record(instance_id)
        if corrected is not None and not corrected[1] <= len(record.text):
            raise ValueError(f"corrected span {corrected} ends past the text ({len(record.text)} characters)")
        span = record.detected
        original = (span.start, span.end, span.source) if span else (0, len(record.text), "whole")
        entry = self.store.annotate(instance_id, status=status, annotator=annotator, original=original,
                                    corrected=corrected, fingerprint=self.ws.fingerprint)
        self._spans_changed([instance_id])
        return entry

    def undo_span_annotation(self, annotator: str):
        """Undo ``annotator``'s latest verdict (store.undo_last) and drop the results it affected."""
        entry = self.store.undo_last(annotator)
        if entry is not None:
            self._spans_changed([entry.instance_id])
        return entry

    def import_span_annotations(self, path: Path, annotator_default: str) -> int:
        """Append the verdicts of an exported JSONL file; drop the results they affect."""
        count = self.store.import_jsonl(path, annotator_default)
        ids = {json.loads(line)["instance_id"] for line in Path(path).read_text(encoding="utf-8").splitlines()
               if line.strip()}
        self._spans_changed(sorted(ids & self.by_id.keys()))
        return count

    def _spans_changed(self, ids: list[str]) -> None:
        by_id = self.by_id
        train = [i for i in ids if by_id[i].split == "train"]
        if train:
            self.store.invalidate_train_span_dependent()
            self.sync_spans()
        for i in ids:
            if i not in train:
                self.store.invalidate_test(i)
