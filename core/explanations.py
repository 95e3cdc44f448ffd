"""Explanations: one method's ranked answer for one test input, as stored in the results cache."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass
class Hit:
    rank: int
    train_id: str
    score: float


@dataclass
class Explanation:
    """One method's answer for one test input (``label``: the label it explains)."""

    method: str
    test_id: str | None
    test_span: tuple[int, int] | None
    k: int
    top: list[Hit]
    opponents: list[Hit]
    scores: list[float]
    approx: dict
    seconds: float
    label: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Explanation":
        data = dict(data)
        data["top"] = [Hit(**h) for h in data["top"]]
        data["opponents"] = [Hit(**h) for h in data["opponents"]]
        data["test_span"] = tuple(data["test_span"]) if data["test_span"] else None
        return cls(**data)

    def cut(self, k: int) -> "Explanation":
        """The same answer with its lists cut to ``k``."""
        data = self.to_dict() | {"k": k}
        data["top"], data["opponents"] = data["top"][:k], data["opponents"][:k]
        return Explanation.from_dict(data)


def rank(scores: torch.Tensor, ids: list[str], k: int, *, opponents: bool = False) -> list[Hit]:
    """Top-k training ids by score (descending), or the k most negative (ascending)."""
    k = min(k, len(ids))
    values, idx = torch.topk(scores.double(), k, largest=not opponents)
    return [Hit(r + 1, ids[int(i)], float(v)) for r, (v, i) in enumerate(zip(values, idx))]
