"""Rollouts: prompts -> samplers -> judges -> a buffer of preference pairs.

Two strategies behind one interface (`take`, `set_weights`, `reset`,
`state`/`restore`, `stop`):

- `LockStep` (sync.mode: sync) samples inside `take`, with every sampler on
  the learner's current version, until the version's pairs are there. Pairs
  are strictly on-policy and a run is deterministic for a seed.
- `Pipelined` (sync.mode: async) keeps every sampler busy in a background
  thread (`sampler.calls_in_flight` requests each, which its engine steps
  together), judging as batches come back, into a bounded buffer: it stops
  sampling while the buffer (and what is in flight) would overflow, instead
  of sampling and dropping. `take` hands out pairs at most
  `sync.max_policy_lag` versions behind the learner; older ones are dropped
  and counted.

With `judge.in_sampler` each sampler labels its own batch with the rule
judge it holds (no judge calls); otherwise the judge actors label them.

Both send the latest published weights with each sampler request: a sampler
pulls a stored version before it samples, or waits for a pushed one it does
not hold yet (pushed versions land in flight too). Every request is
seeded from a round counter, so a request that fails over to another
sampler gives the same completions.
"""

from __future__ import annotations

import collections
import math
import threading
import time

from .buffer import PairBuffer
from .data import PromptSource
from .errors import JudgeFailed, RunFailed
from .specs import RolloutSpec
from .topology import ActorGroup, split
from .types import Labels, SampleBatch

STARVED = 20  # give up after sampling this many times the prompts a batch needs without getting it
BAD_SHARE = 0.5   # a judge whose malformed or non-finite verdicts pass this share of the recent ones ...
BAD_WINDOW = 8    # ... rounds (and at least BAD_MIN groups) ends the run
BAD_MIN = 32


class Starved(RunFailed):
    """The judge no longer separates the policy's samples (ties or identical responses)."""


def judge_health(recent: list[dict]) -> str | None:
    """Why the judge is broken, from the recent rollout records (None while it is fine)."""
    groups, asked = sum(r["prompts"] for r in recent), sum(r["asked"] for r in recent)
    nonfinite, malformed = sum(r["nonfinite"] for r in recent), sum(r["malformed"] for r in recent)
    if groups >= BAD_MIN and nonfinite > BAD_SHARE * groups:
        return (f"the judge scored {nonfinite} of the last {groups} prompts' samples NaN or infinite: fix "
                "judge.function (or the judge model) so it returns finite scores")
    if asked >= BAD_MIN and malformed > BAD_SHARE * asked:
        return (f"{malformed} of the judge's last {asked} verdicts did not parse (it must answer 'A' or 'B'): "
                "set judge.constrained: true, or fix judge.template / judge.model")
    return None


def starved_message(got: int, asked: int, last: dict) -> str:
    return (f"the judge separated only {got} of {asked} prompts' samples (ties {last.get('ties')}, identical "
            f"{last.get('identical')} in the last round): lower judge.margin, or raise sampler.n or "
            f"sampler.temperature")


