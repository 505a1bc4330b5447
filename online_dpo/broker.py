"""Broker: the bounded, versioned pair buffer between the rollout loop and the learner.

The controller puts judged pairs in; trainer rank 0 takes a batch per step.
Every pair carries the policy version that sampled it; a pair that lags the
trainer's version by more than `max_policy_lag` is dropped and counted
(lock-step mode uses lag 0: strictly on-policy). The trainer publishes each
new version here after a weight sync, which is what the rollout loop waits on
before sampling again, and posts its step metrics here for the controller to
print and log. Runs as an async Ray actor.
"""

from __future__ import annotations

import asyncio
import collections


class Broker:
    def __init__(self, max_policy_lag: int = 0, capacity: int = 1 << 16):
        self.max_policy_lag, self.capacity = max_policy_lag, capacity
        self.pairs: collections.deque = collections.deque()
        self.version = 0
        self.stale_dropped = 0
        self.overflow_dropped = 0
        self.metrics: list[dict] = []
        self.closed: str | None = None
        self.finished = False
        self.changed = asyncio.Condition()

    def _fresh(self, pair) -> bool:
        return self.version - pair.policy_version <= self.max_policy_lag

    def _prune(self) -> None:
        while self.pairs and not self._fresh(self.pairs[0]):
            self.pairs.popleft()
            self.stale_dropped += 1

    async def put(self, pairs: list) -> int:
        async with self.changed:
            fresh = [p for p in pairs if self._fresh(p)]
            self.stale_dropped += len(pairs) - len(fresh)
            room = self.capacity - len(self.pairs)
            self.overflow_dropped += max(0, len(fresh) - room)
            self.pairs.extend(fresh[:room])
            self.changed.notify_all()
            return len(fresh[:room])

    async def take(self, n: int, timeout: float | None = None) -> list | None:
        """Wait for n fresh pairs and return them; None once the broker is closed."""
        async with self.changed:
            def ready():
                self._prune()
                return self.closed is not None or len(self.pairs) >= n
            await asyncio.wait_for(self.changed.wait_for(ready), timeout)
            if self.closed is not None:
                return None
            return [self.pairs.popleft() for _ in range(n)]

    async def publish_version(self, version: int) -> None:
        async with self.changed:
            self.version = version
            self._prune()
            self.changed.notify_all()

    async def wait_version(self, above: int, timeout: float | None = None) -> int:
        """Wait until the trainer publishes a version above `above`, finishes, the run
        closes, or the timeout passes; returns the version then."""
        async with self.changed:
            try:
                await asyncio.wait_for(self.changed.wait_for(
                    lambda: self.version > above or self.finished or self.closed is not None), timeout)
            except asyncio.TimeoutError:
                pass
            return self.version

    async def finish(self) -> None:
        async with self.changed:
            self.finished = True
            self.changed.notify_all()

    async def close(self, reason: str) -> None:
        async with self.changed:
            self.closed = self.closed or reason
            self.changed.notify_all()

    def post(self, metrics: dict) -> None:
        self.metrics.append(metrics)

    def drain(self) -> list[dict]:
        out, self.metrics = self.metrics, []
        return out

    def status(self) -> dict:
        return {"version": self.version, "buffered": len(self.pairs), "stale_dropped": self.stale_dropped,
                "overflow_dropped": self.overflow_dropped, "finished": self.finished, "closed": self.closed}
