"""A workspace: one folder per prepared run, its manifest, fingerprints and paths.

Layout of a workspace folder::

    manifest.json          settings, seeds, library versions, stage fingerprints, accuracy, timings
    instances.jsonl        every instance with its span (and, once trained, its prediction)
    prefix/                frozen-prefix hidden states (safetensors)
    train/                 per-epoch parameters and optimiser state (resume)
    model/                 final.safetensors, checkpoint-K.safetensors, variant-I.safetensors
    index/                 the gradient index (built by the explanation engine)
    store.sqlite           results cache, annotations, case studies

Each stage records a fingerprint of everything it depends on (its settings and the stages
before it); a stage whose fingerprint changed is rebuilt, never reused.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .data import Instance
from .spans import Span

MANIFEST = "manifest.json"
STAGES = ("data", "spans", "model", "importance", "variants", "models", "index")
OPTIONAL_STAGES = ("models",)
"""Stages a workspace has only when asked for (``prepare --models N``: TRAK's ensemble)."""


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able parts."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_digest(paths: list[Path]) -> str:
    """sha256 over the names and bytes of files (for dataset and backbone fingerprints)."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def backbone_fingerprint(path_or_id: str) -> str:
    """Fingerprint of a backbone: its files when local, its name otherwise."""
    path = Path(path_or_id)
    if path.is_dir():
        files = [p for p in path.iterdir() if p.suffix in {".json", ".safetensors", ".bin", ".txt", ".model"}]
        return file_digest(files)
    return fingerprint(path_or_id)


def library_versions() -> dict[str, str]:
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}


def write_text_atomic(path: Path, text: str) -> None:
    """Write text (UTF-8, line ends as given) via ``NAME.tmp`` and rename, so a reader never sees
    half a file; the temporary file is removed if the write fails (after a kill, the next write
    replaces it)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON via a temporary file and rename, so a reader never sees half a file."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


@dataclass
class Manifest:
    """The workspace's record of what was built, from what, and how it went."""

    settings: dict = field(default_factory=dict)
    stages: dict[str, dict] = field(default_factory=dict)
    labels: list[str] = field(default_factory=list)
    results: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)

    def stage_done(self, stage: str, fp: str) -> bool:
        rec = self.stages.get(stage)
        return bool(rec and rec.get("fingerprint") == fp and rec.get("done"))

    def prepared(self) -> bool:
        """Whether ``prepare`` finished: its last stages (the variants, and the models where it
        trains more) are done."""
        last = ("variants", *(["models"] if "models" in self.stages else []))
        return all(bool(self.stages.get(s, {}).get("done")) for s in last)


class Workspace:
    """Paths and manifest of one prepared run."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    # paths
    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    @property
    def instances_path(self) -> Path:
        return self.root / "instances.jsonl"

    @property
    def store_path(self) -> Path:
        return self.root / "store.sqlite"

    def dir(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def exists(self) -> bool:
        return self.manifest_path.exists()

    # manifest
    def manifest(self) -> Manifest:
        if not self.manifest_path.exists():
            return Manifest()
        try:
            data = json.loads(self.manifest_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{self.manifest_path}: not valid JSON ({err})") from err
        if not isinstance(data, dict):
            raise ValueError(f"{self.manifest_path}: not a JSON object; delete it to prepare this folder again from "
                             "scratch, or prepare into a new folder")
        return Manifest(**{k: data.get(k, v) for k, v in asdict(Manifest()).items()})

    def save_manifest(self, manifest: Manifest) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.manifest_path, asdict(manifest))

    @property
    def fingerprint(self) -> str:
        """The fingerprint of the whole workspace (that of its last finished stage chain)."""
        stages = self.manifest().stages
        return fingerprint([stages.get(s, {}).get("fingerprint") for s in STAGES
                            if s in stages or s not in OPTIONAL_STAGES])

    # instances
    def save_instances(self, rows: list[dict]) -> None:
        tmp = self.instances_path.with_suffix(".tmp")
        with tmp.open("w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, self.instances_path)

    def load_instances(self) -> list[dict]:
        """The rows of ``instances.jsonl``; a damaged line is an error naming the file and line."""
        rows = []
        with self.instances_path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{self.instances_path}, line {number}: damaged ({err.msg}); run "
                                     f"`python -m core prepare --workspace {self.root}` again to rewrite it") from None
        return rows

    # parameter points
    def point_path_of(self, point: str) -> Path:
        """Where a parameter point's file lies: ``final``, ``checkpoint-K``, ``variant-I`` or ``model-M``."""
        if point != "final" and not point.startswith(("checkpoint-", "variant-", "model-")):
            raise ValueError(f"unknown parameter point {point!r}: use final, checkpoint-K, variant-I or model-M")
        return self.root / "model" / f"{point}.safetensors"

    def point_path(self, point: str) -> Path:
        """File of a parameter point (:meth:`point_path_of`), which must exist."""
        path = self.point_path_of(point)
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: run `python -m core prepare` for this workspace")
        return path

    def points(self, kind: str) -> list[str]:
        """Names of the points of a kind (``checkpoint`` or ``variant``) the manifest lists, in order."""
        from .points import PointSet

        return list(PointSet.from_manifest(self.manifest()).groups[f"{kind}s"])


def instance_row(inst: Instance, span: Span | None) -> dict:
    """The JSONL row of an instance with its span: ``span`` (in use; the importance stage may
    replace it) and ``span_detected`` (what the spans stage found, which that stage reuses)."""
    row = asdict(inst)
    row["span"] = None if span is None else {"start": span.start, "end": span.end, "source": span.source}
    row["span_detected"] = row["span"]
    return row


def load_model(workspace: str | Path | Workspace, point: str = "final", device: str | None = None):
    """Return the workspace's classifier at a parameter point as a ready Hugging Face model.

    ``point`` is ``"final"`` (the selected model theta), ``"checkpoint-K"`` (the K-th of the last
    training epochs kept for TracIn, oldest first; for an imported model, the K-th of its
    Trainer checkpoints kept, whole) or ``"variant-I"`` (theta + delta_I). The returned model is
    in eval mode on ``device`` (CUDA when present unless forced), with its tokenizer as
    ``model.spanlens_tokenizer``.
    """
    from .model import (
        load_classifier,
        load_tokenizer,
        pick_device,
        resolve_backbone,
        split_model,
    )
    from .points import load_point, point_folders

    ws = workspace if isinstance(workspace, Workspace) else Workspace(workspace)
    manifest = ws.manifest()
    if not manifest.settings:
        raise FileNotFoundError(f"{ws.root} has no manifest: not a prepared workspace")
    settings = manifest.settings
    path = resolve_backbone(settings["model"])
    model = load_classifier(str(point_folders(manifest).get(point, path)), manifest.labels, settings["seed"])
    split = split_model(model, settings["trainable_layers"])
    split.load_state(load_point(ws, point))
    model.spanlens_tokenizer = load_tokenizer(path)
    return model.to(pick_device(device)).eval()
