"""Judges: turn completions into preference labels behind one narrow contract.

A judge implements `compare(prompts, a, b) -> list[float]`, the probability
that response a beats response b for each prompt. Pointwise judges (rules,
reward models) also implement `score(prompts, responses) -> list[float]`; their
`compare` follows from the scores. `build_judge(kind, **options)` makes one
from plain arguments; `JudgeActor` runs it as a Ray actor. `ensemble`
combines several judges into one weighted score (ensemble.py);
`constitutional` asks one LLM about each principle of a constitution
(constitution.py).
"""

from .base import Judge, PointwiseJudge, label_groups, make_pairs


def build_judge(kind: str, **options) -> Judge:
    """Make a judge from plain arguments (the controller maps the config to these)."""
    if kind == "rule":
        from .rule import RuleJudge
        return RuleJudge(options["function"])
    if kind == "reward_model":
        from ..artifacts import local_model
        from .reward_model import RewardModelJudge
        return RewardModelJudge(local_model(options["model"], options.get("file_server")), batch_size=options.get("batch_size", 16),
                                max_length=options.get("max_length", 1024),
                                device=options.get("device"))
    if kind == "ensemble":
        from .ensemble import EnsembleJudge, Member
        return EnsembleJudge([
            Member(name=m["name"], weight=m.get("weight", 1.0), normalize=m.get("normalize", False),
                   margin=m.get("margin", 0.0),
                   judge=build_judge(m["kind"], **{k: v for k, v in m.items() if k not in (
                       "name", "kind", "weight", "normalize", "margin")},
                       file_server=options.get("file_server")))
            for m in options["members"]])
    if kind == "constitutional":
        from .constitution import TEMPLATE, ConstitutionalJudge, Principle
        return ConstitutionalJudge(options["model"], [Principle(**p) for p in options["principles"]],
                                   template=options.get("template") or TEMPLATE,
                                   max_new_tokens=options.get("max_new_tokens", 2),
                                   constrained=options.get("constrained", True),
                                   engine=options.get("engine") or {}, file_server=options.get("file_server"))
    if kind == "llm":
        from .llm import LLMJudge
        return LLMJudge(options["model"], template=options["template"],
                        max_new_tokens=options.get("max_new_tokens", 8),
                        constrained=options.get("constrained", True),
                        engine=options.get("engine") or {}, file_server=options.get("file_server"))
    raise ValueError(f"unknown judge kind {kind!r}: use rule, reward_model, llm, ensemble or constitutional")


__all__ = ["Judge", "PointwiseJudge", "build_judge", "label_groups", "make_pairs"]
