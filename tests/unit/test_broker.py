"""The broker's mailbox logic, driven directly with asyncio (no Ray)."""

import asyncio

import pytest

from online_dpo.broker import Broker
from online_dpo.types import Closed, LearnerStart, Restarted, StepDone, StepOrder


def order(step, incarnation=1):
    return StepOrder(step=step, pairs=(), sync=True, version=step, incarnation=incarnation)


async def started(b, step=0):
    await b.hello(LearnerStart(step=step, version=step))


def run(coro):
    return asyncio.run(coro)


def test_submit_resolves_when_the_learner_reports_the_step():
    async def scenario():
        b = Broker()
        await started(b)
        second = asyncio.create_task(b.submit(order(2)))   # Ray may start two submits out of order
        await asyncio.sleep(0.01)
        first = asyncio.create_task(b.submit(order(1)))
        await asyncio.sleep(0.01)
        assert (await b.next(1, 1)).step == 1 and (await b.next(2, 1)).step == 2   # in step order
        assert not first.done()
        await b.done(2, StepDone({"step": 2}))
        await b.done(1, StepDone({"step": 1}))
        assert (await first).metrics["step"] == 1 and (await second).metrics["step"] == 2
    run(scenario())


def test_hello_answers_every_open_order_with_the_restart():
    async def scenario():
        b = Broker()
        await started(b, 4)
        running = asyncio.create_task(b.submit(order(5)))
        queued = asyncio.create_task(b.submit(order(6)))
        await asyncio.sleep(0.01)
        await b.next(5, 1)                     # step 5 was taken by the gang that then died
        start = LearnerStart(step=3, version=3)
        await b.hello(start)
        assert (await running) == Restarted(start) and (await queued) == Restarted(start)
        assert b.status()["queued"] == 0
        # An order planned for the gang that died is answered at once, not queued.
        assert await b.submit(order(7, incarnation=1)) == Restarted(start)
        assert await b.wait_hello(2, timeout=1) == start
        assert await b.wait_hello(3, timeout=0.01) is None
    run(scenario())


def test_close_releases_the_learner_and_every_waiter():
    async def scenario():
        b = Broker()
        await started(b)
        waiter = asyncio.create_task(b.submit(order(1)))
        await asyncio.sleep(0.01)
        await b.close("stop")
        assert await waiter == Closed("stop")
        assert await b.next(1, 1) is None
        assert await b.submit(order(2)) == Closed("stop")
        with pytest.raises(asyncio.TimeoutError):
            await Broker().next(1, 0.01)
    run(scenario())

