"""The judge contract and pair construction (pure Python; no torch, no Ray).

Pairs are best vs worst of the n completions of a prompt. A pair is dropped
and counted when the judge cannot separate them (a score gap at or below the
margin, or a pairwise verdict of 0.5) and when the two token sequences are
identical: identical responses are never trained on.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from ..types import LabelStats, PreferencePair, SampleGroup


@runtime_checkable
class Judge(Protocol):
    def compare(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> list[float]:
        """P(a better than b) per prompt; 0.5 is a tie."""


@runtime_checkable
class PointwiseJudge(Judge, Protocol):
    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        """A scalar score per response: higher is better."""


def compare_by_score(judge: PointwiseJudge, prompts, a, b, margin: float = 0.0) -> list[float]:
    """Hard verdicts from scores: 1 if a wins by more than the margin, 0 if b does, else 0.5."""
    sa, sb = judge.score(prompts, a), judge.score(prompts, b)
    return [1.0 if x - y > margin else 0.0 if y - x > margin else 0.5 for x, y in zip(sa, sb)]


def make_pairs(groups: Sequence[SampleGroup], scores: Sequence[Sequence[float]],
               margin: float) -> tuple[list[PreferencePair], dict]:
    """Best vs worst of each group by score; returns pairs and drop counts."""
    pairs, ties, identical = [], 0, 0
    for group, s in zip(groups, scores):
        best = max(range(len(s)), key=lambda i: s[i])
        worst = min(range(len(s)), key=lambda i: s[i])
        chosen, rejected = group.completions[best], group.completions[worst]
        if s[best] - s[worst] <= margin:  # all equal (best is worst) or within the margin
            ties += 1
        elif chosen.token_ids == rejected.token_ids:
            identical += 1
        else:
            pairs.append(PreferencePair(prompt=group.prompt, prompt_ids=group.prompt_ids,
                                        chosen=chosen, rejected=rejected,
                                        chosen_score=float(s[best]), rejected_score=float(s[worst])))
    return pairs, {"ties": ties, "identical": identical}


def round_robin_scores(judge: Judge, groups: Sequence[SampleGroup]) -> list[list[float]]:
    """For a pairwise-only judge: each completion's mean win probability against the others."""
    prompts, a, b, where = [], [], [], []
    for g, group in enumerate(groups):
        n = len(group.completions)
        for i in range(n):
            for j in range(i + 1, n):
                prompts.append(group.prompt)
                a.append(group.completions[i].text)
                b.append(group.completions[j].text)
                where.append((g, i, j))
    probs = judge.compare(prompts, a, b) if prompts else []
    wins = [[0.0] * len(group.completions) for group in groups]
    for (g, i, j), p in zip(where, probs):
        wins[g][i] += p
        wins[g][j] += 1.0 - p
    return [[w / max(1, len(row) - 1) for w in row] for row in wins]


def label_groups(judge: Judge, groups: Sequence[SampleGroup], margin: float = 0.0
                 ) -> tuple[list[PreferencePair], LabelStats]:
    start = time.time()
    if isinstance(judge, PointwiseJudge):
        flat_prompts = [g.prompt for g in groups for _ in g.completions]
        flat = judge.score(flat_prompts, [c.text for g in groups for c in g.completions])
        scores, k = [], 0
        for g in groups:
            scores.append(flat[k:k + len(g.completions)])
            k += len(g.completions)
    else:
        # Round-robin win rates lie in [0, 1]; a 0.5 verdict between the two ends is a tie.
        scores = round_robin_scores(judge, groups)
    pairs, dropped = make_pairs(groups, scores, margin)
    all_scores = tuple(x for row in scores for x in row)
    stats = LabelStats(
        groups=len(groups), pairs=len(pairs), ties=dropped["ties"], identical=dropped["identical"],
        scores=all_scores,
        chosen_mean=sum(p.chosen_score for p in pairs) / len(pairs) if pairs else 0.0,
        rejected_mean=sum(p.rejected_score for p in pairs) / len(pairs) if pairs else 0.0,
        seconds=time.time() - start)
    return pairs, stats
