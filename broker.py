"""Publish/subscribe: topics, offsets, and the server's one broker shared by all its connections.

Actions and hooks publish with ``await publish(topic, data)`` (or ``app.broker.publish``);
clients subscribe with ``REQUEST_SUBSCRIBE``. A backend chosen by ``BROKER_URL`` (``memory://``,
``nats://``, ``redis://``) carries messages between servers and keeps each topic's history; this
module does the rest once for all backends: one backend subscription per pattern in use, local
fan-out, replay from history with no gap and no duplicate at the seam, and a bounded budget of
pushes per connection (a slow reader is caught up from history later, never buffered without
bound).

Offsets count each topic's messages from 1 without holes, so a subscriber can name exactly where
it stopped, and a missing offset is always announced (``EVENT_GAP``), never silent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlsplit

import msgspec

from context import current_app
from package import PACKAGE, InvalidArgument, Unavailable
from protocol import CONNECTION_REQUEST_ID, HEADER, MAGIC, PROTOCOL_VERSION
from pyasync.tasks import OwnedTasks

__all__ = [
    "Broker",
    "BrokerBackend",
    "BrokerSettings",
    "PushTarget",
    "Stored",
    "check_topic",
    "open_backend",
    "publish",
    "topic_matches",
]

log = logging.getLogger("pyasync.broker")

REPLAY_CHUNK = 256  # messages read from history per backend call while catching up
MAX_POSITIONS = 1000  # topics one SUBSCRIBE may name in positions: each costs a history read
# Seconds a replay waits for history to hold a message already seen live before it announces
# it as a gap (a backend whose history and live feed disagree must not stall a subscriber).
HISTORY_LAG = 2.0
# Seconds of fan-out (mostly socket writes) after which the loop gets a pass: publishes that
# fill the next round go on meanwhile (a NATS publish takes several passes), and so does the rest.
FAN_OUT_PASS = 0.00005
# Live messages a subscription catching up keeps, at most, to push once its replay reaches them:
# those that arrive while a history read travels back, without which a replay chasing a busy
# topic (one message or more per round trip to the backend) never meets the live stream.
HELD_MESSAGES = 256
HELD_BYTES = 256 * 1024
TOKEN = re.compile(r"[^\s.*>]+")  # a topic token: no space, dot or wildcard


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    """What the broker needs from the server's settings."""

    url: str = "memory://"
    history_size: int = 1000  # messages kept per topic
    history_ttl: float = 3600.0  # seconds a message is kept
    max_topic_length: int = 256  # characters
    max_message_size: int = 1024 * 1024  # bytes of data


@dataclass(frozen=True, slots=True)
class Stored:
    """A message as the backend keeps it."""

    topic: str
    offset: int
    data: bytes


class BrokerBackend(Protocol):
    """Where messages travel between servers and where each topic's history is kept.

    Offsets are per topic, from 1, without holes. Every method raises ``Unavailable`` while the
    backend cannot be reached.
    """

    async def start(self) -> None:
        """Connect; the backend reconnects on its own afterwards."""

    async def close(self) -> None:
        """Disconnect and stop every listener."""

    async def publish(self, topic: str, data: bytes) -> int:
        """Store and send one message; return its offset once the backend has it."""

    async def listen(self, pattern: str, deliver: Callable[[Stored], None]) -> None:
        """Call ``deliver`` with every message published from now on to a matching topic."""

    async def unlisten(self, pattern: str) -> None:
        """Stop the deliveries that ``listen(pattern)`` started."""

    async def history(self, topic: str, after: int, limit: int) -> tuple[list[Stored], int]:
        """Up to ``limit`` kept messages of ``topic`` with offsets above ``after``, oldest
        first, and the topic's newest offset (0 if it has none)."""

    async def topics(self, pattern: str) -> list[str]:
        """The topics matching ``pattern`` that have history kept."""


