"""The workspaces under the app's root folder: listing, build state, summaries, new settings."""
from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .data import LAYOUT, default_data_dir
from .index import IndexSettings, saved_settings
from .prepare_settings import PrepareSettings
from .workspace import OPTIONAL_STAGES, STAGES, Manifest, Workspace

WORKSPACES_ENV = "SPANLENS_WORKSPACES"
DATA_ROOTS_ENV = "SPANLENS_DATA_ROOTS"
UPLOAD_TYPES = ("jsonl", "csv", "xml")
"""File types the app accepts as uploads (JSONL/CSV with text, aspect, label; SemEval-2014 XML)."""
REQUEST_FILE = "prepare-request.json"
"""The settings a workspace was created with from the app, so an interrupted build resumes as asked."""

SIZE_PRESETS: dict[str, dict[str, Any]] = {
    "tiny slice": {"train_limit": 300, "eval_limit": 60, "epochs": 3},
    "demo": {"train_limit": 2000, "eval_limit": 300},
    "full": {},
}
"""Dataset sizes offered by the app, as overrides of the ``demo`` prepare preset."""


def workspaces_root() -> Path:
    """The folder holding workspaces: ``$SPANLENS_WORKSPACES`` or ``./workspaces``."""
    return Path(os.environ.get(WORKSPACES_ENV) or "workspaces").expanduser()


def index_settings_of(root: Path) -> IndexSettings:
    """The settings the workspace's index was built (or requested) with; the default otherwise."""
    return saved_settings(root / "index" / "meta.json") or saved_settings(root / REQUEST_FILE, "index") or IndexSettings()


