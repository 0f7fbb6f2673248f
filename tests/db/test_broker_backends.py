"""The broker backends keep one contract: offsets, history, topics, live delivery and failures.

``memory://`` runs everywhere. ``nats://`` (with JetStream) and ``redis://`` are looked for at
``PYASYNC_NATS_URL`` (default ``nats://127.0.0.1:4222``) and ``PYASYNC_REDIS_URL`` (default
``redis://127.0.0.1:6379``); an unreachable one skips its tests with a one-line reason, unless
``PYASYNC_REQUIRE_DB=1``: then they fail. Every test publishes to topics of its own (on NATS, in a
namespace of its own) and removes them afterwards, so runs can repeat.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import msgspec
import pytest

from broker import HISTORY_LAG, Broker, BrokerBackend, BrokerSettings, Stored, open_backend
from package import PACKAGE, Unavailable
from protocol import FrameDecoder
from tests.helpers import FaultyProxy, wait_until

URLS = {
    "memory": "memory://",
    "nats": os.environ.get("PYASYNC_NATS_URL", "nats://127.0.0.1:4222"),
    "redis": os.environ.get("PYASYNC_REDIS_URL", "redis://127.0.0.1:6379"),
}
KINDS = ["memory", "nats", "redis"]
REMOTE = ["nats", "redis"]


class Opened:
    """A started backend, and how many times it reported a reconnection."""

    def __init__(self, settings: BrokerSettings) -> None:
        self.reconnects = 0
        self.backend: BrokerBackend = open_backend(settings, self._reconnected)

    def _reconnected(self) -> None:
        self.reconnects += 1


class Backends:
    """Backends of one kind for one test: its own topic prefix (and NATS namespace).

    ``close()`` closes every backend opened and removes what the test left behind.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        tag = uuid.uuid4().hex[:10]
        self.prefix = f"p{tag}"  # every topic of the test starts with it
        self.url = f"{URLS[kind]}/t{tag}" if kind == "nats" else URLS[kind]
        self.opened: list[Opened] = []

    def topic(self, name: str) -> str:
        return f"{self.prefix}.{name}"

    def url_via(self, port: int) -> str:
        """The same backend, reached through 127.0.0.1:``port`` (a proxy)."""
        parts = urlsplit(self.url)
        return parts._replace(netloc=f"127.0.0.1:{port}").geturl()

    async def open(self, url: str = "", **settings: Any) -> Opened:
        opened = Opened(BrokerSettings(url=url or self.url, **settings))
        self.opened.append(opened)
        await opened.backend.start()
        return opened

    async def retire(self, opened: Opened) -> None:
        self.opened.remove(opened)
        await opened.backend.close()

    async def require_reachable(self) -> None:
        """Skip (or fail under PYASYNC_REQUIRE_DB=1) when the service cannot be reached."""
        opened = await self.open()
        try:
            await opened.backend.history(self.topic("probe"), 0, 0)
        except Unavailable as exc:
            reason = f"{self.kind} broker at {URLS[self.kind]} unreachable: {exc.message}"
            if os.environ.get("PYASYNC_REQUIRE_DB") == "1":
                pytest.fail(f"PYASYNC_REQUIRE_DB=1 but {reason}")
            pytest.skip(reason)

    async def close(self) -> None:
        for opened in self.opened:
            await opened.backend.close()
        self.opened.clear()
        if self.kind == "nats":
            await self._remove_nats_streams()
        elif self.kind == "redis":
            await self._remove_redis_keys()

    async def _remove_nats_streams(self) -> None:
        import nats
        from nats.js.errors import NotFoundError

        parts = urlsplit(self.url)
        namespace = parts.path.strip("/").upper()
        server = parts._replace(path="").geturl()
        try:
            client = await nats.connect(server, connect_timeout=2, allow_reconnect=False)
        except Exception:
            return  # unreachable: nothing was created
        try:
            for stream in (namespace, f"{namespace}_HEADS"):
                try:
                    await client.jetstream().delete_stream(stream)
                except NotFoundError:
                    pass
        finally:
            await client.close()

    async def _remove_redis_keys(self) -> None:
        import redis.asyncio
        from redis.exceptions import RedisError

        client = redis.asyncio.Redis.from_url(self.url, socket_connect_timeout=2)
        try:
            keys = [key async for key in client.scan_iter(match=f"pyasync:*:{self.prefix}.*")]
            if keys:
                await client.delete(*keys)
        except RedisError:
            pass  # unreachable: nothing was created
        finally:
            await client.aclose()