def open_backend(settings: BrokerSettings, on_reconnect: Callable[[], None]) -> BrokerBackend:
    """The backend ``settings.url`` names; drivers are imported only when used.

    Raises:
        ValueError: the URL's scheme is unknown.
    """
    scheme = urlsplit(settings.url).scheme.lower()
    if scheme == "memory":
        from pyasync.brokers.memory import MemoryBackend

        return MemoryBackend(settings)
    if scheme == "nats":
        from pyasync.brokers.nats import NatsBackend

        return NatsBackend(settings, on_reconnect)
    if scheme in ("redis", "rediss"):
        from pyasync.brokers.redis import RedisBackend

        return RedisBackend(settings, on_reconnect)
    raise ValueError(f"BROKER_URL must start with memory://, nats:// or redis://, got {scheme!r}")


# ---- topics ----------------------------------------------------------------------------------


def check_topic(topic: str, *, max_length: int, pattern: bool = False) -> None:
    """Refuse a topic that is not dot-separated tokens (NATS subjects' rules).

    With ``pattern``, a token may be ``*`` (any one token) and the last may be ``>`` (one or
    more tokens).

    Raises:
        InvalidArgument: names what is wrong.
    """
    if not 0 < len(topic) <= max_length:
        raise InvalidArgument(f"topic must be 1 to {max_length} characters, got {len(topic)}")
    tokens = topic.split(".")
    for index, token in enumerate(tokens):
        if TOKEN.fullmatch(token):
            continue
        if pattern and (token == "*" or (token == ">" and index == len(tokens) - 1)):
            continue
        what = "a subscription" if pattern else "a published topic (no wildcards)"
        raise InvalidArgument(
            f"topic {topic!r} has a bad token {token!r} for {what}",
            hint="tokens are separated by dots and hold no spaces; '*' is one token, "
            "'>' the rest, in subscriptions only",
        )


def is_wildcard(pattern: str) -> bool:
    return "*" in pattern or pattern.endswith(">")


def topic_matches(pattern: str, topic: str) -> bool:
    """True when ``topic`` is one that ``pattern`` subscribes to."""
    wanted, tokens = pattern.split("."), topic.split(".")
    for index, token in enumerate(wanted):
        if token == ">":
            return len(tokens) > index
        if index >= len(tokens) or (token != "*" and token != tokens[index]):
            return False
    return len(tokens) == len(wanted)


# ---- pushes ----------------------------------------------------------------------------------


class PushTarget(Protocol):
    """A connection the broker pushes event frames to (``pyasync.connection.Connection``)."""

    def push(self, frame: bytes) -> bool:
        """Queue one frame; False, queuing nothing, when its push budget is spent."""

    def push_now(self, frames: bytes) -> bool:
        """Write ``frames`` (this pass's for one subscription, joined) at once; False, writing
        nothing, when its push budget is spent. Queued behind ``push`` frames, if any."""

    async def writable(self) -> None:
        """Return once the connection can take pushes again (its budget is half free)."""


_encode = msgspec.msgpack.Encoder().encode


def _event_header(kind: PACKAGE, size: int) -> bytes:
    return HEADER.pack(MAGIC, PROTOCOL_VERSION, 0, kind, CONNECTION_REQUEST_ID, 0, size)


def _event_frame(kind: PACKAGE, body: bytes) -> bytes:
    return _event_header(kind, len(body)) + body


