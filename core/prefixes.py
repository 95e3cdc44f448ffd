"""The training inputs' frozen-prefix caches, whole and span-masked, on each bottom.

Every parameter point of a workspace prepared here runs on theta's bottom, so one pair of caches
serves them all: ``prefix/train.safetensors`` (made by ``prepare``) and
``index/prefix-masked.safetensors`` (made with the index: the spans in use masked). The
checkpoints of an imported model have bottoms of their own (:mod:`core.points`), and so caches
of their own: ``prefix/train.<point>.safetensors`` (made by ``import``) and
``index/prefix-masked.<point>.safetensors``. :class:`TrainPrefixes` hands out a point's pair,
holding one bottom's in memory at a time.
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

from .model import Encoded, HiddenCache, compute_prefix
from .points import LoadedModel
from .workspace import Workspace


def prefix_path(folder: Path, name: str, bottom: str) -> Path:
    """The cache file ``name`` of a bottom (``final``: theta's, shared by every other point)."""
    return folder / (f"{name}.safetensors" if bottom == "final" else f"{name}.{bottom}.safetensors")


class TrainPrefixes:
    """A workspace's training caches by point. ``masked_inputs`` gives the span-masked encodings
    of the training rows, for a masked cache that is missing (None: a missing one is an error
    naming the command that rebuilds it)."""

    def __init__(self, ws: Workspace, loaded: LoadedModel, masked_inputs: Callable[[], list[Encoded]] | None = None,
                 *, progress: bool = False):
        self.ws, self.loaded, self.masked_inputs, self.progress = ws, loaded, masked_inputs, progress
        self._held: tuple[str, HiddenCache, HiddenCache] | None = None

    def bottoms(self) -> list[str]:
        """Theta's bottom, then the points with their own."""
        return ["final", *self.loaded.own_bottoms()]

    def pair(self, point: str) -> tuple[HiddenCache, HiddenCache]:
        """The whole and span-masked caches of the training inputs on ``point``'s bottom."""
        bottom = self.loaded.bottom(point)
        if self._held is None or self._held[0] != bottom:
            self._held = None  # let the other bottom's go first
            full = HiddenCache.load(prefix_path(self.ws.root / "prefix", "train", bottom))
            self._held = (bottom, full, self._masked(bottom))
        return self._held[1], self._held[2]

    def _run(self, bottom: str, encodings: list[Encoded], desc: str) -> HiddenCache:
        """The bottom's frozen-prefix states of ``encodings``."""
        with self.loaded.at(bottom) if bottom != "final" else nullcontext():
            return compute_prefix(self.loaded.split, encodings, self.loaded.tokenizer.pad_token_id,
                                  device=self.loaded.device, desc=desc, progress=self.progress)

    def _masked(self, bottom: str) -> HiddenCache:
        path = prefix_path(self.ws.root / "index", "prefix-masked", bottom)
        if path.exists() or self.masked_inputs is None:
            return HiddenCache.load(path)
        suffix = "" if bottom == "final" else f" at {bottom}"
        cache = self._run(bottom, self.masked_inputs(), f"frozen prefix (masked spans{suffix})")
        cache.save(path)  # a fresh index: the overrides go in from the start
        return cache

    def patch(self, where: list[int], encodings: list[Encoded]) -> None:
        """Replace the masked states of the rows ``where`` by those of ``encodings`` on every
        bottom (each cache saved as a new file: readers keep theirs)."""
        for bottom in self.bottoms():
            path = prefix_path(self.ws.root / "index", "prefix-masked", bottom)
            cache = HiddenCache.load(path)
            for n, state in zip(where, self._run(bottom, encodings, "frozen prefix (patch)").states):
                cache.states[n] = state
            cache.save(path)
        self._held = None
