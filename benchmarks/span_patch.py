"""Cost of a corrected training span: patching the index against building it.

Copies a prepared workspace (its store left out), corrects the span of ``--count`` training
instances through the Backend, and times the next use of the index (the patch), then the undo.
Prints JSON with the index's own build time beside it.

    python benchmarks/span_patch.py --workspace workspaces/sentihood-full --count 1
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from common import Backend, peak_rss_mib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", required=True)
    parser.add_argument("--count", type=int, default=1, help="training spans corrected at once")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=Path(args.workspace).parent) as tmp:
        root = Path(tmp) / "ws"
        shutil.copytree(args.workspace, root, ignore=shutil.ignore_patterns("store.sqlite*", "evaluation", "train"))
        backend = Backend(root)
        backend.index  # the copied index, loaded (not timed)
        rows = backend.instances("train")[: args.count]
        for row in rows:
            backend.annotate_span(row["id"], "fix", "benchmark", (0, max(1, min(len(row["text"]), 8))))
        started = time.perf_counter()
        index = backend.index
        patch_s = time.perf_counter() - started
        for _ in rows:
            backend.undo_span_annotation("benchmark")
        started = time.perf_counter()
        backend.index
        undo_s = time.perf_counter() - started
        print(json.dumps({"workspace": args.workspace, "train": len(backend.train_ids), "corrected": len(rows),
                          "points": len(index.points), "patch_seconds": round(patch_s, 2),
                          "undo_seconds": round(undo_s, 2), "index_build_seconds": index.meta["seconds"],
                          "peak_rss_mib": peak_rss_mib()}, indent=2))


if __name__ == "__main__":
    main()