async def backends_of(backends: Backends) -> AsyncIterator[Backends]:
    """Yield ``backends`` once its service answers (or skip), then close and clean up."""
    try:
        if backends.kind != "memory":
            await backends.require_reachable()
        yield backends
    finally:
        await backends.close()


@pytest.fixture(params=KINDS)
async def backends(request: pytest.FixtureRequest) -> AsyncIterator[Backends]:
    async for opened in backends_of(Backends(request.param)):
        yield opened


@pytest.fixture(params=REMOTE)
async def remote(request: pytest.FixtureRequest) -> AsyncIterator[Backends]:
    async for opened in backends_of(Backends(request.param)):
        yield opened


@pytest.fixture
async def redis_only() -> AsyncIterator[Backends]:
    async for opened in backends_of(Backends("redis")):
        yield opened


@pytest.fixture
async def nats_only() -> AsyncIterator[Backends]:
    async for opened in backends_of(Backends("nats")):
        yield opened


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    """Poll the async ``check`` until it is true.

    Raises:
        AssertionError: it stayed false for ``timeout`` seconds.
    """
    try:
        async with asyncio.timeout(timeout):
            while not await check():  # noqa: ASYNC110 - polls a service, no event to wait on
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"condition still false after {timeout:g} s") from None


def offsets(messages: list[Stored]) -> list[int]:
    return [message.offset for message in messages]


# ---- the contract -------------------------------------------------------------------------------


async def test_offsets_count_from_one_per_topic_and_history_reads_after(
    backends: Backends,
) -> None:
    backend = (await backends.open()).backend
    first, second, nowhere = backends.topic("a"), backends.topic("b"), backends.topic("none")

    assert [await backend.publish(first, b"a%d" % n) for n in range(1, 6)] == [1, 2, 3, 4, 5]
    assert [await backend.publish(second, b"b%d" % n) for n in range(1, 4)] == [1, 2, 3]

    messages, head = await backend.history(first, 0, 100)
    assert messages == [Stored(first, n, b"a%d" % n) for n in range(1, 6)] and head == 5
    messages, head = await backend.history(first, 2, 2)
    assert offsets(messages) == [3, 4] and head == 5
    messages, head = await backend.history(first, 3, 100)
    assert offsets(messages) == [4, 5] and head == 5
    assert await backend.history(first, 5, 10) == ([], 5)
    assert await backend.history(first, 0, 0) == ([], 5)
    assert await backend.history(second, 0, 1) == ([Stored(second, 1, b"b1")], 3)
    assert await backend.history(nowhere, 0, 10) == ([], 0)


async def test_data_comes_back_byte_for_byte(backends: Backends) -> None:
    backend = (await backends.open()).backend
    topic = backends.topic("bytes")
    seen: list[Stored] = []
    await backend.listen(topic, seen.append)
    payloads = [b"", b" ", b"1 2 3", b"\x00\xff\r\n", bytes(range(256)) * 64]
    for payload in payloads:
        await backend.publish(topic, payload)

    messages, _ = await backend.history(topic, 0, 100)
    assert [message.data for message in messages] == payloads
    await wait_until(lambda: len(seen) == len(payloads))
    assert [message.data for message in seen] == payloads


