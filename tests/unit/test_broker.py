"""The broker's buffer logic, driven directly with asyncio (no Ray)."""

import asyncio

import pytest

from online_dpo.broker import Broker
from online_dpo.types import Completion, PreferencePair


def pair(version):
    c = Completion((1,), "a", "stop", version)
    r = Completion((2,), "b", "stop", version)
    return PreferencePair("p", (0,), c, r, 1.0, 0.0)


def run(coro):
    return asyncio.run(coro)


def test_take_waits_for_enough_pairs_and_lock_step_drops_stale():
    async def scenario():
        b = Broker(max_policy_lag=0)
        await b.put([pair(0)] * 3)
        waiter = asyncio.create_task(b.take(4, timeout=5))
        await asyncio.sleep(0.01)
        assert not waiter.done()
        await b.put([pair(0)])
        assert len(await waiter) == 4
        await b.put([pair(0)] * 2)            # surplus of version 0
        await b.publish_version(1)            # the trainer moved on
        assert b.status()["buffered"] == 0 and b.stale_dropped == 2
        assert await b.put([pair(0)]) == 0    # a late version-0 pair is refused
        assert b.stale_dropped == 3
    run(scenario())


def test_lag_allows_older_pairs():
    async def scenario():
        b = Broker(max_policy_lag=1)
        await b.publish_version(2)
        assert await b.put([pair(1), pair(0), pair(2)]) == 2
        assert b.stale_dropped == 1
    run(scenario())


def test_close_releases_waiters_and_wait_version_times_out():
    async def scenario():
        b = Broker()
        waiter = asyncio.create_task(b.take(10, timeout=5))
        assert await b.wait_version(0, timeout=0.05) == 0   # timeout returns the current version
        await b.close("stop")
        assert await waiter is None
        with pytest.raises(asyncio.TimeoutError):
            await Broker().take(1, timeout=0.01)
    run(scenario())


def test_metrics_drain_once():
    b = Broker()
    b.post({"step": 1})
    b.post({"step": 2})
    assert [m["step"] for m in b.drain()] == [1, 2] and b.drain() == []
