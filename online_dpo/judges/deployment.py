"""A judge shared by many runs: any judge kind as a Ray Serve application, and the side a run uses.

`online-dpo judge serve CONFIG` deploys the config's judge section (rule,
reward model, LLM, ensemble, constitutional, endpoint) as the Serve
application `--app` (default "judge"), with `--replicas` copies. A run on
the same cluster uses it with `judge.kind: deployment` and `judge.app: NAME`,
so concurrent runs and tune trials load one judge instead of one each.

`score` and `compare` are batched across callers (Serve's `@serve.batch`):
the requests of several runs that arrive within a few milliseconds reach the
judge as one call and are split back. A run labels its groups itself
(`label_groups` over the shared judge's scores, or its verdicts for a
pairwise judge), so pairs are made as for a judge of its own; an ensemble's
per-objective margins and reports stay with the shared copy, and the run
sees its combined score. Every request names its run: `stats()` counts the
requests and items of each, and how many judge calls served them.
"""

from __future__ import annotations

import asyncio
import collections
import os

from ray import serve

from ..errors import JudgeFailed
from ..specs import JudgeSpec
from ..types import Labels
from .base import PointwiseJudge, compare_by_score, label_groups

DEADLINE = 600.0   # seconds a run waits for one request (its judge actor's call_timeout bounds it too)
MAX_BATCH = 64     # requests batched into one judge call


def split(flat: list, sizes: list[int]) -> list[list]:
    out, k = [], 0
    for n in sizes:
        out.append(list(flat[k:k + n]))
        k += n
    return out


class SharedJudge:
    """The Serve deployment: one judge, its requests batched across runs."""

    def __init__(self, spec: JudgeSpec):
        from . import build_judge

        self.judge, self.kind = build_judge(spec), spec.kind
        self.requests, self.items = collections.Counter(), collections.Counter()
        self.calls = 0

    def info(self) -> dict:
        return {"kind": self.kind, "pointwise": isinstance(self.judge, PointwiseJudge), "pid": os.getpid()}

    def stats(self) -> dict:
        """Requests and items per run, judge calls, and an endpoint judge's own counts (`usage`)."""
        usage = self.judge.usage() if hasattr(self.judge, "usage") else {}
        return {"requests": dict(self.requests), "items": dict(self.items), "judge_calls": self.calls, "usage": usage}

    def _count(self, requests: list[tuple]) -> list[int]:
        sizes = [len(r[1]) for r in requests]
        for (caller, *_), n in zip(requests, sizes):
            self.requests[caller] += 1
            self.items[caller] += n
        self.calls += 1
        return sizes

    @serve.batch(max_batch_size=MAX_BATCH, batch_wait_timeout_s=0.02)
    async def score(self, requests: list[tuple]) -> list:
        """(caller, prompts, responses) per request -> its scores (None from a pairwise-only judge)."""
        sizes = self._count(requests)
        if not isinstance(self.judge, PointwiseJudge):
            return [None] * len(requests)
        flat = [[x for r in requests for x in r[k]] for k in (1, 2)]
        return split(await asyncio.to_thread(self.judge.score, *flat), sizes)

    @serve.batch(max_batch_size=MAX_BATCH, batch_wait_timeout_s=0.02)
    async def compare(self, requests: list[tuple]) -> list:
        """(caller, prompts, a, b) per request -> (P(a > b), whether the two orders agreed or None)."""
        sizes = self._count(requests)
        flat = [[x for r in requests for x in r[k]] for k in (1, 2, 3)]
        if hasattr(self.judge, "compare_both"):
            probs, agree = await asyncio.to_thread(self.judge.compare_both, *flat)
        else:
            probs, agree = await asyncio.to_thread(self.judge.compare, *flat), [None] * len(flat[0])
        return list(zip(split(probs, sizes), split(agree, sizes)))

    async def objectives(self, prompts: list, responses: list) -> dict:
        return await asyncio.to_thread(self.judge.objectives, prompts, responses)


def deploy(spec: JudgeSpec, app: str, replicas: int, actor_options: dict) -> None:
    """Run the judge of `spec` as the Serve application `app` (no HTTP route: runs call it by handle)."""
    serve.start(http_options={"host": "127.0.0.1"})
    deployment = serve.deployment(SharedJudge, name="judge", num_replicas=replicas,
                                  ray_actor_options=actor_options, max_ongoing_requests=4 * MAX_BATCH)
    serve.run(deployment.bind(spec), name=app, route_prefix=None, blocking=False)


class DeploymentJudge:
    """A run's side of a shared judge (judge.kind: deployment): the judge contract over the app's handle."""

    def __init__(self, handle, caller: str):
        self.handle, self.caller = handle, caller

    def call(self, method: str, *args):
        try:
            return getattr(self.handle, method).remote((self.caller, *args)).result(timeout_s=DEADLINE)
        except TimeoutError:
            raise JudgeFailed(f"the shared judge did not answer {method} within {DEADLINE:g}s") from None

    def label(self, groups, margin: float) -> Labels:
        return label_groups(self, groups, margin)

    def objectives(self, prompts, responses) -> dict:
        return self.handle.objectives.remote(list(prompts), list(responses)).result(timeout_s=DEADLINE)

    def usage(self) -> dict:
        return {}


class PairwiseDeploymentJudge(DeploymentJudge):
    def compare(self, prompts, a, b) -> list[float]:
        return self.compare_both(prompts, a, b)[0]

    def compare_both(self, prompts, a, b):
        return self.call("compare", list(prompts), list(a), list(b))


class PointwiseDeploymentJudge(DeploymentJudge):
    def score(self, prompts, responses) -> list[float]:
        return self.call("score", list(prompts), list(responses))

    def compare(self, prompts, a, b) -> list[float]:
        return compare_by_score(self, prompts, a, b)


def build(spec: JudgeSpec) -> DeploymentJudge:
    try:
        handle = serve.get_app_handle(spec.app)
        info = handle.info.remote().result(timeout_s=60)
    except Exception as e:   # no such app, or Serve is not running on this cluster
        raise JudgeFailed(f"no shared judge '{spec.app}' on this cluster ({type(e).__name__}): start it with "
                          f"`online-dpo judge serve CONFIG --app {spec.app}` on the cluster the run joins "
                          "(RAY_ADDRESS), or set judge.app to one that runs") from None
    return (PointwiseDeploymentJudge if info["pointwise"] else PairwiseDeploymentJudge)(handle, spec.caller)
