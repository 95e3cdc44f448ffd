"""``import``: a classifier fine-tuned elsewhere + a dataset -> a workspace, nothing retrained.

The stages are ``prepare``'s (:class:`core.prepare.Preparer`: fingerprinted, resumable), so
everything downstream - the index, explain, evaluate, the app - works unchanged. The data stage
reads the labels from the model (``config.json`` id2label, in its order) and refuses data whose
labels are not among them. The model stage differs: theta is the given model, its accuracy on
every split is measured and recorded, and its Trainer checkpoints (:mod:`core.finetuned`)
become the checkpoints of TracIn, Control and TRAK. Fine-tuned in full, a checkpoint differs
from theta below the trainable subset too, so it is kept whole - read from its folder when the
workspace is loaded (:mod:`core.points`) - with its own frozen-prefix cache of the training
inputs (:mod:`core.prefixes`). The variants are made as usual: one step of the trainable subset
from theta.

The trainable subset (``--trainable-layers N``: the last N layers, the pooler and the head) is a
choice of the explanation, not of training: gradients are taken with respect to it, every other
parameter held at the point's own value (see the README's "Bring your own model").
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .data import SPLITS, Dataset, Instance, load_dataset
from .finetuned import (
    Checkpoint,
    check_classifier,
    checkpoints,
    match_labels,
    model_labels,
)
from .model import (
    compute_prefix,
    load_backbone,
    load_classifier,
    save_params,
    split_model,
)
from .prefixes import prefix_path
from .prepare import PREFIX_SHARE, Preparer, StageProgress
from .prepare_settings import check_settings
from .workspace import Manifest, backbone_fingerprint, fingerprint


@dataclass
class ImportSettings:
    """Everything ``import`` depends on (``model``: the fine-tuned model's folder)."""

    model: str = ""
    dataset: str = ""
    data_dir: str | None = None
    input_format: str = "auto"
    rc_model: str | None = None
    train_limit: int | None = None
    eval_limit: int | None = None
    trainable_layers: int = 2
    checkpoints: int = 3
    variants: int = 3
    variant_lr: float = 1e-4
    variant_optimizer: str = "adamw"
    batch_size: int = 32
    max_length: int = 128
    span_importance: bool = False
    category_spans: str = "importance"
    seed: int = 0
    device: str | None = None
    imported: bool = True  # marks the workspace's settings as an import's

    def __post_init__(self) -> None:
        if not str(self.model).strip() or not str(self.dataset).strip():
            raise ValueError("give the fine-tuned model's folder (--model) and a dataset (--dataset)")
        self.model = str(Path(self.model).expanduser().resolve())
        check_settings(self)


class Importer(Preparer):
    """``prepare``'s stages around an imported model (see the module docstring)."""

    settings: ImportSettings

    def _load(self) -> Dataset:
        """The dataset, its labels matched to the model's (which give the workspace's order);
        an unsupported model is refused first."""
        s = self.settings
        folder = Path(s.model)
        self.config = check_classifier(folder)
        labels = model_labels(self.config)
        dataset = load_dataset(s.dataset, s.data_dir, input_format=s.input_format, labels=labels, open_labels=True)
        dataset.labels = tuple(match_labels(labels, dataset.labels, folder))
        return dataset

    def _models(self, instances: list[Instance], split, model_fp: str) -> None:
        """An imported model brings no independently trained ones (a stage left by an earlier
        ``prepare`` goes), so TRAK's ensemble is its checkpoints."""
        self.manifest.stages.pop("models", None)

    def _model(self, instances: list[Instance], data_fp: str):
        """theta = the given model; its checkpoints, kept whole; the frozen-prefix caches (theta's
        for every split, each checkpoint's for training); accuracy at theta."""
        s = self.settings
        found, missing = checkpoints(Path(s.model), s.checkpoints, self.config)
        fp = fingerprint(data_fp, "import", backbone_fingerprint(s.model), s.trainable_layers, s.max_length,
                         [(c.step, c.lr, backbone_fingerprint(str(c.folder))) for c in found])
        model, tokenizer = load_backbone(s.model, self.manifest.labels, s.seed)
        split = split_model(model.to(self.device), s.trainable_layers)
        by_split = {name: [i for i in instances if i.split == name] for name in SPLITS}
        if not self._begin("model", fp, clean=("prefix", "train", "model")):
            self._prefix(split, tokenizer, by_split, load=False)  # recomputes a removed cache file
            self._checkpoints(found, tokenizer, by_split["train"])
            return split, tokenizer, fp
        started = time.perf_counter()
        caches = self._prefix(split, tokenizer, by_split)
        save_params(split.state(), self.ws.dir("model") / "final.safetensors")
        records = self._checkpoints(found, tokenizer, by_split["train"])
        self._measure(split, caches, by_split)
        self._finish("model", started, checkpoints=records, checkpoints_missing=missing, imported_from=s.model)
        if missing:
            self.log(f"[model] no checkpoints: {missing}; TracIn, Control and TRAK will be unavailable")
        return split, tokenizer, fp

    def _checkpoints(self, found: list[Checkpoint], tokenizer, train_rows: list[Instance]) -> list[dict]:
        """Each checkpoint's trainable subset (``model/checkpoint-K``) and the frozen-prefix cache
        of the training inputs on its own bottom (made when missing); their manifest records."""
        s, records = self.settings, []
        for k, c in enumerate(found, start=1):
            point = f"checkpoint-{k}"
            cache_path = prefix_path(self.ws.dir("prefix"), "train", point)
            params_path = self.ws.dir("model") / f"{point}.safetensors"
            if not (cache_path.exists() and params_path.exists()):
                whole = load_classifier(str(c.folder), self.manifest.labels, s.seed).to(self.device)
                split = split_model(whole, s.trainable_layers)
                save_params(split.state(), params_path)
                compute_prefix(split, self._encode(tokenizer, train_rows), tokenizer.pad_token_id, device=self.device,
                               desc=f"frozen prefix (train, {point})", progress=self.progress).save(cache_path)
            self.report("model", PREFIX_SHARE + (1 - PREFIX_SHARE) * k / len(found))
            records.append({"point": point, "lr": c.lr, "step": c.step, "lr_step": c.lr_step, "folder": str(c.folder)})
        return records


def import_model(settings: ImportSettings, workspace: str | Path, *, progress: bool = True,
                 log: Callable[[str], None] = print, on_progress: StageProgress | None = None) -> Manifest:
    """Build (or bring up to date) the workspace of an imported model; returns its manifest.
    ``on_progress(stage, fraction)`` hears each stage's start (0), progress and end (1)."""
    return Importer(settings, workspace, progress=progress, log=log, on_progress=on_progress).run()
