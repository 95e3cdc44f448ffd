"""Fixing a span by words: the text's word tokens, snapping a word range to characters, checks,
and the review queue of the Annotate page."""
from __future__ import annotations

import re
from collections.abc import Sequence

from .instances import InstanceRecord

_TOKEN = re.compile(r"\w+(?:'\w+)?|[^\w\s]")


def word_tokens(text: str) -> list[tuple[int, int]]:
    """Character offsets of the text's words and punctuation marks (one token each)."""
    return [(m.start(), m.end()) for m in _TOKEN.finditer(text)]


def token_range(tokens: Sequence[tuple[int, int]], span: tuple[int, int] | None) -> tuple[int, int]:
    """Indices of the first and last tokens overlapping ``span`` (all tokens when none do)."""
    inside = [i for i, (a, b) in enumerate(tokens) if span and a < span[1] and b > span[0]]
    return (inside[0], inside[-1]) if inside else (0, max(len(tokens) - 1, 0))


def snap(tokens: Sequence[tuple[int, int]], first: int, last: int) -> tuple[int, int]:
    """The character span from the start of token ``first`` to the end of token ``last``."""
    first, last = sorted((first, last))
    return tokens[first][0], tokens[last][1]


def check_span(text: str, start: int, end: int) -> str | None:
    """Why ``[start, end)`` is not a usable span of ``text`` (``None``: it is)."""
    if not 0 <= start < end <= len(text):
        return f"need 0 <= start < end <= {len(text)}, got start {start}, end {end}"
    if not text[start:end].strip():
        return "the span holds only whitespace"
    return None


def review_queue(records: Sequence[InstanceRecord], splits: Sequence[str], unreviewed_only: bool) -> list[InstanceRecord]:
    """Instances whose spans to review: by split in the order given (test first), file order within."""
    order = {s: i for i, s in enumerate(splits)}
    picked = [r for r in records if r.split in order and not (unreviewed_only and r.verdict is not None)]
    return sorted(picked, key=lambda r: order[r.split])
