"""The idle and frame timeouts of one connection, served by one event-loop timer.

A connection tells its ``Watchdog`` when bytes arrive and when a frame is left half-received;
the watchdog calls back once the connection has been idle for ``IDLE_TIMEOUT`` or stuck in a
frame for ``FRAME_TIMEOUT``. It never looks at sockets: tests drive it with a fake clock.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

__all__ = ["Watched", "Watchdog"]


class Watched(Protocol):
    """What the watchdog asks of its connection."""

    @property
    def is_busy(self) -> bool:
        """Requests are running: the connection is not idle, whatever the client sends."""

    @property
    def is_read_paused(self) -> bool:
        """The server stopped reading: a half-received frame is not the client's fault."""


class Watchdog:
    """Times out a connection that is idle too long or stuck in the middle of a frame.

    Args:
        loop: the event loop whose clock and timer to use.
        connection: asked whether it is busy or paused when the timer fires.
        idle_timeout: seconds without a byte or a running request; 0 for never.
        frame_timeout: seconds to receive the rest of a frame once it started.
        expire: called with a one-line reason when a timeout passes.
    """

    __slots__ = (
        "connection", "expire", "frame_timeout", "idle_timeout", "last_activity", "loop",
        "partial_frame_since", "timer",
    )  # fmt: skip

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        connection: Watched,
        *,
        idle_timeout: float,
        frame_timeout: float,
        expire: Callable[[str], None],
    ) -> None:
        self.loop = loop
        self.connection = connection
        self.idle_timeout = idle_timeout
        self.frame_timeout = frame_timeout
        self.expire = expire
        self.last_activity = loop.time()
        self.partial_frame_since: float | None = None
        self.timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._arm()

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def received(self) -> None:
        """Bytes arrived: the connection is active now."""
        self.last_activity = self.loop.time()

    def frames_taken(self, *, took_any: bool, buffered: int) -> None:
        """Frames were taken from the decoder; ``buffered`` bytes of a next frame remain."""
        if not buffered:
            self.partial_frame_since = None
        elif took_any or self.partial_frame_since is None:
            self.partial_frame_since = self.loop.time()
            self._arm()

    def _arm(self) -> None:
        deadline = self._next_deadline()
        if deadline is None:
            return
        if self.timer is None or self.timer.when() > deadline:
            if self.timer is not None:
                self.timer.cancel()
            self.timer = self.loop.call_at(deadline, self._fire)

    def _next_deadline(self) -> float | None:
        deadlines = []
        if self.idle_timeout:
            deadlines.append(self.last_activity + self.idle_timeout)
        if self.partial_frame_since is not None:
            deadlines.append(self.partial_frame_since + self.frame_timeout)
        return min(deadlines, default=None)

    def _fire(self) -> None:
        """Expire a connection idle too long or stuck in a frame; otherwise look again later."""
        self.timer = None
        now = self.loop.time()
        connection = self.connection
        if (
            self.partial_frame_since is not None
            and not connection.is_read_paused
            and now - self.partial_frame_since >= self.frame_timeout
        ):
            self.expire(f"sent no rest of a frame within {self.frame_timeout:g} s")
            return
        if connection.is_busy:
            self.last_activity = now  # a running request is activity
        elif self.idle_timeout and now - self.last_activity >= self.idle_timeout:
            self.expire(f"idle for {self.idle_timeout:g} s")
            return
        if self.partial_frame_since is not None and connection.is_read_paused:
            self.partial_frame_since = now  # we stopped reading: the client is not to blame
        self._arm()
