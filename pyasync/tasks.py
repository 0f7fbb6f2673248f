"""Tasks an object starts on its own: kept until done, failures logged, ended at its close.

No fire-and-forget: a task nobody holds can be collected mid-run, and its exception would go
unreported. The broker and its backends start replays, reconnections and clean-ups this way.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

__all__ = ["OwnedTasks"]


class OwnedTasks:
    """A set of running tasks owned by one object.

    Args:
        log: where a task's failure is logged, with its traceback.
        what: names the owner in that log line.
    """

    def __init__(self, log: logging.Logger, what: str) -> None:
        self.log = log
        self.what = what
        self.running: set[asyncio.Task[None]] = set()

    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``coroutine`` as a task kept until it is done."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self.running.add(task)
        task.add_done_callback(self._done)
        return task

    async def close(self, timeout: float = 5.0) -> None:
        """Cancel every running task and wait up to ``timeout`` seconds for them to end."""
        for task in list(self.running):
            task.cancel()
        if self.running:
            await asyncio.wait(self.running, timeout=timeout)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.running.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.log.error("%s task failed", self.what, exc_info=task.exception())
