"""The judge contract and pair construction (pure Python; no torch, no Ray).

Every judge kind answers the same four questions:

    label(groups, margin) -> Labels          training: pairs, and why the rest were dropped
    compare(prompts, a, b) -> [P(a > b)]     evaluation's win rate
    score(prompts, responses) -> [float]     evaluation's reward; None for a pairwise-only judge
    objectives(prompts, responses) -> dict   per-objective mean scores ({} for a single judge)

`label_groups` answers the first for any judge that compares (or scores):
rule, reward-model and LLM judges use it as is; an ensemble combines its
members' scores first and hands `make_pairs` its own gap.

Pairs are best vs worst of the n completions of a prompt. A pair is dropped
and counted when the judge cannot separate them (a score gap at or below the
margin, or a pairwise verdict of 0.5) and when the two token sequences are
identical: identical responses are never trained on.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from ..types import Labels, PreferencePair, SampleGroup


@runtime_checkable
class Judge(Protocol):
    def compare(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> list[float]:
        """P(a better than b) per prompt; 0.5 is a tie."""

    def label(self, groups: Sequence[SampleGroup], margin: float) -> Labels:
        """Best-vs-worst pairs of each group, and counts of what was dropped."""

    def objectives(self, prompts: Sequence[str], responses: Sequence[str]) -> dict[str, float]:
        """Each objective's mean score of these responses ({} for a judge of one objective)."""


@runtime_checkable
class PointwiseJudge(Judge, Protocol):
    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        """A scalar score per response: higher is better."""


def compare_by_score(judge: PointwiseJudge, prompts, a, b, margin: float = 0.0) -> list[float]:
    """Hard verdicts from scores: 1 if a wins by more than the margin, 0 if b does, else 0.5."""
    sa, sb = judge.score(prompts, a), judge.score(prompts, b)
    return [float("nan") if not (math.isfinite(x) and math.isfinite(y)) else
            1.0 if x - y > margin else 0.0 if y - x > margin else 0.5 for x, y in zip(sa, sb)]


def regroup(flat: Sequence[float], groups: Sequence) -> list[list[float]]:
    """Flat per-completion values back into rows, one per group (a group or a row of values)."""
    rows, k = [], 0
    for g in groups:
        n = len(g.completions) if isinstance(g, SampleGroup) else len(g)
        rows.append(list(flat[k:k + n]))
        k += n
    return rows


def flat_texts(groups: Sequence[SampleGroup]) -> tuple[list[str], list[str]]:
    """Each completion's prompt and text, in group order (what a pointwise judge scores)."""
    return [g.prompt for g in groups for _ in g.completions], [c.text for g in groups for c in g.completions]


def extremes(scores: Sequence[float]) -> tuple[int, int]:
    """Indices of the best and the worst finite score (a NaN or an infinity is never either)."""
    finite = [i for i in range(len(scores)) if math.isfinite(scores[i])] or [0]
    return max(finite, key=lambda i: scores[i]), min(finite, key=lambda i: scores[i])


Gap = Callable[[int, int, int], float]   # (group, best, worst) -> the gap that decides a tie
Details = Callable[[int, int, int], dict]   # (group, best, worst) -> what else the preference log keeps


