"""Parameter points: the classifier at theta, its checkpoints and its variants, loaded once.

A workspace's points are listed in its manifest (``final``; ``checkpoint-K`` from the model
stage, with the learning rate of its epoch; ``variant-I`` from the variants stage; ``model-M``,
an independently trained classifier, from the models stage), never taken
from a directory listing: a point file that is missing is an error naming the file and the
command that rebuilds it, so a method never runs silently on fewer points than it was built for.

A point is the trainable subset's parameters; every point shares theta's bottom (the frozen
prefix), except the checkpoints of an imported model (:mod:`core.importing`): fine-tuned in full,
each is a whole model of its own, so it brings its own bottom too (and its own copy of any frozen
parameter the top uses). Moving the model to such a point moves every parameter.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .model import (
    Encoded,
    SplitModel,
    encode_pairs,
    load_backbone,
    load_classifier,
    load_params,
    pick_device,
    split_model,
)
from .workspace import Manifest, Workspace


@dataclass(frozen=True)
class PointSet:
    """The workspace's parameter points by set (``final``, ``checkpoints``, ``variants``) and the
    checkpoints' learning rates (TracIn's weights)."""

    groups: dict[str, tuple[str, ...]]
    lrs: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> "PointSet":
        """The points the manifest lists. ``ensemble`` (TRAK's) is theta and the classifiers of the
        models stage (``prepare --models N``) when it has any, else the checkpoints."""
        checkpoints = manifest.stages.get("model", {}).get("checkpoints", [])
        variants = manifest.stages.get("variants", {}).get("records", [])
        models = tuple(r["point"] for r in manifest.stages.get("models", {}).get("records", []))
        named = tuple(r["point"] for r in checkpoints)
        return cls({"final": ("final",), "checkpoints": named, "variants": tuple(r["point"] for r in variants),
                    "ensemble": ("final", *models) if models else named},
                   {r["point"]: float(r["lr"]) for r in checkpoints})

    def names(self) -> list[str]:
        """Every point once, theta first."""
        return list(dict.fromkeys(p for group in self.groups.values() for p in group))

    def of(self, points: str, method: str = "this method") -> list[str]:
        """The points of a set; ValueError when the workspace has none of them."""
        chosen = list(self.groups.get(points, ()))
        if not chosen:
            raise ValueError(f"{method} needs {points}, and this workspace has none")
        return chosen

    def weight(self, weights: str, point: str, points: str = "final") -> float:
        """A point's weight: its learning rate for ``lr`` weights, 1 / (points in the set) for
        ``mean`` (an average over the set), else 1."""
        if weights == "lr":
            return self.lrs.get(point, 1.0)
        return 1.0 / len(self.groups.get(points, (point,))) if weights == "mean" else 1.0

    def with_group(self, points: str, names: tuple[str, ...]) -> "PointSet":
        """The same points with one set replaced (e.g. new variants for a faithfulness run)."""
        return replace(self, groups={**self.groups, points: tuple(names)})


@dataclass
class LoadedModel:
    """A workspace's classifier at theta, with its tokenizer and every parameter point."""

    split: SplitModel
    tokenizer: object
    labels: list[str]
    points: dict[str, dict[str, torch.Tensor]]
    device: torch.device
    max_length: int
    point_set: PointSet = field(default_factory=lambda: PointSet({"final": ("final",)}))
    frozen: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    """The parameters outside the trainable subset of each point with a whole model of its own
    (and theta's, under "final"); empty when every point shares theta's bottom."""
    _at: str | None = field(default=None, init=False, repr=False)  # the point of the open `at` body
    _bottom: str = field(default="final", init=False, repr=False)  # whose frozen parameters the model holds

    def bottom(self, point: str) -> str:
        """The point whose bottom (frozen prefix) ``point`` runs on: its own, else theta's."""
        return point if point in self.frozen else "final"

    def own_bottoms(self) -> list[str]:
        """The points with a bottom of their own (an imported model's checkpoints)."""
        return [p for p in self.frozen if p != "final"]

    def _set_bottom(self, point: str) -> str:
        """Point the parameters outside the trainable subset at ``point``'s bottom (no copy);
        returns the bottom they were at."""
        previous, wanted = self._bottom, self.bottom(point)
        if wanted != previous:
            params = dict(self.split.model.named_parameters())
            for name, tensor in self.frozen[wanted].items():
                params[name].data = tensor
            self._bottom = wanted
        return previous

    def use(self, point: str) -> None:
        """Load a parameter point into the model (a copy into its own tensors; a point with its own
        bottom brings that in too)."""
        if self._at is not None:
            raise RuntimeError(f"use({point!r}) inside at({self._at!r}) would write into that stored point")
        self.split.load_state(self.points[point])
        self._set_bottom(point)

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
        bottom = self._set_bottom(point)
        try:
            for name, p in params.items():
                p.data = stored[name]
            yield
        finally:
            changed = [name for name, p in params.items() if p._version != versions[name]]
            for name, p in params.items():
                p.data = own[name]
            self._set_bottom(bottom)
            self._at = None
        if changed:
            raise RuntimeError(f"stored point {point!r} was changed in place inside at(): {changed[:3]}")

    def encode(self, aspect: str, text: str) -> Encoded:
        return encode_pairs(self.tokenizer, [(aspect, text)], self.max_length)[0]


def load_point(ws: Workspace, point: str, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """One point's trainable tensors; errors name the file and the command that rebuilds it."""
    known = PointSet.from_manifest(ws.manifest()).names()
    if point not in known:
        raise ValueError(f"unknown parameter point {point!r}; {ws.root} has {', '.join(known)}")
    path = ws.root / "model" / f"{point}.safetensors"
    redo = f"run `python -m core prepare --workspace {ws.root}` with its settings to rebuild it"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing (the manifest lists {point}); {redo}")
    try:
        return {k: v.to(device) for k, v in load_params(path).items()}
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise ValueError(f"{path}: unreadable ({err}); {redo}") from None


def point_folders(manifest: Manifest) -> dict[str, Path]:
    """The model folders of the points with a whole model of their own (an imported model's
    checkpoints), by point."""
    return {r["point"]: Path(r["folder"]) for r in manifest.stages.get("model", {}).get("checkpoints", [])
            if r.get("folder")}


def _own_bottoms(manifest: Manifest, split: SplitModel, device: torch.device) -> dict[str, dict[str, torch.Tensor]]:
    """The parameters outside the trainable subset of theta and of each point with its own model."""
    folders = point_folders(manifest)
    if not folders:
        return {}
    trainable = set(split.trainable)
    frozen = {"final": {n: p.data for n, p in split.model.named_parameters() if n not in trainable}}
    for point, folder in folders.items():
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} (the model of {point}) is missing: the workspace reads an imported "
                                    "model's checkpoints from its folder; put it back, or import the model again")
        model = load_classifier(str(folder), manifest.labels, manifest.settings["seed"]).to(device)
        frozen[point] = {n: p.data for n, p in model.named_parameters() if n not in trainable}
    return frozen


def unprepared(ws: Workspace) -> str:
    """What to do with a workspace whose ``prepare`` did not finish."""
    return (f"{ws.root} is not fully prepared (its prepare was interrupted or failed): run the same "
            "`python -m core prepare` command again; it resumes where it stopped")


def load_workspace_model(ws: Workspace, device: str | None = None) -> LoadedModel:
    """Load the classifier and every parameter point the manifest lists."""
    manifest = ws.manifest()
    if not manifest.prepared():
        raise FileNotFoundError(unprepared(ws))
    settings = manifest.settings
    dev = pick_device(device)
    model, tokenizer = load_backbone(settings["model"], manifest.labels, settings["seed"])
    split = split_model(model.to(dev), settings["trainable_layers"])
    point_set = PointSet.from_manifest(manifest)
    points = {name: load_point(ws, name, dev) for name in point_set.names()}
    loaded = LoadedModel(split, tokenizer, list(manifest.labels), points, dev, settings["max_length"], point_set,
                         _own_bottoms(manifest, split, dev))
    loaded.use("final")
    return loaded
