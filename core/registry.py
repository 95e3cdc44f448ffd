"""The method registry: every explanation method as one declarative spec.

A method is ``score(z) = sum_p w_p * T_p . X_p(z)`` over parameter points p (Zhang et al. 2021,
section 3): a test-side vector T_p, optionally multiplied by an inverse Hessian, and a
training-side vector X_p(z). A :class:`MethodSpec` says which points, which representation on
each side (:mod:`core.representations`), which inverse (:mod:`core.inverses`), which point
weights, and how it is shown (family, colour, dash). The CLI's choices and help, the app's
pickers and colours, the evaluation's method lists and reports and the results-cache keys all
read this registry, so a method the vocabulary can express is added by registering one spec.

Larger score = stronger proponent for every method. ``paper_sign = -1`` marks a method whose
literal formula in the paper is the negative of ours (IF: Eq. 1's minus; every ++ form, EK-FAC's
and TRAK's included: the paper's test side g(z'_-kl) - g(z') = -e(z')); ``--paper-signs``
applies it. A spec is checked when made: an inverse of the curvature at theta (``hessian``,
``ekfac``) needs the point theta, ``lr`` weights need the checkpoints, both sides must be in the
same coordinates, and the ``ekfac`` inverse (a division in the EK-FAC eigenbasis) goes with the
``ekfac`` representations.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from .representations import REPRESENTATIONS

POINT_SETS = ("final", "checkpoints", "variants", "ensemble")
"""``ensemble`` is TRAK's: the independently trained classifiers (theta and ``prepare --models
N``'s others) when the workspace has them, else the checkpoints (:class:`core.points.PointSet`)."""
POINT_WEIGHTS = ("uniform", "lr", "mean")
INVERSES = (None, "hessian", "ekfac", "trak")
"""Inverse kinds a spec may name (:mod:`core.inverses`): ``hessian`` = (H + lambda I)^-1 estimated
as the run asks (``--ihvp fast`` or ``lissa``); ``ekfac`` = the EK-FAC Gauss-Newton inverse;
``trak`` = TRAK's (Phi^T Phi + lambda I)^-1 of the point's features."""
DASHES = ("solid", "dash", "dot", "dashdot", "longdash")


@dataclass(frozen=True)
class MethodSpec:
    """One explanation method as data."""

    name: str
    points: str  # a POINT_SETS entry
    train: str  # training-side representation
    test: str  # test-side representation
    colour: str  # "#RRGGBB"
    inverse: str | None = None
    weights: str = "uniform"  # "lr": checkpoint learning rates (TracIn); "mean": average over the points (TRAK)
    paper_sign: int = 1
    family: str = "TracIn"
    dash: str = "solid"
    aliases: tuple[str, ...] = ()
    paper: bool = False  # one of the six methods of the paper's table 3
    help: str = ""

    def __post_init__(self) -> None:
        checks = {"points": (self.points, POINT_SETS), "train": (self.train, tuple(REPRESENTATIONS)),
                  "test": (self.test, tuple(REPRESENTATIONS)), "inverse": (self.inverse, INVERSES),
                  "weights": (self.weights, POINT_WEIGHTS), "paper_sign": (self.paper_sign, (1, -1)),
                  "dash": (self.dash, DASHES)}
        for field_name, (value, allowed) in checks.items():
            if value not in allowed:
                raise ValueError(f"method {self.name!r}: {field_name} must be one of {allowed}, got {value!r}")
        if not (self.name and self.name.strip() == self.name and "," not in self.name):
            raise ValueError(f"a method name must be non-empty, without commas or outer spaces: {self.name!r}")
        if not (len(self.colour) == 7 and self.colour.startswith("#")):
            raise ValueError(f"method {self.name!r}: colour must be '#RRGGBB', got {self.colour!r}")
        bases = {REPRESENTATIONS[self.train].basis, REPRESENTATIONS[self.test].basis}
        if len(bases) > 1:
            raise ValueError(f"method {self.name!r}: its two sides must be in the same coordinates, got "
                             f"{self.train!r} and {self.test!r}")
        if (self.inverse == "ekfac") != (bases == {"ekfac"}):
            raise ValueError(f"method {self.name!r}: the ekfac inverse is a division in the EK-FAC eigenbasis: "
                             "it goes with the ekfac representations on both sides, and they with it")
        if (self.inverse == "trak") != (REPRESENTATIONS[self.train].train_scale == "q"):
            raise ValueError(f"method {self.name!r}: the index keeps TRAK's training rows whitened (multiplied by "
                             "its inverse): the trak inverse goes with the trak representations, and they with it")
        if self.inverse in ("hessian", "ekfac") and self.points != "final":
            raise ValueError(f"method {self.name!r}: the {self.inverse} inverse is the curvature at theta; "
                             "its points must be 'final'")
        if self.weights == "lr" and self.points != "checkpoints":
            raise ValueError(f"method {self.name!r}: 'lr' weights are the checkpoints' learning rates")

    @property
    def uses_spans(self) -> bool:
        """Whether either side depends on spans (so on the training spans people correct)."""
        return REPRESENTATIONS[self.train].span or REPRESENTATIONS[self.test].span

    @property
    def test_span(self) -> bool:
        return REPRESENTATIONS[self.test].span

    @property
    def formula(self) -> str:
        """A one-line formula, e.g. ``sum_variants e(z') . e(z)``."""
        inv = {None: "", "hessian": " H^-1", "ekfac": " G_ekfac^-1", "trak": " (Phi^T Phi)^-1"}[self.inverse]
        weight = {"lr": "eta_c ", "mean": "1/C ", "uniform": ""}[self.weights]
        return (f"sum over {self.points}: {weight}{REPRESENTATIONS[self.test].test_symbol}{inv}"
                f" . {REPRESENTATIONS[self.train].train_symbol}")