class Subscription:
    """One client's subscription: where it stands in each topic, and whether it is live.

    While ``catching_up``, a task replays history from ``positions`` until it meets the live
    stream, then goes live. Live messages that arrive meanwhile are noted (``live_heads``), and
    the first few kept (``held``): the replay pushes them once it has reached them.
    """

    __slots__ = (
        "catch_up_task", "catching_up", "default_after", "held", "held_bytes", "id",
        "live_heads", "live_only", "pattern", "positions", "prefix", "target",
    )  # fmt: skip

    def __init__(
        self,
        subscription_id: int,
        pattern: str,
        target: PushTarget,
        positions: dict[str, int],
        default_after: int,
        live_only: bool = False,
    ) -> None:
        self.id = subscription_id
        self.pattern = pattern
        self.target = target
        self.positions = positions  # topic -> last offset delivered (or skipped by request)
        self.default_after = default_after  # the position of a topic not in positions
        self.live_only = live_only  # subscribed without since: new messages only
        self.live_heads: dict[str, int] = {}  # topic -> newest offset seen live while catching up
        self.held: list[Stored] = []  # live messages kept while catching up, in arrival order
        self.held_bytes = 0
        self.catching_up = True
        self.catch_up_task: asyncio.Task[None] | None = None
        # The body of EVENT_MESSAGE is a map; its first entry (this subscription) is fixed.
        self.prefix = b"\x84" + _encode("subscription") + _encode(subscription_id)

    def position_before(self, topic: str, offset: int) -> int:
        """The last offset delivered in ``topic``, as a live ``offset`` arrives; for a topic
        first seen now, right before it if new messages only, else ``since``."""
        last = self.positions.get(topic)
        if last is None:
            return offset - 1 if self.live_only else self.default_after
        return last


@dataclass(slots=True)
class Listener:
    """The one backend subscription of a pattern, and the local subscriptions it feeds."""

    pattern: str
    subscriptions: set[Subscription] = field(default_factory=set)
    ready: asyncio.Future[bool] | None = None  # True once the backend listens, False if it failed
    joining: int = 0  # subscriptions being set up: the listener stays while they are
    arrived: list[Stored] = field(default_factory=list)  # live, not yet fanned out
    fan_out: asyncio.Task[None] | None = None  # pushing arrived messages, while there are any

    @property
    def is_unused(self) -> bool:
        return not self.subscriptions and not self.joining


