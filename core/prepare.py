"""``prepare``: dataset + backbone -> a workspace (spans, trained classifier, checkpoints, variants).

Stages run in data-flow order and each is skipped when its fingerprint matches a finished
record in the manifest, resumed when it matches an unfinished one, and rebuilt (its old files
removed) when it changed::

    data -> spans -> model (frozen prefix, training, checkpoints) -> importance -> variants
"""
from __future__ import annotations

import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from .data import Dataset, Instance, load_dataset
from .model import (
    HiddenCache,
    compute_prefix,
    encode_pairs,
    load_backbone,
    load_params,
    mask_span,
    pick_device,
    predict,
    resolve_backbone,
    save_params,
    split_model,
)
from .spans import RCSpanFinder, Span, detect_spans, refine_by_importance, span_stats
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

PRESETS: dict[str, dict] = {
    "demo": {},
    "paper": {
        "model": "roberta-large",
        "rc_model": "phiyodr/roberta-large-finetuned-squad2",
        "batch_size": {"mams": 200, "sentihood": 100},
        "lr": 1e-4,
        "epochs": 100,
        "max_length": 256,
        "span_importance": True,
    },
}


@dataclass
class PrepareSettings:
    """Everything ``prepare`` depends on. Defaults are the demo preset."""

    dataset: str = "mams"
    data_dir: str | None = None
    model: str = "minilm"
    rc_model: str | None = None
    train_limit: int | None = None
    eval_limit: int | None = None
    epochs: int = 6
    batch_size: int = 32
    lr: float = 5e-4
    trainable_layers: int = 2
    checkpoints: int = 3
    variants: int = 3
    variant_lr: float = 1e-4
    variant_optimizer: str = "adamw"
    max_length: int = 128
    span_importance: bool = False
    seed: int = 0
    device: str | None = None

    @classmethod
    def from_preset(cls, preset: str = "demo", **overrides) -> "PrepareSettings":
        """Preset values, then every override that is not ``None``."""
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
        values = dict(PRESETS[preset])
        dataset = overrides.get("dataset") or cls.dataset
        if isinstance(values.get("batch_size"), dict):
            values["batch_size"] = values["batch_size"].get(dataset, 100)
        values.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown settings: {sorted(unknown)}")
        return cls(**values)


