"""Texts not in the dataset (``explain --test-text``, the app's new review): their aspect and
span, chosen by the rules ``prepare`` applied to the workspace's own instances.

SentiHood-style category aspects are written as the dataset writes them, "TARGET CATEGORY"
("LOCATION1 price", any case): a target and a category of the training instances, the target
occurring in the text. Spans follow ``prepare``'s rule without a reading-comprehension model: the
clause heuristic around the aspect (around the target for categories), refined by the paper's
importance rule (Eq. 3) where ``prepare`` refines: category aspects (unless prepared with
``--category-spans anchored``), single texts and pairs, and every span with
``--span-importance``. A workspace prepared with ``--rc-model`` kept the RC answers for its
instances; a new text gets the rule above.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from .data import Instance
from .spans import (
    find_aspect,
    heuristic_span,
    importance_candidates,
    refine_by_importance,
    whole_span,
)

LogitDrop = Callable[[list[tuple[int, int]]], Sequence[float]]
"""Eq. 3's importance of candidate spans of the new input (as the model reads it): ``spans -> drops``."""


def _norm(value: object) -> str:
    return " ".join(str(value).lower().split())


@dataclass(frozen=True)
class CategoryAspects:
    """The targets and categories of a workspace's category aspects (SentiHood: "location1",
    "location2"; "price", ...), lowercase with single spaces; both empty for other workspaces."""

    targets: frozenset[str]
    categories: frozenset[str]

    @classmethod
    def of(cls, rows: Iterable[Mapping]) -> CategoryAspects:
        """From the training rows of ``instances.jsonl`` (their ``meta``)."""
        metas = [r["meta"] for r in rows if r.get("split") == "train" and isinstance(r.get("meta"), Mapping)
                 and r["meta"].get("category") and r["meta"].get("target")]
        return cls(frozenset(_norm(m["target"]) for m in metas), frozenset(_norm(m["category"]) for m in metas))

    def split(self, aspect: str) -> tuple[str, str] | None:
        """``(target, category)`` when ``aspect`` reads "TARGET CATEGORY" with both of this workspace."""
        words = _norm(aspect).split()
        for cut in range(1, len(words)):
            target, category = " ".join(words[:cut]), " ".join(words[cut:])
            if target in self.targets and category in self.categories:
                return target, category
        return None


@dataclass(frozen=True)
class NewAspect:
    """An aspect of a new text: as the model reads it, and the offsets the span is built around."""

    aspect: str
    at: tuple[int, int]
    category: bool


def resolve_aspect(text: str, aspect: str, known: CategoryAspects) -> NewAspect:
    """The aspect of a new (aspect, text) input: "TARGET CATEGORY" with a target and a category of
    the workspace (read in lowercase, as the dataset writes category aspects; the target must occur
    in ``text``), else a word or phrase of ``text``. ValueError saying what is missing."""
    parts = known.split(aspect)
    if parts is not None:
        at = find_aspect(text, parts[0])
        if at is None:
            raise ValueError(f"the target {parts[0]!r} of the aspect {aspect!r} does not occur in the review")
        return NewAspect(" ".join(parts), at, True)
    found = find_aspect(text, aspect)
    if found is not None:
        return NewAspect(aspect, found, False)
    hint = (f", or a target ({', '.join(sorted(known.targets))}) and a category ({', '.join(sorted(known.categories))})"
            f" of this workspace, e.g. '{min(known.targets).upper()} {min(known.categories)}'") if known.categories else ""
    raise ValueError(f"the aspect {aspect!r} does not occur in the review; give a word or phrase of it{hint}")


def new_span(text: str, aspect: NewAspect | None, settings: Mapping, logit_drop: LogitDrop) -> tuple[int, int]:
    """The span ``prepare`` would give this text (module docstring); ``aspect`` is None for single
    texts and pairs, whose spans are chosen among the text's clauses and sentences. ``logit_drop``
    scores spans of the input as the model reads it (a pair with its first text)."""
    if aspect is None:
        inst = Instance("new", "test", text, "", "", None, None)
        start = whole_span(text)
    else:
        inst = Instance("new", "test", text, aspect.aspect, "", *aspect.at, meta={"category": aspect.category})
        start = heuristic_span(inst)
    candidates = importance_candidates(inst, whole_text=aspect is None,
                                       category_spans=settings.get("category_spans", "importance"),
                                       span_importance=bool(settings.get("span_importance")))
    if candidates is None:
        return start.start, start.end
    chosen = refine_by_importance([inst], {"new": start}, lambda _, spans: logit_drop(spans), progress=False,
                                  candidates_for=lambda _: candidates)["new"]
    return chosen.start, chosen.end