def _index_meta(root: Path) -> dict:
    try:
        return json.loads((root / "index" / "meta.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def index_done(root: Path) -> bool:
    """Whether the workspace has a finished gradient index."""
    return bool(_index_meta(root).get("done"))


def index_fingerprint_of(root: Path) -> str:
    """The fingerprint of the workspace's finished index ('-' while there is none)."""
    meta = _index_meta(root)
    return meta.get("fingerprint", "-") if meta.get("done") else "-"


@dataclass(frozen=True)
class WorkspaceInfo:
    """A folder under the root and how far it was built."""

    name: str
    path: Path
    status: str  # "ready" | "needs index" | "unfinished" | "empty"
    stages_done: tuple[str, ...]

    @property
    def ready(self) -> bool:
        return self.status == "ready"


def workspace_info(path: Path) -> WorkspaceInfo:
    """The build state of the workspace at ``path``."""
    manifest = Workspace(path).manifest()
    done = tuple(s for s in STAGES if manifest.stages.get(s, {}).get("done"))
    prepared = all(s in done for s in STAGES[:-1] if s in manifest.stages or s not in OPTIONAL_STAGES)
    if prepared and index_done(path):
        status = "ready"
    elif prepared:
        status = "needs index"
    elif manifest.stages or (path / REQUEST_FILE).exists():
        status = "unfinished"
    else:
        status = "empty"
    return WorkspaceInfo(path.name, path, status, done + (("index",) if index_done(path) else ()))


def list_workspaces(root: Path) -> list[WorkspaceInfo]:
    """Workspaces (folders with a manifest or a creation request) under ``root``, by name."""
    if not root.is_dir():
        return []
    return [workspace_info(p) for p in sorted(root.iterdir())
            if p.is_dir() and ((p / "manifest.json").exists() or (p / REQUEST_FILE).exists())]


WORKSPACE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_workspace_name(root: Path, name: str) -> str | None:
    """Why ``name`` cannot be a new workspace under ``root`` (``None``: it can)."""
    if not WORKSPACE_NAME.match(name):
        return "use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
    if (root / name).exists():
        return f"{root / name} already exists"
    return None


def data_roots() -> list[Path]:
    """The folders the app may read data from, resolved: ``$SPANLENS_DATA_ROOTS`` (separated by
    ``os.pathsep``), else the default data folder and the workspaces root."""
    configured = [p for p in os.environ.get(DATA_ROOTS_ENV, "").split(os.pathsep) if p.strip()]
    roots = configured or [default_data_dir(), workspaces_root()]
    return [Path(p).expanduser().resolve() for p in roots]


def outside_roots_message(roots: Sequence[Path]) -> str:
    """The one answer for every path outside the data roots (it never says whether the path exists)."""
    return (f"data paths must lie under a data root of this server ({', '.join(str(r) for r in roots)}; "
            f"set by {DATA_ROOTS_ENV}); upload your own file instead")


def allowed_data_path(text: str, roots: Sequence[Path] | None = None) -> Path:
    """``text`` as a resolved path (``~``, ``..`` and symlinks resolved) when it lies under a data
    root; ValueError otherwise, with the same message whether or not the path exists."""
    roots = data_roots() if roots is None else list(roots)
    try:
        path = Path(text.strip()).expanduser().resolve()
    except (OSError, RuntimeError):  # a symlink loop, an unknown ~user
        raise ValueError(outside_roots_message(roots)) from None
    if not text.strip() or not any(path.is_relative_to(root) for root in roots):
        raise ValueError(outside_roots_message(roots))
    return path


def save_upload(workspace: Path, filename: str, data: bytes) -> Path:
    """Store an uploaded data file in the new workspace's ``data/`` folder (its name cleaned,
    its suffix one of :data:`UPLOAD_TYPES`); returns the path to prepare from."""
    name = Path(filename).name
    suffix = Path(name).suffix.lower().lstrip(".")
    if suffix not in UPLOAD_TYPES:
        raise ValueError(f"upload a .{', .'.join(UPLOAD_TYPES)} file, not {name!r}")
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(name).stem).strip("_")[:64] or "upload"
    path = workspace / "data" / f"{stem}.{suffix}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def delete_workspace(root: Path, name: str) -> None:
    """Remove the workspace ``name`` (a folder that :func:`list_workspaces` lists under ``root``)."""
    if not WORKSPACE_NAME.match(name) or name not in {i.name for i in list_workspaces(root)}:
        raise ValueError(f"no workspace {name!r} under {root}")
    shutil.rmtree(root / name)


def missing_data(dataset: str, data_dir: str | None) -> list[str]:
    """Files a named dataset needs that are not in ``data_dir``; for a path, the path if absent."""
    if dataset in LAYOUT:
        folder = Path(data_dir) if data_dir else default_data_dir()
        return [str(folder / rel) for rel in LAYOUT[dataset].values() if not (folder / rel).is_file()]
    return [] if Path(dataset).expanduser().exists() else [dataset]


def settings_for(dataset: str, data_dir: str | None, backbone: str, size: str, **overrides: Any) -> PrepareSettings:
    """Prepare settings: the demo preset, the size preset, then the user's choices."""
    if size not in SIZE_PRESETS:
        raise ValueError(f"unknown size {size!r}; choose from {', '.join(SIZE_PRESETS)}")
    return PrepareSettings.from_preset("demo", dataset=dataset, data_dir=data_dir or None, model=backbone or None,
                                       **SIZE_PRESETS[size], **overrides)


def span_source(manifest: Manifest) -> str:
    """Where the workspace's spans come from, in words (a person's corrections aside)."""
    settings, stages = manifest.settings, manifest.stages
    model = "the imported model" if settings.get("imported") else "the trained classifier"
    if stages.get("data", {}).get("input_format", "aspect") != "aspect":
        return f"the importance rule (paper Eq. 3) over each text's clauses and sentences, with {model}"
    found = (f"reading comprehension with the QA model {settings['rc_model']} (the clause heuristic where it fails)"
             if settings.get("rc_model") else "the clause heuristic around the aspect (no QA model)")
    if settings.get("span_importance"):
        found += f", then the importance rule (Eq. 3) among candidate chunks with {model}"
    if stages.get("importance", {}).get("category"):
        found += f"; category aspects: the importance rule over clauses and sentences with {model}"
    return found


def manifest_summary(root: Path) -> dict[str, Any]:
    """What the Workspaces page shows: sizes, the data report, accuracy, TRAK's independently
    trained models, span stats, index, timings, settings."""
    ws = Workspace(root)
    manifest = ws.manifest()
    stages, results = manifest.stages, manifest.results
    index_meta: dict[str, Any] = {}
    meta_path = root / "index" / "meta.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        size = sum(p.stat().st_size for p in (root / "index").iterdir() if p.is_file())
        index_meta = {"done": bool(meta.get("done")), "dim": meta.get("dim"), "seconds": meta.get("seconds"),
                      "bytes": size, "points": meta.get("points", []), "projection": meta.get("projection"),
                      "examples_per_second": meta.get("examples_per_second")}
    timings = {s: stages[s]["seconds"] for s in STAGES if "seconds" in stages.get(s, {})}
    if index_meta.get("seconds") is not None:
        timings["index"] = index_meta["seconds"]
    return {
        "counts": stages.get("data", {}).get("counts", {}),
        "data_report": stages.get("data", {}).get("report", ""),
        "labels": manifest.labels,
        "accuracy": {k: results[k] for k in ("train_accuracy", "dev_accuracy", "test_accuracy") if k in results},
        "best_epoch": results.get("best_epoch"),
        "history": results.get("history", []),
        "models": stages.get("models", {}).get("records", []),
        "span_stats": stages.get("spans", {}).get("stats", {}),
        "index": index_meta,
        "timings": timings,
        "settings": manifest.settings,
        "versions": manifest.versions,
        "span_source": span_source(manifest) if manifest.settings else "",
        "imported": ({key: stages.get("model", {}).get(key) for key in ("imported_from", "checkpoints",
                                                                        "checkpoints_missing")}
                     if manifest.settings.get("imported") else None),
    }
