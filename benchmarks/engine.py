"""Speed of the explanation engine on a prepared workspace, side by side in one run.

* index build rate: batched, sketched per-example gradients on the frozen-prefix cache
  against a plain per-example backward loop on the whole model (same instances, same point,
  same sketch), in training instances per second; each side makes the index's two rows of an
  instance, the sketches of g(z) and of g(z) - g(z_-ij);
* query latency p50 per method in fast mode with the index built (every registered method but
  Control, which costs what TracIn++ costs);
* IF++ with LiSSA at the paper's settings (depth up to 1000, early stop);
* captum's TracInCP against ours on the same checkpoints, training subset and queries:
  seconds per query, index build + first query, and Spearman of the rankings (ours exact);
* peak memory and the index size on disk.

The test inputs explain their gold labels. Prints JSON. ``python benchmarks/engine.py --workspace workspaces/mams-full``
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch
from common import Backend, engine_over, gold_tests, peak_rss_mib, subset_side
from torch import nn

from core.gradients import Projector
from core.ihvp import LissaSettings
from core.model import HiddenCache, collate, length_batches, mask_span
from core.registry import METHODS
from core.scoring import ScoreSettings
from core.training_rows import training_gradients

LATENCY_METHODS = [name for name in METHODS.names() if name != "Control"]
"""The methods whose query latency is reported: every registered method but Control (TracIn++ on
the checkpoints, the same cost as TracIn++), so the report keeps its eight keys."""


def build_rates(backend: Backend, rows: list[int], point: str, warm: int = 32) -> dict:
    """Instances per second: batched hooks on the cache vs a plain loop on the whole model.
    Each side first runs on ``warm`` other instances, untimed (allocation, thread start-up)."""
    loaded = backend.loaded
    settings = backend.index.settings
    projector = Projector(loaded.split, settings.dim, settings.seed, loaded.device)
    full, labels = backend.train_cache()
    masked = HiddenCache.load(backend.index.root / "prefix-masked.safetensors")
    tok, model = loaded.tokenizer, loaded.split.model
    params = loaded.split.top_params()
    train_rows = backend.instances("train")
    chosen = set(rows)
    others = [i for i in range(len(train_rows)) if i not in chosen][:warm]

    def batched(rows: list[int]) -> torch.Tensor:
        sub = lambda c: HiddenCache([c.states[i] for i in rows])  # noqa: E731
        return torch.cat([b.vectors["diff"] for b in training_gradients(
            loaded, projector, sub(full), sub(masked), labels[rows], point,
            length_batches([full.states[i].shape[0] for i in rows], settings.batch_size), kinds=("full", "diff"))])

    def plain(rows: list[int]) -> None:
        loaded.use(point)
        for i in rows:
            row = train_rows[i]
            enc = loaded.encode(row.aspect, row.text)
            span = row.span_pair  # the span in use, as the index masks it
            grads = []
            for e in (enc, mask_span(enc, *span, tok.mask_token_id) if span else enc):
                loss = nn.functional.cross_entropy(model(**collate([e], tok.pad_token_id)).logits, labels[i:i + 1])
                grads.append(dict(zip(params, torch.autograd.grad(loss, list(params.values())))))
            projector.project_params(grads[0])  # g(z) and e(z), as the index stores them
            projector.project_params({n: grads[0][n] - grads[1][n] for n in params})

    if others:
        batched(others)
    started = time.perf_counter()
    vectors = batched(rows)
    batched_s = time.perf_counter() - started
    plain(others)  # nothing when every instance is measured
    started = time.perf_counter()
    plain(rows)
    loop_s = time.perf_counter() - started
    loaded.use("final")
    return {"instances": len(rows), "point": point, "batched_per_s": round(len(rows) / batched_s, 1),
            "plain_loop_per_s": round(len(rows) / loop_s, 1), "speedup": round(loop_s / batched_s, 2),
            "warm_up_instances": len(others), "vectors_shape": list(vectors.shape)}


def query_latency(backend: Backend, tests, methods) -> dict:
    engine = backend.engine()
    engine.scores(tests[:1], METHODS.resolve("IF"))  # warm: index matrices in memory, inverse factorised
    for name in methods:
        engine.scores(tests[:1], METHODS.resolve(name))
    out = {}
    for name in methods:
        spec = METHODS.resolve(name)
        times = []
        for t in tests:
            started = time.perf_counter()
            engine.scores([t], spec)
            times.append(time.perf_counter() - started)
        out[name] = {"p50_ms": round(1000 * statistics.median(times), 1), "max_ms": round(1000 * max(times), 1)}
    return out


def lissa_run(backend: Backend, test) -> dict:
    started = time.perf_counter()
    scores = backend.engine().scores([test], METHODS.resolve("IF++"), ScoreSettings(ihvp="lissa", lissa=LissaSettings()))
    info = dict(scores.approx["ihvp"])
    info.pop("trace", None)
    return {"seconds": round(time.perf_counter() - started, 1), **info}


def captum_comparison(backend: Backend, rows: list[int], tests, batch_tests) -> dict:
    from captum.influence import TracInCP
    from scipy.stats import spearmanr

    from core.model import load_params

    loaded = backend.loaded
    split = loaded.split
    lrs = loaded.point_set.lrs
    full, labels = backend.train_cache()
    h, mask = HiddenCache([full.states[i] for i in rows]).batch(range(len(rows)))

    class Top(nn.Module):
        def __init__(self):
            super().__init__()
            self.top = split.top

        def forward(self, hs, m):
            return split.top(inputs_embeds=hs, attention_mask=m).logits

    def load(_model, path):
        from pathlib import Path

        split.load_state(load_params(Path(path)))
        return lrs[Path(path).stem]

    engine = backend.engine()
    cache = engine.test_batch(tests, masked=False).cache
    t_h, t_m = cache.batch(range(len(tests)))
    t_y = torch.tensor([loaded.labels.index(t.label) for t in tests])
    tracin = TracInCP(Top(), torch.utils.data.TensorDataset(h, mask, labels[rows]),
                      [str(backend.ws.point_path(p)) for p in lrs], checkpoints_load_func=load,
                      loss_fn=nn.CrossEntropyLoss(reduction="sum"), batch_size=32, sample_wise_grads_per_batch=True)
    started = time.perf_counter()
    theirs = tracin.influence((t_h, t_m, t_y))
    captum_s = (time.perf_counter() - started) / len(tests)
    loaded.use("final")

    spec = METHODS.resolve("TracIn")
    started = time.perf_counter()
    side, projector, build_s = subset_side(backend, rows, list(lrs), backend.index.settings.dim)
    ours_engine = engine_over(backend, side, projector)
    first = ours_engine.scores(tests[:1], spec)
    build_and_first = time.perf_counter() - started
    singles = []
    for _ in range(20):  # the median of many: single queries on a shared VM vary by ~20 %
        started = time.perf_counter()
        ours_engine.scores(tests[:1], spec)
        singles.append(time.perf_counter() - started)
    per_query = statistics.median(singles)
    started = time.perf_counter()
    ours_engine.scores(batch_tests, spec)
    per_query_batched = (time.perf_counter() - started) / len(batch_tests)
    ours = ours_engine.scores(tests, spec).values
    exact_side, exact_projector, _ = subset_side(backend, rows, [], None)
    exact = engine_over(backend, exact_side, exact_projector).scores(tests, spec).values
    rho = lambda a, b: round(float(sum(spearmanr(x, y).statistic for x, y in zip(a.numpy(), b.numpy())) / len(a)), 4)  # noqa: E731
    return {"train": len(rows), "checkpoints": len(lrs), "queries": len(tests),
            "captum_seconds_per_query": round(captum_s, 2), "ours_seconds_per_query": round(per_query, 4),
            "speedup_per_query": round(captum_s / per_query, 1),
            "ours_single_query_range": [round(min(singles), 4), round(max(singles), 4)],
            "ours_seconds_per_query_batched": round(per_query_batched, 4), "batched_queries": len(batch_tests),
            "speedup_per_query_batched": round(captum_s / per_query_batched, 1),
            "ours_index_build_seconds": round(build_s, 1), "ours_build_plus_first_query_seconds": round(build_and_first, 1),
            "spearman_exact_vs_captum": rho(exact.double(), theirs.double()),
            "spearman_projected_vs_captum": rho(ours.double(), theirs.double()), "first_query_ok": bool(first.values.numel())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", required=True)
    parser.add_argument("--build-sample", type=int, default=512)
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--captum-train", type=int, default=1000)
    parser.add_argument("--captum-queries", type=int, default=1)
    parser.add_argument("--skip", nargs="*", default=[], choices=["build", "latency", "lissa", "captum"])
    args = parser.parse_args()
    backend = Backend(args.workspace)
    rng = random.Random(0)
    tests = gold_tests(backend, rng.sample(backend.instances("test"), args.queries))
    out: dict = {"workspace": args.workspace, "train": len(backend.train_ids), "d": backend.index.meta["dim"],
                 "index_bytes": backend.index.size_bytes(), "index_build_seconds": backend.index.meta["seconds"]}
    if "build" not in args.skip:
        rows = sorted(rng.sample(range(len(backend.train_ids)), args.build_sample))
        out["build_rate"] = build_rates(backend, rows, "variant-1")
    if "latency" not in args.skip:
        out["query_latency_fast"] = query_latency(backend, tests, LATENCY_METHODS)
    if "lissa" not in args.skip:
        out["if_pp_lissa"] = lissa_run(backend, tests[0])
    if "captum" not in args.skip:
        rows = sorted(rng.sample(range(len(backend.train_ids)), args.captum_train))
        out["captum"] = captum_comparison(backend, rows, tests[: args.captum_queries], tests)
    out["peak_rss_mib"] = peak_rss_mib()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