class Broker:
    """The server's side of publish/subscribe, over one backend.

    Args:
        settings: URL, history and limits.
    """

    def __init__(self, settings: BrokerSettings) -> None:
        self.settings = settings
        self.backend = open_backend(settings, self._resync_all)
        self.listeners: dict[str, Listener] = {}
        self.tasks = OwnedTasks(log, "broker")
        self._ids = 0

    async def start(self) -> None:
        await self.backend.start()

    async def close(self) -> None:
        for listener in self.listeners.values():
            for subscription in list(listener.subscriptions):
                self._stop(subscription)
        self.listeners.clear()
        await self.tasks.close()
        await self.backend.close()

    # ---- publishing ----------------------------------------------------------------------

    async def publish(self, topic: str, data: bytes) -> int:
        """Publish ``data`` to ``topic``; return its offset once the backend accepted it.

        Raises:
            InvalidArgument: a bad topic, or data above the message size limit.
            Unavailable: the backend cannot be reached.
        """
        check_topic(topic, max_length=self.settings.max_topic_length)
        if len(data) > self.settings.max_message_size:
            raise InvalidArgument(
                f"message of {len(data)} bytes exceeds {self.settings.max_message_size}"
            )
        return await self.backend.publish(topic, data)

    # ---- subscribing -----------------------------------------------------------------------

    async def subscribe(
        self,
        target: PushTarget,
        pattern: str,
        *,
        since: int | None,
        positions: dict[str, int],
    ) -> tuple[Subscription, int, bool]:
        """Start a subscription; its pushes begin once ``start_pushing`` is called.

        ``subscription.positions`` then holds where it starts, per topic known now.

        Args:
            target: the connection to push to.
            pattern: a topic, or a pattern with ``*`` / ``>``.
            since: deliver every kept message after this offset, then live ones; None for live
                only. For a wildcard it applies to each matching topic not in ``positions``.
            positions: per topic, the last offset the client has (a wildcard's resume point).

        Returns:
            The subscription; the topic's newest offset (0 for a wildcard); and whether kept
            history reaches back to every position asked for.

        Raises:
            InvalidArgument: a bad pattern, position or offset.
            Unavailable: the backend cannot be reached.
        """
        limit = self.settings.max_topic_length
        check_topic(pattern, max_length=limit, pattern=True)
        if len(positions) > MAX_POSITIONS:
            raise InvalidArgument(
                f"positions names {len(positions)} topics, at most {MAX_POSITIONS}"
            )
        for topic in positions:
            check_topic(topic, max_length=limit)
            if not topic_matches(pattern, topic):
                raise InvalidArgument(f"a position for {topic!r}, which {pattern!r} does not match")
        if (since is not None and since < 0) or any(v < 0 for v in positions.values()):
            raise InvalidArgument("since and positions are offsets: 0 or above")
        listener = await self._listen(pattern)
        listener.joining += 1
        try:
            return await self._start_subscription(listener, target, since, positions)
        finally:
            listener.joining -= 1
            self._let_go_if_unused(listener)

    async def _start_subscription(
        self,
        listener: Listener,
        target: PushTarget,
        since: int | None,
        positions: dict[str, int],
    ) -> tuple[Subscription, int, bool]:
        pattern = listener.pattern
        wanted = dict(positions)
        position = 0
        if not is_wildcard(pattern):
            after = wanted.get(pattern, since)
            _, position = await self.backend.history(pattern, 0, 0)
            wanted[pattern] = position if after is None else after
        else:  # each known topic not listed: from ``since``, or live only from its head
            for topic in await self.backend.topics(pattern):  # new topics start from 1
                if topic in wanted:
                    continue
                if since is None:
                    _, wanted[topic] = await self.backend.history(topic, 0, 0)
                else:  # listed, so that complete and positions speak for it too
                    wanted[topic] = since
        complete = True
        for topic, after in wanted.items():
            messages, head = await self.backend.history(topic, after, 1)
            first = messages[0].offset if messages else head + 1
            if after > head or first > after + 1:
                complete = False
            wanted[topic] = min(after, head)
        self._ids += 1
        subscription = Subscription(
            self._ids, pattern, target, wanted, since or 0, live_only=since is None
        )
        listener.subscriptions.add(subscription)
        return subscription, position, complete

    def start_pushing(self, subscription: Subscription) -> None:
        """Replay what the subscription asked for, then go live (call after its answer left)."""
        self._catch_up(subscription)

    async def unsubscribe(self, subscription: Subscription) -> None:
        """End a subscription; the backend subscription goes with its last local subscriber."""
        self.drop([subscription])

    def drop(self, subscriptions: Iterable[Subscription]) -> None:
        """End subscriptions (no await: a closing connection calls this as it closes)."""
        for subscription in subscriptions:
            self._stop(subscription)
            listener = self.listeners.get(subscription.pattern)
            if listener is not None:
                self._let_go_if_unused(listener)

    def _let_go_if_unused(self, listener: Listener) -> None:
        if listener.is_unused and self.listeners.get(listener.pattern) is listener:
            del self.listeners[listener.pattern]
            self.tasks.spawn(self._unlisten(listener.pattern))

    async def _unlisten(self, pattern: str) -> None:
        if pattern not in self.listeners:  # nobody subscribed again meanwhile
            with contextlib.suppress(Unavailable):
                await self.backend.unlisten(pattern)

    def _stop(self, subscription: Subscription) -> None:
        listener = self.listeners.get(subscription.pattern)
        if listener is not None:
            listener.subscriptions.discard(subscription)
        if subscription.catch_up_task is not None:
            subscription.catch_up_task.cancel()

    async def _listen(self, pattern: str) -> Listener:
        """The listener of ``pattern``, made (and its backend subscription opened) if new."""
        listener = self.listeners.get(pattern)
        if listener is None:
            listener = self.listeners[pattern] = Listener(pattern)
            listener.ready = asyncio.get_running_loop().create_future()
            try:
                await self.backend.listen(pattern, lambda message: self._deliver(listener, message))
            except BaseException:
                if self.listeners.get(pattern) is listener:
                    del self.listeners[pattern]
                listener.ready.set_result(False)
                raise
            listener.ready.set_result(True)
        elif listener.ready is not None and not await asyncio.shield(listener.ready):
            raise Unavailable(f"the broker did not subscribe to {pattern!r}", hint="retry")
        return listener

    # ---- delivering ------------------------------------------------------------------------

    def _deliver(self, listener: Listener, message: Stored) -> None:
        """Take a live message; the listener's fan-out pushes it with whatever else arrived."""
        listener.arrived.append(message)
        if listener.fan_out is None:
            listener.fan_out = self.tasks.spawn(self._fan_out(listener))

    async def _fan_out(self, listener: Listener) -> None:
        """Push arrived live messages to the listener's subscriptions, round after round.

        A round takes every message that arrived since the last one. A subscription that is
        live and stands right before them in every topic (the usual case) gets them all in one
        write, made of frames encoded once for everyone; any other goes through them one by one
        (``_deliver_one``). The loop gets a pass every FAN_OUT_PASS seconds, so that a round
        over thousands of subscriptions does not hold up the publishes that fill the next one.
        """
        clock = time.perf_counter  # not loop.time(): uvloop's stands still within a pass
        try:
            while listener.arrived:
                messages, listener.arrived = listener.arrived, []
                round_ = _Round(messages)
                # The usual round, one topic: its test inline (this loop runs per subscriber).
                topic, (first, last) = next(iter(round_.spans.items()))
                single = len(round_.spans) == 1 and round_.contiguous
                subscriptions = listener.subscriptions
                until = clock() + FAN_OUT_PASS
                for subscription in list(subscriptions):
                    if clock() > until:
                        await asyncio.sleep(0)
                        until = clock() + FAN_OUT_PASS
                    if subscription not in subscriptions:  # ended meanwhile
                        continue
                    if not (
                        single
                        and not subscription.catching_up
                        and subscription.positions.get(topic) == first - 1
                    ):
                        self._push_round(subscription, round_)
                    elif subscription.target.push_now(round_.frames_for(subscription.prefix)):
                        subscription.positions[topic] = last
                    else:  # over its budget: replay from history once it drained
                        subscription.live_heads[topic] = last
                        self._catch_up(subscription)
        finally:
            listener.fan_out = None

    def _push_round(self, subscription: Subscription, round_: _Round) -> None:
        if round_.contiguous and not subscription.catching_up:
            starts = _starts(subscription, round_.spans)
            if starts is not None:
                if subscription.target.push_now(round_.frames_for(subscription.prefix)):
                    for topic, (_, last) in round_.spans.items():
                        subscription.positions[topic] = last
                else:  # over its budget: replay from history once it drained
                    for topic, (_, last) in round_.spans.items():
                        subscription.positions[topic] = starts[topic]
                        subscription.live_heads[topic] = last
                    self._catch_up(subscription)
                return
        for message, rest in zip(round_.messages, round_.rests, strict=True):
            self._deliver_one(subscription, message, rest)

    def _deliver_one(self, subscription: Subscription, message: Stored, rest: bytes) -> None:
        """Push one live message to one subscription, minding its position in the topic."""
        topic, offset = message.topic, message.offset
        if subscription.catching_up:
            heads = subscription.live_heads
            if offset > heads.get(topic, 0):
                heads[topic] = offset
            if (
                subscription.catch_up_task is not None  # pushing began: its answer left
                and len(subscription.held) < HELD_MESSAGES
                and subscription.held_bytes + len(message.data) <= HELD_BYTES
            ):
                subscription.held.append(message)
                subscription.held_bytes += len(message.data)
            return
        last = subscription.position_before(topic, offset)
        if offset <= last:
            return  # delivered already (replayed at the seam)
        if offset > last + 1:  # missed live messages: fetch them from history
            subscription.positions[topic] = last
            subscription.live_heads[topic] = offset
            self._catch_up(subscription)
            return
        if subscription.target.push(_message_frame(subscription, rest)):
            subscription.positions[topic] = offset
        else:  # over its budget: stop pushing, replay from history once it drained
            subscription.positions[topic] = last
            subscription.live_heads[topic] = offset
            self._catch_up(subscription)

    def _catch_up(self, subscription: Subscription) -> None:
        subscription.catching_up = True
        if subscription.catch_up_task is None or subscription.catch_up_task.done():
            subscription.catch_up_task = self.tasks.spawn(self._replay(subscription))

    async def _replay(self, subscription: Subscription) -> None:
        """Push kept messages from the subscription's positions until it meets the live ones.

        The switch back to live happens with no await after the last check, so a message that
        arrives meanwhile is either in the replay or pushed live, never lost or pushed twice.
        """
        delay = 0.05
        # Per topic that live messages are ahead of: its position, and the passes in which it
        # stayed there. One that history does not move on for HISTORY_LAG is given up on.
        stuck: dict[str, tuple[int, int]] = {}
        while True:
            await subscription.target.writable()
            try:
                done = await self._replay_once(subscription)
            except Unavailable as exc:
                log.info("replay for subscription %d waits: %s", subscription.id, exc.message)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            if done and all(
                subscription.positions.get(topic, 0) >= head
                for topic, head in subscription.live_heads.items()
            ):
                subscription.live_heads.clear()
                subscription.held.clear()
                subscription.held_bytes = 0
                subscription.catching_up = False
                return
            if not done:  # held back by the connection's budget, not by history
                stuck.clear()
                continue
            late = []  # live is ahead of what history holds yet: let the backend store it
            for topic, head in subscription.live_heads.items():
                position = subscription.positions.get(topic, subscription.default_after)
                if position >= head:
                    continue
                was, passes = stuck.get(topic, (position, 0))
                stuck[topic] = (position, passes + 1 if was == position else 1)
                if stuck[topic][1] * 0.01 >= HISTORY_LAG:  # it never will: say what is missing
                    late.append(topic)
            if late:
                self._give_up_waiting(subscription, late)
            await asyncio.sleep(0.01)

    def _give_up_waiting(self, subscription: Subscription, topics: list[str]) -> None:
        """Announce as a gap the live offsets of ``topics`` that history never came to hold."""
        for topic in topics:
            head = subscription.live_heads[topic]
            after = subscription.positions.get(topic, subscription.default_after)
            if head > after and subscription.target.push(
                _gap_frame(subscription, topic, after, head + 1)
            ):
                subscription.positions[topic] = head

    async def _replay_once(self, subscription: Subscription) -> bool:
        """One pass over the subscription's topics; True once nothing more could be pushed
        for want of history (as opposed to want of budget)."""
        if is_wildcard(subscription.pattern):
            topics = set(await self.backend.topics(subscription.pattern))
            topics.update(subscription.positions, subscription.live_heads)
        else:
            topics = {subscription.pattern}
        for topic in sorted(topics):
            after = subscription.positions.get(topic)
            if after is None:
                after = await self._start_of(subscription, topic)
            while True:
                messages, head = await self.backend.history(topic, after, REPLAY_CHUNK)
                first = messages[0].offset if messages else head + 1
                if first > after + 1 and head > after:  # history no longer reaches back
                    if not subscription.target.push(_gap_frame(subscription, topic, after, first)):
                        return False
                    after = subscription.positions[topic] = first - 1
                for message in messages:
                    if not subscription.target.push(
                        _message_frame(subscription, _encode_rest(message))
                    ):
                        return False
                    after = subscription.positions[topic] = message.offset
                if not self._push_held(subscription):
                    return False
                after = subscription.positions.get(topic, after)
                if len(messages) < REPLAY_CHUNK:
                    break
        return True

    def _push_held(self, subscription: Subscription) -> bool:
        """Push the held live messages that follow on from the positions reached; drop those
        pushed already. False when the connection's budget is spent."""
        kept: list[Stored] = []
        pushed_all = True
        for index, message in enumerate(subscription.held):
            last = subscription.positions.get(message.topic)
            if last is None or message.offset > last + 1:
                kept.append(message)  # not reached yet: history or a later pass brings it
            elif message.offset == last + 1:
                if not subscription.target.push(
                    _message_frame(subscription, _encode_rest(message))
                ):
                    kept += subscription.held[index:]
                    pushed_all = False
                    break
                subscription.positions[message.topic] = message.offset
        subscription.held = kept
        subscription.held_bytes = sum(len(message.data) for message in kept)
        return pushed_all

    async def _start_of(self, subscription: Subscription, topic: str) -> int:
        """Where a subscription starts in a topic it had no position for: for new messages
        only, at the topic's first kept message (what came before was published before it
        subscribed, or is a topic whose history expired: no gap to announce); else at
        ``since``."""
        if not subscription.live_only:
            return subscription.default_after
        messages, head = await self.backend.history(topic, 0, 1)
        return messages[0].offset - 1 if messages else head

    def _resync_all(self) -> None:
        """After the backend reconnected: replay whatever was published while it was away."""
        for listener in self.listeners.values():
            for subscription in listener.subscriptions:
                self._catch_up(subscription)


