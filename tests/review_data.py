"""Small synthetic review datasets written as JSONL, and the settings of a seconds-long ``prepare``
on them, for tests."""
from __future__ import annotations

import json
from pathlib import Path

from core.prepare_settings import PrepareSettings

FOODS = ["pasta", "soup", "bread", "salad", "pizza", "curry"]


def reviews(n: int, *, split: bool = True, labels: tuple[str, ...] = ("positive", "negative"), filler: int = 0) -> list[dict]:
    """``n`` short reviews (texts differ); with ``split``, 70/15/15 train/dev/test by position;
    ``filler`` sentences of three words go first, to push the aspect's span past a token limit."""
    rows = []
    for i in range(n):
        food, label = FOODS[i % len(FOODS)], labels[i % len(labels)]
        words = [f"the {food} was", "good" if label == "positive" else "bad", f"at table {i}"]
        text = " ".join(words) if not filler else " ".join(["we came late"] * filler) + ". " + " ".join(words)
        row = {"text": text, "aspect": food, "label": label}
        if split:
            row["split"] = "train" if i < 0.7 * n else "dev" if i < 0.85 * n else "test"
        rows.append(row)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def small_settings(dataset: Path, backbone: Path, **overrides) -> PrepareSettings:
    values = {"dataset": str(dataset), "model": str(backbone), "epochs": 2, "batch_size": 4, "lr": 1e-3,
              "checkpoints": 1, "variants": 1, "max_length": 32, "device": "cpu"}
    return PrepareSettings(**{**values, **overrides})