class Rollouts:
    """What both strategies share: the prompt source, the actor groups, the counters and the records."""

    def __init__(self, spec: RolloutSpec, samplers: ActorGroup, judges: ActorGroup, source: PromptSource, log):
        self.samplers, self.judges, self.source = samplers, judges, source
        self.sampling, self.seed, self.log = spec.sampling.kwargs(), spec.seed, log   # log(record): the tracker
        if spec.judge_in_sampler:   # each sampler labels its own batch: no judge calls
            self.sampling["label"] = True
        self.buffer = PairBuffer(spec.capacity)
        self.weights = None          # the latest published WeightsHandle
        self.version = 0             # its version
        self.round = 0
        self.counts = collections.Counter()   # prompts, completions, pairs, ties, identical
        self.busy = collections.Counter()     # sampler index -> seconds generating or loading
        self.busy_until: dict[int, float] = {}   # sampler index -> when its latest counted call ended
        self.latest: dict = {}
        self.recent: collections.deque = collections.deque(maxlen=BAD_WINDOW)   # for judge_health

    # ------------------------------------------------------------ requests

    def request(self, prompts: list, chunk: int, weights) -> tuple[tuple, dict]:
        """One sampler call's arguments; seeded by the round and the chunk, not by the sampler."""
        kwargs = dict(self.sampling, seed=self.seed * 1_000_003 + self.round * 7919 + 10_000 * chunk,
                      weights=weights)
        return ([list(p.ids) for p in prompts], [p.text for p in prompts]), kwargs

    def count_busy(self, i: int, batch: SampleBatch) -> None:
        """Sampler i's busy seconds: the union of its calls' spans (sampler.calls_in_flight overlaps them)."""
        end = batch.ended or time.time()
        start = max(end - batch.seconds - batch.load_seconds, self.busy_until.get(i, 0.0))
        self.busy[i] += max(0.0, end - start)
        self.busy_until[i] = max(end, self.busy_until.get(i, 0.0))

    def record(self, batches: list[SampleBatch], labels: list[Labels], judge_seconds: float) -> dict:
        comps = [c for b in batches for g in b.groups for c in g.completions]
        groups = sum(len(b.groups) for b in batches)
        scores = [x for lb in labels for x in lb.scores]
        pairs = [p for lb in labels for p in lb.pairs]
        record = {
            "kind": "rollout", "round": self.round, "policy_version": min(b.version for b in batches),
            "prompts": groups, "completions": len(comps), "pairs": len(pairs),
            "ties": sum(lb.ties for lb in labels), "identical": sum(lb.identical for lb in labels),
            "nonfinite": sum(lb.nonfinite for lb in labels), "malformed": sum(lb.malformed for lb in labels),
            "asked": sum(lb.asked for lb in labels), **usage_sums(labels), "reward_mean": sum(scores) / max(1, len(scores)),
            "chosen_score": sum(p.chosen_score for p in pairs) / max(1, len(pairs)),
            "rejected_score": sum(p.rejected_score for p in pairs) / max(1, len(pairs)),
            "response_tokens": sum(len(c.token_ids) for c in comps) / max(1, len(comps)),
            "eos_rate": sum(c.finish_reason == "stop" for c in comps) / max(1, len(comps)),
            "sample_seconds": max(b.seconds for b in batches),
            "load_seconds": max(b.load_seconds for b in batches), "judge_seconds": judge_seconds,
            "versions": sorted({b.version for b in batches}),
            "spanned": sum(c.end_version not in (None, c.policy_version) for c in comps),   # updated in flight
            **objective_means(labels),
        }
        for key in ("prompts", "completions", "pairs", "ties", "identical", "nonfinite", "malformed"):
            self.counts[key] += record[key]
        self.latest = record
        self.buffer.drop([row for lb in labels for row in lb.dropped])   # for the preference log
        self.log(record)
        self.recent.append(record)
        broken = judge_health(list(self.recent))
        if broken:
            raise JudgeFailed(broken)
        return record

    def label(self, batches: list[SampleBatch]) -> list[Labels]:
        """The batches' labels: the samplers' own (judge.in_sampler), or the judges'."""
        if all(b.labels is not None for b in batches):
            return [b.labels for b in batches]
        groups = [g for b in batches for g in b.groups]
        chunks = [c for c in split(groups, len(self.judges.handles)) if c]
        return self.judges.run("label", [((c,), {}) for c in chunks])

    # ------------------------------------------------------------ the interface

    def set_weights(self, handle) -> None:
        """Sample from a newly published version from now on (None: nothing was published)."""
        if handle is not None:
            self.weights, self.version = handle, handle.version

    def reset(self, handle, version: int) -> int:
        """A restored learner is back at `version`: forget newer pairs, sample from its weights."""
        if handle is not None:
            self.set_weights(handle)
        self.version = version
        return self.buffer.discard_newer(version)

    def dropped(self) -> list:
        """(why, pair) rows dropped since the last call, for the preference log."""
        return self.buffer.drain()

    def waiting(self) -> list:
        """The pairs buffered for the learner."""
        return self.buffer.waiting()

    def lost(self, pairs, trained: int = 0) -> None:
        """Pairs taken for orders a restored learner never ran, and `trained` more that it trained into a
        version it no longer has (the preference log relabels those itself)."""
        self.buffer.drop([("restart", p) for p in pairs])
        self.buffer.discarded += trained

    @property
    def stale(self) -> int:
        """Pairs dropped so far for lagging too far behind the learner."""
        return self.buffer.stale

    def stats(self) -> dict:
        return {**self.counts, "stale_dropped": self.buffer.stale, "restart_dropped": self.buffer.discarded,
                "buffered": len(self.buffer), "rounds": self.round}

    def state(self) -> dict:
        return {"round": self.round, "counts": dict(self.counts), "source": self.source.state(),
                "buffer": self.buffer.state()}

    def restore(self, state: dict) -> None:
        self.round, self.counts = state["round"], collections.Counter(state["counts"])
        self.source.restore(state["source"])
        self.buffer.restore(state["buffer"])

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def outstanding(self) -> list[str]:
        """Sampler and judge calls in flight, for a stalled run's message (none between lock steps)."""
        return []


