"""The in-process broker (``memory://``): needs nothing, reaches only this process.

History lives in this process's memory: it is lost when the server restarts, and servers in
other processes never see these messages. Use ``nats://`` or ``redis://`` for more than one.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from broker import BrokerSettings, Stored, topic_matches

__all__ = ["MemoryBackend"]


@dataclass(slots=True)
class _Topic:
    head: int = 0  # newest offset
    kept: collections.deque[tuple[float, Stored]] = field(default_factory=collections.deque)


class MemoryBackend:
    """Each topic keeps its newest ``history_size`` messages for ``history_ttl`` seconds."""

    def __init__(self, settings: BrokerSettings) -> None:
        self.settings = settings
        self.topics_: dict[str, _Topic] = {}
        self.listeners: dict[str, Callable[[Stored], None]] = {}

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        self.listeners.clear()

    async def publish(self, topic: str, data: bytes) -> int:
        kept = self.topics_.get(topic)
        if kept is None:
            kept = self.topics_[topic] = _Topic()
        kept.head += 1
        message = Stored(topic, kept.head, data)
        now = time.monotonic()
        kept.kept.append((now, message))
        self._trim(kept, now)
        for pattern, deliver in list(self.listeners.items()):
            if topic_matches(pattern, topic):
                deliver(message)
        return message.offset

    async def listen(self, pattern: str, deliver: Callable[[Stored], None]) -> None:
        self.listeners[pattern] = deliver

    async def unlisten(self, pattern: str) -> None:
        self.listeners.pop(pattern, None)

    async def history(self, topic: str, after: int, limit: int) -> tuple[list[Stored], int]:
        kept = self.topics_.get(topic)
        if kept is None:
            return [], 0
        self._trim(kept, time.monotonic())
        if not kept.kept or limit <= 0:
            return [], kept.head
        first = kept.kept[0][1].offset
        start = max(0, after + 1 - first)  # offsets are contiguous: index by subtraction
        stop = min(len(kept.kept), start + limit)
        return [kept.kept[index][1] for index in range(start, stop)], kept.head

    async def topics(self, pattern: str) -> list[str]:
        now = time.monotonic()
        found = []
        for topic, kept in self.topics_.items():
            if topic_matches(pattern, topic):
                self._trim(kept, now)
                if kept.kept:  # a topic whose history aged out keeps its head, not a listing
                    found.append(topic)
        return found

    def _trim(self, kept: _Topic, now: float) -> None:
        messages, settings = kept.kept, self.settings
        while len(messages) > settings.history_size:
            messages.popleft()
        while messages and now - messages[0][0] > settings.history_ttl:
            messages.popleft()
