"""The NATS JetStream broker (``nats://host:port``): a stream's history, offsets set by CAS.

Why it is built this way:

* One stream, ``PYASYNC``, keeps every topic's history under the subject ``pyasync.<topic>``; the
  server itself enforces ``history_size`` (``max_msgs_per_subject``) and ``history_ttl``
  (``max_age``), so no server process has to trim anything.
* The stream's sequence is global, so a topic's offset travels in the ``Pyasync-Offset`` header.
  A publish reads the subject's last message and sends offset + 1 with
  ``Nats-Expected-Last-Subject-Sequence``: JetStream refuses it if anyone published to the topic
  in between, and the publisher reads again (a bounded number of times). Offsets therefore have
  no holes and no duplicates whatever the number of publishing processes. Inside one process
  publishes to a topic take turns (a lock) and reuse the sequence their predecessor was given,
  so the race costs a round trip only when another process really published meanwhile.
* Live messages come from one ephemeral push consumer per pattern, not from a core
  subscription to the stream's subjects: core subscribers also receive the attempts JetStream
  refused (same offset, other data). A consumer delivers only what the stream stored, in stream
  order, and after a reconnect it is opened again from the next stream sequence, so nothing
  published meanwhile is lost or repeated.
* When all of a quiet topic's history ages out, its last offset would go with it and offsets
  would start again at 1. The stream republishes the headers of every stored message to
  ``pyasync-heads.<topic>``, which a second stream, ``PYASYNC_HEADS``, keeps (one message per
  topic, no age limit): the server, not the publisher, remembers each topic's newest offset, the
  way the memory backend keeps ``head`` after trimming.
* ``history()`` finds the first wanted message by a binary search over stream sequences (a
  direct get of the subject's next message per step, the bounds narrowed by the offsets already
  seen: with one busy topic it lands at once), then reads the rest in one batch from a
  short-lived pull consumer.

The URL's path names a namespace, ``nats://host:4222/<namespace>`` (default ``pyasync``): its
streams are ``<NAMESPACE>`` and ``<NAMESPACE>_HEADS`` with the subjects ``<namespace>.>`` and
``<namespace>-heads.>``, which belong to this backend. Servers that share a namespace share
topics, and should share ``history_size`` and ``history_ttl`` too: these are the stream's limits,
and the server that connects last sets them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError
from nats.errors import MaxPayloadError, StaleConnectionError
from nats.js import api
from nats.js.errors import APIError, NotFoundError

from broker import BrokerSettings, Stored, topic_matches
from package import Aborted, InvalidArgument, Unavailable
from pyasync.tasks import OwnedTasks

__all__ = ["NatsBackend"]

log = logging.getLogger("pyasync.broker.nats")

DEFAULT_NAMESPACE = "pyasync"  # nats://host:port/<namespace> picks another
NAMESPACE = re.compile(r"[a-z0-9_-]{1,32}")  # becomes stream names and subject tokens
OFFSET_HEADER = "Pyasync-Offset"
EXPECTED_LAST_SUBJECT_SEQUENCE = "Nats-Expected-Last-Subject-Sequence"
WRONG_LAST_SEQUENCE = 10071  # JetStream's error code when that expectation failed
STREAM_NAME_IN_USE = 10058  # JetStream's error code for adding a stream that exists

REQUEST_TIMEOUT = 5.0  # seconds for one JetStream request (publish, get, consumer creation)
CONNECT_TIMEOUT = 2  # seconds for one connection attempt (nats-py takes whole seconds)
RECONNECT_WAIT = 1  # seconds between attempts at the same server
PING_INTERVAL = 10  # seconds; two unanswered pings declare a stalled connection lost
PUBLISH_PATIENCE = 10.0  # seconds of races lost to other publishers before Aborted
CONTENDED = 1.0  # seconds after a lost race during which a publish reads the last offset first
CONSUMER_IDLE = 60.0  # seconds the server keeps a consumer nobody listens to (a crashed server's)
PULL_EXPIRES = 1.0  # seconds a batch read waits at most for messages that vanished
SEARCH_STEPS = 64  # a binary search over 2**64 sequences ends well before this
LOCK_STRIPES = 256  # topics hash onto this many publish locks
REMEMBERED_TOPICS = 4096  # topics whose last (offset, sequence) this process remembers


@dataclass(slots=True)
class _Live:
    """The consumer that feeds one pattern's listener; ``generation`` retires old deliveries."""

    pattern: str
    deliver: Callable[[Stored], None]
    generation: int = 0
    subscription: Subscription | None = None
    consumer: str = ""
    expected: int = 1  # the consumer sequence of the next message
    next_sequence: int = 0  # the stream sequence to start at when opened again