def make_pairs(groups: Sequence[SampleGroup], scores: Sequence[Sequence[float]], margin: float,
               gap: Gap | None = None, details: Details | None = None
               ) -> tuple[list[PreferencePair], dict, list[tuple[str, PreferencePair]]]:
    """Best vs worst of each group by score; returns pairs, drop counts, and the dropped groups' best vs
    worst with why ("tie", "identical", "nonfinite": fewer than two finite scores). `gap` replaces the
    score difference as what must exceed the margin (an ensemble's gap leaves out tied objectives). A
    score that is NaN or infinite takes no part: its group counts as `nonfinite`, and is a tie unless
    two finite scores remain to pair."""
    pairs, rows, ties, identical, nonfinite = [], [], 0, 0, 0
    for g, (group, s) in enumerate(zip(groups, scores)):
        finite = sum(math.isfinite(x) for x in s)
        nonfinite += finite < len(s)
        best, worst = extremes(s)
        chosen, rejected = group.completions[best], group.completions[worst]
        pair = PreferencePair(prompt=group.prompt, prompt_ids=group.prompt_ids, chosen=chosen, rejected=rejected,
                              chosen_score=float(s[best]), rejected_score=float(s[worst]),
                              details=details(g, best, worst) if details else {})
        if finite < 2 or best == worst or (s[best] - s[worst] if gap is None else gap(g, best, worst)) <= margin:
            ties += 1   # all equal, within the margin, or too few finite scores
            rows.append(("nonfinite" if finite < 2 else "tie", pair))
        elif chosen.token_ids == rejected.token_ids:
            identical += 1
            rows.append(("identical", pair))
        else:
            pairs.append(pair)
    return pairs, {"ties": ties, "identical": identical, "nonfinite": nonfinite}, rows


def agreement(first: str | None, swapped: str | None) -> bool | None:
    """Whether verdicts on (a, b) and on (b, a) name the same response (None: one did not parse)."""
    return None if first is None or swapped is None else (first == "A") == (swapped == "B")


def round_robin_scores(judge: Judge, groups: Sequence[SampleGroup]) -> tuple[list[list[float]], list]:
    """For a pairwise-only judge: each completion's mean win probability against the others, and per group
    the share of its comparisons where the two orders agreed (None: the judge does not say, or no verdict
    parsed). A judge that asks both orders says so through `compare_both(prompts, a, b) -> (probs, agree)`."""
    prompts, a, b, where = [], [], [], []
    for g, group in enumerate(groups):
        n = len(group.completions)
        for i in range(n):
            for j in range(i + 1, n):
                prompts.append(group.prompt)
                a.append(group.completions[i].text)
                b.append(group.completions[j].text)
                where.append((g, i, j))
    both = hasattr(judge, "compare_both")
    probs, agree = (judge.compare_both(prompts, a, b) if both else (judge.compare(prompts, a, b), None)) \
        if prompts else ([], None)
    wins = [[0.0] * len(group.completions) for group in groups]
    agreed = [[] for _ in groups]
    for k, ((g, i, j), p) in enumerate(zip(where, probs)):
        wins[g][i] += p
        wins[g][j] += 1.0 - p
        if agree is not None and agree[k] is not None:
            agreed[g].append(agree[k])
    shares = [sum(x) / len(x) if x else None for x in agreed] if agree is not None else [None] * len(groups)
    return [[w / max(1, len(row) - 1) for w in row] for row in wins], shares


def group_scores(judge, groups: Sequence[SampleGroup]) -> list[list[float]]:
    """Each completion's score per group: the judge's own (pointwise), or round-robin win rates."""
    return scores_and_agreement(judge, groups)[0]


def scores_and_agreement(judge, groups: Sequence[SampleGroup]) -> tuple[list[list[float]], list]:
    """`group_scores`, and per group how often a pairwise judge's two orders agreed (None: pointwise)."""
    if isinstance(judge, PointwiseJudge):
        return regroup(judge.score(*flat_texts(groups)), groups), [None] * len(groups)
    return round_robin_scores(judge, groups)   # win rates lie in [0, 1]; a 0.5 verdict is a tie


def label_groups(judge, groups: Sequence[SampleGroup], margin: float = 0.0) -> Labels:
    """Labels from any judge that scores or compares."""
    start = time.time()
    scores, agreed = scores_and_agreement(judge, groups)
    pairs, dropped, rows = make_pairs(groups, scores, margin, details=lambda g, best, worst: (
        {} if agreed[g] is None else {"order_agreement": agreed[g]}))
    return Labels(pairs=tuple(pairs), groups=len(groups), ties=dropped["ties"], identical=dropped["identical"],
                  nonfinite=dropped["nonfinite"], scores=tuple(x for row in scores for x in row if math.isfinite(x)),
                  seconds=time.time() - start, dropped=tuple(rows))