class LockStep(Rollouts):
    """Sample, judge, learn, sync: one phase at a time, every sampler on the learner's version."""

    def __init__(self, *args):
        super().__init__(*args)
        self.keep_rate = 1.0

    def take(self, n: int, min_version: int, want: int | None = None, timeout: float | None = None):
        """n pairs of exactly min_version; samples until `want` of them (the version's share) are there."""
        self.buffer.prune(min_version)
        want, asked, start = max(n, want or n), 0, len(self.buffer)
        while len(self.buffer) < n:
            if asked > STARVED * want:
                raise Starved(starved_message(len(self.buffer) - start, asked, self.latest))
            k = max(len(self.samplers.handles), math.ceil((want - len(self.buffer)) / max(self.keep_rate, 0.2)))
            self.buffer.put(self.one_round(self.source.next_batch(k)))
            asked += k
        return self.buffer.take(n, min_version, timeout=0)

    def one_round(self, prompts: list) -> list:
        chunks = split(prompts, len(self.samplers.handles))
        calls = [self.request(c, i, self.weights) for i, c in enumerate(chunks) if c]
        batches = self.samplers.run("generate", calls)
        for i, b in enumerate(batches):
            self.count_busy(i, b)
        t = time.time()
        labels = self.label(batches)
        pairs = [p for lb in labels for p in lb.pairs]
        self.round += 1
        self.record(batches, labels, time.time() - t + max(b.judge_seconds for b in batches))
        self.keep_rate = 0.5 * self.keep_rate + 0.5 * len(pairs) / max(1, len(prompts))
        return pairs

    def state(self) -> dict:
        return {**super().state(), "keep_rate": self.keep_rate}

    def restore(self, state: dict) -> None:
        super().restore(state)
        self.keep_rate = state["keep_rate"]