def select(instances: list[Instance], limit: int | None, seed: int) -> list[Instance]:
    """A seeded random subset of ``limit`` instances, in file order (all when no limit)."""
    if limit is None or limit >= len(instances):
        return list(instances)
    keep = set(random.Random(seed).sample(range(len(instances)), limit))
    return [inst for i, inst in enumerate(instances) if i in keep]


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
        s = self.settings
        torch.manual_seed(s.seed)
        self.manifest.settings = asdict(s)
        self.manifest.versions = library_versions()
        dataset = load_dataset(s.dataset, s.data_dir)
        self.manifest.labels = list(dataset.labels)
        instances = self._select(dataset)
        data_fp = fingerprint(
            [(i.id, i.text, i.aspect, i.label, i.start, i.end) for i in instances], dataset.labels
        )
        self.manifest.stages.setdefault("data", {})
        if self._begin("data", data_fp):
            started = time.perf_counter()
            counts = {split: sum(i.split == split for i in instances) for split in ("train", "dev", "test")}
            self._finish("data", started, counts=counts, report=dataset.report.summary())

        spans = self._spans(instances, data_fp)
        split, tokenizer, model_fp = self._model(instances, data_fp)
        spans = self._importance(instances, spans, split, tokenizer, model_fp)
        self._variants(instances, split, model_fp)
        self.ws.save_manifest(self.manifest)
        return self.manifest

    def _select(self, dataset: Dataset) -> list[Instance]:
        s = self.settings
        return (
            select(dataset.splits.get("train", []), s.train_limit, s.seed)
            + select(dataset.splits.get("dev", []), s.eval_limit, s.seed)
            + select(dataset.splits.get("test", []), s.eval_limit, s.seed)
        )

    def _spans(self, instances: list[Instance], data_fp: str) -> dict[str, Span]:
        s = self.settings
        fp = fingerprint(data_fp, s.rc_model, backbone_fingerprint(s.rc_model) if s.rc_model else None)
        if not self._begin("spans", fp):
            return self._saved_spans()
        started = time.perf_counter()
        rc = RCSpanFinder(s.rc_model, device=str(self.device)) if s.rc_model else None
        spans = detect_spans(instances, rc=rc, progress=self.progress)
        self.ws.save_instances([instance_row(i, spans.get(i.id)) for i in instances])
        _, tokenizer = load_backbone(s.model, self.manifest.labels, s.seed)
        stats = span_stats([i for i in instances if i.split == "train"], spans, tokenizer)
        self._finish("spans", started, stats=stats)
        return spans

    def _saved_spans(self) -> dict[str, Span]:
        return {
            row["id"]: Span(row["span"]["start"], row["span"]["end"], row["span"]["source"])
            for row in self.ws.load_instances()
            if row.get("span")
        }

    def _encode(self, tokenizer, instances: list[Instance]):
        return encode_pairs(tokenizer, [(i.aspect, i.text) for i in instances], self.settings.max_length)

    def _model(self, instances: list[Instance], data_fp: str):
        s = self.settings
        backbone = resolve_backbone(s.model)
        cfg = TrainConfig(epochs=s.epochs, batch_size=s.batch_size, lr=s.lr, seed=s.seed, checkpoints=s.checkpoints)
        fp = fingerprint(data_fp, backbone_fingerprint(backbone), asdict(cfg), s.trainable_layers, s.max_length,
                         CHECKPOINT_RULE)
        model, tokenizer = load_backbone(s.model, self.manifest.labels, s.seed)
        model.to(self.device)
        split = split_model(model, s.trainable_layers)
        labels = self.manifest.labels
        by_split = {name: [i for i in instances if i.split == name] for name in ("train", "dev", "test")}
        if not self._begin("model", fp, clean=("prefix", "train", "model")):
            split.load_state(load_params(self.ws.point_path("final")))
            return split, tokenizer, fp
        started = time.perf_counter()
        timings: dict[str, float] = {}
        caches: dict[str, HiddenCache] = {}
        prefix_dir = self.ws.dir("prefix")
        t0 = time.perf_counter()
        for name, rows in by_split.items():
            path = prefix_dir / f"{name}.safetensors"
            if path.exists():
                caches[name] = HiddenCache.load(path)
                continue
            caches[name] = compute_prefix(
                split, self._encode(tokenizer, rows), tokenizer.pad_token_id,
                device=self.device, desc=f"frozen prefix ({name})", progress=self.progress,
            )
            caches[name].save(path)
            self.report("model", PREFIX_SHARE * (len(caches) / len(by_split)))
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
        for k, record in enumerate(kept, start=1):
            shutil.copyfile(self.ws.root / "train" / f"epoch-{record.epoch}.safetensors", model_dir / f"checkpoint-{k}.safetensors")
        checkpoints = [{"point": f"checkpoint-{k}", "epoch": r.epoch, "lr": r.lr} for k, r in enumerate(kept, 1)]
        results = {"best_epoch": state.best_epoch, "history": [asdict(r) for r in state.history]}
        for name in ("train", "dev", "test"):
            if len(caches[name]):
                logits = predict(split, caches[name], device=self.device)
                results[f"{name}_accuracy"] = round(accuracy(logits, y[name]), 4)
                self._store_predictions(by_split[name], logits)
        self.manifest.results.update(results)
        self._finish("model", started, timings=timings, checkpoints=checkpoints)
        return split, tokenizer, fp

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
        s = self.settings
        fp = fingerprint(model_fp, self.manifest.stages["spans"]["fingerprint"], s.span_importance)
        if not self._begin("importance", fp):
            return self._saved_spans()
        started = time.perf_counter()
        if s.span_importance:
            rows = {i.id: i for i in instances}
            saved = {r["id"]: r for r in self.ws.load_instances()}

            @torch.no_grad()
            def logit_drop(inst: Instance, candidates: list[tuple[int, int]]) -> list[float]:
                enc = self._encode(tokenizer, [inst])[0]
                variants = [enc] + [mask_span(enc, a, b, tokenizer.mask_token_id) for a, b in candidates]
                cache = compute_prefix(split, variants, tokenizer.pad_token_id, device=self.device, progress=False)
                logits = predict(split, cache, device=self.device)
                y = int(logits[0].argmax())
                return [float(logits[0, y] - lg[y]) for lg in logits[1:]]

            spans = refine_by_importance(list(rows.values()), spans, logit_drop, progress=self.progress)
            for inst_id, span in spans.items():
                saved[inst_id]["span"] = {"start": span.start, "end": span.end, "source": span.source}
            self.ws.save_instances(list(saved.values()))
        self._finish("importance", started, enabled=s.span_importance)
        return spans

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


def prepare(settings: PrepareSettings, workspace: str | Path, *, progress: bool = True,
            log: Callable[[str], None] = print, on_progress: StageProgress | None = None) -> Manifest:
    """Build (or bring up to date) the workspace at ``workspace``; returns its manifest.
    ``on_progress(stage, fraction)`` hears each stage's start (0), progress and end (1)."""
    return Preparer(settings, workspace, progress=progress, log=log, on_progress=on_progress).run()
