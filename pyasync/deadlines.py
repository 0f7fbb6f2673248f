"""Timeouts that share one event-loop timer: ``async with within(seconds):``.

``asyncio.timeout()`` arms a timer of its own per use, which costs about 3.5 µs on uvloop or
the default loop, and a request that reads a database needs three (the request, the wait for
a pooled connection, the query). ``within()`` keeps ``asyncio.timeout()``'s meaning: at the
deadline the task is cancelled, and ``TimeoutError`` comes out of the block unless the task was
also cancelled for another reason. Deadlines go on a heap that one timer per event loop serves,
waking at most every ``TICK`` seconds, so a deadline may pass up to ``TICK`` late.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import weakref
from types import TracebackType

__all__ = ["TICK", "Scope", "within"]

TICK = 0.01  # seconds: timer granularity
_COMPACT_AT = 1024  # heap entries; above this, drop finished scopes once they are most of it


class Scope:
    """One ``within()`` block; ``expired`` tells whether its deadline cancelled the task."""

    __slots__ = ("cancelling", "clock", "expired", "exited", "task", "when")

    def __init__(self, clock: _Clock, when: float) -> None:
        self.clock = clock
        self.when = when
        self.expired = False
        self.exited = False
        self.cancelling = 0
        self.task: asyncio.Task[object] | None = None

    async def __aenter__(self) -> Scope:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("within() must be used inside a task")
        self.task = task
        self.cancelling = task.cancelling()
        self.clock.add(self)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.exited = True
        self.clock.live -= 1
        assert self.task is not None
        if (
            self.expired
            and self.task.uncancel() <= self.cancelling
            and exc_type is asyncio.CancelledError
        ):
            raise TimeoutError from exc

    def expire(self) -> None:
        self.expired = True
        assert self.task is not None
        self.task.cancel()


class _Clock:
    """The deadlines of one event loop and the one timer that serves them."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.heap: list[tuple[float, int, Scope]] = []
        self.order = itertools.count()  # ties: first come, first expired
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = math.inf
        self.live = 0  # scopes entered and not yet exited

    def add(self, scope: Scope) -> None:
        heap = self.heap
        heapq.heappush(heap, (scope.when, next(self.order), scope))
        self.live += 1
        if len(heap) > _COMPACT_AT and len(heap) > 4 * self.live:
            heap[:] = [entry for entry in heap if not entry[2].exited]
            heapq.heapify(heap)
        if scope.when < self.timer_at:
            self._arm(heap[0][0])

    def _arm(self, when: float) -> None:
        when = math.ceil(when / TICK) * TICK  # on the tick: one wake-up serves many deadlines
        if when >= self.timer_at:
            return
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.loop.call_at(when, self._fire)
        self.timer_at = when

    def _fire(self) -> None:
        self.timer, self.timer_at = None, math.inf
        now = self.loop.time()
        heap = self.heap
        while heap and (heap[0][0] <= now or heap[0][2].exited):
            scope = heapq.heappop(heap)[2]
            if not scope.exited and not scope.expired:
                scope.expire()
        if heap:
            self._arm(heap[0][0])


_clocks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Clock] = weakref.WeakKeyDictionary()


def within(seconds: float) -> Scope:
    """Cancel the block after ``seconds`` and raise ``TimeoutError`` out of it.

    Like ``asyncio.timeout(seconds)``, for code that runs it on every request.
    """
    loop = asyncio.get_running_loop()
    clock = _clocks.get(loop)
    if clock is None:
        clock = _clocks[loop] = _Clock(loop)
    return Scope(clock, loop.time() + seconds)
