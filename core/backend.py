"""The one facade that the pages and the command line call.

A :class:`Backend` opens a prepared workspace, loads the model, its parameter points and the
gradient index once, and serves explanations from the workspace's SQLite store, computing each
(workspace fingerprint, method, settings, test) only once.
"""
from __future__ import annotations

from dataclasses import asdict
from functools import cached_property
from pathlib import Path

from .ihvp import DEFAULT_DAMPING, LissaSettings
from .index import (
    GradientIndex,
    IndexSettings,
    LoadedModel,
    Overrides,
    build_index,
    index_fingerprint,
    load_workspace_model,
)
from .methods import Engine, Explanation, TestInput, TrainingSide, paper_sign, rank, resolve_method
from .model import HiddenCache
from .spans import clause_span
from .store import Store
from .workspace import Workspace, fingerprint


def training_span_fixes(ws: Workspace, store: Store | None = None, train_ids: set[str] | None = None) -> Overrides:
    """Corrected spans of the workspace's training instances, from its store's annotations."""
    if store is None:
        if not ws.store_path.exists():
            return {}
        store = Store(ws.store_path)
    fixes = {i: (a.corrected_start, a.corrected_end) for i, a in store.current_annotations().items() if a.status == "fix"}
    if not fixes:
        return {}
    if train_ids is None:
        train_ids = {row["id"] for row in ws.load_instances() if row["split"] == "train"}
    return {i: span for i, span in fixes.items() if i in train_ids}