class MethodRegistry:
    """Specs by name, in registration order; names and aliases resolve case-insensitively."""

    def __init__(self) -> None:
        self._specs: dict[str, MethodSpec] = {}
        self._names: dict[str, str] = {}

    def register(self, spec: MethodSpec) -> MethodSpec:
        keys = [spec.name.lower(), *(a.lower() for a in spec.aliases)]
        taken = [k for k in keys if k in self._names]
        if taken:
            raise ValueError(f"method {spec.name!r}: the name or alias {taken[0]!r} is taken by {self._names[taken[0]]!r}")
        self._specs[spec.name] = spec
        self._names.update(dict.fromkeys(keys, spec.name))
        return spec

    def unregister(self, name: str) -> None:
        spec = self._specs.pop(self.resolve(name).name)
        for key in [spec.name.lower(), *(a.lower() for a in spec.aliases)]:
            self._names.pop(key, None)

    @contextmanager
    def registered(self, spec: MethodSpec) -> Iterator[MethodSpec]:
        """``spec`` registered for the with-statement body (tests, plug-ins)."""
        self.register(spec)
        try:
            yield spec
        finally:
            self.unregister(spec.name)

    def resolve(self, name: str) -> MethodSpec:
        """A spec by name or alias, case-insensitively; ValueError naming the choices."""
        key = self._names.get(str(name).strip().lower())
        if key is None:
            raise ValueError(f"unknown method {name!r}; choose from {', '.join(self._specs)}")
        return self._specs[key]

    def __contains__(self, name: str) -> bool:
        return str(name).strip().lower() in self._names

    def __iter__(self) -> Iterator[MethodSpec]:
        return iter(list(self._specs.values()))

    def __len__(self) -> int:
        return len(self._specs)

    def names(self) -> list[str]:
        return list(self._specs)

    def paper(self) -> list[str]:
        """The paper's six methods (its table 3), in registration order."""
        return [s.name for s in self._specs.values() if s.paper]

    def help_text(self) -> str:
        """One line per method: name, aliases and what it computes (the CLI's --method help)."""
        lines = []
        for s in self._specs.values():
            alias = f" (also {', '.join(s.aliases)})" if s.aliases else ""
            lines.append(f"{s.name}{alias}: {s.help or s.formula}")
        return "; ".join(lines)

    def style(self, name: str) -> tuple[str, str]:
        """(colour, dash) of a method; black and solid for a name no longer registered (an old report)."""
        if name not in self:
            return "#000000", "solid"
        spec = self.resolve(name)
        return spec.colour, spec.dash

    def colours(self) -> dict[str, str]:
        return {s.name: s.colour for s in self._specs.values()}

    def dashes(self) -> dict[str, str]:
        return {s.name: s.dash for s in self._specs.values()}


