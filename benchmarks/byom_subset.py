"""How much does ``--trainable-layers N`` change the explanations of a fully fine-tuned model?

An imported model was fine-tuned in full, but SpanLens takes gradients with respect to a subset
of its parameters only: the last N encoder layers, the pooler and the head (``import
--trainable-layers N``, default 2), every other parameter held at each point's own value. This
measures what that choice does to the scores, against N = every encoder layer (the word,
position and type embeddings stay out of the subset in both).

The model: the packaged all-MiniLM-L6-v2 (6 layers, 384 wide), fine-tuned in full with
``transformers.Trainer`` (AdamW, linear decay, every parameter trained, batch 16) on a seeded
slice of MAMS (``--finetune-rows`` training instances, (aspect, text) pairs, ``--max-length``
tokens), a checkpoint every ``--save-steps`` steps; ``--eval`` dev and ``--eval`` test
instances. That folder is imported twice, with N = ``--layers`` and N = all, explaining a
seeded ``--train`` of its training instances (``import --train-limit``: the same ones in
both), each workspace indexed with the same CountSketch (``--dim``, seed 0); checkpoints,
variants (3, one AdamW step of the subset at lr 1e-4) and the fast inverse are SpanLens's
defaults. For ``--tests`` seeded test instances (gold labels), each method's scores over the
training set are compared between the two workspaces: per test, the Spearman correlation
(x100) and the top-10 overlap (%); reported as the mean over tests with its 95%
percentile-bootstrap interval (core.stats.bootstrap_ci; a test whose scores are constant is
left out and counted). ``top10_chance`` is the overlap of two random rankings.

For scale, ``sketch_only``: the same comparison between two indexes of the N = ``--layers``
workspace that differ only in the sketch's seed (0 and 1): how far the scores move from the
sketch alone. A ``subset_vs_all`` figure near it says the subset costs little beyond the sketch.

What would make it misleading: a 6-layer model (a deeper model holds more of its fine-tuning
below its last 2 layers); a short fine-tuning on a small slice; few explained rows (Spearman
and the top-10 over 64 rows are coarse: ``top10_chance``); the sketch reference is taken at
N = ``--layers`` (at N = all the sketch folds about 3x more parameters into the same d, so its
own noise there may be larger); the variants of TracInF/TracIn+/TracIn++ are one step of the
subset from theta, so they differ between the two workspaces by construction (part of what N
means).

Prints JSON. ``python benchmarks/byom_subset.py`` (22 minutes on 2 CPU cores shared with
other jobs: 9 of them fine-tuning, 6 the N = all index)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import Backend, gold_tests, peak_rss_mib
from scipy.stats import spearmanr

from core.backend import index_workspace
from core.data import load_dataset
from core.importing import ImportSettings, import_model
from core.index import IndexSettings
from core.metrics import top_k_overlap
from core.model import load_backbone
from core.registry import METHODS
from core.stats import bootstrap_ci
from core.workspace import Workspace

MAMS_LABELS = ["negative", "neutral", "positive"]
METHOD_NAMES = ("TracIn", "TracInF", "TracIn+", "TracIn++", "IF", "IF++", "GroundTruth")
TOP = 10
BATCH = 16
QUIET = dict(progress=False, log=lambda _: None)


def data_slice(data_dir: str | None, n_train: int, n_eval: int, seed: int, out: Path) -> list[dict]:
    """A seeded slice of MAMS written to ``out`` as JSONL (text, aspect, from, to, label, split)."""
    dataset = load_dataset("mams", data_dir)
    rng = random.Random(seed)
    rows = []
    for split, n in (("train", n_train), ("dev", n_eval), ("test", n_eval)):  # n_train: those fine-tuned on
        for i in sorted(rng.sample(range(len(dataset.splits[split])), n)):
            inst = dataset.splits[split][i]
            rows.append({"text": inst.text, "aspect": inst.aspect, "from": inst.start, "to": inst.end,
                         "label": inst.label, "split": split})
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def finetune(rows: list[dict], folder: Path, args: argparse.Namespace) -> None:
    """Fine-tune every parameter of MiniLM on the training rows with ``transformers.Trainer``
    (a checkpoint every ``--save-steps``); save the model and its tokenizer to ``folder``."""
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    model, tok = load_backbone(None, MAMS_LABELS, args.seed)
    model.train()
    train = [dict(tok(r["aspect"], r["text"], truncation=True, max_length=args.max_length),
                  labels=MAMS_LABELS.index(r["label"])) for r in rows if r["split"] == "train"]
    settings = TrainingArguments(output_dir=str(folder), per_device_train_batch_size=BATCH, max_steps=args.steps,
                                 save_steps=args.save_steps, logging_steps=1, learning_rate=args.lr,
                                 lr_scheduler_type="linear", weight_decay=0.01, report_to=[], use_cpu=True,
                                 seed=args.seed, save_only_model=True, disable_tqdm=True, dataloader_num_workers=0)
    with contextlib.redirect_stdout(sys.stderr):  # the Trainer prints its logs; stdout is the JSON
        Trainer(model=model, args=settings, train_dataset=train, data_collator=DataCollatorWithPadding(tok)).train()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


def index(ws: Path, dim: int, seed: int) -> float:
    """Build the workspace's index (CountSketch of ``dim``, ``seed``); seconds."""
    started = time.perf_counter()
    index_workspace(Workspace(ws), IndexSettings(dim=dim, seed=seed), device="cpu", **QUIET)
    return round(time.perf_counter() - started, 1)


