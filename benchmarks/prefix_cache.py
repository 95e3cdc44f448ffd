"""Frozen-prefix cache: one training epoch with the cache against the same epoch without it.

Side by side in one run, on the same MAMS training slice, batches and seeds:

* ``cached``: the frozen layers run once (timed separately), each step runs only the top;
* ``uncached``: each step runs the whole model (frozen layers without autograd) - what
  training costs without the cache.

The two models train step by step in turn (interleaved), so load on the machine falls on both.

Prints JSON: seconds per epoch for each, their ratio, the one-off prefix time, and the ratio
amortised over the demo preset's epochs.

    python benchmarks/prefix_cache.py --limit 1000
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from core.data import load_dataset  # noqa: E402
from core.model import (  # noqa: E402,F401
    collate,
    compute_prefix,
    encode_pairs,
    length_batches,
    load_backbone,
    split_model,
    top_forward,
)
from core.prepare import select  # noqa: E402
from core.prepare_settings import PrepareSettings  # noqa: E402


class Trainer:
    """One model and its AdamW optimiser; ``step`` times one training step."""

    def __init__(self, settings: PrepareSettings, labels_names, forward):
        model, self.tok = load_backbone(settings.model, labels_names, 0)
        self.model, self.split = model, split_model(model, settings.trainable_layers)
        self.split.top.train()
        self.optimizer = torch.optim.AdamW(list(self.split.top_params().values()), lr=5e-4, weight_decay=0.01)
        self.forward = forward
        self.seconds = 0.0

    def step(self, idx, labels) -> None:
        started = time.perf_counter()
        loss = nn.functional.cross_entropy(self.forward(self, idx), labels[idx])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.seconds += time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--limit", type=int, default=1000, help="MAMS training instances")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    settings = PrepareSettings()
    data = load_dataset("mams", args.data_dir)
    rows = select(data.splits["train"], args.limit, 0)
    cached = Trainer(settings, data.labels, lambda t, idx: top_forward(t.split, *cache.batch(idx)))
    uncached = Trainer(settings, data.labels,
                       lambda t, idx: t.model(**collate([encoded[i] for i in idx], t.tok.pad_token_id)).logits)
    tok = cached.tok
    encoded = encode_pairs(tok, [(r.aspect, r.text) for r in rows], settings.max_length)
    labels = torch.tensor([data.labels.index(r.label) for r in rows])
    batches = length_batches([len(e) for e in encoded], args.batch_size, shuffle=True, seed=0)

    started = time.perf_counter()
    cache = compute_prefix(cached.split, encoded, tok.pad_token_id, progress=False)
    prefix_seconds = time.perf_counter() - started

    # interleaved step by step, so a change in machine load hits both sides alike
    torch.manual_seed(0)
    for idx in batches:
        cached.step(idx, labels)
        uncached.step(idx, labels)
    results = {"cached": cached.seconds, "uncached": uncached.seconds}
    epochs = settings.epochs
    print(json.dumps({
        "instances": len(rows), "batch_size": args.batch_size, "threads": torch.get_num_threads(),
        "epoch_seconds_cached": round(results["cached"], 2),
        "epoch_seconds_uncached": round(results["uncached"], 2),
        "speedup_per_epoch": round(results["uncached"] / results["cached"], 2),
        "prefix_seconds_once": round(prefix_seconds, 2),
        "demo_epochs": epochs,
        "speedup_amortised": round(epochs * results["uncached"] / (prefix_seconds + epochs * results["cached"]), 2),
    }, indent=2))


if __name__ == "__main__":
    main()