METHODS = MethodRegistry()
"""The methods SpanLens knows. Colours: Okabe & Ito's colour-blind-safe palette for the paper's
methods, Tol's for Control, EK-FAC and TRAK; the line dash separates the families (IF dashed,
TracIn solid, references dotted, EK-FAC and TRAK long-dashed)."""

for _spec in (
    MethodSpec("IF", "final", "full", "full", "#E69F00", inverse="hessian", paper_sign=-1, family="IF", dash="dash",
               paper=True, help="influence function g(z')^T H^-1 g(z) at theta"),
    MethodSpec("IF+", "final", "diff", "full", "#D55E00", inverse="hessian", family="IF", dash="dash", paper=True,
               help="g(z')^T H^-1 [g(z) - g(z_-ij)]: the training span's influence"),
    MethodSpec("IF++", "final", "diff", "diff", "#CC79A7", inverse="hessian", paper_sign=-1, family="IF",
               dash="dash", paper=True, help="e(z')^T H^-1 e(z): span to span, e = g(input) - g(span masked)"),
    MethodSpec("TracIn", "checkpoints", "full", "full", "#F0E442", weights="lr",
               help="sum over checkpoints of eta_c g(z') . g(z)"),
    MethodSpec("TracInF", "variants", "full", "full", "#56B4E9", paper=True,
               help="sum over variants theta + delta_i of g(z') . g(z)"),
    MethodSpec("TracIn+", "variants", "diff", "full", "#009E73", paper=True,
               help="sum over variants of g(z') . [g(z) - g(z_-ij)]"),
    MethodSpec("TracIn++", "variants", "diff", "diff", "#0072B2", paper_sign=-1, paper=True,
               help="sum over variants of e(z') . e(z)"),
    MethodSpec("GroundTruth", "final", "diff", "diff", "#000000", paper_sign=-1, family="reference", dash="dot",
               aliases=("gt", "ground-truth"), help="e(z') . e(z) at theta: the paper's 'ultimately faithful' reference"),
    MethodSpec("Control", "checkpoints", "diff", "diff", "#882255", paper_sign=-1, family="reference",
               dash="dashdot", help="TracIn++ with checkpoints in place of variants (the paper's table-4 control)"),
    MethodSpec("EKFAC", "final", "ekfac", "ekfac", "#DDCC77", inverse="ekfac", family="EK-FAC", dash="longdash",
               help="influence with the EK-FAC Gauss-Newton inverse: g(z')^T G_ekfac^-1 g(z) (Grosse et al. 2023)"),
    MethodSpec("EKFAC++", "final", "ekfac-diff", "ekfac-diff", "#AA4499", inverse="ekfac", paper_sign=-1, family="EK-FAC",
               dash="longdash",
               help="EK-FAC influence span to span: e(z')^T G_ekfac^-1 e(z)"),
    MethodSpec("TRAK", "ensemble", "trak", "trak", "#117733", inverse="trak", weights="mean", family="TRAK",
               dash="longdash", help="TRAK (Park et al. 2023): mean over the independently trained models (prepare "
                                     "--models N), else the checkpoints, of phi(z')^T (Phi^T Phi)^-1 phi(z) Q(z), "
                                     "phi the margin gradient, Q = 1 - p_y"),
    MethodSpec("TRAK++", "ensemble", "trak-diff", "trak-diff", "#332288", inverse="trak", weights="mean",
               paper_sign=-1, family="TRAK", dash="longdash", help="TRAK span to span: margin-gradient span differences on both sides"),
):
    METHODS.register(_spec)
