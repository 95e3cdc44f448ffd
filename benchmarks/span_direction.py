"""Which way the span's share of a training gradient points: cosine of e(z) = g(z) - g(z_-ij)
with g(z) over every training instance at theta (read from the built index, so in the sketch).

A negative cosine means masking the span pushes the loss gradient further the same way, so a
score that multiplies one e with one g (IF+, TracIn+) is negative for same-label pairs.

    python benchmarks/span_direction.py --workspace workspaces/sentihood-full
"""
from __future__ import annotations

import argparse
import json

import torch
from common import Backend


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", required=True)
    args = parser.parse_args()
    index = Backend(args.workspace).index
    g, e = index.matrix("final", "full"), index.matrix("final", "diff")
    cos = torch.nn.functional.cosine_similarity(g, e, dim=1)
    print(json.dumps({"workspace": args.workspace, "train": len(cos), "mean_cosine": round(float(cos.mean()), 4),
                      "median_cosine": round(float(cos.median()), 4),
                      "share_negative": round(float((cos < 0).float().mean()), 4)}, indent=2))


if __name__ == "__main__":
    main()
