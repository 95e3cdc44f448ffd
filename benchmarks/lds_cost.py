"""What LDS costs on this machine: one retrain per intervention, the scoring, and the projected
wall time of ``python -m core evaluate --lds``.

LDS and span-LDS (core/lds.py, core/evaluate/counterfactual.py) retrain the trainable subset
once per random subset and intervention: ``remove`` trains on the alpha N instances of the
subset, ``mask`` on all N instances with the subset's spans masked. This times such retrains
exactly as an evaluation runs them: ``core.lds.CacheRetrainer`` from
``core.evaluate.ral.initial_state`` with ``core.training.TrainConfig.from_settings`` (the workspace's
own epochs, batch size, learning rate and seed, choosing the best epoch on dev), measuring every
test instance of the split afterwards, in a temporary work folder (removed afterwards; the
workspace is only read). ``--repeats`` retrains per intervention (default 1) run on the first
of the ``--subsets`` (default 50) seeded subsets of share ``--alpha`` (default 0.5, as the CLI),
after one untimed warm-up retrain on a single batch of instances (first autograd passes, the
optimiser, thread pools: seconds that a real run pays once, not per retrain).

Then the scoring: every registered method the workspace can run (``Backend.check_methods``:
TRAK and EK-FAC need their artifacts; the others are listed under ``unavailable``), timed one
method at a time, in chunks of the evaluation's batch (16), on ``--tests`` test instances
(``core.evaluate.select_tests``, gold labels, fast inverse: ``evaluate``'s defaults). Each method's
time includes its first-call work (the inverse's factorisation, the index rows read), once, as
in a run.

Printed: seconds per retrain and retrains per hour per intervention; the fixed set-up of the
LDS phase (the initial state, the test instances' masked prefix states); the scoring seconds per
method; and the projection for M subsets: M retrains for each intervention some available
method is checked against (``kind_of``), plus the set-up and the scoring, with the shares spent
retraining and scoring.

What would make the result misleading: one retrain is one sample of a time that varies with the
machine's load (raise ``--repeats`` on a shared machine); ``remove`` retrains grow with alpha;
in a real ``evaluate`` run the scores are usually already stored by the Sag/Lag phase, so the LDS
phase itself scores nothing new and the projection counts the scoring once for the run; the
projection leaves out the other phases (Sag/Lag, faithfulness, Ral), the store's writes and
LiSSA (``--ihvp lissa`` scores far slower); a GPU machine changes the retrain/scoring balance.
No timing is asserted.

Prints JSON. ``python benchmarks/lds_cost.py --workspace workspaces/mams-full --tests 50 --subsets 50``
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import Backend, peak_rss_mib

from core.evaluate import EvalSettings, initial_state, select_tests
from core.evaluate.counterfactual import kind_of
from core.index import IndexUnavailable
from core.lds import (
    INTERVENTIONS,
    CachePair,
    CacheRetrainer,
    LdsSettings,
    sample_subsets,
)
from core.model import HiddenCache, compute_prefix, mask_span
from core.registry import METHODS
from core.scoring import ScoreSettings
from core.training import TrainConfig


def split_cache(backend: Backend, split: str) -> tuple[HiddenCache, torch.Tensor]:
    """Frozen-prefix states and gold labels of a split (as core.evaluate.ral.split_cache)."""
    cache = HiddenCache.load(backend.ws.root / "prefix" / f"{split}.safetensors")
    labels = backend.manifest.labels
    return cache, torch.tensor([labels.index(r.label) for r in backend.instances(split)])


def test_pair(backend: Backend) -> CachePair:
    """Every test instance, whole and with its span in use masked (as the LDS phase builds it)."""
    loaded, records = backend.loaded, backend.instances("test")
    tok = loaded.tokenizer
    masked = [mask_span(loaded.encode(r.aspect, r.text), *r.span_pair, tok.mask_token_id) if r.span
              else loaded.encode(r.aspect, r.text) for r in records]
    whole, labels = split_cache(backend, "test")
    return CachePair(whole, compute_prefix(loaded.split, masked, tok.pad_token_id, device=loaded.device,
                                           progress=False), labels)


def available_methods(backend: Backend) -> tuple[list, list[str]]:
    specs, missing = [], []
    for spec in METHODS:
        try:
            backend.check_methods([spec])
            specs.append(spec)
        except IndexUnavailable:
            missing.append(spec.name)
    return specs, missing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", required=True)
    parser.add_argument("--tests", type=int, default=50, help="test instances scored")
    parser.add_argument("--subsets", type=int, default=50, help="M, the subsets of the projected run")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=1, help="retrains timed per intervention")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip", nargs="*", default=[], choices=["retrain", "scoring"])
    args = parser.parse_args()
    backend = Backend(args.workspace)
    loaded, manifest = backend.loaded, backend.manifest
    specs, unavailable = available_methods(backend)
    needed = sorted({kind_of(s)[0] for s in specs}, reverse=True)
    cfg = TrainConfig.from_settings(manifest.settings)
    n = len(backend.train_ids)
    out: dict = {"workspace": args.workspace, "device": str(loaded.device), "train": n,
                 "train_config": {k: getattr(cfg, k) for k in ("epochs", "batch_size", "lr", "seed")},
                 "workspace_training_seconds": manifest.stages.get("model", {}).get("timings", {}).get("train"),
                 "methods": [s.name for s in specs], "unavailable": unavailable, "interventions_needed": needed}

    retrain: dict[str, float] = {}
    setup = 0.0
    if "retrain" not in args.skip:
        subsets = sample_subsets(n, LdsSettings(max(args.subsets, args.repeats, 2), args.alpha, args.seed))
        started = time.perf_counter()
        init = initial_state(manifest.settings, manifest.labels)
        pair = test_pair(backend)
        dev = split_cache(backend, "dev")
        full, labels = backend.train_cache()
        masked = HiddenCache.load(backend.index.root / "prefix-masked.safetensors")
        setup = time.perf_counter() - started
        out["lds_setup_seconds"] = round(setup, 2)
        with tempfile.TemporaryDirectory(prefix="lds-cost-") as work:
            retrainer = CacheRetrainer(loaded.split, init, CachePair(full, masked, labels), pair, dev, cfg, Path(work),
                                       device=loaded.device, progress=False)
            small = torch.zeros(n, dtype=torch.bool)
            small[: min(n - 1, cfg.batch_size)] = True  # one batch per epoch: warms autograd, the optimiser, threads
            started = time.perf_counter()
            retrainer(small.numpy(), "remove")
            out["warm_up_seconds"] = round(time.perf_counter() - started, 2)
            for intervention in INTERVENTIONS:
                times = []
                for r in range(args.repeats):
                    started = time.perf_counter()
                    retrainer(subsets[r], intervention)
                    times.append(time.perf_counter() - started)
                retrain[intervention] = statistics.median(times)
                trained_on = int(subsets[0].sum()) if intervention == "remove" else n
                out[f"retrain_{intervention}"] = {
                    "seconds": round(retrain[intervention], 2), "all_seconds": [round(t, 2) for t in times],
                    "trained_on": trained_on, "retrains_per_hour": round(3600 / retrain[intervention], 1),
                    "test_instances_measured": len(pair.labels)}
        loaded.use("final")

    scoring: dict[str, float] = {}
    if "scoring" not in args.skip:
        selection = select_tests(backend, args.tests, args.seed)
        tests = [backend.test_input(i, label="gold") for i in selection.ids]
        engine, size = backend.engine(), EvalSettings().batch
        for spec in specs:
            started = time.perf_counter()
            for s in range(0, len(tests), size):
                engine.scores(tests[s : s + size], spec, ScoreSettings())
            scoring[spec.name] = time.perf_counter() - started
        out["scoring"] = {"tests": len(tests), "chunk": size,
                          "seconds": {k: round(v, 2) for k, v in scoring.items()},
                          "total_seconds": round(sum(scoring.values()), 2)}

    if retrain and scoring:
        retraining = args.subsets * sum(retrain[i] for i in needed)
        scored = sum(scoring.values())
        total = retraining + scored + setup
        out["projection"] = {
            "subsets": args.subsets, "interventions": needed, "retrain_seconds": round(retraining, 1),
            "scoring_seconds": round(scored, 1), "setup_seconds": round(setup, 1), "total_seconds": round(total, 1),
            "total_hours": round(total / 3600, 2), "share_retraining": round(retraining / total, 4),
            "share_scoring": round(scored / total, 4)}
    out["peak_rss_mib"] = peak_rss_mib()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
