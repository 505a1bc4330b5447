"""The pair buffer and the schedule: staleness, restarts, state; which step syncs (no Ray)."""

import json
import threading
import time

from online_dpo.rollout import PairBuffer
from online_dpo.topology import split
from online_dpo.schedule import Schedule
from online_dpo.types import Completion, PreferencePair


def pair(version, tag=0):
    c = Completion((1, tag), "a", "stop", version)
    r = Completion((2, tag), "b", "stop", version)
    return PreferencePair("p", (0,), c, r, 1.0, 0.0)


def test_take_drops_pairs_older_than_the_lag_and_counts_them():
    b = PairBuffer(capacity=64)
    b.put([pair(3), pair(1), pair(2), pair(0)])       # samplers finish out of order
    got = b.take(2, min_version=2, timeout=0)
    assert [p.policy_version for p in got] == [3, 2] and b.stale == 2 and len(b) == 0


def test_take_waits_for_enough_fresh_pairs_or_times_out():
    b = PairBuffer(capacity=64)
    b.put([pair(1)])
    assert b.take(2, min_version=0, timeout=0.01) is None and len(b) == 1
    threading.Timer(0.05, lambda: b.put([pair(1)])).start()
    start = time.time()
    assert len(b.take(2, min_version=1, timeout=5)) == 2
    assert time.time() - start < 4


def test_a_restored_learner_discards_pairs_from_versions_it_no_longer_has():
    b = PairBuffer(capacity=64)
    b.put([pair(4), pair(5), pair(6), pair(5)])
    assert b.discard_newer(4) == 3 and b.discarded == 3 and [p.policy_version for p in b.pairs] == [4]


def test_state_round_trips_the_contents_and_counters():
    b = PairBuffer(capacity=8)
    b.put([pair(1, k) for k in range(3)])
    b.take(1, min_version=1, timeout=0)
    b.stale = 7
    c = PairBuffer(capacity=8)
    c.restore(json.loads(json.dumps(b.state())))   # checkpoints hold it as JSON
    assert list(c.pairs) == list(b.pairs) and c.stale == 7


def test_split_covers_every_item_once():
    items = list(range(10))
    chunks = split(items, 3)
    assert [x for c in chunks for x in c] == items and len(chunks) == 3


def test_schedule_syncs_every_n_steps_and_at_the_end():
    s = Schedule(max_steps=7, sync_every=3, checkpoint_every=4, eval_every=2)
    plans = [s.plan(k) for k in range(1, 8)]
    assert [p.sync for p in plans] == [False, False, True, False, False, True, True]
    assert [p.version_before for p in plans] == [0, 0, 0, 1, 1, 1, 2]
    assert [p.version_after for p in plans] == [0, 0, 1, 1, 1, 2, 3]
    assert [p.checkpoint for p in plans] == [False, False, False, True, False, False, True]
    assert [p.evaluate for p in plans] == [False, True, False, True, False, True, False]  # not at the end
    assert plans[-1].final and not any(p.final for p in plans[:-1])
    assert [s.steps_left_in_version(k) for k in range(1, 8)] == [3, 2, 1, 3, 2, 1, 1]


def test_a_samplers_busy_time_is_the_union_of_its_overlapping_calls():
    import collections

    from online_dpo.rollout import Rollouts
    from online_dpo.types import SampleBatch

    r = Rollouts.__new__(Rollouts)
    r.busy, r.busy_until = collections.Counter(), {}
    r.count_busy(0, SampleBatch((), 0, seconds=2.0, ended=102.0))            # 100-102
    r.count_busy(0, SampleBatch((), 0, seconds=1.5, load_seconds=0.5, ended=103.0))   # 101-103: 1 s more
    r.count_busy(0, SampleBatch((), 0, seconds=1.0, ended=105.0))            # 104-105, after a gap
    r.count_busy(1, SampleBatch((), 0, seconds=0.5, ended=103.0))
    assert r.busy == {0: 4.0, 1: 0.5}


class LabellingSamplers:
    """Samplers that run the rule judge themselves (judge.in_sampler), as `ActorGroup.run` returns them."""

    handles = [object()]

    def __init__(self):
        from online_dpo.judges.rule import RuleJudge

        self.judge, self.calls = RuleJudge(lambda prompts, responses: [float(len(r)) for r in responses]), []

    def run(self, method, calls):
        from online_dpo.types import SampleBatch, SampleGroup

        out = []
        for (ids, texts), kwargs in calls:
            self.calls.append(kwargs)
            groups = tuple(SampleGroup(t, tuple(i), (Completion((1,), "a", "stop", 0), Completion((1, 2), "ab", "stop", 0)))
                           for i, t in zip(ids, texts))
            labels = self.judge.label(groups, 0.0) if kwargs.get("label") else None
            out.append(SampleBatch(groups, 0, seconds=0.1, ended=time.time(), labels=labels, judge_seconds=0.01))
        return out


class NoJudges:
    handles = [object()]

    def run(self, method, calls):
        raise AssertionError(f"a judge was asked to {method}: the samplers label their own batches")


def test_samplers_that_hold_the_judge_label_their_own_batches_and_no_judge_is_called():
    from online_dpo.data import Prompt, PromptSource
    from online_dpo.rollout import LockStep
    from online_dpo.specs import RolloutSpec, Sampling

    spec = RolloutSpec(mode="sync", sampling=Sampling(), seed=0, capacity=64, prompts_per_call=8, calls_in_flight=1,
                       max_lag=0, judge_in_sampler=True)
    samplers, records = LabellingSamplers(), []
    source = PromptSource([Prompt(f"p{i}", (i,)) for i in range(20)])
    rollouts = LockStep(spec, samplers, NoJudges(), source, records.append)
    pairs = rollouts.take(8, min_version=0)
    assert len(pairs) == 8 and all(p.chosen.text == "ab" and p.rejected.text == "a" for p in pairs)
    assert samplers.calls and all(kw["label"] is True for kw in samplers.calls)
    assert records[-1]["pairs"] >= 8 and records[-1]["judge_seconds"] >= 0.01
