"""within(): asyncio.timeout()'s meaning on a shared timer."""

from __future__ import annotations

import asyncio

import pytest

from pyasync import deadlines
from pyasync.deadlines import TICK, Scope, within
from tests.helpers import wait_until


async def test_a_block_past_its_deadline_raises_timeout_error() -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError):
        async with within(0.05) as scope:
            await asyncio.sleep(10)
    assert scope.expired
    assert 0.05 <= loop.time() - started < 0.05 + TICK + 0.1
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_a_block_that_finishes_in_time_is_never_cancelled_later() -> None:
    async with within(0.02) as scope:
        await asyncio.sleep(0)
    await asyncio.sleep(0.05 + TICK)  # past the old deadline: nothing cancels this sleep
    assert not scope.expired


async def test_nested_blocks_expire_separately() -> None:
    async with within(5) as outer:
        with pytest.raises(TimeoutError):
            async with within(0.01):
                await asyncio.sleep(10)
        await asyncio.sleep(0)
    assert not outer.expired


async def test_a_cancel_from_outside_stays_a_cancel() -> None:
    entered: list[Scope] = []

    async def sleeper() -> None:
        async with within(0.05) as scope:
            entered.append(scope)
            await asyncio.sleep(10)

    task = asyncio.create_task(sleeper())
    await wait_until(lambda: entered)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    clock = deadlines._clocks[asyncio.get_running_loop()]
    await wait_until(lambda: clock.timer is None)  # the deadline passed and its timer fired
    assert not entered[0].expired  # it found the block gone and cancelled nothing
    assert not clock.heap and clock.live == 0


async def test_finished_scopes_do_not_pile_up() -> None:
    for _ in range(20_000):
        async with within(60):
            pass
    clock = deadlines._clocks[asyncio.get_running_loop()]
    assert clock.live == 0
    assert len(clock.heap) <= 4 * deadlines._COMPACT_AT


async def test_many_concurrent_deadlines_all_fire() -> None:
    async def late(seconds: float) -> bool:
        try:
            async with within(seconds):
                await asyncio.sleep(10)
        except TimeoutError:
            return True
        return False

    results = await asyncio.gather(*(late(0.01 * (i % 7)) for i in range(500)))
    assert all(results)


async def test_outside_a_task_is_an_error() -> None:
    loop = asyncio.get_running_loop()
    said: asyncio.Future[str] = loop.create_future()

    def callback() -> None:  # a plain callback runs in no task
        entering = within(1).__aenter__()
        try:
            entering.send(None)
        except RuntimeError as exc:
            said.set_result(str(exc))
        finally:
            entering.close()

    loop.call_soon(callback)
    assert "inside a task" in await said
