"""How scores are computed (:class:`ScoreSettings`) and the one function that keys a result by it.

Every cached result - an explanation, an evaluation row, a faithfulness row - is keyed by
:func:`result_key`: the method's spec (what it computes) and the scoring settings that change its
numbers. A scoring setting a method does not use is left out, so changing it reuses the method's
rows (a new damping recomputes the methods with a Hessian inverse - the IF family and EK-FAC -
only); a setting it uses is always in, so no row computed under other settings is ever served.
What the caller adds (the test's span and label, the training spans, K) it adds for every method.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .ihvp import DEFAULT_DAMPING, LissaSettings, check_damping
from .registry import MethodSpec

IHVP_MODES = ("fast", "lissa")
TRAK_RIDGE = 0.01
"""TRAK's ridge relative to the mean eigenvalue of Phi^T Phi (the kernel is singular when there are
fewer training instances than sketch dimensions)."""


@dataclass(frozen=True)
class ScoreSettings:
    """Choices that change scores: the inverse-Hessian estimator and its damping, LiSSA's
    settings, the paper's literal signs, and exact (unsketched) training gradients."""

    ihvp: str = "fast"
    damping: float = DEFAULT_DAMPING
    lissa: LissaSettings = field(default_factory=LissaSettings)
    paper_signs: bool = False
    exact: bool = False

    def __post_init__(self) -> None:
        if self.ihvp not in IHVP_MODES:
            raise ValueError(f"ihvp must be one of {', '.join(IHVP_MODES)}, got {self.ihvp!r}")
        object.__setattr__(self, "damping", check_damping(self.damping))

    def sign(self, spec: MethodSpec) -> int:
        """-1 where the paper's literal sign is asked for and differs from ours."""
        return spec.paper_sign if self.paper_signs else 1

    def inverse_key(self, spec: MethodSpec) -> dict[str, Any] | None:
        """What the method's inverse Hessian depends on (None: it has none)."""
        if spec.inverse is None:
            return None
        if spec.inverse == "trak":
            return {"kind": "trak", "ridge": TRAK_RIDGE}
        if spec.inverse == "ekfac":
            return {"kind": "ekfac", "damping": self.damping}
        if self.ihvp == "fast":
            return {"kind": spec.inverse, "ihvp": "fast", "damping": self.damping}
        return {"kind": spec.inverse, "ihvp": "lissa", "lissa": asdict(self.lissa)}


def spec_key(spec: MethodSpec) -> dict[str, Any]:
    """The parts of a spec that decide its numbers (not its colour or help)."""
    return {"name": spec.name, "points": spec.points, "train": spec.train, "test": spec.test,
            "inverse": spec.inverse, "weights": spec.weights}


def result_key(spec: MethodSpec, settings: ScoreSettings, **extra: Any) -> dict[str, Any]:
    """The cache key of a method's result under ``settings``; ``extra`` adds what the caller's
    result depends on besides (the test's span and label, the training spans, K ...)."""
    return {"method": spec_key(spec), "inverse": settings.inverse_key(spec), "sign": settings.sign(spec),
            "exact": settings.exact, **extra}
