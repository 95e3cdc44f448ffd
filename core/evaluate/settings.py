"""What an evaluation run computes (:class:`EvalSettings`) and on which test instances (:func:`select_tests`)."""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .. import metrics
from ..ihvp import DEFAULT_DAMPING, LissaSettings, check_damping
from ..lds import LdsSettings
from ..parallel import RaySettings
from ..registry import METHODS, MethodSpec
from ..scoring import IHVP_MODES, ScoreSettings

if TYPE_CHECKING:
    from ..backend import Backend

RUN_SEED_STEP = 7919  # test sample of faithfulness run r: seed + r * RUN_SEED_STEP
METHOD_GROUPS = {"all": METHODS.names, "paper": METHODS.paper}
"""Names a method list may use for a group of registered methods."""


def resolve_methods(names: tuple[str, ...] | list[str]) -> list[MethodSpec]:
    """Specs of method names and groups (``all``: every registered method; ``paper``: the six)."""
    out: list[MethodSpec] = []
    for name in names:
        group = METHOD_GROUPS.get(str(name).strip().lower())
        out += [METHODS.resolve(n) for n in group()] if group else [METHODS.resolve(name)]
    return list(dict.fromkeys(out))


@dataclass(frozen=True)
class EvalSettings:
    """What an evaluation run computes. ``test_limit=None`` takes every eligible test instance."""

    methods: tuple[str, ...] = ("all",)
    ks: tuple[int, ...] = (10, 100)
    test_limit: int | None = 200
    ral: tuple[float, ...] = (20, 50)
    faithfulness_runs: int = 5
    ihvp: str = "fast"
    damping: float = DEFAULT_DAMPING
    lissa: LissaSettings = field(default_factory=LissaSettings)
    paper_signs: bool = False
    seed: int = 0
    kmax: int = 100
    batch: int = 16
    random_draws: int = 50  # random rankings behind the K-curve baseline band
    ral_random_seeds: int = 1
    lds: LdsSettings | None = None  # LDS and span-LDS by retraining (None: not run)
    ray: RaySettings | None = None  # Sag/Lag batches and retrains as Ray tasks (None: in this process); same numbers on the same device

    def __post_init__(self) -> None:
        if self.ihvp not in IHVP_MODES:
            raise ValueError(f"ihvp must be one of {', '.join(IHVP_MODES)}, got {self.ihvp!r}")
        if not self.ks:
            raise ValueError("give at least one K")
        if any(k < 1 for k in (*self.ks, self.kmax, self.batch, self.random_draws)):
            raise ValueError("K values, kmax, batch and random_draws must be at least 1")
        if self.test_limit is not None and self.test_limit < 1:
            raise ValueError(f"test_limit must be positive (None for all), got {self.test_limit}")
        object.__setattr__(self, "damping", check_damping(self.damping))
        if self.faithfulness_runs < 0 or self.ral_random_seeds < 0:
            raise ValueError("faithfulness_runs and ral_random_seeds must not be negative")
        for p in self.ral:
            metrics.removal_count(1, p)  # raises outside [0, 100)
        if not resolve_methods(self.methods):
            raise ValueError("no methods to evaluate")

    def specs(self) -> list[MethodSpec]:
        """The methods reported, in order."""
        return resolve_methods(self.methods)

    def scoring(self, run: int = 0) -> ScoreSettings:
        """How scores are computed in faithfulness run ``run`` (LiSSA's seed moves with it)."""
        lissa = LissaSettings(**{**self.lissa.__dict__, "seed": self.lissa.seed + run})
        return ScoreSettings(self.ihvp, self.damping, lissa, self.paper_signs)


@dataclass
class Selection:
    """Which test instances a run uses, and which it left out."""

    ids: list[str]
    seed: int
    eligible: int
    excluded_wrong: list[str]
    excluded_no_span: list[str]

    def describe(self) -> dict:
        return {"n": len(self.ids), "seed": self.seed, "eligible": self.eligible,
                "excluded_wrong": len(self.excluded_wrong), "excluded_no_span": len(self.excluded_no_span),
                "ids": self.ids, "wrong_ids": self.excluded_wrong, "no_span_ids": self.excluded_no_span}


def select_tests(backend: "Backend", limit: int | None, seed: int) -> Selection:
    """A seeded sample (in file order) of the test instances whose span is usable.

    Left out: spans a person marked wrong (paper section 5) and instances without a span.
    """
    records = backend.instances("test")
    excluded_wrong = [r.id for r in records if r.verdict == "wrong"]
    kept = [r for r in records if r.verdict != "wrong"]
    no_span = [r.id for r in kept if r.span is None]
    eligible = [r.id for r in kept if r.span is not None]
    if limit is not None and limit < len(eligible):
        keep = set(random.Random(seed).sample(range(len(eligible)), limit))
        chosen = [i for k, i in enumerate(eligible) if k in keep]
    else:
        chosen = eligible
    return Selection(chosen, seed, len(eligible), excluded_wrong, no_span)
