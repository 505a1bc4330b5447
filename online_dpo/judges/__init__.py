"""Judges: turn completions into preference labels behind one narrow contract.

A judge implements `compare(prompts, a, b) -> list[float]`, the probability
that response a beats response b for each prompt. Pointwise judges (rules,
reward models) also implement `score(prompts, responses) -> list[float]`; their
`compare` follows from the scores. `build_judge(kind, **options)` makes one
from plain arguments; `JudgeActor` runs it as a Ray actor.
"""

from .base import Judge, PointwiseJudge, build_judge, label_groups, make_pairs

__all__ = ["Judge", "PointwiseJudge", "build_judge", "label_groups", "make_pairs"]
