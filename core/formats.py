"""Input formats of a classification data set: what the model reads from each JSONL/CSV row.

* ``aspect``: an (aspect, text) pair, as in aspect-based sentiment (columns text, aspect, label);
* ``single``: a text alone - sentiment, topic, toxicity ... (columns text, label): the instance's
  aspect is empty and the model reads the text by itself;
* ``pair``: two texts, NLI-style (columns text_a, text_b or premise, hypothesis, and label): the
  first takes the aspect's place in the model input, and spans lie in the second.

``auto`` reads the format from a file's columns (its CSV header, its first JSONL row).
"""
from __future__ import annotations

from collections.abc import Collection, Mapping

INPUT_FORMATS = ("auto", "aspect", "single", "pair")
DESCRIPTIONS = {"aspect": "(aspect, text) pairs", "single": "single texts (no aspect)",
                "pair": "text pairs (the span lies in the second text)"}
PAIR_COLUMNS = (("text_a", "text_b"), ("premise", "hypothesis"))
"""The column names of a pair's first and second text, in the order they are looked for."""


def check_format(name: str) -> str:
    """``name`` when it is one of :data:`INPUT_FORMATS`; ValueError naming them otherwise."""
    if name not in INPUT_FORMATS:
        raise ValueError(f"unknown input format {name!r}; choose from {', '.join(INPUT_FORMATS)}")
    return name


def detect(columns: Collection[str]) -> str:
    """The format a file's columns describe: ``aspect`` with an aspect column, ``pair`` with
    text_a/text_b or premise/hypothesis, ``single`` otherwise."""
    if "aspect" in columns:
        return "aspect"
    return "pair" if any(a in columns and b in columns for a, b in PAIR_COLUMNS) else "single"


def pair_columns(columns: Collection[str]) -> tuple[str, str]:
    """The (first, second) text columns of a pair file (text_a/text_b unless premise/hypothesis)."""
    return next(((a, b) for a, b in PAIR_COLUMNS if a in columns and b in columns), PAIR_COLUMNS[0])


def required(fmt: str, columns: Collection[str]) -> tuple[str, ...]:
    """The columns a row of this format needs (the label included)."""
    if fmt == "pair":
        return (*pair_columns(columns), "label")
    return ("text", "aspect", "label") if fmt == "aspect" else ("text", "label")


def inputs(row: Mapping, fmt: str) -> tuple[str, str]:
    """(the aspect slot, the text) of a row: (aspect, text), ("", text) or (first, second text).
    ValueError naming the missing fields (the label included) or an empty one."""
    missing = [k for k in required(fmt, row.keys()) if row.get(k) is None]
    if missing:
        raise ValueError(f"missing field(s) {', '.join(missing)}")
    keys = required(fmt, row.keys())[:-1]
    for key in keys:
        if not isinstance(row[key], str) or not row[key].strip():
            raise ValueError(f"empty or non-string {key} ({row[key]!r})")
    if fmt == "aspect":
        return row["aspect"], row["text"]
    return ("", row["text"]) if fmt == "single" else (row[keys[0]], row[keys[1]])