class Pipelined(Rollouts):
    """Samplers run ahead of the learner in a background thread, into a bounded buffer."""

    def __init__(self, spec: RolloutSpec, *args):
        super().__init__(spec, *args)
        self.prompts_per_call, self.calls_in_flight = spec.prompts_per_call, spec.calls_in_flight
        self.keep_rate = 0.5
        self.error: BaseException | None = None
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="rollouts", daemon=True)
        self.epoch = 0                       # bumped by reset(): results dispatched before are dropped
        self.inflight_prompts = 0
        self.asked_since_take = 0
        self.sampling_calls: dict = {}   # ref -> (Call, prompts, epoch)
        self.judging_calls: dict = {}    # ref -> (Call, batch, epoch, started)

    def start(self) -> None:
        if self.thread.ident is None:
            self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        if self.thread.is_alive():
            self.thread.join(timeout=60)

    def reset(self, handle, version: int) -> int:
        self.epoch += 1
        return super().reset(handle, version)

    def take(self, n: int, min_version: int, want: int | None = None, timeout: float | None = None):
        if self.error is not None:
            raise self.error
        got = self.buffer.take(n, min_version, timeout=timeout)
        if got is not None:
            self.asked_since_take = 0
        elif self.asked_since_take > STARVED * n:
            raise Starved(starved_message(len(self.buffer), self.asked_since_take, self.latest))
        return got

    def room(self) -> bool:
        expected = self.inflight_prompts * self.keep_rate
        return len(self.buffer) + expected < self.buffer.capacity

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # surfaced by take()
            self.error = e

    def outstanding(self) -> list[str]:
        now, calls = time.time(), [e[0] for e in list(self.sampling_calls.values()) + list(self.judging_calls.values())]
        return [f"{c.method} on {self.samplers.name(c.actor) if c.method == 'generate' else self.judges.name(c.actor)} "
                f"for {now - c.sent:.0f}s" for c in calls]

    def _loop(self) -> None:
        import ray

        sampling, judging = self.sampling_calls, self.judging_calls
        while not self.stopping.is_set():
            self._resend_overdue(sampling, self.samplers)
            self._resend_overdue(judging, self.judges)
            busy = collections.Counter(call.actor for call, *_ in sampling.values())
            for i in self.samplers.live():
                while busy[i] < self.calls_in_flight and self.room():
                    busy[i] += 1
                    prompts = self.source.next_batch(self.prompts_per_call)
                    call = self.samplers.send("generate", *self.request(prompts, i, self.weights), actor=i)
                    self.round += 1
                    sampling[call.ref] = (call, prompts, self.epoch)
                    self.inflight_prompts += len(prompts)
                    self.asked_since_take += len(prompts)
            refs = list(sampling) + list(judging)
            if not refs:
                time.sleep(0.01)
                continue
            ready, _ = ray.wait(refs, num_returns=1, timeout=0.1)
            for ref in ready:
                if ref in sampling:
                    self._sampled(*sampling.pop(ref), sampling, judging)
                else:
                    self._judged(*judging.pop(ref), judging)

    @staticmethod
    def _resend_overdue(calls: dict, group: ActorGroup) -> None:
        """Calls past run.call_timeout: their actor is hung; the same call goes to a live one."""
        for ref, (call, *rest) in list(calls.items()):
            if group.overdue(call):
                del calls[ref]
                again = group.abandon(call)
                calls[again.ref] = (again, *rest)

    def _sampled(self, call, prompts: list, epoch: int, sampling: dict, judging: dict) -> None:
        done, out = self.samplers.receive(call)
        if not done:   # its sampler died: the same seeded request went to a live one
            sampling[out.ref] = (out, prompts, epoch)
            return
        self.count_busy(call.actor, out)
        if out.labels is not None:   # labelled by the sampler's own judge
            self._labelled(out, out.labels, epoch, out.judge_seconds)
        else:
            self._judge(out, judging, epoch, time.time())

    def _judge(self, batch: SampleBatch, judging: dict, epoch: int, started: float) -> None:
        live = self.judges.wait_live()
        call = self.judges.send("label", (list(batch.groups),), actor=live[self.round % len(live)])
        judging[call.ref] = (call, batch, epoch, started)

    def _judged(self, call, batch: SampleBatch, epoch: int, started: float, judging: dict) -> None:
        done, labels = self.judges.receive(call)
        if not done:   # its judge died: the same batch went to a live one
            judging[labels.ref] = (labels, batch, epoch, started)
            return
        self._labelled(batch, labels, epoch, time.time() - started)

    def _labelled(self, batch: SampleBatch, labels: Labels, epoch: int, judge_seconds: float) -> None:
        """A batch's labels, into the buffer (dropped when the learner was restored since it was sent)."""
        self.inflight_prompts -= len(batch.groups)
        if epoch != self.epoch:   # sampled before the learner was restored: its version is gone
            self.buffer.drop([("restart", p) for p in labels.pairs])
            return
        self.record([batch], [labels], judge_seconds)
        self.keep_rate = 0.8 * self.keep_rate + 0.2 * len(labels.pairs) / max(1, len(batch.groups))
        self.buffer.put(list(labels.pairs))


def make_rollouts(spec: RolloutSpec, samplers: ActorGroup, judges: ActorGroup, source: PromptSource, log):
    """Lock-step rollouts for sync.mode sync, pipelined ones for async."""
    if spec.mode == "sync":
        return LockStep(spec, samplers, judges, source, log)
    return Pipelined(spec, samplers, judges, source, log)


def objective_means(labels: list[Labels]) -> dict:
    """An ensemble judge's per-objective figures over a batch's label calls, weighted by groups."""
    total = sum(lb.groups for lb in labels if lb.objectives)
    keys = list(dict.fromkeys(k for lb in labels for k in lb.objectives))   # the members' order
    return {k: sum(lb.objectives.get(k, 0.0) * lb.groups for lb in labels) / total for k in keys} if total else {}


def usage_sums(labels: list[Labels]) -> dict:
    """An endpoint judge's requests, cache hits, retries and tokens over a batch's label calls."""
    keys = list(dict.fromkeys(k for lb in labels for k in lb.usage))
    return {f"judge_{k}": sum(lb.usage.get(k, 0) for lb in labels) for k in keys}
