"""The judge as a Ray actor, so a large judge model gets its own resources."""

from __future__ import annotations

import os

from . import build_judge
from .base import PointwiseJudge, compare_by_score, label_groups


class JudgeActor:
    def __init__(self, kind: str, margin: float = 0.0, name: str = "judge", **options):
        self.name, self.margin = name, margin
        self.judge = build_judge(kind, **options)

    def ready(self) -> dict:
        return {"name": self.name, "pid": os.getpid(), "pointwise": self.pointwise()}

    def counters(self) -> dict:
        return {k: getattr(self.judge, k) for k in ("asked", "malformed") if hasattr(self.judge, k)}

    def pointwise(self) -> bool:
        return isinstance(self.judge, PointwiseJudge)

    def label(self, groups):
        if hasattr(self.judge, "label"):   # an ensemble pairs by its combined score
            return self.judge.label(groups, self.margin)
        return label_groups(self.judge, groups, self.margin)

    def objectives(self, prompts, responses) -> dict:
        """An ensemble's per-objective mean scores of these responses ({} for a single judge)."""
        return self.judge.objectives(prompts, responses) if hasattr(self.judge, "objectives") else {}

    def score(self, prompts, responses):
        if not self.pointwise():
            return None
        return self.judge.score(prompts, responses)

    def compare(self, prompts, a, b):
        if self.pointwise():
            return compare_by_score(self.judge, prompts, a, b, self.margin)
        return self.judge.compare(prompts, a, b)