def _encode_rest(message: Stored) -> bytes:
    # The three entries of EVENT_MESSAGE after "subscription", shared by every subscriber.
    return b"".join(
        (
            _encode("topic"), _encode(message.topic), _encode("offset"), _encode(message.offset),
            _encode("data"), _encode(message.data),
        )
    )  # fmt: skip


def _starts(subscription: Subscription, spans: dict[str, tuple[int, int]]) -> dict[str, int] | None:
    """Per topic, the subscription's position if it is right before ``spans``; else None."""
    starts = {}
    for topic, (first, _) in spans.items():
        last = subscription.position_before(topic, first)
        if last != first - 1:
            return None
        starts[topic] = last
    return starts


class _Round:
    """The live messages of one fan-out round, encoded once for every subscription."""

    __slots__ = ("contiguous", "glues", "messages", "rests", "spans")

    def __init__(self, messages: list[Stored]) -> None:
        self.messages = messages
        self.rests = [_encode_rest(message) for message in messages]
        self.spans: dict[str, tuple[int, int]] = {}  # topic -> (first, last) offset
        self.contiguous = True  # each topic's offsets follow one another
        for message in messages:
            span = self.spans.get(message.topic)
            if span is None:
                self.spans[message.topic] = (message.offset, message.offset)
            else:
                self.contiguous = self.contiguous and message.offset == span[1] + 1
                self.spans[message.topic] = (span[0], message.offset)
        self.glues: dict[int, list[bytes]] = {}  # by prefix length: most subscriptions share one

    def frames_for(self, prefix: bytes) -> bytes:
        """The round's EVENT_MESSAGE frames for the subscription whose body starts ``prefix``."""
        glue = self.glues.get(len(prefix))
        if glue is None:
            glue = self.glues[len(prefix)] = _glue(self.rests, len(prefix))
        return prefix.join(glue)


