"""The judge as a Ray actor, so a large judge model gets its own resources; `Judging` is the judge's
calls on any actor that holds one (a sampler runs a rule judge itself with `judge.in_sampler`)."""

from __future__ import annotations

import os

from ..specs import JudgeSpec
from ..types import Labels
from . import build_judge
from .base import PointwiseJudge


class Judging:
    """The calls rollouts and evaluation make of a judge, on an actor with `self.judge` and `self.margin`."""

    judge = None
    margin = 0.0

    def pointwise(self) -> bool:
        return isinstance(self.judge, PointwiseJudge)

    def label(self, groups) -> Labels:
        return self.judge.label(groups, self.margin)

    def objectives(self, prompts, responses) -> dict:
        """An ensemble's per-objective mean scores of these responses ({} for a single judge)."""
        return self.judge.objectives(prompts, responses)

    def score(self, prompts, responses):
        """Scores of single responses; None from a judge that only compares two."""
        return self.judge.score(prompts, responses) if self.pointwise() else None

    def compare(self, prompts, a, b):
        return self.judge.compare(prompts, a, b)

    def usage(self) -> dict:
        """An endpoint judge's requests, cache hits, retries and tokens so far ({} for other kinds)."""
        return self.judge.usage() if hasattr(self.judge, "usage") else {}


class JudgeActor(Judging):
    def __init__(self, spec: JudgeSpec, name: str = "judge", env: dict[str, str] | None = None):
        from ..engine import use_env
        from ..gc_pause import paused_gc

        use_env(env)   # engine_env, before the judge's imports
        self.name, self.margin = name, spec.margin
        with paused_gc():
            self.judge = build_judge(spec)

    def ready(self) -> dict:
        return {"name": self.name, "pid": os.getpid(), "pointwise": self.pointwise()}
