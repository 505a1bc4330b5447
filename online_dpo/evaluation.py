"""Held-out evaluation and the run summary.

Evaluation samples one response per held-out prompt with a fixed seed,
from a given published version, scores it with the judge and, against the
baseline (version 0), counts the judge's wins (ties are half). The summary is
what a run reports at its end: quality, speed, what was dropped, what
restarted.
"""

from __future__ import annotations

import math
import time

from .errors import JudgeFailed
from .specs import Sampling
from .topology import ActorGroup, split

EVAL_SEED = 424242


class HeldOut:
    """The held-out evaluation of a run: one sample per held-out prompt, scored by the training judge and,
    where eval.judge is set, by an independent one (`evaluators`), whose figures carry the `eval_judge/`
    prefix. `report(result, step)` logs each evaluation. A judge that fails (JudgeFailed: its endpoint is
    down) leaves an evaluation out with a warning instead of ending a run that has trained."""

    def __init__(self, samplers: ActorGroup, judges: ActorGroup, evaluators: ActorGroup | None, heldout: list,
                 sampling: Sampling, report, warn):
        self.samplers, self.judges, self.evaluators, self.heldout = samplers, judges, evaluators, heldout
        self.sampling, self.report, self.warn = sampling, report, warn

    def __call__(self, weights, version: int, baseline: dict | None, step: int) -> dict:
        """Score `weights` (None: the starting ones) at `version`; log and return the result."""
        start = time.time()
        try:
            result = evaluate(self.samplers, self.judges, self.heldout, self.sampling, weights, version, baseline)
            if result and self.evaluators is not None:
                result.update(judged(self.evaluators, result["prompts"], result["responses"],
                                     (baseline or {}).get("responses"), "eval_judge/"))
        except JudgeFailed as e:
            self.warn(f"held-out evaluation of v{version} left out: {e}")
            return {}
        if result:
            result["seconds"] = round(time.time() - start, 3)
            result["time"] = round(start, 3)   # when it began (Unix time): a time-to-quality curve needs it
            self.report(result, step)
        return result


def evaluate(samplers: ActorGroup, judges: ActorGroup, heldout: list, sampling: Sampling, weights,
             version: int, baseline: dict | None = None) -> dict:
    """Score one sample per held-out prompt (`sampling`: eval's, n = 1) from `weights` (None: the
    engines' starting weights)."""
    if not heldout:
        return {}
    calls = [(([list(p.ids) for p in c], [p.text for p in c]),
              dict(sampling.kwargs(), seed=EVAL_SEED + 10_000 * i, weights=weights))
             for i, c in enumerate(split(heldout, len(samplers.handles))) if c]
    groups = [g for batch in samplers.run("generate", calls) for g in batch.groups]
    prompts = [g.prompt for g in groups]
    responses = [g.completions[0].text for g in groups]
    result = {"kind": "eval", "policy_version": version, "prompts": prompts, "responses": responses}
    return {**result, **judged(judges, prompts, responses, (baseline or {}).get("responses"))}


def judged(judges: ActorGroup, prompts: list, responses: list, baseline: list | None, prefix: str = "") -> dict:
    """One judge's figures of held-out responses: mean score, per-objective means, and the win rate
    against the baseline's responses (when given); NaN or infinite verdicts are left out and counted."""
    (scores,) = judges.run("score", [((prompts, responses), {})])
    reward, bad = finite_mean(scores)
    out = {"reward": reward, "nonfinite": bad}
    (objectives,) = judges.run("objectives", [((prompts, responses), {})])
    out.update({f"objective/{k}": v for k, v in objectives.items() if v is not None and math.isfinite(v)})
    if baseline is not None:
        (wins,) = judges.run("compare", [((prompts, responses, baseline), {})])
        out["win_rate"], more = finite_mean(wins)
        out["nonfinite"] += more
    return {prefix + k: v for k, v in out.items()}


def finite_mean(values) -> tuple[float | None, int]:
    """The mean of the finite values (None if there are none), and how many were NaN or infinite:
    a judge's stray NaN is left out and counted, never averaged into a figure."""
    if values is None:
        return None, 0
    good = [v for v in values if v is not None and math.isfinite(v)]
    return (sum(good) / len(good) if good else None), len(values) - len(good)


def summary(before: dict, after: dict, last_train: dict, train_wall: float | None, pairs_before: int,
            wall: float, rollouts: dict, restarts: dict, extra: dict) -> dict:
    """`train_wall` and `wall` cover this process; `pairs_before` were trained before it (resume)."""
    pairs = last_train.get("pairs", 0)
    return {
        "reward_before": before.get("reward"), "reward_after": after.get("reward"),
        "win_rate": after.get("win_rate"), "steps": last_train.get("step", 0), "pairs": pairs,
        "final_kl": last_train.get("kl"),
        "wall_seconds": round(wall, 1),
        "train_seconds": round(train_wall, 1) if train_wall else None,
        "pairs_per_second": round((pairs - pairs_before) / train_wall, 2) if train_wall else None,
        "final_policy_version": last_train.get("policy_version", 0),
        "prompts_sampled": rollouts.get("prompts", 0), "ties_dropped": rollouts.get("ties", 0),
        "identical_dropped": rollouts.get("identical", 0), "stale_dropped": rollouts.get("stale_dropped", 0),
        "restart_dropped": rollouts.get("restart_dropped", 0),
        "restarts": restarts,
        **({"objectives": {k.removeprefix("objective/"): {"before": before.get(k), "after": after.get(k)}
                           for k in after if k.startswith("objective/")}} if any(
            k.startswith("objective/") for k in after) else {}),
        **({"eval_judge": {"reward_before": before.get("eval_judge/reward"), "reward_after": after.get(
            "eval_judge/reward"), "win_rate": after.get("eval_judge/win_rate")}} if "eval_judge/reward" in after else {}),
        **extra,
        "samples_before": before.get("responses", [])[:5], "samples_after": after.get("responses", [])[:5],
    }
