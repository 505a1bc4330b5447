"""Rule or callable judge: any Python function named by import path.

The function takes the prompts and responses as two lists of strings and
returns one float per response (higher is better):

    def my_rule(prompts: list[str], responses: list[str]) -> list[float]: ...

`vader_compound` is the embedded default's judge: VADER's compound sentiment
score in [-1, 1], so the policy learns to write positive reviews.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence

from ..specs import JudgeSpec
from ..types import Labels
from .base import compare_by_score, label_groups


def import_function(path: str) -> Callable:
    module_name, _, attr = path.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"judge.function {path!r} cannot be imported: {e}") from None
    if not callable(fn):
        raise ValueError(f"judge.function {path!r} is not callable")
    return fn


class RuleJudge:
    def __init__(self, function: str | Callable, margin: float = 0.0):
        self.fn = import_function(function) if isinstance(function, str) else function
        self.margin = margin

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        scores = [float(s) for s in self.fn(list(prompts), list(responses))]
        if len(scores) != len(responses):
            raise ValueError(f"judge function returned {len(scores)} scores for {len(responses)} responses")
        return scores

    def compare(self, prompts, a, b) -> list[float]:
        return compare_by_score(self, prompts, a, b, self.margin)

    def label(self, groups, margin: float) -> Labels:
        return label_groups(self, groups, margin)

    def objectives(self, prompts, responses) -> dict[str, float]:
        return {}


def build(spec: JudgeSpec) -> RuleJudge:
    return RuleJudge(spec.function, spec.margin)


_vader = None


def vader_compound(prompts: list[str], responses: list[str]) -> list[float]:
    """VADER compound sentiment of each response, in [-1, 1]."""
    global _vader
    if _vader is None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        _vader = SentimentIntensityAnalyzer()
    return [_vader.polarity_scores(r)["compound"] for r in responses]


def vader_length_bonus(prompts: list[str], responses: list[str]) -> list[float]:
    """VADER plus 0.03 per word: a judge biased toward length, to test length control with."""
    return [v + 0.03 * len(r.split()) for v, r in zip(vader_compound(prompts, responses), responses)]


def distinct_words(prompts: list[str], responses: list[str]) -> list[float]:
    """The share of a response's words that are distinct, in [0, 1]: low for text that repeats itself."""
    out = []
    for r in responses:
        words = r.lower().split()
        out.append(len(set(words)) / len(words) if words else 0.0)
    return out
