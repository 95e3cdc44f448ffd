"""Case studies: a snapshot of what a view showed (the test review, each method's top-1 with its
span in use, Sag/Lag at K), self-contained so it survives later changes to the workspace."""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .engine import TestInput
from .metrics import agreement
from .spans import find_aspect

if TYPE_CHECKING:
    from .backend import Backend


def snapshot_instance(text: str, aspect: str, aspect_span: tuple[int, int] | None,
                      span: tuple[int, int] | None, **extra: Any) -> dict[str, Any]:
    """The parts of an instance a case study keeps (the text travels with it)."""
    return {"text": text, "aspect": aspect, "aspect_span": list(aspect_span) if aspect_span else None,
            "span": list(span) if span else None, **extra}


def save_case_study(backend: "Backend", title: str, note: str, workspace: str, test: TestInput,
                    methods: Sequence[str], k: int) -> int:
    """Save the current view as a case study with a snapshot of each method's top-1; its id."""
    profile = backend.profile(test)
    aspect_span = backend.record(test.id).aspect_offsets() if test.id else find_aspect(test.text, test.aspect)
    snap_test = snapshot_instance(test.text, test.aspect, aspect_span, test.span, id=test.id, label=test.gold,
                                  pred=profile["label"], explained=test.label or profile["label"])
    table = backend.table
    position = {train_id: i for i, train_id in enumerate(table.train_ids)}
    labels = [table.by_id[i].label for i in table.train_ids]
    snapshot: dict = {"test": snap_test, "k": k, "methods": {}}
    for exp in backend.explain_many(test, methods, k=max(k, 1)):
        scores = agreement([position[h.train_id] for h in exp.top], profile["cosines"], labels,
                           test.gold or test.label or profile["label"], k).at(k)
        top = []
        for hit in exp.top[:1]:
            train = table.by_id[hit.train_id]
            top.append(snapshot_instance(train.text, train.aspect, train.aspect_offsets(), train.span_pair,
                                         id=train.id, label=train.label, rank=hit.rank, score=hit.score))
        snapshot["methods"][exp.method] = {"top": top, "sag": scores["sag"], "lag": scores["lag"]}
    return backend.store.save_case(title, note, workspace, test.id or "(new review)", list(snapshot["methods"]), k,
                                   snapshot)