def index_workspace(ws: Workspace, settings: IndexSettings, *, device: str | None = None, progress: bool = True,
                    log=print) -> GradientIndex:
    """Build (or bring up to date) the workspace's index with its corrected training spans, and
    record its size and timing in the manifest."""
    index = build_index(ws, settings, device=device, progress=progress, log=log, overrides=training_span_fixes(ws))
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
                 index_settings: IndexSettings = IndexSettings()):
        self.ws = Workspace(workspace)
        if not self.ws.exists():
            raise FileNotFoundError(f"{self.ws.root}: no manifest.json; run `python -m core prepare` first")
        self.device = device
        self.index_settings = index_settings
        self.manifest = self.ws.manifest()
        self.rows = self.ws.load_instances()
        self.by_id = {row["id"]: row for row in self.rows}
        self.train_ids = [row["id"] for row in self.rows if row["split"] == "train"]
        self.store = Store(self.ws.store_path)

    # loading -------------------------------------------------------------------------------
    @cached_property
    def loaded(self) -> LoadedModel:
        return load_workspace_model(self.ws, self.device)

    @property
    def index(self) -> GradientIndex:
        """The gradient index, with the training spans people corrected patched in."""
        fixes = self.train_span_fixes()
        current = self.__dict__.get("_index")
        if current is None or not current.spans_match(fixes):
            current = build_index(self.ws, self.index_settings, loaded=self.loaded, progress=False,
                                  log=lambda _: None, overrides=fixes)
            record_index(self.ws, current)  # it may have been (re)built here
            self.__dict__["_index"] = current
            for stale in ("_engine", "_exact_engine"):  # they hold the previous rows
                self.__dict__.pop(stale, None)
        return current

    def _spans_key(self) -> str:
        """The corrected training spans in use, as part of a cache key (a result computed before
        a correction is never served after it)."""
        return fingerprint(sorted(self.train_span_fixes().items()))

    def train_span_fixes(self) -> Overrides:
        """Corrected spans of training instances (from the store's annotations)."""
        return training_span_fixes(self.ws, self.store, self._train_set)

    @cached_property
    def _train_set(self) -> set[str]:
        return set(self.train_ids)

    @property
    def fingerprint(self) -> str:
        return index_fingerprint(self.ws, self.index_settings)

    def engine(self, exact: bool = False) -> Engine:
        """The engine over the current index (a corrected training span is patched in first)."""
        self.index  # a property: brings corrected training spans in, dropping stale engines
        if exact:
            return self._exact_engine
        return self._engine

    @cached_property
    def _engine(self) -> Engine:
        from .gradients import Projector

        projector = Projector(self.loaded.split, self.index_settings.dim, self.index_settings.seed, self.loaded.device)
        return Engine(self.loaded, TrainingSide(self.loaded, projector, self.index), self._checkpoint_lrs())

    @cached_property
    def _exact_engine(self) -> Engine:
        from .gradients import Projector

        full, labels = self.train_cache
        masked = HiddenCache.load(self.index.root / "prefix-masked.safetensors")  # built with the index
        projector = Projector(self.loaded.split, None, 0, self.loaded.device)
        side = TrainingSide(self.loaded, projector, None, full, masked, labels, self.index_settings.batch_size)
        return Engine(self.loaded, side, self._checkpoint_lrs())

    @cached_property
    def train_cache(self):
        import torch

        cache = HiddenCache.load(self.ws.root / "prefix" / "train.safetensors")
        labels = torch.tensor([self.manifest.labels.index(self.by_id[i]["label"]) for i in self.train_ids])
        return cache, labels

    def _checkpoint_lrs(self) -> dict[str, float]:
        records = self.manifest.stages.get("model", {}).get("checkpoints", [])
        return {r["point"]: r["lr"] for r in records}

    # instances -----------------------------------------------------------------------------
    def instances(self, split: str | None = None) -> list[dict]:
        return [row for row in self.rows if split is None or row["split"] == split]

    def test_input(self, test_id: str) -> TestInput:
        """The stored instance as a test input, with a person's span correction applied."""
        row = self.by_id.get(test_id)
        if row is None:
            raise KeyError(f"no instance with id {test_id!r} in {self.ws.root}")
        span = (row["span"]["start"], row["span"]["end"]) if row.get("span") else None
        ann = self.store.current_annotations().get(test_id)
        if ann is not None and ann.status == "fix":
            span = (ann.corrected_start, ann.corrected_end)
        return TestInput(row["aspect"], row["text"], row["label"], span, test_id)

    def new_input(self, text: str, aspect: str) -> TestInput:
        """A review not in the dataset: its span from the heuristic around the aspect."""
        if not text.strip() or not aspect.strip():
            raise ValueError("both a text and an aspect are needed")
        span = clause_span(text, None, None, aspect)
        return TestInput(aspect, text, None, span, None)

    # explanations --------------------------------------------------------------------------
    def explain(
        self,
        test: str | TestInput,
        method: str,
        *,
        k: int = 10,
        exact: bool = False,
        ihvp: str = "fast",
        damping: float = DEFAULT_DAMPING,
        paper_signs: bool = False,
        lissa: LissaSettings = LissaSettings(),
        use_cache: bool = True,
    ) -> Explanation:
        """Top-k proponents and opponents of a test input under ``method`` (cached)."""
        m = resolve_method(method)
        test_input = self.test_input(test) if isinstance(test, str) else test
        settings = self.result_settings(test_input, m.name, exact=exact, ihvp=ihvp, damping=damping,
                                        paper_signs=paper_signs, lissa=lissa)
        key = test_input.id or "new"
        if use_cache:
            cached = self.store.get_result(self.fingerprint, m.name, settings, key)
            if cached is not None and cached["k"] >= k:
                return self._cut(Explanation.from_dict(cached), k)
        engine = self.engine(exact)
        scores = engine.scores([test_input], m, ihvp=ihvp, damping=damping, lissa_settings=lissa,
                               paper_signs=paper_signs, train_cache=self.train_cache if ihvp == "lissa" else None)
        values = scores.values[0]
        keep = max(k, 100)
        explanation = Explanation(
            m.name, test_input.id, test_input.span, keep,
            rank(values, self.train_ids, keep), rank(values, self.train_ids, keep, opponents=True),
            [round(float(v), 8) for v in values], scores.approx, round(scores.seconds, 4),
        )
        if use_cache:
            self.store.put_result(self.fingerprint, m.name, settings, key, explanation.to_dict(),
                                  depends_on_train_spans=m.uses_spans)
        return self._cut(explanation, k)

    def result_settings(self, test: TestInput, method: str, *, exact: bool = False, ihvp: str = "fast",
                        damping: float = DEFAULT_DAMPING, paper_signs: bool = False,
                        lissa: LissaSettings = LissaSettings()) -> dict:
        """What an explanation's cached result is keyed by, besides the index fingerprint."""
        m = resolve_method(method)
        settings = {"exact": exact, "ihvp": ihvp if m.inverse else None,
                    "damping": float(damping) if m.inverse and ihvp == "fast" else None,
                    "paper_signs": paper_signs and paper_sign(m) < 0, "span": test.span,
                    "text": None if test.id else [test.aspect, test.text],
                    "lissa": asdict(lissa) if m.inverse and ihvp == "lissa" else None}
        if m.uses_spans:
            settings["train_spans"] = self._spans_key()
        return settings

    @staticmethod
    def _cut(explanation: Explanation, k: int) -> Explanation:
        explanation.top = explanation.top[:k]
        explanation.opponents = explanation.opponents[:k]
        explanation.k = k
        return explanation

    # for the app's pages -------------------------------------------------------------------
    PROFILE = "profile"
    """The results-cache method name under which :meth:`profile` stores its answers."""

    def profile(self, test: TestInput) -> dict:
        """The model's view of ``test`` (cached in the store): predicted label, class
        probabilities, and the cosine of its span's embedding with every training span's
        (emb(span) = emb(x) - emb(x_-ij), CLS at theta; the quantity Sag@K averages)."""
        from .metrics import cosine_to

        settings = {"span": test.span, "text": None if test.id else [test.aspect, test.text],
                    "train_spans": self._spans_key()}
        key = test.id or "new"
        cached = self.store.get_result(self.fingerprint, self.PROFILE, settings, key)
        if cached is not None:
            return cached
        import torch

        from .model import compute_prefix, mask_span, predict

        tok = self.loaded.tokenizer
        enc = self.loaded.encode(test.aspect, test.text)
        masked = mask_span(enc, test.span[0], test.span[1], tok.mask_token_id) if test.span else enc
        cache = compute_prefix(self.loaded.split, [enc, masked], tok.pad_token_id, device=self.loaded.device,
                               progress=False)
        self.loaded.use("final")
        with torch.no_grad():
            logits, cls = predict(self.loaded.split, cache, device=self.loaded.device, with_cls=True)
        probs = logits[0].softmax(-1).tolist()
        full, masked_emb = self.index.embeddings()
        cosines = cosine_to(full - masked_emb, cls[0] - cls[1])
        result = {"label": self.manifest.labels[int(logits[0].argmax())], "probs": [round(p, 6) for p in probs],
                  "cosines": [round(float(c), 6) for c in cosines]}
        self.store.put_result(self.fingerprint, self.PROFILE, settings, key, result, depends_on_train_spans=True)
        return result

    def annotate_span(self, instance_id: str, status: str, annotator: str,
                      corrected: tuple[int, int] | None = None) -> int:
        """Record a verdict on an instance's span and drop the cached results it affects.

        A test (or dev) instance's change drops that instance's results; a training span's
        change drops every result that uses training spans (the index patches that instance's
        rows when it is next used). Returns the annotation's id.
        """
        row = self.by_id.get(instance_id)
        if row is None:
            raise KeyError(f"no instance with id {instance_id!r} in {self.ws.root}")
        if corrected is not None and not corrected[1] <= len(row["text"]):
            raise ValueError(f"corrected span {corrected} ends past the text ({len(row['text'])} characters)")
        span = row.get("span") or {"start": 0, "end": len(row["text"]), "source": "whole"}
        entry = self.store.annotate(instance_id, status=status, annotator=annotator,
                                    original=(span["start"], span["end"], span["source"]), corrected=corrected,
                                    fingerprint=self.ws.fingerprint)
        self._span_changed(instance_id)
        return entry

    def undo_span_annotation(self, annotator: str):
        """Undo ``annotator``'s latest verdict (store.undo_last) and drop the results it affected."""
        entry = self.store.undo_last(annotator)
        if entry is not None:
            self._span_changed(entry.instance_id)
        return entry

    def import_span_annotations(self, path: Path, annotator_default: str) -> int:
        """Append the verdicts of an exported JSONL file; drop the results they affect."""
        import json

        count = self.store.import_jsonl(path, annotator_default)
        ids = {json.loads(line)["instance_id"] for line in Path(path).read_text(encoding="utf-8").splitlines()
               if line.strip()}
        for instance_id in ids & self.by_id.keys():
            self._span_changed(instance_id)
        return count

    def _span_changed(self, instance_id: str) -> None:
        if self.by_id[instance_id]["split"] == "train":
            self.store.invalidate_train_span_dependent()
        else:
            self.store.invalidate_test(instance_id)

    def current_span(self, instance_id: str) -> tuple[int, int] | None:
        """The span in use for an instance: a person's fix, else the stored span."""
        ann = self.store.current_annotations().get(instance_id)
        if ann is not None and ann.status == "fix":
            return ann.corrected_start, ann.corrected_end
        span = self.by_id[instance_id].get("span")
        return (span["start"], span["end"]) if span else None

    def save_case_study(self, title: str, note: str, workspace: str, test: TestInput, methods: list[str],
                        k: int) -> int:
        """Save the current view as a case study with a snapshot of each method's top-1."""
        from .explore import agreement, snapshot_instance

        profile = self.profile(test)
        row = self.by_id.get(test.id) if test.id else None
        snap_test = snapshot_instance(row or {"text": test.text, "aspect": test.aspect}, test.span)
        snap_test.update(label=test.label, pred=profile["label"])
        position = {train_id: i for i, train_id in enumerate(self.train_ids)}
        labels = [self.by_id[i]["label"] for i in self.train_ids]
        snapshot: dict = {"test": snap_test, "k": k, "methods": {}}
        for method in methods:
            exp = self.explain(test, method, k=max(k, 1))
            scores = agreement([position[h.train_id] for h in exp.top], profile["cosines"], labels,
                               test.label or profile["label"], k).at(k)
            top = []
            for hit in exp.top[:1]:
                train = self.by_id[hit.train_id]
                entry = snapshot_instance(train, (train["span"]["start"], train["span"]["end"]) if train.get("span") else None)
                top.append({**entry, "rank": hit.rank, "score": hit.score})
            snapshot["methods"][exp.method] = {"top": top, "sag": scores["sag"], "lag": scores["lag"]}
        return self.store.save_case(title, note, workspace, test.id or "(new review)", list(snapshot["methods"]), k,
                                    snapshot)