@dataclass(slots=True)
class _Known:
    """What this process knows of a topic: its last (offset, sequence), and contention."""

    last: tuple[int, int] | None = None
    calm_after: float = 0.0  # the loop time until which others are known to publish too


class NatsBackend:
    """Topics on a NATS server with JetStream; see the module's docstring for the design.

    Args:
        settings: URL, history size and age.
        on_reconnect: called once the connection is back and the listeners deliver again.
    """

    def __init__(self, settings: BrokerSettings, on_reconnect: Callable[[], None]) -> None:
        self.settings = settings
        self.on_reconnect = on_reconnect
        parts = urlsplit(settings.url)
        self.address = f"{parts.hostname or '127.0.0.1'}:{parts.port or 4222}"
        self.server_url = f"{parts.scheme}://{parts.netloc}"
        namespace = parts.path.strip("/") or DEFAULT_NAMESPACE
        if not NAMESPACE.fullmatch(namespace):
            raise ValueError(f"NATS namespace must match {NAMESPACE.pattern}, got {namespace!r}")
        self.stream, self.heads_stream = namespace.upper(), namespace.upper() + "_HEADS"
        self.prefix = namespace + "."  # a topic's subject: prefix + topic
        self.heads_prefix = namespace + "-heads."  # its newest offset: heads_prefix + topic
        self.nc = Client()
        self.js = self.nc.jetstream(timeout=REQUEST_TIMEOUT)
        self.is_ready = False  # connected once and the streams exist
        self.last_error = "not connected yet"
        self.live: dict[str, _Live] = {}
        self.lasts: collections.OrderedDict[str, _Known] = collections.OrderedDict()
        self.locks = [asyncio.Lock() for _ in range(LOCK_STRIPES)]
        self.tasks = OwnedTasks(log, "NATS broker")
        self.attempted: asyncio.Event | None = None
        self.resuming: asyncio.Task[None] | None = None
        self.is_closing = False

    # ---- connection --------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect; if NATS cannot be reached, log it once and keep trying in the background."""
        self.attempted = asyncio.Event()
        self.tasks.spawn(self._connect())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CONNECT_TIMEOUT + REQUEST_TIMEOUT):
                await self.attempted.wait()
        if not self.is_ready:
            log.warning(
                "NATS broker at %s not reachable at start-up (%s); retrying in the background",
                self.address,
                self.last_error,
            )

    async def close(self) -> None:
        self.is_closing = True
        for pattern in list(self.live):
            await self.unlisten(pattern)
        await self.tasks.close()
        with contextlib.suppress(NatsError, OSError):
            await self.nc.close()

    async def _connect(self) -> None:
        await self.nc.connect(
            servers=[self.server_url],
            error_cb=self._on_error,
            disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected,
            max_reconnect_attempts=-1,  # forever, starting with the first connection
            connect_timeout=CONNECT_TIMEOUT,
            reconnect_time_wait=RECONNECT_WAIT,
            ping_interval=PING_INTERVAL,
            name="pyasync",
        )
        was_down = self.attempted is not None and self.attempted.is_set()
        await self._until_streams()
        if self.attempted is not None:
            self.attempted.set()
        if was_down:
            log.info("NATS broker at %s reachable now", self.address)
            self.on_reconnect()

    async def _until_streams(self) -> None:
        """Set the streams up, trying again while NATS refuses (a misconfiguration, or away)."""
        delay = 0.1
        while True:
            try:
                await self._ensure_streams()
                return
            except (NatsError, OSError) as exc:
                self.last_error = f"cannot set up its streams: {_describe(exc)}"
                log.warning("NATS broker at %s: %s", self.address, self.last_error)
                if self.attempted is not None:
                    self.attempted.set()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _ensure_streams(self) -> None:
        """Create the two streams, or bring their limits in line with these settings."""
        heads = api.StreamConfig(
            name=self.heads_stream, subjects=[self.heads_prefix + ">"], max_msgs_per_subject=1,
            allow_direct=True, storage=api.StorageType.FILE,
        )  # fmt: skip
        history = api.StreamConfig(
            name=self.stream,
            subjects=[self.prefix + ">"],
            max_msgs_per_subject=self.settings.history_size,
            max_age=self.settings.history_ttl,
            allow_direct=True,
            storage=api.StorageType.FILE,
            republish=api.RePublish(
                src=self.prefix + ">", dest=self.heads_prefix + ">", headers_only=True
            ),
        )
        for config in (heads, history):  # heads first: it must catch every republished header
            try:
                await self.js.add_stream(config)
            except APIError as exc:
                if exc.err_code != STREAM_NAME_IN_USE:
                    raise
                await self.js.update_stream(config)
        self.is_ready = True

    async def _on_error(self, exc: Exception) -> None:
        self.last_error = _describe(exc)
        # Failed connection attempts repeat every second while NATS is away: not worth a line.
        noisy = isinstance(exc, (OSError, StaleConnectionError))
        log.log(logging.DEBUG if noisy else logging.WARNING, "NATS broker at %s: %s",
                self.address, self.last_error)  # fmt: skip
        if self.attempted is not None and not self.is_ready:
            self.attempted.set()  # the first attempt failed: start() may return

    async def _on_disconnected(self) -> None:
        if self.is_ready and not self.is_closing:
            log.warning("NATS broker at %s: connection lost; reconnecting", self.address)

    async def _on_reconnected(self) -> None:
        if self.resuming is not None:
            self.resuming.cancel()  # it was cut short by another disconnection
        self.resuming = self.tasks.spawn(self._resume())

    async def _resume(self) -> None:
        """Back after a disconnection: streams (a restarted server), consumers, then replay."""
        await self._until_streams()
        try:
            for live in list(self.live.values()):
                await self._reopen(live)
        except (NatsError, OSError) as exc:
            log.warning("NATS broker at %s: resuming failed: %s", self.address, _describe(exc))
            return  # the connection went again: the next reconnection resumes
        log.info("NATS broker at %s: reconnected", self.address)
        self.on_reconnect()

    def _check(self) -> None:
        if not (self.is_ready and self.nc.is_connected):
            raise Unavailable(f"NATS broker at {self.address} unreachable: {self.last_error}")

    @contextlib.contextmanager
    def _translate(self) -> Iterator[None]:
        """The driver's failures as ``Unavailable`` (one line), oversized messages aside."""
        try:
            yield
        except MaxPayloadError as exc:
            raise InvalidArgument(
                "message too large for the NATS server", hint="raise max_payload in NATS"
            ) from exc
        except (NatsError, OSError) as exc:  # OSError: asyncio's TimeoutError too
            raise Unavailable(f"NATS broker at {self.address}: {_describe(exc)}") from exc

    # ---- publishing --------------------------------------------------------------------------

    async def publish(self, topic: str, data: bytes) -> int:
        """Store ``data`` as the topic's next offset and return that offset.

        Raises:
            Unavailable: NATS cannot be reached or did not answer in time.
            Aborted: other processes won every race for the next offset for PUBLISH_PATIENCE s.
            InvalidArgument: the message exceeds the NATS server's payload limit.
        """
        self._check()
        async with self.locks[hash(topic) % LOCK_STRIPES]:
            self._check()  # the connection may have gone while this waited for its turn
            with self._translate():
                return await self._append(topic, data)

    async def _append(self, topic: str, data: bytes) -> int:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + PUBLISH_PATIENCE
        known = self.lasts.get(topic)
        # The last offset this process published is a guess worth sending while nobody else
        # publishes to the topic; under contention every publisher reads first, as equals.
        last = known.last if known is not None and known.calm_after <= loop.time() else None
        attempt = 0
        while True:
            if last is None:
                last = await self._last(topic)
            offset, sequence = last[0] + 1, last[1]
            headers = {OFFSET_HEADER: str(offset), EXPECTED_LAST_SUBJECT_SEQUENCE: str(sequence)}
            try:
                ack = await self.js.publish(self.prefix + topic, data, headers=headers)
            except APIError as exc:
                if exc.err_code != WRONG_LAST_SEQUENCE:
                    raise
                self._remember(topic, None, loop.time() + CONTENDED)
                if loop.time() > deadline:
                    raise Aborted(
                        f"topic {topic!r}: other publishers won the race for the next offset "
                        f"{attempt + 1} times in {PUBLISH_PATIENCE:g} s",
                        hint="retry",
                    ) from None
                last, attempt = None, attempt + 1
                await asyncio.sleep(random.uniform(0, min(0.02, 0.001 * 2**attempt)))
                continue
            self._remember(topic, (offset, ack.seq), 0.0)
            return offset

    async def _last(self, topic: str) -> tuple[int, int]:
        """The topic's newest (offset, stream sequence); (offset kept in heads, 0) if no history."""
        message = await self._get(self.stream, self.prefix + topic)
        if message is not None:
            return _offset(message), message.seq or 0
        return await self._floor(topic), 0

    async def _floor(self, topic: str) -> int:
        message = await self._get(self.heads_stream, self.heads_prefix + topic)
        return 0 if message is None else _offset(message)

    def _remember(self, topic: str, last: tuple[int, int] | None, calm_after: float) -> None:
        known = self.lasts.get(topic)
        if known is None:
            known = self.lasts[topic] = _Known()
        known.last = last
        known.calm_after = max(known.calm_after, calm_after)
        self.lasts.move_to_end(topic)
        if len(self.lasts) > REMEMBERED_TOPICS:
            self.lasts.popitem(last=False)

    async def _get(
        self, stream: str, subject: str, sequence: int | None = None
    ) -> api.RawStreamMsg | None:
        """The subject's last message, or its first at ``sequence`` or after; None if none."""
        try:
            if sequence is None:
                return await self.js.get_last_msg(stream, subject, direct=True)
            return await self.js.get_msg(
                stream, seq=sequence, subject=subject, next=True, direct=True
            )
        except NotFoundError:
            return None

    # ---- history -----------------------------------------------------------------------------

    async def history(self, topic: str, after: int, limit: int) -> tuple[list[Stored], int]:
        """Up to ``limit`` kept messages after offset ``after``, and the newest offset.

        Raises:
            Unavailable: NATS cannot be reached or did not answer in time.
        """
        self._check()
        with self._translate():
            for _ in range(3):  # a message aged out or was stored while we looked: look again
                found = await self._history_once(topic, after, limit)
                if found is not None:
                    return found
            return [], (await self._last(topic))[0]

    async def _history_once(
        self, topic: str, after: int, limit: int
    ) -> tuple[list[Stored], int] | None:
        subject = self.prefix + topic
        last = await self._get(self.stream, subject)
        if last is None:
            floor = await self._floor(topic)
            if floor and await self._get(self.stream, subject) is not None:
                # Stored between the two reads (a new topic's first messages): the floor is not
                # history that aged out, and answering it would announce kept messages as a gap.
                return None
            return [], floor
        head = _offset(last)
        if limit <= 0 or after >= head:
            return [], head
        if after + 1 == head:
            return [_stored(topic, last)], head
        first = await self._get(self.stream, subject, 1)
        if first is None:
            return None
        start = (
            first if after < _offset(first) else await self._seek(subject, after + 1, first, last)
        )
        if start is None:
            return None
        count = min(limit, head - _offset(start) + 1)
        messages = [_stored(topic, start)]
        if count > 1:
            messages += await self._read(topic, (start.seq or 0) + 1, count - 1)
        for index in range(1, len(messages)):  # contiguous, or cut where one aged out meanwhile
            if messages[index].offset != messages[0].offset + index:
                del messages[index:]
                break
        return messages, head

    async def _seek(
        self, subject: str, target: int, first: api.RawStreamMsg, last: api.RawStreamMsg
    ) -> api.RawStreamMsg | None:
        """The subject's message with offset ``target``, between ``first`` and ``last``.

        Offsets grow with stream sequences and a topic's kept offsets are contiguous, so each
        probe bounds where ``target`` can be: ``n`` offsets away means ``n`` sequences at least.
        """
        low = (first.seq or 0) + (target - _offset(first))
        high = (last.seq or 0) - (_offset(last) - target)
        for _ in range(SEARCH_STEPS):
            if low > high:
                return None
            middle = (low + high) // 2
            probe = await self._get(self.stream, subject, middle)
            if probe is None:
                return None
            offset, sequence = _offset(probe), probe.seq or 0
            if offset == target:
                return probe
            if offset < target:
                low = sequence + (target - offset)
            else:
                high = min(middle - 1, sequence - (offset - target))
        return None

    async def _read(self, topic: str, sequence: int, count: int) -> list[Stored]:
        """Up to ``count`` of the topic's messages from stream ``sequence`` on, in one batch."""
        inbox = self.nc.new_inbox()
        subscription = await self.nc.subscribe(inbox)
        config = api.ConsumerConfig(
            filter_subject=self.prefix + topic, deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=sequence, ack_policy=api.AckPolicy.NONE, mem_storage=True,
            num_replicas=1, inactive_threshold=CONSUMER_IDLE,
        )  # fmt: skip
        try:
            info = await self.js.add_consumer(self.stream, config)
            # "expires" as well: a start that aged out meanwhile can leave a no_wait request
            # unanswered (NATS 2.9), where an expiring one ends with status 408.
            wait = {"batch": count, "no_wait": True, "expires": int(PULL_EXPIRES * 1e9)}
            request = json.dumps(wait).encode()
            try:
                await self.nc.publish(
                    f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{info.name}", request, reply=inbox
                )
                messages: list[Stored] = []
                while len(messages) < count:
                    message = await subscription.next_msg(REQUEST_TIMEOUT)
                    if message.headers and message.headers.get("Status"):
                        break  # 404 or 408: nothing more to read
                    messages.append(Stored(topic, _offset(message), message.data))
                return messages
            finally:
                await self._delete_consumer(info.name)
        finally:
            await subscription.unsubscribe()

    async def _delete_consumer(self, name: str) -> None:
        # Without waiting for the answer; CONSUMER_IDLE removes it anyway if this is lost.
        with contextlib.suppress(NatsError, OSError):
            await self.nc.publish(f"$JS.API.CONSUMER.DELETE.{self.stream}.{name}")

    async def topics(self, pattern: str) -> list[str]:
        """The topics matching ``pattern`` that have messages kept.

        Raises:
            Unavailable: NATS cannot be reached or did not answer in time.
        """
        self._check()
        with self._translate():
            info = await self.js.stream_info(self.stream, subjects_filter=self.prefix + pattern)
        subjects = info.state.subjects or {}
        found = (subject[len(self.prefix) :] for subject in subjects)
        return sorted(topic for topic in found if topic_matches(pattern, topic))

    # ---- live messages -----------------------------------------------------------------------

    async def listen(self, pattern: str, deliver: Callable[[Stored], None]) -> None:
        """Deliver every message stored from now on to a topic matching ``pattern``.

        Raises:
            Unavailable: NATS cannot be reached or did not answer in time.
        """
        self._check()
        live = _Live(pattern, deliver)
        with self._translate():
            await self._open(live, None)
        previous = self.live.get(pattern)
        self.live[pattern] = live
        if previous is not None:
            previous.generation += 1
            await self._retire(previous.subscription, previous.consumer)

    async def unlisten(self, pattern: str) -> None:
        """Stop ``listen(pattern)``; its consumer goes even if NATS is away (it times out)."""
        live = self.live.pop(pattern, None)
        if live is not None:
            live.generation += 1
            await self._retire(live.subscription, live.consumer)

    async def _open(self, live: _Live, start: int | None) -> None:
        """Feed ``live`` from a new consumer: from stream sequence ``start``, or from now.

        From the moment this starts, messages of the previous consumer are ignored; if it
        fails, none are delivered until it is opened again (the connection is gone anyway).
        """
        live.generation += 1
        generation = live.generation
        live.expected = 1

        async def on_message(message: Msg) -> None:
            if live.generation == generation:
                self._on_live(live, message)

        subscription = await self.nc.subscribe(self.nc.new_inbox(), cb=on_message)
        policy = api.DeliverPolicy.NEW if start is None else api.DeliverPolicy.BY_START_SEQUENCE
        config = api.ConsumerConfig(
            deliver_subject=subscription.subject, filter_subject=self.prefix + live.pattern,
            deliver_policy=policy, opt_start_seq=start, ack_policy=api.AckPolicy.NONE,
            mem_storage=True, num_replicas=1, inactive_threshold=CONSUMER_IDLE,
        )  # fmt: skip
        try:
            info = await self.js.add_consumer(self.stream, config)
        except BaseException:
            await self._retire(subscription, "")
            raise
        live.subscription, live.consumer = subscription, info.name
        if start is None and info.delivered is not None:
            live.next_sequence = max(live.next_sequence, (info.delivered.stream_seq or 0) + 1)

    def _on_live(self, live: _Live, message: Msg) -> None:
        if not message.reply:
            return  # a status message; this consumer asks for none
        sequences = message.metadata.sequence
        if sequences.consumer != live.expected:  # dropped as a slow consumer: open it again
            live.generation += 1
            self.tasks.spawn(self._reopen(live))
            return
        live.expected += 1
        live.next_sequence = sequences.stream + 1
        topic = message.subject[len(self.prefix) :]
        try:
            live.deliver(Stored(topic, _offset(message), message.data))
        except Exception:
            log.exception("delivering a message of %s failed", topic)

    async def _reopen(self, live: _Live) -> None:
        """Open ``live``'s consumer again where the old one stopped, then drop the old one."""
        if self.live.get(live.pattern) is not live:
            return  # unlistened meanwhile
        subscription, consumer = live.subscription, live.consumer
        await self._open(live, live.next_sequence or None)
        await self._retire(subscription, consumer)

    async def _retire(self, subscription: Subscription | None, consumer: str) -> None:
        with contextlib.suppress(NatsError, OSError):
            if subscription is not None:
                await subscription.unsubscribe()
        if consumer:
            await self._delete_consumer(consumer)


def _offset(message: api.RawStreamMsg | Msg) -> int:
    headers = message.headers or {}
    return int(headers.get(OFFSET_HEADER, 0))


def _stored(topic: str, message: api.RawStreamMsg) -> Stored:
    return Stored(topic, _offset(message), message.data or b"")


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