async def test_topics_match_single_and_multi_token_wildcards(backends: Backends) -> None:
    backend = (await backends.open()).backend
    topic = backends.topic
    names = ["a.x", "a.y", "b.x", "a.x.deep", "q?[z]", "qq[z]", "q\\z"]
    for name in names:
        await backend.publish(topic(name), b"x")

    async def found(pattern: str) -> list[str]:
        return sorted(await backend.topics(topic(pattern)))

    assert await found("a.*") == [topic("a.x"), topic("a.y")]
    assert await found("*.x") == [topic("a.x"), topic("b.x")]
    assert await found("a.>") == [topic("a.x"), topic("a.x.deep"), topic("a.y")]
    assert await found(">") == sorted(topic(name) for name in names)
    assert await found("q?[z]") == [topic("q?[z]")]  # '?' and '[' are no wildcards here
    assert await found("q\\z") == [topic("q\\z")]
    assert await found("nothing.>") == []


async def test_listen_delivers_in_order_until_unlisten(backends: Backends) -> None:
    backend = (await backends.open()).backend
    topic, deep = backends.topic("a"), backends.topic("a.deep")
    every: list[Stored] = []
    one_token: list[Stored] = []
    await backend.listen(backends.topic(">"), every.append)
    await backend.listen(backends.topic("*"), one_token.append)

    for _ in range(10):
        await backend.publish(topic, b"x")
        await backend.publish(deep, b"y")
    await wait_until(lambda: len(every) == 20 and len(one_token) == 10)
    assert offsets([m for m in every if m.topic == topic]) == list(range(1, 11))
    assert offsets([m for m in every if m.topic == deep]) == list(range(1, 11))
    assert {m.topic for m in one_token} == {topic}

    await backend.unlisten(backends.topic(">"))
    assert await backend.publish(topic, b"after") == 11
    await wait_until(lambda: len(one_token) == 11)  # delivered: the other listener would have it
    assert len(every) == 20
    await backend.unlisten(backends.topic("*"))


async def test_listen_takes_glob_characters_literally(backends: Backends) -> None:
    backend = (await backends.open()).backend
    literal, lookalike = backends.topic("q?[z]"), backends.topic("qq[z]")
    seen: list[Stored] = []
    await backend.listen(literal, seen.append)
    await backend.publish(lookalike, b"no")
    await backend.publish(literal, b"yes")
    await wait_until(lambda: len(seen) == 1)
    assert seen == [Stored(literal, 1, b"yes")]


async def test_history_keeps_the_newest_history_size(backends: Backends) -> None:
    backend = (await backends.open(history_size=5)).backend
    topic = backends.topic("a")
    assert [await backend.publish(topic, b"%d" % n) for n in range(1, 13)] == list(range(1, 13))

    messages, head = await backend.history(topic, 0, 100)
    assert offsets(messages) == [8, 9, 10, 11, 12] and head == 12
    assert [message.data for message in messages] == [b"8", b"9", b"10", b"11", b"12"]
    messages, head = await backend.history(topic, 3, 2)  # before the kept range: from its start
    assert offsets(messages) == [8, 9] and head == 12
    assert await backend.publish(topic, b"13") == 13


async def test_history_ages_out_and_offsets_go_on(backends: Backends) -> None:
    backend = (await backends.open(history_ttl=0.5)).backend
    topic = backends.topic("a")
    assert [await backend.publish(topic, b"x") for _ in range(3)] == [1, 2, 3]
    messages, head = await backend.history(topic, 0, 100)
    assert offsets(messages) == [1, 2, 3] and head == 3

    async def aged_out() -> bool:
        return (await backend.history(topic, 0, 100))[0] == []

    await eventually(aged_out)
    assert await backend.history(topic, 0, 100) == ([], 3)  # the newest offset stays
    assert await backend.publish(topic, b"later") == 4
    assert await backend.history(topic, 0, 100) == ([Stored(topic, 4, b"later")], 4)


@pytest.mark.parametrize(
    "backends",
    [
        "memory",
        *REMOTE,
    ],
    indirect=True,
)
async def test_topics_forget_history_that_aged_out(backends: Backends) -> None:
    backend = (await backends.open(history_ttl=0.5)).backend
    topic = backends.topic("a")
    await backend.publish(topic, b"x")
    assert await backend.topics(backends.topic(">")) == [topic]

    async def forgotten() -> bool:
        return await backend.topics(backends.topic(">")) == []

    await eventually(forgotten, timeout=5)


