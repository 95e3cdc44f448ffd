"""``prepare``: dataset + backbone -> a workspace (spans, trained classifier, checkpoints, variants).

Stages run in data-flow order and each is skipped when its fingerprint matches a finished
record in the manifest, resumed when it matches an unfinished one, and rebuilt (its old files
removed) when it changed::

    data -> spans -> model (frozen prefix, training, checkpoints) -> importance -> variants

Settings are range-checked when made, and the data (no instances, an empty split, a single label
in training) before any model is loaded or any file is written; each refusal says what to do.

The data may be (aspect, text) pairs, single texts or text pairs (:mod:`core.formats`). The span of
a single text or of a pair's second text has no aspect mention to grow from: the importance rule
(Eq. 3) picks it among the text's clauses and sentences with the trained classifier.
"""
from __future__ import annotations

import random
import shutil
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from .data import (
    HASH_NOTE,
    KNOWN_LABELS,
    SPLITS,
    DataError,
    Dataset,
    Instance,
    LoadReport,
    load_dataset,
)
from .model import (
    HiddenCache,
    compute_prefix,
    encode_pairs,
    load_backbone,
    load_params,
    logit_drops,
    pick_device,
    predict,
    resolve_backbone,
    save_params,
    span_token_positions,
    split_model,
)
from .prepare_settings import (
    RC_NEEDS_ASPECTS,
    PrepareSettings,
    changed_settings,
    sample_seed,
)
from .spans import (
    RCSpanFinder,
    Span,
    among_clauses,
    category_span_quality,
    detect_spans,
    importance_candidates,
    refine_by_importance,
    span_stats,
    whole_span,
)
from .training import TrainConfig, accuracy, train, variants_like
from .workspace import (
    Manifest,
    Workspace,
    backbone_fingerprint,
    fingerprint,
    instance_row,
    library_versions,
)

StageProgress = Callable[[str, float], None]
"""Called with a stage name and the fraction of that stage done."""
CHECKPOINT_RULE = "last C epochs up to the selected one"  # in the model stage's fingerprint
PREFIX_SHARE = 0.1  # of the model stage: the frozen prefix; the rest is training, step by step


def select(instances: list[Instance], limit: int | None, seed: int) -> list[Instance]:
    """A seeded random subset of ``limit`` instances, in file order (all when no limit)."""
    if limit is None or limit >= len(instances):
        return list(instances)
    keep = set(random.Random(seed).sample(range(len(instances)), limit))
    return [inst for i, inst in enumerate(instances) if i in keep]


def _skipped_text(skipped: Counter[str]) -> str:
    return ", ".join(f"{n} {why}" for why, n in sorted(skipped.items()))


def _empty_split_hint(split: str, report: LoadReport) -> str:
    """What to do about an empty split, from how the files assigned their splits."""
    own = [f for f in report.files if f.split == split]
    if own:
        skipped = f" ({_skipped_text(own[0].skipped)} skipped)" if own[0].skipped else ""
        return f"{own[0].path} gave no instances{skipped}; give it some"
    hashed = [f for f in report.files if HASH_NOTE in f.notes]
    if hashed:
        texts = sum(f.sentences for f in hashed)
        return (f"give a 'split' column, or use more rows (the 80/10/10 hash put none of {texts} "
                f"text{'s' if texts != 1 else ''} in {split})")
    named = [f for f in report.files if f.split is None]
    if named:
        return f"the 'split' column of {named[0].path} names no {split} rows; mark some rows {split}"
    folder = report.files[0].path.parent if report.files else "the folder"
    return f"add a {split} file to {folder} (a name ending in {split if split != 'dev' else 'dev or val'})"


def check_usable(splits: dict[str, Sequence[Instance]], report: LoadReport) -> None:
    """Refuse data that cannot make a meaningful workspace, before any work: no instances, an
    empty split, or fewer than two labels in training (:class:`DataError` saying what to do)."""
    if not any(splits.get(split) for split in SPLITS):
        files = ", ".join(str(f.path) for f in report.files) or "the data"
        skipped = f" ({_skipped_text(report.skipped)} skipped)" if report.skipped else ""
        raise DataError(f"{files}: no instances to use{skipped}; give items with text, aspect and a "
                        f"label of {', '.join(KNOWN_LABELS)}")
    for split in SPLITS:
        if not splits.get(split):
            raise DataError(f"the {split} split is empty: {_empty_split_hint(split, report)}")
    labels = sorted({inst.label for inst in splits["train"]})
    if len(labels) < 2:
        raise DataError(f"a single-class dataset is refused: every score would be 0 (every training instance "
                        f"is {labels[0]!r}); give training instances of at least two labels")


