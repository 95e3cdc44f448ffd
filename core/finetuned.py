"""A fine-tuned model folder, as ``save_pretrained`` and ``transformers.Trainer`` write it: its
architecture, its labels, and the Trainer's checkpoints with their learning rates.

The folder holds ``config.json`` and the weights of an ``AutoModelForSequenceClassification``;
the Trainer adds ``checkpoint-<step>/`` folders, each a whole model with a ``trainer_state.json``
whose ``log_history`` records the learning rate at the logged steps. Only JSON files are read
here (never ``training_args.bin``, a pickle). An extractive question-answering folder (the RC
span model) is checked the same way.
"""
from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .model import architecture

WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
CHECKPOINT = re.compile(r"checkpoint-(\d+)")


@dataclass(frozen=True)
class Checkpoint:
    """A Trainer checkpoint: its folder, its step, and the learning rate logged for it (at its
    step, else the last one logged before it: ``lr_step``)."""

    folder: Path
    step: int
    lr: float
    lr_step: int


def read_config(folder: Path) -> dict:
    """The folder's ``config.json``; ValueError naming what is missing."""
    path = folder / "config.json"
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such model folder")
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: unreadable ({err}); give a folder written by save_pretrained") from None
    if not any((folder / name).exists() for name in WEIGHTS):
        raise ValueError(f"{folder}: no model weights ({', '.join(WEIGHTS)})")
    return config


def check_classifier(folder: Path) -> dict:
    """The config of a supported single-label sequence classifier; ValueError saying what is not."""
    config = read_config(folder)
    name = (config.get("architectures") or ["?"])[0]
    architecture(config.get("model_type", ""), name)
    if not name.endswith("ForSequenceClassification"):
        raise ValueError(f"{folder}: a {name}, not a sequence classifier (AutoModelForSequenceClassification)")
    if config.get("problem_type") not in (None, "single_label_classification") or len(model_labels(config)) < 2:
        raise ValueError(f"{folder}: a single-label classifier over two or more labels is needed (problem_type "
                         f"{config.get('problem_type')!r}, {len(config.get('id2label') or {})} labels)")
    return config


def check_qa_model(folder: Path) -> dict:
    """The config of an extractive question-answering model folder (the RC span model,
    ``AutoModelForQuestionAnswering``); ValueError saying what is not one."""
    config = read_config(folder)
    name = (config.get("architectures") or ["?"])[0]
    if not name.endswith("ForQuestionAnswering"):
        raise ValueError(f"{folder}: a {name}, not an extractive question-answering model "
                         "(AutoModelForQuestionAnswering, e.g. fine-tuned on SQuAD)")
    return config


def model_labels(config: dict) -> list[str]:
    """The model's labels in its output order, from ``id2label`` (lower case, as the data's)."""
    id2label = config.get("id2label") or {}
    labels = [str(id2label[k]).strip().lower() for k in sorted(id2label, key=int)]
    if len(set(labels)) < len(labels):
        raise ValueError(f"config.json id2label names a label twice (case-insensitively): {', '.join(labels)}")
    return labels


def match_labels(model: Sequence[str], data: Sequence[str], folder: Path) -> list[str]:
    """The workspace's labels - the model's, in its order - when every label of the data is one of
    them (case-insensitively); ValueError naming both sets otherwise."""
    extra = [label for label in data if label not in model]
    if extra:
        raise ValueError(f"the dataset's labels ({', '.join(data)}) do not match the model's ({', '.join(model)}, "
                         f"id2label in {folder / 'config.json'}): {', '.join(extra)} "
                         f"{'is' if len(extra) == 1 else 'are'} not among them; set id2label or relabel the data")
    return list(model)


def learning_rate(state: dict, step: int) -> tuple[float, int] | None:
    """(learning rate, the step it was logged at) at ``step`` in a ``trainer_state.json``'s log
    history, else the last one logged before it; None when none was."""
    logged = [(int(e["step"]), float(e["learning_rate"])) for e in state.get("log_history", [])
              if "learning_rate" in e and "step" in e and int(e["step"]) <= step]
    if not logged:
        return None
    at, lr = max(logged)
    return lr, at


def checkpoints(folder: Path, count: int, config: dict) -> tuple[list[Checkpoint], str | None]:
    """The last ``count`` Trainer checkpoints of ``folder`` (by step) with their learning rates;
    or none and the reason (no checkpoint folders, or no learning rate logged for one)."""
    found = sorted((int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := CHECKPOINT.fullmatch(p.name)))
    if not found:
        return [], (f"{folder} has no checkpoint-* folders (transformers.Trainer writes them while it trains: see its "
                    "save_strategy); import a model folder that has them")
    out = []
    for step, path in found[-count:]:
        _same_model(check_classifier(path), config, path)
        state_path = path / "trainer_state.json"
        try:
            rate = learning_rate(json.loads(state_path.read_text()), step)
        except (OSError, json.JSONDecodeError, TypeError, ValueError, KeyError):
            rate = None
        if rate is None:
            return [], f"{state_path} records no learning_rate at or before step {step} (TracIn weighs each checkpoint by it)"
        out.append(Checkpoint(path, step, *rate))
    return out, None


def _same_model(found: dict, config: dict, path: Path) -> None:
    """ValueError when a checkpoint is not the same kind of model over the same labels."""
    if (found.get("model_type"), model_labels(found)) != (config.get("model_type"), model_labels(config)):
        raise ValueError(f"{path} is a {found.get('model_type')} over {', '.join(model_labels(found))}; the model is a "
                         f"{config.get('model_type')} over {', '.join(model_labels(config))}")

