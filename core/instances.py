"""Typed instance records of a prepared workspace, carrying the span in use.

``instances.jsonl`` holds each instance with the span ``prepare`` found (and, for dev/test, the
model's prediction); the store holds people's verdicts on spans. An :class:`InstanceRecord`
joins the two: ``span`` is the *effective* span (a person's fix applied), ``detected`` the one
found, ``verdict`` the current annotation. Pages, the command line, case studies and the
engine's test inputs all read records, so a correction shows (and counts) everywhere at once.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .engine import TestInput
from .spans import Span, find_aspect
from .store import Annotation

LABEL_CHOICES = ("predicted", "gold")
"""Which label an explanation explains by default: the model's prediction, or the gold label
(any label name of the workspace may be given too)."""


@dataclass(frozen=True)
class InstanceRecord:
    """One instance of a workspace with the span in use."""

    id: str
    split: str
    text: str
    aspect: str
    label: str
    span: Span | None
    detected: Span | None
    verdict: str | None = None  # "accept" | "wrong" | "fix" | None
    pred: str | None = None
    probs: tuple[float, ...] | None = None
    aspect_start: int | None = None
    aspect_end: int | None = None
    span_truncated: bool = False  # the detected span in use lies wholly past the token limit (masks nothing)

    @property
    def span_pair(self) -> tuple[int, int] | None:
        return (self.span.start, self.span.end) if self.span else None

    @property
    def span_source(self) -> str:
        """Who found the span in use: ``corrected`` when a person fixed it."""
        if self.verdict == "fix":
            return "corrected"
        return self.span.source if self.span else "none"

    def aspect_offsets(self) -> tuple[int, int] | None:
        """The aspect mention's offsets in the text (given, else looked up)."""
        return find_aspect(self.text, self.aspect, self.aspect_start, self.aspect_end)

    def explained_label(self, choice: str = "predicted") -> str:
        """The label an explanation of this instance explains: ``predicted`` (the model's; the
        gold label where there is no prediction), ``gold``, or a label name."""
        if choice == "gold":
            return self.label
        if choice == "predicted":
            return self.pred or self.label
        return choice

    def test_input(self, label: str = "predicted") -> TestInput:
        """This instance as a test input explaining ``label`` (see :meth:`explained_label`)."""
        return TestInput(self.aspect, self.text, self.explained_label(label), self.span_pair, self.id, self.label)


def _span(data: Mapping | None) -> Span | None:
    return Span(data["start"], data["end"], data["source"]) if data else None


def record_of(row: Mapping, annotation: Annotation | None = None) -> InstanceRecord:
    """A JSONL row of ``instances.jsonl`` and its current annotation as a record."""
    detected = _span(row.get("span"))
    span = detected
    if annotation is not None and annotation.status == "fix":
        span = Span(annotation.corrected_start, annotation.corrected_end, "manual")
    probs = row.get("probs")
    return InstanceRecord(row["id"], row["split"], row["text"], row["aspect"], row["label"], span, detected,
                          annotation.status if annotation else None, row.get("pred"),
                          tuple(probs) if probs else None, row.get("start"), row.get("end"),
                          bool(row.get("span_truncated")) and span is detected)


class Instances:
    """A workspace's records in file order, by id and by split."""

    def __init__(self, rows: Iterable[Mapping], annotations: Mapping[str, Annotation]):
        self.records = [record_of(row, annotations.get(row["id"])) for row in rows]
        self.by_id = {r.id: r for r in self.records}
        self.train_ids = [r.id for r in self.records if r.split == "train"]

    def __len__(self) -> int:
        return len(self.records)

    def split(self, name: str | None = None) -> list[InstanceRecord]:
        """The records of a split (all of them for ``None``), in file order."""
        return [r for r in self.records if name is None or r.split == name]

    def get(self, instance_id: str, where: object = "this workspace") -> InstanceRecord:
        """The record of an id; KeyError naming it otherwise."""
        record = self.by_id.get(instance_id)
        if record is None:
            raise KeyError(f"no instance with id {instance_id!r} in {where}")
        return record

    def fixed_train_spans(self) -> dict[str, tuple[int, int]]:
        """Corrected spans of training instances (what the index patches in)."""
        return {r.id: r.span_pair for r in self.records if r.split == "train" and r.verdict == "fix"}


# --------------------------------------------------------------------------- finding instances

@dataclass(frozen=True)
class InstanceFilter:
    """What the instance picker narrows by; empty fields do not filter."""

    query: str = ""
    aspect: str | None = None
    gold: str | None = None
    predicted: str | None = None
    outcome: str | None = None  # "correct" | "wrong"
    source: str | None = None  # a span source, or "corrected"

    def matches(self, r: InstanceRecord) -> bool:
        """Whether ``r`` passes every set field (``query``: a case-insensitive substring of the
        text, the aspect or the id)."""
        query = self.query.strip().lower()
        if query and not any(query in value.lower() for value in (r.text, r.aspect, r.id)):
            return False
        if self.outcome and (r.pred is None or (r.pred == r.label) != (self.outcome == "correct")):
            return False
        wanted = ((self.aspect, r.aspect), (self.gold, r.label), (self.predicted, r.pred), (self.source, r.span_source))
        return all(want is None or want == have for want, have in wanted)


def filter_instances(records: Iterable[InstanceRecord], f: InstanceFilter) -> list[InstanceRecord]:
    """The records matching ``f``, in order."""
    return [r for r in records if f.matches(r)]


_SPACES = re.compile(r"\s+")


def option_label(record: InstanceRecord, width: int = 90) -> str:
    """A one-line plain-text label for a picker: aspect, then the start of the text."""
    text = _SPACES.sub(" ", record.text).strip()
    if len(text) > width:
        text = text[:width - 1] + "…"
    aspect = _SPACES.sub(" ", record.aspect).strip()
    return f"{aspect} · {text}" if aspect else text