def _glue(rests: list[bytes], prefix_length: int) -> list[bytes]:
    """What ``prefix.join`` turns into the frames of ``rests`` for a prefix of that length:
    ``[header 1, rest 1 + header 2, ..., rest n]``."""
    headers = [_event_header(PACKAGE.EVENT_MESSAGE, prefix_length + len(rest)) for rest in rests]
    joined = [rest + header for rest, header in zip(rests[:-1], headers[1:], strict=True)]
    return [headers[0], *joined, rests[-1]]


def _message_frame(subscription: Subscription, rest: bytes) -> bytes:
    return _event_frame(PACKAGE.EVENT_MESSAGE, subscription.prefix + rest)


def _gap_frame(subscription: Subscription, topic: str, after: int, first: int) -> bytes:
    body = {"subscription": subscription.id, "topic": topic, "first_missing": after + 1,
            "last_missing": first - 1}  # fmt: skip
    return _event_frame(PACKAGE.EVENT_GAP, _encode(body))


async def publish(topic: str, data: bytes) -> int:
    """Publish from an action or hook of the running server; return the message's offset.

    Raises:
        InvalidArgument: a bad topic or an oversized message.
        Unavailable: no broker, or it cannot be reached.
    """
    broker = current_app().broker
    if broker is None:
        raise Unavailable("this server has no broker", hint="set BROKER_URL")
    return await broker.publish(topic, data)
