"""Phase 3: Ral, the test accuracy lost by retraining without the top p % of each method's
ranking (scores summed over phase 1's tests), against a retrain on the unchanged training set;
a random removal of the same size is the baseline. Equal removal sets share one retrain, and
results are cached per removed set, so an interrupted run resumes."""
from __future__ import annotations

import shutil
import time
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .. import metrics
from ..engine import TestInput
from ..model import HiddenCache, Params, SplitModel, load_backbone, predict, split_model
from ..parallel import forget, mapper, worker_cache
from ..training import TrainConfig, accuracy, train
from ..workspace import fingerprint
from .context import Evaluation
from .saglag import decode_scores

if TYPE_CHECKING:
    from ..backend import Backend


def initial_state(settings: dict, labels: list[str]) -> Params:
    """The trainable subset before training, as ``prepare`` starts it (same backbone and seed)."""
    model, _ = load_backbone(settings["model"], labels, settings["seed"])
    return split_model(model, settings["trainable_layers"]).state()


def retrain_accuracy(split: SplitModel, init: Params, train_cache: HiddenCache, train_labels: torch.Tensor,
                     keep: Iterable[int], dev: tuple[HiddenCache, torch.Tensor],
                     test: tuple[HiddenCache, torch.Tensor], cfg: TrainConfig, work_dir: Path, *,
                     device: torch.device | str = "cpu", progress: bool = False) -> float:
    """Test accuracy after training the trainable subset from ``init`` on the kept training rows.

    Resumable in ``work_dir`` (see :func:`core.training.train`); leaves the split at the best epoch.
    """
    keep = [int(i) for i in keep]
    split.load_state(init)
    subset = HiddenCache([train_cache.states[i] for i in keep])
    train(split, subset, train_labels[keep], dev[0], dev[1], cfg, out_dir=work_dir, device=device, progress=progress)
    return accuracy(predict(split, test[0], device=device), test[1])


def split_cache(backend: "Backend", split: str) -> tuple[HiddenCache, torch.Tensor]:
    """The frozen-prefix states and gold labels of a split."""
    cache = HiddenCache.load(backend.ws.root / "prefix" / f"{split}.safetensors")
    labels = backend.manifest.labels
    return cache, torch.tensor([labels.index(r.label) for r in backend.instances(split)])


def _key(ev: Evaluation, cfg: TrainConfig, removed: np.ndarray) -> str:
    return "eval:ral:" + fingerprint(ev.backend.fingerprint, asdict(cfg), removed.tolist())


def ral(ev: Evaluation, tests: list[TestInput]) -> pd.DataFrame:
    """Accuracy lost by retraining without the top p % of each method's combined ranking."""
    s = ev.settings
    cfg = TrainConfig.from_settings(ev.backend.manifest.settings)
    jobs: list[tuple[str, int | None, float, np.ndarray]] = [("unchanged", None, 0.0, np.array([], dtype=np.int64))]
    for m in ev.reported:
        rows = ev.store.eval_rows(ev.scores_key(m))
        ranking = metrics.combined_ranking(np.stack([decode_scores(rows[t.id]["scores"]) for t in tests]))
        jobs += [(m.name, None, p, metrics.top_removal(ranking, p)) for p in s.ral]
    for p in s.ral:
        jobs += [("random", r, p, metrics.random_removal(ev.n, p, s.seed + r)) for r in range(s.ral_random_seeds)]
    keys = [_key(ev, cfg, removed) for *_, removed in jobs]
    unique = {key: removed for key, (*_, removed) in zip(keys, jobs)}  # equal sets share one retrain
    todo = [removed for key, removed in unique.items() if not ev.store.eval_rows(key)]
    if todo:
        _retrain(ev, cfg, todo)
    test_cache, test_labels = split_cache(ev.backend, "test")
    loaded = ev.backend.loaded
    with torch.no_grad(), loaded.at("final"):
        theta_acc = accuracy(predict(loaded.split, test_cache, device=loaded.device), test_labels)
    results = [ev.store.eval_rows(key)["result"] for key in keys]
    base = results[0]["accuracy"]
    return pd.DataFrame([
        {"method": name, "draw": draw, "percent": p, "removed": r["removed"], "accuracy": r["accuracy"],
         "baseline_accuracy": base, "theta_accuracy": theta_acc, "ral": base - r["accuracy"], "seconds": r["seconds"],
         "retrain": key.split(":")[-1][:12]}
        for (name, draw, p, _), r, key in zip(jobs, results, keys)
    ])


def _retrain(ev: Evaluation, cfg: TrainConfig, removals: list[np.ndarray]) -> None:
    """Retrain without each removed set (resumable per set; as Ray tasks with ``--ray``) and
    store the test accuracy."""
    backend = ev.backend
    per_run = backend.manifest.stages.get("model", {}).get("timings", {}).get("train")
    guess = f", each about as long as the workspace's own training ({per_run:.0f} s)" if per_run else ""
    ev.log(f"[evaluate] Ral: {len(removals)} retrain(s) of the trainable subset{guess}")
    started = time.perf_counter()
    bar = tqdm(total=len(removals), desc="Ral retrains", unit="run", disable=not ev.progress)
    args = (str(backend.ws.root), str(ev.out_dir), asdict(cfg), removals)
    worker_cache(("ral", args[0]), lambda: backend)  # in this process, tasks use this backend's model
    try:
        with mapper(ev.settings.ray) as pool:
            for done, (r, (accuracy_, seconds)) in enumerate(pool.map(_ral_task, range(len(removals)), *args), 1):
                ev.store.put_eval_row(_key(ev, cfg, removals[r]), "result",
                                      {"accuracy": accuracy_, "removed": int(len(removals[r])), "seconds": seconds})
                bar.update(1)
                ev.phases.report("Ral retrains", done, len(removals), "retrains")
    finally:
        bar.close()
        forget(("ral", args[0]))
    shutil.rmtree(ev.out_dir / "ral-train", ignore_errors=True)
    ev.timings["ral_seconds"] = round(time.perf_counter() - started, 1)


def _ral_task(r: int, ws_root: str, out_dir: str, cfg: dict, removals: list[np.ndarray]) -> tuple[float, float]:
    """One Ral retrain: (test accuracy, seconds); the workspace opened once per process, its model
    back at theta afterwards."""
    from ..backend import Backend

    backend = worker_cache(("ral", ws_root), lambda: Backend(ws_root))
    init = worker_cache(("ral-init", ws_root), lambda: initial_state(backend.manifest.settings,
                                                                      list(backend.manifest.labels)))
    train_cache, train_labels = backend.train_cache()
    removed = removals[r]
    work = Path(out_dir) / "ral-train" / fingerprint(cfg, removed.tolist())
    started = time.perf_counter()
    keep = np.setdiff1d(np.arange(len(train_labels)), removed)
    try:
        acc = retrain_accuracy(backend.loaded.split, init, train_cache, train_labels, keep, split_cache(backend, "dev"),
                               split_cache(backend, "test"), TrainConfig(**cfg), work, device=backend.loaded.device)
    finally:
        backend.loaded.use("final")
    shutil.rmtree(work, ignore_errors=True)
    return acc, round(time.perf_counter() - started, 1)
