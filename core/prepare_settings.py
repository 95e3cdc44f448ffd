"""The settings of ``prepare``: the presets, the settings object and their range checks (made
when the object is made, so a CLI option, the app's form and a library call are refused alike)."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

from . import formats

CATEGORY_SPANS = ("importance", "anchored")
"""Spans of category aspects (SentiHood's "price" of LOCATION1): chosen among every clause and
sentence of the text by the paper's importance rule (Eq. 3), or anchored on the target mention."""
AT_LEAST = {"epochs": 1, "batch_size": 1, "trainable_layers": 1, "checkpoints": 1, "variants": 1, "models": 1,
            "max_length": 8, "seed": 0}
"""The smallest value of each whole-number setting."""
OPTIONAL_AT_LEAST = {"train_limit": (1, "leave it out to use every instance"),
                     "eval_limit": (1, "leave it out to use every instance"),
                     "data_seed": (0, "leave it out to draw the samples with --seed")}
"""The smallest value of each whole-number setting that may be left out (None), and what leaving it out does."""
VARIANT_OPTIMIZERS = ("adamw", "sgd")
RC_NEEDS_ASPECTS = ("--rc-model asks about an aspect (\"How is the X?\"); single texts and text pairs have none: "
                    "their spans come from the importance rule over the text's clauses and sentences")

PRESETS: dict[str, dict] = {
    "demo": {},
    "paper": {
        "model": "roberta-large",
        "rc_model": "phiyodr/roberta-large-finetuned-squad2",
        "batch_size": {"mams": 200, "sentihood": 100},
        "lr": 1e-4,
        "epochs": 100,
        "max_length": 256,
        "span_importance": True,
    },
}


@dataclass
class PrepareSettings:
    """Everything ``prepare`` depends on. Defaults are the demo preset."""

    dataset: str = "mams"
    data_dir: str | None = None
    model: str = "minilm"
    rc_model: str | None = None
    train_limit: int | None = None
    eval_limit: int | None = None
    epochs: int = 6
    batch_size: int = 32
    lr: float = 5e-4
    trainable_layers: int = 2
    checkpoints: int = 3
    variants: int = 3
    variant_lr: float = 1e-4
    variant_optimizer: str = "adamw"
    models: int = 1  # classifiers trained independently (theta and models - 1 more): TRAK's ensemble
    max_length: int = 128
    span_importance: bool = False
    category_spans: str = "importance"
    input_format: str = "auto"
    seed: int = 0
    data_seed: int | None = None  # seed of the --train-limit/--eval-limit samples (None: ``seed``)
    device: str | None = None

    def __post_init__(self) -> None:
        check_settings(self)

    @classmethod
    def from_preset(cls, preset: str = "demo", **overrides) -> "PrepareSettings":
        """Preset values, then every override that is not ``None``."""
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
        values = dict(PRESETS[preset])
        dataset = overrides.get("dataset") or cls.dataset
        if isinstance(values.get("batch_size"), dict):
            values["batch_size"] = values["batch_size"].get(dataset, 100)
        values.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown settings: {sorted(unknown)}")
        return cls(**values)


def sample_seed(settings: object) -> int:
    """The seed of the instance samples (``--train-limit``/``--eval-limit``): ``data_seed`` where
    the settings have one, else ``seed`` (``import`` has no data seed; ``prepare``'s lets
    classifiers of several seeds share one slice)."""
    data_seed = getattr(settings, "data_seed", None)
    return settings.seed if data_seed is None else data_seed


def check_settings(settings: object) -> None:
    """Every setting of ``settings`` in range (ValueError naming the setting, its option and the
    range): those of :class:`PrepareSettings` it has."""
    def whole(value: object) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    option = lambda name: f"{name} (--{name.replace('_', '-')})"  # noqa: E731
    for name, low in AT_LEAST.items():
        value = getattr(settings, name, low)
        if not whole(value) or value < low:
            raise ValueError(f"{option(name)} must be a whole number of at least {low}, got {value!r}")
    for name, (low, hint) in OPTIONAL_AT_LEAST.items():
        value = getattr(settings, name, None)
        if value is not None and (not whole(value) or value < low):
            raise ValueError(f"{option(name)} must be at least {low} ({hint}), got {value!r}")
    for name in ("lr", "variant_lr"):
        value = getattr(settings, name, 1.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
            raise ValueError(f"{option(name)} must be a positive number, got {value!r}")
    for name, allowed in (("category_spans", CATEGORY_SPANS), ("variant_optimizer", VARIANT_OPTIMIZERS),
                          ("input_format", formats.INPUT_FORMATS)):
        if getattr(settings, name) not in allowed:
            raise ValueError(f"{option(name)} must be one of {', '.join(allowed)}, got {getattr(settings, name)!r}")
    if settings.rc_model and settings.input_format in ("single", "pair"):
        raise ValueError(RC_NEEDS_ASPECTS)


def preset_defaults(name: str) -> str:
    """A setting's default and, where it has its own, the paper preset's value (for help texts)."""
    paper = PRESETS["paper"].get(name)
    if isinstance(paper, dict):  # per dataset
        paper = ", ".join(f"{v:g} on {k}" for k, v in paper.items())
    elif paper is not None:
        paper = f"{paper:g}"
    return f"default {getattr(PrepareSettings(), name):g}" + (f"; paper preset {paper}" if paper else "")


def changed_settings(before: dict, now: dict) -> str:
    """The settings that differ between a workspace's recorded run and this one, as ``name old ->
    new`` (the device, which changes no result, left out); empty for a new workspace."""
    if not before:
        return ""
    return ", ".join(f"{k} {before.get(k)} -> {v}" for k, v in now.items() if k != "device" and before.get(k) != v)
