"""Cost of a corrected training span: patching the index against building it.

Copies a prepared workspace (its store left out), opens it and loads its model and index
(not timed), then corrects the span of ``--count`` training instances through
``Backend.annotate_span`` and undoes them through ``Backend.undo_span_annotation``.

What is timed: the ``annotate_span`` calls, which now patch the index immediately (each call
records the verdict, drops the cached results it affects and patches that instance's rows:
the masked prefix states, the span rows at every point and emb(x_-ij)), so ``patch_seconds`` is
their total over the ``--count`` corrections, one patch per correction; ``undo_seconds`` is the
total of the ``undo_span_annotation`` calls, each patching the original span back in. Prints
JSON with the index's own build time beside it.

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
    parser.add_argument("--count", type=int, default=1, help="training spans corrected, one annotation each")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=Path(args.workspace).parent) as tmp:
        root = Path(tmp) / "ws"
        shutil.copytree(args.workspace, root, ignore=shutil.ignore_patterns("store.sqlite*", "evaluation", "train"))
        backend = Backend(root)
        _ = backend.loaded, backend.index  # the model and the copied index, loaded (not timed)
        rows = backend.instances("train")[: args.count]
        started = time.perf_counter()
        for row in rows:  # each call patches the index
            backend.annotate_span(row.id, "fix", "benchmark", (0, max(1, min(len(row.text), 8))))
        patch_s = time.perf_counter() - started
        index = backend.index
        if len(index.meta.get("overrides", {})) != len(rows):  # the timed calls must have done the patch
            raise RuntimeError(f"annotate_span left {index.meta.get('overrides')} in the index, not {len(rows)} spans")
        started = time.perf_counter()
        for _ in rows:
            backend.undo_span_annotation("benchmark")
        undo_s = time.perf_counter() - started
        if backend.index.meta.get("overrides"):
            raise RuntimeError(f"undo_span_annotation left {backend.index.meta['overrides']} in the index")
        print(json.dumps({"workspace": args.workspace, "train": len(backend.train_ids), "corrected": len(rows),
                          "points": len(index.points), "patch_seconds": round(patch_s, 2),
                          "undo_seconds": round(undo_s, 2), "index_build_seconds": index.meta["seconds"],
                          "peak_rss_mib": peak_rss_mib()}, indent=2))


if __name__ == "__main__":
    main()
