"""Broker: the mailbox between the controller and trainer rank 0.

The controller owns the schedule and the pairs; the learner only executes
step orders. `submit(order)` queues an order and resolves, as an ObjectRef
the controller can wait on, when rank 0 reports the step `done`. Rank 0 says
`hello` when the gang (re)starts, with the step and version it restored; any
order queued or running then resolves as `Restarted(start)` so the
controller can plan again from there, and so does an order planned for an
earlier gang (its `incarnation` counts the hellos the controller had seen).
`next(expected)` hands rank 0 the order for the step it expects (Ray may
start two submits out of order; the broker puts them back in step order).
It also posts the current generation of the collective weight group
(`set_weight_group`/`weight_group`), which trainer rank 0 polls (syncer.py).
`close` resolves everything as `Closed(reason)` and makes `next` return None.
Rank 0 answers a step with `StepDone` (types.py): every result is typed.
Runs as an async Ray actor, so all of these wait without blocking each other.
"""

import asyncio
import collections
import time

from .types import Closed, Restarted


class Broker:
    def __init__(self):
        self.orders: collections.deque = collections.deque()
        self.waiting: dict[int, asyncio.Future] = {}
        self.hellos = 0          # hellos so far (the gang's incarnation)
        self.latest = None       # the latest hello only: each holds a weight handle, and old ones are dead
        self.closed: str | None = None
        self.changed = asyncio.Condition()
        self.group = None   # syncer.WeightGroup: the current generation of the weight group

    async def submit(self, order) -> dict:
        """Queue a step order; returns its StepDone, or Restarted / Closed."""
        loop = asyncio.get_running_loop()
        async with self.changed:
            if self.closed is not None:
                return Closed(self.closed)
            if order.incarnation != self.hellos:   # planned before the gang restarted
                return Restarted(self.latest)
            done = self.waiting[order.step] = loop.create_future()
            self.orders.append(order)
            self.changed.notify_all()
        return await done

    async def next(self, expected: int, timeout: float | None = None):
        """Rank 0: the queued order with the lowest step up to `expected` (None once closed);
        waits up to `timeout` seconds."""
        async with self.changed:
            def ready():
                return self.closed is not None or any(o.step <= expected for o in self.orders)
            await asyncio.wait_for(self.changed.wait_for(ready), timeout)
            if self.closed is not None:
                return None
            order = min((o for o in self.orders if o.step <= expected), key=lambda o: o.step)
            self.orders.remove(order)
            return order

    async def done(self, step: int, result) -> None:
        future = self.waiting.pop(step, None)
        if future is not None and not future.done():
            future.set_result(result)

    async def hello(self, start) -> None:
        """Rank 0 (re)started from `start` (a LearnerStart): forget every queued or running order."""
        async with self.changed:
            self._resolve_all(Restarted(start))
            self.orders.clear()
            self.hellos, self.latest = self.hellos + 1, start
            self.changed.notify_all()

    async def wait_hello(self, count: int, timeout: float | None = None):
        """The latest hello once there have been `count` (1-based); None on timeout or close."""
        async with self.changed:
            try:
                await asyncio.wait_for(self.changed.wait_for(
                    lambda: self.hellos >= count or self.closed is not None), timeout)
            except asyncio.TimeoutError:
                return None
            return self.latest if self.hellos >= count else None

    async def set_weight_group(self, spec) -> None:
        self.group = spec

    async def weight_group(self):
        return None if self.closed is not None else self.group

    async def close(self, reason: str) -> None:
        async with self.changed:
            self.closed = self.closed or reason
            self._resolve_all(Closed(self.closed))
            self.changed.notify_all()

    def _resolve_all(self, value) -> None:
        for future in self.waiting.values():
            if not future.done():
                future.set_result(value)
        self.waiting.clear()

    def status(self) -> dict:
        return {"queued": len(self.orders), "running": len(self.waiting), "hellos": self.hellos,
                "closed": self.closed, "time": time.time()}
