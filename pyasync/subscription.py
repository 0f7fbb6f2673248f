"""The client's side of one subscription: events in order, positions kept, resumed on failover.

``client.Client.subscribe()`` makes one; it is an async context manager (``SUBSCRIBE`` on
entry, ``UNSUBSCRIBE`` on exit) and an async iterator of ``MessageEvent`` and ``GapEvent``.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

from package import (
    PACKAGE,
    GapEvent,
    MessageEvent,
    RPCError,
    SubscribeAnswer,
    SubscribeRequest,
    UnsubscribeRequest,
    unpack,
)
from protocol import Frame
from pyasync.client_protocol import ClientProtocol, ConnectionClosed

if TYPE_CHECKING:
    from client import Client

__all__ = ["Subscription"]

Event = MessageEvent | GapEvent


class Subscription:
    """One subscription: an async context manager and an async iterator of its events.

    The events are ``MessageEvent`` (``topic``, ``offset``, ``data``) and ``GapEvent``
    (``first_missing`` to ``last_missing`` of ``topic`` are gone from history: resynchronise
    from your own records). ``positions`` holds the last offset handed out per topic, to resume
    from later; ``complete`` is False when history did not reach back to ``since``. When the
    client fails over to another server, the subscription resumes where it was: no event is
    handed out twice.
    """

    def __init__(
        self,
        client: Client,
        topic: str,
        since: int | None,
        positions: dict[str, int],
        max_queued: int,
    ) -> None:
        self.client = client
        self.topic = topic
        self.since = since
        self.positions = positions  # last offset handed out, per topic
        self.max_queued = max_queued
        self.id = 0
        self.position = 0
        self.complete = True
        self._received: dict[str, int] = {}  # last offset received, per topic: resume point
        self._events: asyncio.Queue[Event | ConnectionClosed | RPCError] = asyncio.Queue()
        self._protocol: ClientProtocol | None = None
        self._is_open = False

    async def __aenter__(self) -> Subscription:
        await self._subscribe(SubscribeRequest(topic=self.topic, since=self.since,
                                               positions=self.positions))  # fmt: skip
        self._is_open = True
        self.client.subscriptions.add(self)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._is_open = False
        self.client.subscriptions.discard(self)
        protocol, self._protocol = self._protocol, None
        if protocol is None:
            return
        protocol.subscriptions.pop(self.id, None)
        protocol.resume_reading()
        if protocol.closed_error is None:
            with contextlib.suppress(ConnectionClosed, RPCError):
                await self.client.request(
                    PACKAGE.REQUEST_UNSUBSCRIBE, UnsubscribeRequest(subscription=self.id)
                )

    async def resume(self) -> None:
        """Subscribe again on the client's new connection, from the last offsets received."""
        if not self._is_open:
            return
        positions = {**self.positions, **self._received}
        try:
            await self._subscribe(SubscribeRequest(topic=self.topic, since=0, positions=positions))
        except (RPCError, ConnectionClosed) as exc:
            self._events.put_nowait(exc)  # the iterator raises it

    async def _subscribe(self, request: SubscribeRequest) -> None:
        def register(frame: Frame) -> None:  # before the events that follow in the same read
            if frame.kind != PACKAGE.ANSWER_SUBSCRIBE:
                return
            answer = unpack(PACKAGE.ANSWER_SUBSCRIBE, frame.body)
            assert isinstance(answer, SubscribeAnswer)
            self.id, self.position, self.complete = (
                answer.subscription, answer.position, answer.complete
            )  # fmt: skip
            for topic, offset in answer.positions.items():
                # The server's word wins: below ours only when its broker lost its history.
                self._received[topic] = offset
                if offset < self.positions.get(topic, 0):
                    self.positions[topic] = offset
            protocol = self.client._protocol
            assert protocol is not None
            protocol.subscriptions[self.id] = self
            self._protocol = protocol
            if not self.client.reconnect:
                protocol.lost.add_done_callback(self._connection_lost)

        await self.client.request(PACKAGE.REQUEST_SUBSCRIBE, request, on_answer=register)

    def take(self, event: Event) -> bool:
        """Queue one pushed event (called by the connection); False once the queue is full."""
        if isinstance(event, MessageEvent):
            self._received[event.topic] = event.offset
        else:
            self._received[event.topic] = event.last_missing
        self._events.put_nowait(event)
        return self._events.qsize() < self.max_queued

    def _connection_lost(self, lost: asyncio.Future[None]) -> None:
        protocol = self._protocol
        if protocol is not None and protocol.closed_error is not None:
            self._events.put_nowait(protocol.closed_error)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        """The next event; raises ``ConnectionClosed`` once the connection is gone for good."""
        while self._is_open:
            event = await self._events.get()
            if isinstance(event, Exception):
                self._events.put_nowait(event)  # every later call raises it too
                raise event
            protocol = self._protocol
            if protocol is not None and protocol.is_reading_paused:
                if self._events.qsize() <= self.max_queued // 2:
                    protocol.resume_reading()
            last = self.positions.get(event.topic, 0)
            if isinstance(event, MessageEvent):
                if event.offset <= last:
                    continue  # replayed after a failover: handed out already
                self.positions[event.topic] = event.offset
            else:
                self.positions[event.topic] = max(last, event.last_missing)
            return event
        raise StopAsyncIteration
