"""What a method needs beyond the default index, and the EK-FAC factors as a workspace artifact.

Most methods read the index's ``grad`` rows. TRAK and TRAK++ need its ``trak`` rows (a kind group
built on request), EKFAC and EKFAC++ the EK-FAC factors (``WS/ekfac/``) and the index's ``ekfac``
rows (the gradients in the factors' eigenbasis, so built after them). All are built only by the
``index`` (or ``prepare``) command with ``--with``; explaining refuses, with that command, when
they are missing. The factors are fitted at theta on the whole training inputs, so they depend on
the model stage alone (not on spans or the sketch); the fit resumes after an interruption
(:func:`core.ekfac.fit_ekfac`).
"""
from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable

from .ekfac import Eigenbasis, EkfacFactors, fit_ekfac
from .gradients import Basis
from .index import GradientIndex, IndexUnavailable, group_of
from .model import HiddenCache
from .points import load_workspace_model
from .registry import MethodSpec
from .representations import bases_of
from .workspace import Workspace, fingerprint, write_json_atomic

EXTRAS = ("trak", "ekfac")
"""What ``--with`` may add: the index's TRAK rows; the EK-FAC factors and the index's ``ekfac`` rows."""


def extras_for(specs: Iterable[MethodSpec]) -> list[str]:
    """The extras these methods need, in :data:`EXTRAS` order."""
    needed = set()
    for spec in specs:
        needed |= {group_of(kind) for kind in (spec.train, spec.test)} - {"grad"}
        if spec.inverse == "ekfac":
            needed.add("ekfac")
    return [e for e in EXTRAS if e in needed]


def check_extras(extras: Iterable[str]) -> list[str]:
    """``extras`` as a list; ValueError naming the choices for an unknown one."""
    extras = list(dict.fromkeys(extras))
    unknown = [e for e in extras if e not in EXTRAS]
    if unknown:
        raise ValueError(f"unknown --with {', '.join(unknown)}; choose from {', '.join(EXTRAS)}")
    return extras


def with_command(ws: Workspace, extras: Iterable[str]) -> str:
    return f"python -m core index --workspace {ws.root} --with {','.join(extras)}"


def _ekfac_fingerprint(ws: Workspace) -> str:
    return fingerprint("ekfac", ws.manifest().stages.get("model", {}).get("fingerprint"))


def factors_fingerprint(ws: Workspace) -> str | None:
    """The fingerprint of the workspace's EK-FAC factors (of the file's bytes, taken when they
    were fitted) when they are there for its current model; else None."""
    try:
        meta = json.loads((ws.root / "ekfac" / "meta.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    fresh = meta.get("fingerprint") == _ekfac_fingerprint(ws) and (ws.root / "ekfac" / "factors.safetensors").exists()
    return meta.get("factors") if fresh else None


def ekfac_ready(ws: Workspace) -> bool:
    """Whether the workspace has EK-FAC factors for its current model."""
    return factors_fingerprint(ws) is not None


def basis_fingerprints(ws: Workspace, kinds: Iterable[str]) -> dict[str, str | None]:
    """Per basis that rows of ``kinds`` are formed in, the fingerprint of its factors (None when
    missing): what an index records with the rows it forms there."""
    return {"ekfac": factors_fingerprint(ws)} if "ekfac" in bases_of(kinds) else {}


def open_ekfac(ws: Workspace) -> EkfacFactors:
    """The workspace's EK-FAC factors; IndexUnavailable with the command that builds them."""
    if not ekfac_ready(ws):
        raise IndexUnavailable(f"{ws.root / 'ekfac'}: no EK-FAC factors for the current model; build them with "
                               f"`{with_command(ws, ['ekfac'])}`")
    return EkfacFactors.load(ws.root / "ekfac" / "factors.safetensors")


def formed_with_current_factors(ws: Workspace, index: GradientIndex) -> bool:
    """Whether the index's rows formed in a basis (its ekfac rows) were formed with the factors
    the workspace has now (an index without such rows: True)."""
    return index.meta.get("basis_fps", {}) == basis_fingerprints(ws, index.kinds)


def bases_for(ws: Workspace, kinds: Iterable[str]) -> dict[str, Basis]:
    """The coordinates that rows of ``kinds`` are formed in (:class:`core.ekfac.Eigenbasis` for
    the ``ekfac`` kinds), from the workspace's artifacts; IndexUnavailable when they are missing."""
    return {"ekfac": Eigenbasis(open_ekfac(ws))} if "ekfac" in bases_of(kinds) else {}


def build_ekfac(ws: Workspace, *, device: str | None = None, batch_size: int = 32, progress: bool = True,
                log: Callable[[str], None] = print, on_progress: Callable[[float], None] | None = None) -> None:
    """Fit (or resume, or keep) the EK-FAC factors of the workspace's model at theta."""
    if ekfac_ready(ws):
        log("[ekfac] up to date")
        return
    folder = ws.dir("ekfac")
    started = time.perf_counter()
    loaded = load_workspace_model(ws, device)
    cache = HiddenCache.load(ws.root / "prefix" / "train.safetensors")
    factors = fit_ekfac(loaded.split, cache, batch_size=batch_size, device=loaded.device, work_dir=folder,
                        progress=progress, on_progress=on_progress)
    factors.save(folder / "factors.safetensors")
    seconds = round(time.perf_counter() - started, 1)
    digest = hashlib.sha256()
    with open(folder / "factors.safetensors", "rb") as saved:
        for chunk in iter(lambda: saved.read(1 << 24), b""):
            digest.update(chunk)
    write_json_atomic(folder / "meta.json", {"fingerprint": _ekfac_fingerprint(ws), "factors": digest.hexdigest()[:16],
                                             "seconds": seconds, "examples": factors.examples})
    (folder / "ekfac-partial.safetensors").unlink(missing_ok=True)
    log(f"[ekfac] fitted on {factors.examples} training instances in {seconds:.1f}s")
