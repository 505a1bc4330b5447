"""The buffer of judged pairs waiting for the learner, and the preference log's rows of what it dropped.

Rollouts put pairs in as the judge labels them; the controller takes a
batch per step. Pairs that lag too far behind the learner (`prune`) or that
a restored learner no longer has (`discard_newer`) are dropped and counted;
each dropped pair, and each group the judge dropped, also waits in `gone`
as (why, pair) until the controller writes it to the preference log
(pairs_log.py).
"""

from __future__ import annotations

import collections
import threading
import time

from .types import PreferencePair


class PairBuffer:
    """Judged pairs waiting for the learner, oldest first; thread-safe."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.pairs: collections.deque[PreferencePair] = collections.deque()
        self.stale = 0       # dropped: older than the lag allows
        self.discarded = 0   # dropped: sampled by versions a restored learner no longer has
        self.gone: list[tuple[str, PreferencePair]] = []   # dropped, not yet in the preference log
        self.cond = threading.Condition()

    def __len__(self) -> int:
        return len(self.pairs)

    def put(self, pairs: list[PreferencePair]) -> None:
        with self.cond:
            self.pairs.extend(pairs)
            self.cond.notify_all()

    def prune(self, min_version: int) -> None:
        """Drop pairs older than min_version (samplers finish out of order, so look at all of them)."""
        with self.cond:
            keep = [p for p in self.pairs if p.policy_version >= min_version]
            if len(keep) < len(self.pairs):
                self.stale += len(self.pairs) - len(keep)
                self.gone += [("stale", p) for p in self.pairs if p.policy_version < min_version]
                self.pairs = collections.deque(keep)

    def take(self, n: int, min_version: int, timeout: float | None = None) -> list[PreferencePair] | None:
        """n pairs no older than min_version, or None if they are not there within timeout."""
        deadline = None if timeout is None else time.time() + timeout
        with self.cond:
            while True:
                self.prune(min_version)
                if len(self.pairs) >= n:
                    out = [self.pairs.popleft() for _ in range(n)]
                    self.cond.notify_all()
                    return out
                left = None if deadline is None else deadline - time.time()
                if left is not None and left <= 0:
                    return None
                self.cond.wait(left if left is not None else 1.0)

    def discard_newer(self, version: int) -> int:
        with self.cond:
            keep = [p for p in self.pairs if p.policy_version <= version]
            self.drop([("restart", p) for p in self.pairs if p.policy_version > version])
            dropped = len(self.pairs) - len(keep)
            self.pairs = collections.deque(keep)
            return dropped

    def drop(self, rows) -> None:
        """(why, pair) rows that will never be trained on, for the log; a "restart" row (a version a
        restored learner no longer has) is counted here; a judge's "tie", "identical" or "nonfinite"
        are counted by the rollouts."""
        with self.cond:
            self.discarded += sum(why == "restart" for why, _ in rows)
            self.gone += rows

    def waiting(self) -> list[PreferencePair]:
        with self.cond:
            return list(self.pairs)

    def drain(self) -> list[tuple[str, PreferencePair]]:
        """The dropped rows not yet logged, and forget them."""
        with self.cond:
            out, self.gone = self.gone, []
            return out

    def state(self) -> dict:
        with self.cond:
            return {"pairs": [p.data() for p in self.pairs], "stale": self.stale, "discarded": self.discarded}

    def restore(self, state: dict) -> None:
        with self.cond:
            self.pairs = collections.deque(PreferencePair.from_data(p) for p in state["pairs"])
            self.stale, self.discarded = state["stale"], state["discarded"]