class Preparer:
    """Runs the stages of one workspace; ``log`` gets one line per event."""

    def __init__(
        self,
        settings: PrepareSettings,
        workspace: str | Path,
        *,
        progress: bool = True,
        log: Callable[[str], None] = print,
        on_progress: StageProgress | None = None,
    ):
        self.settings = settings
        self.on_progress = on_progress
        self.ws = Workspace(workspace)
        self.progress = progress
        self.log = log
        self.device = pick_device(settings.device)
        self.manifest = self.ws.manifest()

    # ------------------------------------------------------------------ bookkeeping
    def report(self, stage: str, fraction: float) -> None:
        if self.on_progress is not None:
            self.on_progress(stage, min(max(fraction, 0.0), 1.0))

    def _begin(self, stage: str, fp: str, clean: tuple[str, ...] = ()) -> bool:
        """True when the stage must run; wipes its folders when its fingerprint changed."""
        self.report(stage, 0.0)
        if self.manifest.stage_done(stage, fp):
            self.report(stage, 1.0)
            self.log(f"[{stage}] up to date ({fp})")
            return False
        record = self.manifest.stages.get(stage)
        if record is None or record.get("fingerprint") != fp:
            for name in clean:
                shutil.rmtree(self.ws.root / name, ignore_errors=True)
            self.manifest.stages[stage] = {"fingerprint": fp, "done": False}
            self.ws.save_manifest(self.manifest)
        else:
            self.log(f"[{stage}] resuming ({fp})")
        return True

    def _finish(self, stage: str, started: float, **extra) -> None:
        rec = self.manifest.stages[stage]
        rec.update(done=True, seconds=round(time.perf_counter() - started, 1), **extra)
        self.ws.save_manifest(self.manifest)
        self.log(f"[{stage}] done in {rec['seconds']:.1f}s")
        self.report(stage, 1.0)

    # ------------------------------------------------------------------ stages
    def run(self) -> Manifest:
        """Check the settings and the data, then run every stage that is not up to date. Bad data
        is refused before any model is loaded or any file of the workspace is written."""
        s = self.settings
        dataset = self._load()
        if s.rc_model and dataset.input_format != "aspect":
            raise DataError(RC_NEEDS_ASPECTS)
        instances = self._select(dataset)
        fmt = dataset.input_format
        data_fp = fingerprint(
            [(i.id, i.text, i.aspect, i.label, i.start, i.end) for i in instances], dataset.labels,
            *([fmt] if fmt != "aspect" else []),
        )
        if not self.manifest.stage_done("data", data_fp):
            self._log_report(dataset, instances)
        check_usable({name: [i for i in instances if i.split == name] for name in SPLITS}, dataset.report)
        torch.manual_seed(s.seed)
        changed = changed_settings(self.manifest.settings, asdict(s))
        if changed:
            self.log(f"[settings] changed since this workspace was last prepared: {changed}; the stages "
                     "whose inputs changed are rebuilt")
        self.manifest.settings = asdict(s)
        self.manifest.versions = library_versions()
        self.manifest.labels = list(dataset.labels)
        self.manifest.stages.setdefault("data", {})
        if self._begin("data", data_fp):
            started = time.perf_counter()
            counts = {split: sum(i.split == split for i in instances) for split in SPLITS}
            self._finish("data", started, counts=counts, report=dataset.report.summary(), input_format=fmt)

        spans = self._spans(instances, data_fp)
        split, tokenizer, model_fp = self._model(instances, data_fp)
        spans = self._importance(instances, spans, split, tokenizer, model_fp)
        self._mark_past_limit(instances, spans, tokenizer)
        self._variants(instances, split, model_fp)
        self._models(instances, split, model_fp)
        self.ws.save_manifest(self.manifest)
        return self.manifest

    def _load(self) -> Dataset:
        """The dataset, read as the settings ask."""
        s = self.settings
        return load_dataset(s.dataset, s.data_dir, input_format=s.input_format)

    @property
    def input_format(self) -> str:
        """The data's input format, as the data stage read it."""
        return self.manifest.stages.get("data", {}).get("input_format", "aspect")

    def _log_report(self, dataset: Dataset, instances: list[Instance]) -> None:
        """The data report: per file, the items read and skipped (with reasons) and how splits were
        assigned; then what this workspace uses of them."""
        s = self.settings
        self.log(f"[data] {dataset.name}: {dataset.report.instances} instances read "
                 f"(labels {', '.join(dataset.labels) or 'none'})")
        for line in dataset.report.summary().splitlines():
            self.log(f"  {line}")
        used = ", ".join(f"{split} {sum(i.split == split for i in instances)}" for split in SPLITS)
        limits = ""
        if s.train_limit is not None or s.eval_limit is not None:
            limits = (f" (samples drawn with seed {sample_seed(s)}: train at most {s.train_limit or 'all'}, "
                      f"dev and test at most {s.eval_limit or 'all'})")
        self.log(f"  used: {used}{limits}")

    def _mark_past_limit(self, instances: list[Instance], spans: dict[str, Span], tokenizer) -> None:
        """Flag (``span_truncated`` in instances.jsonl), count (the spans stage's stats) and warn
        about the instances whose span lies wholly past the token limit: masking it changes
        nothing, so their span scores are 0. Done once per state of the importance stage."""
        stats = self.manifest.stages["spans"].setdefault("stats", {})
        fp = self.manifest.stages["importance"]["fingerprint"]
        if stats.get("past_token_limit", {}).get("fingerprint") == fp:
            return
        past = {inst.id for inst, enc in zip(instances, self._encode(tokenizer, instances))
                if inst.id in spans and not span_token_positions(enc, spans[inst.id].start, spans[inst.id].end)}
        rows = self.ws.load_instances()
        for row in rows:
            if row["id"] in past:
                row["span_truncated"] = True
            else:
                row.pop("span_truncated", None)
        self.ws.save_instances(rows)
        counts = {split: sum(i.id in past for i in instances if i.split == split) for split in SPLITS}
        stats["past_token_limit"] = {**counts, "max_length": self.settings.max_length, "fingerprint": fp}
        self.ws.save_manifest(self.manifest)
        if past:
            self.log(f"[spans] warning: the span of {counts['train']} training, {counts['dev']} dev and "
                     f"{counts['test']} test instances lies wholly past the token limit "
                     f"({self.settings.max_length} tokens): masking it changes nothing, so their span scores "
                     f"are 0 (marked span_truncated in instances.jsonl); a larger --max-length includes them")

    def _select(self, dataset: Dataset) -> list[Instance]:
        s = self.settings
        return (
            select(dataset.splits.get("train", []), s.train_limit, sample_seed(s))
            + select(dataset.splits.get("dev", []), s.eval_limit, sample_seed(s))
            + select(dataset.splits.get("test", []), s.eval_limit, sample_seed(s))
        )

    def _spans(self, instances: list[Instance], data_fp: str) -> dict[str, Span]:
        s = self.settings
        fp = fingerprint(data_fp, s.rc_model, backbone_fingerprint(s.rc_model) if s.rc_model else None)
        if not self._begin("spans", fp):
            return self._saved_spans("span_detected")
        started = time.perf_counter()
        if self.input_format != "aspect":  # no aspect mention: the importance stage chooses within the text
            spans = {i.id: whole_span(i.text) for i in instances}
        else:
            rc = RCSpanFinder(s.rc_model, device=str(self.device)) if s.rc_model else None
            spans = detect_spans(instances, rc=rc, progress=self.progress)
        self.ws.save_instances([instance_row(i, spans.get(i.id)) for i in instances])
        _, tokenizer = load_backbone(s.model, self.manifest.labels, s.seed)
        stats = span_stats([i for i in instances if i.split == "train"], spans, tokenizer)
        self._finish("spans", started, stats=stats)
        return spans

    def _saved_spans(self, field: str = "span") -> dict[str, Span]:
        """The spans of instances.jsonl: in use (``span``), or as the spans stage found them
        (``span_detected``; rows written before that field: ``span``)."""
        return {
            row["id"]: Span(row[key]["start"], row[key]["end"], row[key]["source"])
            for row in self.ws.load_instances()
            for key in [field if field in row else "span"]
            if row.get(key)
        }

    def _encode(self, tokenizer, instances: list[Instance]):
        return encode_pairs(tokenizer, [(i.aspect, i.text) for i in instances], self.settings.max_length)

    def _model(self, instances: list[Instance], data_fp: str):
        s = self.settings
        backbone = resolve_backbone(s.model)
        cfg = TrainConfig.from_settings(asdict(s))
        fp = fingerprint(data_fp, backbone_fingerprint(backbone), asdict(cfg), s.trainable_layers, s.max_length,
                         CHECKPOINT_RULE)
        model, tokenizer = load_backbone(s.model, self.manifest.labels, s.seed)
        model.to(self.device)
        split = split_model(model, s.trainable_layers)
        labels = self.manifest.labels
        by_split = {name: [i for i in instances if i.split == name] for name in SPLITS}
        if not self._begin("model", fp, clean=("prefix", "train", "model")):
            split.load_state(load_params(self.ws.point_path("final")))
            self._prefix(split, tokenizer, by_split, load=False)  # recomputes a removed cache file
            return split, tokenizer, fp
        started = time.perf_counter()
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        caches = self._prefix(split, tokenizer, by_split)
        timings["prefix"] = round(time.perf_counter() - t0, 1)
        y = {name: torch.tensor([labels.index(i.label) for i in rows]) for name, rows in by_split.items()}
        t0 = time.perf_counter()
        state = train(
            split, caches["train"], y["train"], caches["dev"], y["dev"], TrainConfig(**asdict(cfg)),
            out_dir=self.ws.dir("train"), device=self.device, progress=self.progress,
            on_epoch=lambda r: self.log(
                f"  epoch {r.epoch}: loss {r.train_loss:.4f}, dev accuracy {r.dev_accuracy:.4f} ({r.seconds:.0f}s)"
            ),
            on_step=lambda done, total: self.report("model", PREFIX_SHARE + (1 - PREFIX_SHARE) * done / max(total, 1)),
        )
        timings["train"] = round(time.perf_counter() - t0, 1)
        model_dir = self.ws.dir("model")
        save_params(split.state(), model_dir / "final.safetensors")
        kept = [state.history[e - 1] for e in state.checkpoint_epochs(s.checkpoints)]  # up to the selected epoch
        if len(kept) < s.checkpoints:
            self.log(f"  warning: {s.checkpoints} checkpoints asked, {len(kept)} kept: dev selected epoch "
                     f"{state.best_epoch}, and TracIn's checkpoints end there (train longer or ask fewer)")
        for k, record in enumerate(kept, start=1):
            shutil.copyfile(self.ws.root / "train" / f"epoch-{record.epoch}.safetensors", model_dir / f"checkpoint-{k}.safetensors")
        checkpoints = [{"point": f"checkpoint-{k}", "epoch": r.epoch, "lr": r.lr} for k, r in enumerate(kept, 1)]
        self.manifest.results.update(best_epoch=state.best_epoch, history=[asdict(r) for r in state.history])
        self._measure(split, caches, by_split)
        self._finish("model", started, timings=timings, checkpoints=checkpoints)
        return split, tokenizer, fp

    def _measure(self, split, caches: dict[str, HiddenCache], by_split: dict[str, list[Instance]]) -> None:
        """Each split's accuracy at theta (into the results) and the dev/test predictions."""
        for name in SPLITS:
            if len(caches[name]):
                logits = predict(split, caches[name], device=self.device)
                y = torch.tensor([self.manifest.labels.index(i.label) for i in by_split[name]])
                self.manifest.results[f"{name}_accuracy"] = round(accuracy(logits, y), 4)
                self._store_predictions(by_split[name], logits)

    def _prefix(self, split, tokenizer, by_split: dict[str, list[Instance]], *,
                load: bool = True) -> dict[str, HiddenCache]:
        """Each split's frozen-prefix cache: read from its file (``load``), or computed and saved
        when the file is missing (the prefix is fixed by the backbone, the data and max_length)."""
        caches: dict[str, HiddenCache] = {}
        prefix_dir = self.ws.dir("prefix")
        for number, (name, rows) in enumerate(by_split.items(), start=1):
            path = prefix_dir / f"{name}.safetensors"
            if path.exists():
                if load:
                    caches[name] = HiddenCache.load(path)
                continue
            caches[name] = compute_prefix(
                split, self._encode(tokenizer, rows), tokenizer.pad_token_id,
                device=self.device, desc=f"frozen prefix ({name})", progress=self.progress,
            )
            caches[name].save(path)
            if load:
                self.report("model", PREFIX_SHARE * number / len(by_split))
        return caches

    def _store_predictions(self, rows: list[Instance], logits: torch.Tensor) -> None:
        labels = self.manifest.labels
        probs = logits.softmax(-1)
        pred = {inst.id: (labels[int(p.argmax())], [round(float(x), 4) for x in p]) for inst, p in zip(rows, probs)}
        saved = self.ws.load_instances()
        for row in saved:
            if row["id"] in pred:
                row["pred"], row["probs"] = pred[row["id"]]
        self.ws.save_instances(saved)

    def _importance(self, instances, spans, split, tokenizer, model_fp: str) -> dict[str, Span]:
        """Spans chosen by the paper's importance rule (Eq. 3): every span with --span-importance,
        and the spans of category aspects (--category-spans importance, the default), of single
        texts and of pairs among every clause and sentence of their text; the stage records how
        the category spans compare with the target-anchored ones (``category`` in the manifest)
        and, for single texts and pairs, the span statistics of the spans chosen."""
        s = self.settings
        fp = fingerprint(model_fp, self.manifest.stages["spans"]["fingerprint"], s.span_importance, s.category_spans)
        if not self._begin("importance", fp):
            return self._saved_spans()
        started = time.perf_counter()
        in_text = self.input_format != "aspect"  # single texts, pairs: among the text's clauses and sentences
        rule = {"whole_text": in_text, "category_spans": s.category_spans, "span_importance": s.span_importance}
        candidates = {i.id: c for i in instances if (c := importance_candidates(i, **rule)) is not None}
        category = {i.id for i in instances if among_clauses(i, in_text, s.category_spans)}
        targets = [i for i in instances if i.id in candidates]
        stats = {}
        if targets:
            drops: dict[tuple[str, tuple[int, int]], float] = {}
            logit_drop = self._logit_drop(split, tokenizer, drops)
            anchored = dict(spans)
            spans = refine_by_importance(targets, spans, logit_drop, progress=self.progress,
                                         candidates_for=lambda i: candidates[i.id])
            stats = category_span_quality([i for i in instances if i.id in category], anchored, spans, drops)
        if in_text:  # the spans stage only stood in the whole texts
            self.manifest.stages["spans"]["stats"] = span_stats([i for i in instances if i.split == "train"], spans,
                                                                tokenizer)
        saved = self.ws.load_instances()  # the spans in use: these, whatever an earlier run chose
        for row in saved:
            span = spans.get(row["id"])
            row["span"] = None if span is None else {"start": span.start, "end": span.end, "source": span.source}
        self.ws.save_instances(saved)
        self._finish("importance", started, enabled=s.span_importance, category=stats)
        return spans

    def _logit_drop(self, split, tokenizer, seen: dict):
        """Eq. 3's importance of candidate spans (the predicted class's logit drop when masked),
        remembered in ``seen`` by (instance id, span)."""

        def logit_drop(inst: Instance, candidates: list[tuple[int, int]]) -> list[float]:
            out = logit_drops(split, tokenizer, self._encode(tokenizer, [inst])[0], candidates, device=self.device)
            seen.update({(inst.id, tuple(c)): d for c, d in zip(candidates, out)})
            return out

        return logit_drop

    def _variants(self, instances: list[Instance], split, model_fp: str) -> None:
        s = self.settings
        fp = fingerprint(model_fp, s.variants, s.variant_lr, s.variant_optimizer, s.batch_size, s.seed)
        if not self._begin("variants", fp):
            return
        started = time.perf_counter()
        train_rows = [i for i in instances if i.split == "train"]
        cache = HiddenCache.load(self.ws.root / "prefix" / "train.safetensors")
        y = torch.tensor([self.manifest.labels.index(i.label) for i in train_rows])
        theta = split.state()
        variants, records = variants_like(asdict(s), split, cache, y, seed=s.seed, device=self.device)
        split.load_state(theta)
        for params, rec in zip(variants, records):
            save_params(params, self.ws.dir("model") / f"variant-{rec.index}.safetensors")
        self._finish(
            "variants", started,
            records=[{"point": f"variant-{r.index}", "seed": r.seed, "lr": r.lr, "step_norm": r.step_norm,
                      "rows": [train_rows[k].id for k in r.rows], "optimizer": s.variant_optimizer} for r in records],
        )

    def _models(self, instances: list[Instance], split, model_fp: str) -> None:
        """TRAK's ensemble (``--models N``): N - 1 classifiers besides theta, each trained as theta
        was but with the seed + M - 1 (head initialisation, shuffling, dropout), kept at its best dev
        epoch as the point ``model-M``. Trainings resume; models trained for this theta are kept (also
        by an interrupted stage) when N changes. With N = 1 the workspace has no models stage."""
        s, stage = self.settings, self.manifest.stages.get("models", {})
        before = {r["point"]: r for r in [*stage.get("records", []), *stage.get("kept", [])]
                  if r.get("model") == model_fp and self.ws.point_path_of(r["point"]).exists()}
        for point in set(before) - {f"model-{m}" for m in range(2, s.models + 1)}:
            self.ws.point_path_of(point).unlink()
        if s.models == 1:
            if self.manifest.stages.pop("models", None) is not None:
                self.log("[models] removed: TRAK's ensemble is the checkpoints again")
            return
        if not self._begin("models", fingerprint(model_fp, s.models), clean=("ensemble",)):
            return
        started, labels = time.perf_counter(), self.manifest.labels
        caches = {name: HiddenCache.load(self.ws.root / "prefix" / f"{name}.safetensors") for name in SPLITS}
        y = {name: torch.tensor([labels.index(i.label) for i in instances if i.split == name]) for name in SPLITS}
        theta, records = split.state(), []
        self.manifest.stages["models"]["kept"] = [before[p] for p in sorted(before)]  # what an interruption keeps
        self.ws.save_manifest(self.manifest)
        for m in range(2, s.models + 1):
            seed = s.seed + m - 1
            if f"model-{m}" in before:
                records.append(before[f"model-{m}"])
                continue
            split.load_state(split_model(load_backbone(s.model, labels, seed)[0], s.trainable_layers).state())
            state = train(
                split, caches["train"], y["train"], caches["dev"], y["dev"],
                TrainConfig(**{**asdict(TrainConfig.from_settings(asdict(s))), "seed": seed}),
                out_dir=self.ws.dir("ensemble") / f"model-{m}", device=self.device, progress=self.progress,
                on_step=lambda done, total, at=m - 2: self.report("models", (at + done / max(total, 1)) / (s.models - 1)),
            )
            save_params(split.state(), self.ws.point_path_of(f"model-{m}"))
            test = round(accuracy(predict(split, caches["test"], device=self.device), y["test"]), 4) if len(y["test"]) else None
            records.append({"point": f"model-{m}", "model": model_fp, "seed": seed, "best_epoch": state.best_epoch,
                            "dev_accuracy": round(state.best_accuracy, 4), "test_accuracy": test})
            self.manifest.stages["models"]["kept"].append(records[-1])  # kept if interrupted
            self.ws.save_manifest(self.manifest)
            self.log(f"  model-{m} (seed {seed}): epoch {state.best_epoch}, dev accuracy {state.best_accuracy:.4f}, "
                     f"test accuracy {test}")
        split.load_state(theta)
        shutil.rmtree(self.ws.root / "ensemble", ignore_errors=True)
        del self.manifest.stages["models"]["kept"]
        self._finish("models", started, records=records)


def prepare(settings: PrepareSettings, workspace: str | Path, *, progress: bool = True,
            log: Callable[[str], None] = print, on_progress: StageProgress | None = None) -> Manifest:
    """Build (or bring up to date) the workspace at ``workspace``; returns its manifest.
    ``on_progress(stage, fraction)`` hears each stage's start (0), progress and end (1)."""
    return Preparer(settings, workspace, progress=progress, log=log, on_progress=on_progress).run()