def all_scores(ws: Path, n_tests: int, seed: int) -> tuple[dict[str, np.ndarray], list[str], dict]:
    """Every method's scores (tests x training rows) on the workspace, its training ids, and
    facts about its model (trainable parameters, accuracy)."""
    backend = Backend(ws, device="cpu")
    records = backend.instances("test")
    tests = gold_tests(backend, random.Random(seed).sample(records, min(n_tests, len(records))))
    found = backend.engine().scores_many(tests, [METHODS.resolve(name) for name in METHOD_NAMES])
    results = backend.manifest.results
    facts = {"trainable_parameters": sum(p.numel() for p in backend.loaded.split.top.parameters() if p.requires_grad),
             "dev_accuracy": round(results["dev_accuracy"], 3), "test_accuracy": round(results["test_accuracy"], 3)}
    return {name: s.values.double().numpy() for name, s in found.items()}, list(backend.train_ids), facts


def compare(a: np.ndarray, b: np.ndarray, ids: list[str], seed: int) -> dict:
    """Per-test Spearman x100 and top-10 overlap (%) of two score matrices: means, 95% intervals."""
    rho, overlap = [], []
    for x, y in zip(a, b):
        rho.append(float("nan") if np.ptp(x) == 0 or np.ptp(y) == 0 else 100 * spearmanr(x, y).statistic)
        ranked = [[ids[i] for i in np.argsort(-s, kind="stable")] for s in (x, y)]
        overlap.append(100 * top_k_overlap(*ranked, TOP))
    out: dict = {}
    for name, values in (("spearman", rho), (f"top{TOP}_overlap", overlap)):
        mean, low, high = bootstrap_ci(values, seed=seed)
        out[name] = {"mean": round(mean, 1), "ci95": [round(low, 1), round(high, 1)]}
    out["nan_tests"] = int(np.isnan(rho).sum())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", help="holds mams-atsa/ (default: $SPANLENS_DATA or ../shared/data)")
    parser.add_argument("--finetune-rows", type=int, default=512)
    parser.add_argument("--train", type=int, default=64)
    parser.add_argument("--eval", type=int, default=60)
    parser.add_argument("--tests", type=int, default=16)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--save-steps", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", help="folder for the model and the workspaces (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        data, folder = work / "mams-slice.jsonl", work / "model"
        rows = data_slice(args.data_dir, args.finetune_rows, args.eval, args.seed, data)
        started = time.perf_counter()
        finetune(rows, folder, args)
        seconds: dict = {"finetune": round(time.perf_counter() - started, 1)}
        n_all = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
        scores, ids, facts = {}, {}, {}
        for name, layers in (("subset", args.layers), ("all", n_all)):
            started = time.perf_counter()
            import_model(ImportSettings(model=str(folder), dataset=str(data), trainable_layers=layers,
                                        train_limit=args.train, max_length=args.max_length, seed=args.seed,
                                        device="cpu"), work / name, **QUIET)
            seconds[name] = {"import": round(time.perf_counter() - started, 1), "index": index(work / name, args.dim, 0)}
            scores[name], ids[name], facts[name] = all_scores(work / name, args.tests, args.seed)
        reseeded = work / "subset-sketch-seed-1"  # the subset's workspace, its index sketched with another seed
        shutil.copytree(work / "subset", reseeded, ignore=shutil.ignore_patterns("index", "store.sqlite*"))
        seconds["subset_sketch_seed_1"] = {"index": index(reseeded, args.dim, 1)}
        scores["reseeded"], ids["reseeded"], _ = all_scores(reseeded, args.tests, args.seed)
        if not ids["subset"] == ids["all"] == ids["reseeded"]:
            raise RuntimeError("the workspaces' training sets differ")
        train_ids = ids["all"]
        out = {
            "model": "all-MiniLM-L6-v2 (packaged), every parameter fine-tuned by transformers.Trainer",
            "data": {"dataset": "MAMS ATSA", "finetuned_on": args.finetune_rows, "explained_train": args.train,
                     "dev": args.eval, "test": args.eval, "seed": args.seed, "max_length": args.max_length},
            "finetune": {"steps": args.steps, "batch": BATCH, "lr": args.lr, "checkpoint_every": args.save_steps},
            "d": args.dim, "sketch_seed": 0, "tests": args.tests, "layers": {"subset": args.layers, "all": n_all},
            "accuracy": {k: facts["all"][k] for k in ("dev_accuracy", "test_accuracy")},
            "trainable_parameters": {k: facts[k]["trainable_parameters"] for k in ("subset", "all")},
            "units": {"spearman": "x 100, mean over tests", f"top{TOP}_overlap": "%, mean over tests"},
            f"top{TOP}_chance": round(100 * TOP / len(train_ids), 1),
            "subset_vs_all": {m: compare(scores["subset"][m], scores["all"][m], train_ids, args.seed)
                              for m in METHOD_NAMES},
            "sketch_only": {m: compare(scores["reseeded"][m], scores["subset"][m], train_ids, args.seed)
                            for m in METHOD_NAMES},
            "seconds": seconds, "peak_rss_mib": peak_rss_mib(),
        }
        print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