async def test_a_first_publish_between_two_history_reads_is_history_not_a_gap(
    nats_only: Backends, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NATS answers "no history" in two reads: the topic's last message, then the offset its
    heads stream remembers. A topic's first publish landing between them must not make its
    message look aged out (the broker would announce it to a new subscriber as a gap)."""
    from pyasync.brokers.nats import NatsBackend

    reader = (await nats_only.open()).backend
    publisher = (await nats_only.open()).backend
    assert isinstance(reader, NatsBackend)
    topic = nats_only.topic("first")
    floor = reader._floor
    published: list[int] = []

    async def floor_after_a_publish(name: str) -> int:
        if not published:  # the race, once: the publish is stored between the two reads
            published.append(await publisher.publish(topic, b"first"))
            # NATS republishes the head a moment after the acknowledgement; the race needs it.
            async with asyncio.timeout(5):
                while not await floor(name):  # noqa: ASYNC110 - polls NATS, no event to wait on
                    await asyncio.sleep(0.01)
        return await floor(name)

    monkeypatch.setattr(reader, "_floor", floor_after_a_publish)
    assert await reader.history(topic, 0, 10) == ([Stored(topic, 1, b"first")], 1)
    assert published == [1]


# ---- several servers --------------------------------------------------------------------------


@pytest.mark.slow
async def test_concurrent_publishers_share_one_gapless_sequence(remote: Backends) -> None:
    """Four servers publish 200 messages each to one topic at once: offsets 1..800, once each."""
    # Debug mode records a stack for every future; through nats-py that multiplies this test's
    # time by eight. The loop guard's exception handler stays on.
    asyncio.get_running_loop().set_debug(False)
    topic = remote.topic("busy")
    publishers = [(await remote.open()).backend for _ in range(4)]
    watcher = (await remote.open()).backend
    seen: list[Stored] = []
    await watcher.listen(topic, seen.append)

    async def publish_all(server: int, backend: BrokerBackend) -> dict[int, bytes]:
        in_flight = asyncio.Semaphore(8)  # each server has several publishes under way

        async def publish(data: bytes) -> int:
            async with in_flight:
                return await backend.publish(topic, data)

        payloads = [f"{server}:{n}".encode() for n in range(200)]
        got = await asyncio.gather(*(publish(data) for data in payloads))
        return dict(zip(got, payloads, strict=True))

    published: dict[int, bytes] = {}
    for part in await asyncio.gather(*(publish_all(*pair) for pair in enumerate(publishers))):
        assert not published.keys() & part.keys(), "two publishes got the same offset"
        published |= part
    assert sorted(published) == list(range(1, 801))

    messages, head = await watcher.history(topic, 0, 1000)
    assert head == 800
    assert {message.offset: message.data for message in messages} == published
    assert offsets(messages) == list(range(1, 801))
    await wait_until(lambda: len(seen) >= 800, timeout=30)
    assert offsets(seen) == list(range(1, 801))
    assert {message.offset: message.data for message in seen} == published


async def test_redis_databases_do_not_share_live_messages(redis_only: Backends) -> None:
    """Pub/Sub ignores the database number; a listener must still hear its database only."""
    parts = urlsplit(URLS["redis"])
    elsewhere = Backends("redis")
    elsewhere.prefix = redis_only.prefix  # the same topic names, in another database
    elsewhere.url = parts._replace(path=f"/{(int(parts.path.strip('/') or 0) + 1) % 16}").geturl()
    try:
        listening = (await redis_only.open()).backend
        publishing = (await elsewhere.open()).backend
        topic = redis_only.topic("a")
        seen: list[Stored] = []
        await listening.listen(topic, seen.append)
        assert await publishing.publish(topic, b"other database") == 1
        # Redis runs the two publishes in this order: a leak would arrive first.
        assert await listening.publish(topic, b"this database") == 1
        await wait_until(lambda: len(seen) >= 1)
        assert seen == [Stored(topic, 1, b"this database")]
    finally:
        await elsewhere.close()


class Pushes:
    """A connection as the broker sees it: keeps every event pushed to it, decoded."""

    def __init__(self) -> None:
        self.decoder = FrameDecoder()
        self.events: list[dict[str, Any]] = []

    def push(self, frame: bytes) -> bool:
        self.decoder.feed(frame)
        while (decoded := self.decoder.next_frame()) is not None:
            body = msgspec.msgpack.decode(decoded.body)
            self.events.append({"kind": decoded.kind, **body})
        return True

    def push_now(self, frames: bytes) -> bool:
        return self.push(frames)

    async def writable(self) -> None:
        return None


class TightPushes(Pushes):
    """A connection whose push budget runs out twice: it is caught up from history each time."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def push(self, frame: bytes) -> bool:
        self.calls += 1
        return self.calls not in (5, 60) and super().push(frame)


def by_topic(events: list[dict[str, Any]]) -> dict[str, list[int]]:
    """Offsets pushed per topic, in the order they arrived (message events only)."""
    seen: dict[str, list[int]] = {}
    for event in events:
        assert event["kind"] == PACKAGE.EVENT_MESSAGE, event
        seen.setdefault(event["topic"], []).append(event["offset"])
    return seen


async def test_a_burst_reaches_every_kind_of_subscription_once_and_in_order(
    backends: Backends,
) -> None:
    """Publishes in flight together (one fan-out round holds many) to two topics, while
    subscriptions are live, replaying from history, or short of push budget: each gets every
    offset of each topic once, in order, whichever way it got them."""
    broker = Broker(BrokerSettings(url=backends.url, history_size=1000))
    await broker.start()
    try:
        a, b = backends.topic("a"), backends.topic("b")
        count = 150  # per topic

        async def subscribe(target: Pushes, pattern: str, since: int | None) -> None:
            subscription, _, _ = await broker.subscribe(target, pattern, since=since, positions={})
            broker.start_pushing(subscription)

        live = [Pushes() for _ in range(20)] + [TightPushes() for _ in range(10)]
        for index, target in enumerate(live):
            await subscribe(target, backends.topic(">") if index % 2 else a, None)
        assert await broker.publish(b, b"before") == 1  # so that b's live subscribers know b
        await wait_until(lambda: all(len(target.events) == 1 for target in live[1::2]), 10)
        for target in live[1::2]:
            target.events.clear()

        async def burst() -> None:
            for start in range(0, count, 50):
                await asyncio.gather(*(
                    broker.publish(topic, b"%d" % n)
                    for n in range(start, start + 50) for topic in (a, b)
                ))  # fmt: skip

        publishing = asyncio.create_task(burst())
        late = [Pushes() for _ in range(10)]
        for index, target in enumerate(late):
            await subscribe(target, backends.topic(">") if index % 2 else a, 0)
        await publishing

        def wanted(target: Pushes, since: int | None, pattern_index: int) -> dict[str, list[int]]:
            first_b = 1 if since == 0 else 2
            if pattern_index % 2 == 0:
                return {a: list(range(1, count + 1))}
            return {a: list(range(1, count + 1)), b: list(range(first_b, count + 2))}

        everyone = [(t, None, i) for i, t in enumerate(live)] + [
            (t, 0, i) for i, t in enumerate(late)
        ]
        await wait_until(
            lambda: all(by_topic(t.events) == wanted(t, s, i) for t, s, i in everyone), 20
        )
    finally:
        await broker.close()


async def test_no_event_follows_the_end_of_a_subscription_mid_round(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A fan-out round gives the loop a pass between subscriptions (here after every one); a
    subscription ended meanwhile gets nothing more, as UNSUBSCRIBE's answer promises."""
    monkeypatch.setattr("broker.FAN_OUT_PASS", 0.0)
    broker = Broker(BrokerSettings(url="memory://"))
    await broker.start()
    try:
        targets = [Pushes() for _ in range(50)]
        subscriptions = []
        for target in targets:
            subscription, _, _ = await broker.subscribe(target, "t.x", since=None, positions={})
            broker.start_pushing(subscription)
            subscriptions.append(subscription)
        await wait_until(lambda: not any(s.catching_up for s in subscriptions))
        await broker.publish("t.x", b"one")
        await asyncio.sleep(0)  # the round begins
        await asyncio.sleep(0)
        broker.drop(subscriptions)
        reached = [len(target.events) for target in targets]
        assert 0 < sum(reached) < len(targets)  # ended in the middle of the round
        await asyncio.sleep(0.05)
        assert [len(target.events) for target in targets] == reached
    finally:
        await broker.close()


async def test_two_servers_brokers_share_topics(remote: Backends) -> None:
    """The broker front over a shared backend: one server publishes, another's client reads."""
    settings = BrokerSettings(url=remote.url)
    publishing, subscribed = Broker(settings), Broker(settings)
    await publishing.start()
    await subscribed.start()
    try:
        topic = remote.topic("a")
        assert await publishing.publish(topic, b"early") == 1
        pushes = Pushes()
        subscription, _, complete = await subscribed.subscribe(
            pushes, remote.topic(">"), since=0, positions={}
        )
        assert complete
        subscribed.start_pushing(subscription)
        for n in range(2, 7):
            assert await publishing.publish(topic, b"%d" % n) == n
        await wait_until(lambda: len(pushes.events) == 6)
        assert {event["kind"] for event in pushes.events} == {PACKAGE.EVENT_MESSAGE}
        assert [event["offset"] for event in pushes.events] == [1, 2, 3, 4, 5, 6]
        assert [event["data"] for event in pushes.events][:2] == [b"early", b"2"]
    finally:
        await subscribed.close()
        await publishing.close()


async def test_a_replay_chasing_a_busy_topic_goes_live_without_a_gap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A subscription catching up reads history while live messages keep coming. Each read
    takes a round trip (to NATS or Redis), so at a high rate one always arrives during it: a
    replay that went live only after a pass in which none did never went live, and after
    HISTORY_LAG announced kept messages as a gap. It must go live soon, missing nothing."""
    broker = Broker(BrokerSettings(url="memory://", history_size=100_000))
    await broker.start()
    history = broker.backend.history

    async def one_round_trip_later(topic: str, after: int, limit: int) -> tuple[list[Stored], int]:
        found = await history(topic, after, limit)
        await asyncio.sleep(0.005)  # the answer travels back while messages go on arriving
        return found

    monkeypatch.setattr(broker.backend, "history", one_round_trip_later)
    topic, stop = "busy.topic", asyncio.Event()

    async def publish_fast() -> None:  # about 1,000 messages a second
        while not stop.is_set():
            await broker.publish(topic, b"x")
            await asyncio.sleep(0.001)

    publisher = asyncio.create_task(publish_fast())
    try:
        await asyncio.sleep(0.1)  # the topic has history to catch up with
        pushes = Pushes()
        subscription, _, _ = await broker.subscribe(pushes, topic, since=0, positions={})
        broker.start_pushing(subscription)
        # The pass that reaches history's head goes live; waiting for a pass during which no
        # message arrives could take much longer, and past HISTORY_LAG lost messages.
        await wait_until(lambda: not subscription.catching_up, timeout=HISTORY_LAG / 4)
        await asyncio.sleep(0.2)  # and stays live while messages keep coming
        assert not subscription.catching_up
    finally:
        stop.set()
        await publisher
    head = (await history(topic, 0, 0))[1]
    await wait_until(lambda: len(pushes.events) >= head)
    assert {event["kind"] for event in pushes.events} == {PACKAGE.EVENT_MESSAGE}
    assert [event["offset"] for event in pushes.events] == list(range(1, head + 1))
    await broker.close()


async def test_a_new_backend_sees_the_old_history(remote: Backends) -> None:
    topic = remote.topic("a")
    before = await remote.open()
    for n in range(1, 4):
        await before.backend.publish(topic, b"%d" % n)
    await remote.retire(before)

    after = (await remote.open()).backend
    messages, head = await after.history(topic, 0, 10)
    assert [message.data for message in messages] == [b"1", b"2", b"3"] and head == 3
    assert await after.topics(remote.topic(">")) == [topic]
    assert await after.publish(topic, b"4") == 4


# ---- failures ---------------------------------------------------------------------------------


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (just released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@pytest.mark.parametrize("kind", REMOTE)
async def test_an_unreachable_backend_starts_and_answers_unavailable(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="pyasync.broker")
    opened = Opened(BrokerSettings(url=f"{kind}://127.0.0.1:{closed_port()}"))
    backend = opened.backend
    try:
        async with asyncio.timeout(10):
            await backend.start()
        warnings = [r for r in caplog.records if r.name.startswith("pyasync.broker")]
        assert len(warnings) == 1 and "not reachable at start-up" in warnings[0].getMessage()
        async with asyncio.timeout(3):
            with pytest.raises(Unavailable) as raised:
                await backend.publish("t.a", b"x")
            assert "\n" not in str(raised.value)
            with pytest.raises(Unavailable):
                await backend.history("t.a", 0, 10)
            with pytest.raises(Unavailable):
                await backend.topics("t.>")
            with pytest.raises(Unavailable):
                await backend.listen("t.>", lambda message: None)
    finally:
        async with asyncio.timeout(10):
            await backend.close()
    assert opened.reconnects == 0


class ClosingProxy(FaultyProxy):
    """A ``FaultyProxy`` that can also stop listening, so that connecting fails outright.

    ``FaultyProxy.refuse()`` accepts a connection and then drops it; nats-py 2.16 leaves the
    writer of a connection that fails during its handshake unclosed until garbage collection,
    a ResourceWarning that this suite turns into a failure.
    """

    async def stop_listening(self) -> None:
        if self.listener is not None:
            self.listener.close()
            await self.listener.wait_closed()
        self.cut()

    async def listen_again(self) -> None:
        self.listener = await asyncio.start_server(self._accept, "127.0.0.1", self.port)


async def publish_when_back(backend: BrokerBackend, topic: str, data: bytes) -> int:
    """Publish, retrying while the backend is still unavailable (10 s at most)."""
    async with asyncio.timeout(10):
        while True:
            try:
                return await backend.publish(topic, data)
            except Unavailable:
                await asyncio.sleep(0.1)


@pytest.mark.slow
async def test_listeners_and_publishing_come_back_after_a_cut(remote: Backends) -> None:
    topic = remote.topic("a")
    other_server = (await remote.open()).backend
    address = urlsplit(remote.url)
    proxy = ClosingProxy(address.hostname or "127.0.0.1", address.port or 0)
    await proxy.start()
    try:
        opened = await remote.open(remote.url_via(proxy.port))
        backend = opened.backend
        seen: list[Stored] = []
        await backend.listen(remote.topic(">"), seen.append)
        assert await backend.publish(topic, b"before") == 1
        await wait_until(lambda: len(seen) == 1)

        await proxy.stop_listening()  # cut every connection, refuse new ones

        async def refused() -> bool:
            try:
                await backend.publish(topic, b"probe")
            except Unavailable:
                return True
            return False

        await eventually(refused)
        await other_server.publish(topic, b"while away")
        await proxy.listen_again()
        await wait_until(lambda: opened.reconnects >= 1, timeout=15)
        back = await publish_when_back(backend, topic, b"back")
        await wait_until(lambda: any(m.data == b"back" for m in seen), timeout=10)
        messages, head = await backend.history(topic, 0, 100)
        assert head == back and offsets(messages) == list(range(1, back + 1))
        assert {b"before", b"while away", b"back"} <= {m.data for m in messages}
    finally:
        await proxy.close()
