"""Multi-objective judging: several judges (objectives) combined into one score with weights.

`judge.kind: ensemble` lists `judge.members`, each a judge of its own (rule,
reward_model or llm) with a `name`, a `weight`, an optional `normalize` and
an optional `margin`. Each completion's combined score is

    sum_k  weight_k * z_k(score_k)

where score_k is the member's pointwise score, or, for a pairwise (LLM)
member, the completion's round-robin win rate within its group; and z_k is
the identity, or with `normalize` a z-score whose mean and spread are fixed
from the first batch the member scores (the baseline evaluation in a fresh
run), so scores stay comparable across the run: a held-out reward before and
after training is measured on one scale.

Pairs are best vs worst of each group by combined score. A member's
`margin` makes its gaps at or below that margin count as zero in the pair's
combined gap (that objective calls it a tie); the pair is dropped as a tie
when the combined gap is at or below `judge.margin`.

Each objective is reported on its own: per batch its mean raw score, and how
often it agrees with the pair the ensemble chose (`agree`), or calls it a tie.
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

from ..specs import JudgeSpec
from ..types import Labels, SampleGroup
from .base import PointwiseJudge, compare_by_score, extremes, group_scores, make_pairs, regroup


@dataclass
class Member:
    name: str
    judge: object
    weight: float = 1.0
    normalize: bool = False
    margin: float = 0.0
    mean: float | None = None   # normalisation, fixed at the first batch
    std: float = 1.0

    @property
    def pointwise(self) -> bool:
        return isinstance(self.judge, PointwiseJudge)

    def calibrate(self, scores: Sequence[float]) -> None:
        if self.mean is not None or not scores:
            return
        self.mean = sum(scores) / len(scores)
        var = sum((s - self.mean) ** 2 for s in scores) / max(1, len(scores) - 1)
        self.std = math.sqrt(var) if var > 1e-12 else 1.0

    def scaled(self, scores: Sequence[float]) -> list[float]:
        if not self.normalize:
            return list(scores)
        self.calibrate(scores)
        return [(s - self.mean) / self.std for s in scores]


class EnsembleJudge:
    """Combines member judges into one weighted score (see the module docstring)."""

    def __init__(self, members: list[Member], margin: float = 0.0):
        if not members:
            raise ValueError("judge.members is empty: list at least one judge")
        self.members, self.margin = members, margin

    # ------------------------------------------------------------ scores

    def member_scores(self, groups: Sequence[SampleGroup]) -> dict[str, list[list[float]]]:
        """Each member's raw score of each completion, per group."""
        return {m.name: group_scores(m.judge, groups) for m in self.members}

    def scale(self, raw: dict[str, list[list[float]]]) -> dict[str, list[list[float]]]:
        """Each member's scores after its normalisation, in the same groups."""
        return {m.name: regroup(m.scaled([x for row in raw[m.name] for x in row]), raw[m.name])
                for m in self.members}

    def combine(self, scaled: dict[str, list[list[float]]]) -> list[list[float]]:
        """The weighted sum of the members' scaled scores of each completion."""
        shapes = scaled[self.members[0].name]
        return [[sum(m.weight * scaled[m.name][g][i] for m in self.members) for i in range(len(row))]
                for g, row in enumerate(shapes)]

    def gaps(self, raw: dict, scaled: dict, g: int, best: int, worst: int) -> dict[str, float | None]:
        """Each member's weighted gap between group g's best and worst completion; None where the
        member calls them a tie (its raw gap is within its margin)."""
        out: dict[str, float | None] = {}
        for m in self.members:
            tied = abs(raw[m.name][g][best] - raw[m.name][g][worst]) <= m.margin
            out[m.name] = None if tied else m.weight * (scaled[m.name][g][best] - scaled[m.name][g][worst])
        return out

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        """The combined score of single responses (evaluation): pointwise members only, since a pairwise
        member has nothing to compare a lone response with."""
        total = [0.0] * len(responses)
        for m in self.members:
            if m.pointwise:
                for i, s in enumerate(m.scaled(m.judge.score(prompts, responses))):
                    total[i] += m.weight * s
        return total

    def compare(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> list[float]:
        """Verdicts from the combined scores (evaluation's win rate)."""
        return compare_by_score(self, prompts, a, b, self.margin)

    def objectives(self, prompts: Sequence[str], responses: Sequence[str]) -> dict[str, float]:
        """Each pointwise objective's mean raw score over these responses."""
        return {m.name: sum(s) / max(1, len(s)) for m in self.members if m.pointwise
                for s in [m.judge.score(prompts, responses)]}

    # ------------------------------------------------------------ labelling

    def label(self, groups: Sequence[SampleGroup], margin: float) -> Labels:
        """Best vs worst by combined score; the gap that must pass `margin` leaves out tied members."""
        start = time.time()
        raw = self.member_scores(groups)
        scaled = self.scale(raw)
        combined = self.combine(scaled)

        def gap(g: int, best: int, worst: int) -> float:
            return sum(d for d in self.gaps(raw, scaled, g, best, worst).values() if d is not None)

        def details(g: int, best: int, worst: int) -> dict:   # each objective's raw scores, for the log
            return {f"{side}/{m.name}": raw[m.name][g][i] for m in self.members
                    for side, i in (("chosen", best), ("rejected", worst))}

        pairs, dropped, rows = make_pairs(groups, combined, margin, gap, details)
        return Labels(pairs=tuple(pairs), groups=len(groups), ties=dropped["ties"], identical=dropped["identical"],
                      nonfinite=dropped["nonfinite"],
                      scores=tuple(x for row in combined for x in row if math.isfinite(x)),
                      seconds=time.time() - start,
                      objectives=self.report(raw, scaled, combined), dropped=tuple(rows))

    def report(self, raw: dict, scaled: dict, combined: list[list[float]]) -> dict[str, float]:
        """Per objective: its mean raw score, and the share of groups where it agrees with the chosen
        pair or calls it a tie."""
        agree, tied = collections.Counter(), collections.Counter()
        for g, s in enumerate(combined):
            for name, d in self.gaps(raw, scaled, g, *extremes(s)).items():
                tied[name] += d is None
                agree[name] += d is not None and d > 0
        n, out = max(1, len(combined)), {}
        for m in self.members:
            flat = [x for row in raw[m.name] for x in row]
            out[f"objective/{m.name}"] = sum(flat) / max(1, len(flat))
            out[f"objective_agree/{m.name}"] = agree[m.name] / n
            out[f"objective_ties/{m.name}"] = tied[m.name] / n
        return out


def build(spec: JudgeSpec) -> EnsembleJudge:
    """An ensemble of judges built by kind (judges/__init__.py's registry)."""
    from dataclasses import replace

    from . import build_judge

    return EnsembleJudge([Member(name=m.name, weight=m.weight, normalize=m.normalize, margin=m.margin,
                                 judge=build_judge(replace(m, margin=0.0))) for m in spec.members], spec.margin)
