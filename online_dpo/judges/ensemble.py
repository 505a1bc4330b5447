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

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

from ..types import LabelStats, PreferencePair, SampleGroup
from .base import PointwiseJudge, compare_by_score, round_robin_scores


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

    def __init__(self, members: list[Member]):
        if not members:
            raise ValueError("judge.members is empty: list at least one judge")
        self.members = members

    # ------------------------------------------------------------ scores

    def member_scores(self, groups: Sequence[SampleGroup]) -> dict[str, list[list[float]]]:
        """Each member's raw score of each completion, per group."""
        out = {}
        prompts = [g.prompt for g in groups for _ in g.completions]
        texts = [c.text for g in groups for c in g.completions]
        for m in self.members:
            if m.pointwise:
                flat, rows, k = m.judge.score(prompts, texts), [], 0
                for g in groups:
                    rows.append(list(flat[k:k + len(g.completions)]))
                    k += len(g.completions)
                out[m.name] = rows
            else:
                out[m.name] = round_robin_scores(m.judge, groups)
        return out

    def scale(self, raw: dict[str, list[list[float]]]) -> dict[str, list[list[float]]]:
        """Each member's scores after its normalisation, in the same groups."""
        scaled = {}
        for m in self.members:
            values, rows, k = m.scaled([x for row in raw[m.name] for x in row]), [], 0
            for row in raw[m.name]:
                rows.append(values[k:k + len(row)])
                k += len(row)
            scaled[m.name] = rows
        return scaled

    def combine(self, scaled: dict[str, list[list[float]]]) -> list[list[float]]:
        """The weighted sum of the members' scaled scores of each completion."""
        shapes = scaled[self.members[0].name]
        return [[sum(m.weight * scaled[m.name][g][i] for m in self.members) for i in range(len(row))]
                for g, row in enumerate(shapes)]

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
        return compare_by_score(self, prompts, a, b)

    def objectives(self, prompts: Sequence[str], responses: Sequence[str]) -> dict[str, float]:
        """Each pointwise objective's mean raw score over these responses."""
        return {m.name: sum(s) / max(1, len(s)) for m in self.members if m.pointwise
                for s in [m.judge.score(prompts, responses)]}

    # ------------------------------------------------------------ labelling

    def label(self, groups: Sequence[SampleGroup], margin: float) -> tuple[list[PreferencePair], LabelStats]:
        start = time.time()
        raw = self.member_scores(groups)
        scaled = self.scale(raw)
        combined = self.combine(scaled)
        pairs, ties, identical = [], 0, 0
        agree = {m.name: 0 for m in self.members}
        tied = {m.name: 0 for m in self.members}
        for gi, (group, s) in enumerate(zip(groups, combined)):
            best = max(range(len(s)), key=lambda i: s[i])
            worst = min(range(len(s)), key=lambda i: s[i])
            gap = 0.0
            for m in self.members:
                d = scaled[m.name][gi][best] - scaled[m.name][gi][worst]
                raw_gap = raw[m.name][gi][best] - raw[m.name][gi][worst]
                if abs(raw_gap) <= m.margin:
                    tied[m.name] += 1
                else:
                    gap += m.weight * d
                    agree[m.name] += (m.weight * d) > 0
            chosen, rejected = group.completions[best], group.completions[worst]
            if best == worst or gap <= margin:
                ties += 1
            elif chosen.token_ids == rejected.token_ids:
                identical += 1
            else:
                pairs.append(PreferencePair(prompt=group.prompt, prompt_ids=group.prompt_ids, chosen=chosen,
                                            rejected=rejected, chosen_score=float(s[best]),
                                            rejected_score=float(s[worst])))
        n = max(1, len(groups))
        objectives = {}
        for m in self.members:
            flat = [x for row in raw[m.name] for x in row]
            objectives[f"objective/{m.name}"] = sum(flat) / max(1, len(flat))
            objectives[f"objective_agree/{m.name}"] = agree[m.name] / n
            objectives[f"objective_ties/{m.name}"] = tied[m.name] / n
        stats = LabelStats(
            groups=len(groups), pairs=len(pairs), ties=ties, identical=identical,
            scores=tuple(x for row in combined for x in row),
            chosen_mean=sum(p.chosen_score for p in pairs) / len(pairs) if pairs else 0.0,
            rejected_mean=sum(p.rejected_score for p in pairs) / len(pairs) if pairs else 0.0,
            seconds=time.time() - start, objectives=objectives)
        return pairs, stats
