"""Judges: turn completions into preference labels behind one contract (base.py).

Every judge labels groups of completions (`label -> Labels`), compares two
responses (`compare -> P(a > b)`), and reports objectives; pointwise judges
(rules, reward models, ensembles) also `score` single responses.
`build_judge(spec)` makes one from its `JudgeSpec` through a registry keyed
by `judge.kind`: each kind's module has a `build(spec)`. `JudgeActor` runs a
judge as a Ray actor. `ensemble` combines several judges into one weighted
score (ensemble.py); `constitutional` asks one LLM about each principle of a
constitution (constitution.py); `openai` asks an OpenAI-compatible endpoint (endpoint.py);
`deployment` asks a judge that several runs share, served by Ray Serve (deployment.py).
"""

from __future__ import annotations

import importlib

from .base import Judge, PointwiseJudge, label_groups, make_pairs

# judge.kind -> the module (in this package) whose build(spec) makes it; imported only when used
KINDS = {"rule": "rule", "reward_model": "reward_model", "llm": "llm", "ensemble": "ensemble",
         "constitutional": "constitution", "openai": "endpoint", "deployment": "deployment"}


def build_judge(spec) -> Judge:
    """Make the judge a JudgeSpec describes."""
    if spec.kind not in KINDS:
        raise ValueError(f"unknown judge kind {spec.kind!r}: use one of {', '.join(KINDS)}")
    return importlib.import_module(f"{__name__}.{KINDS[spec.kind]}").build(spec)


__all__ = ["Judge", "PointwiseJudge", "build_judge", "label_groups", "make_pairs", "KINDS"]
