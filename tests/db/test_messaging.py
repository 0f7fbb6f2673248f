"""Publish/subscribe through a real server and real clients, on every broker backend.

Brokers come from ``PYASYNC_NATS_URL`` (default ``nats://127.0.0.1:4222``) and
``PYASYNC_REDIS_URL`` (default ``redis://127.0.0.1:6379``); an unreachable one skips its tests
with a one-line reason, or fails them under ``PYASYNC_REQUIRE_DB=1``. Each test uses topics of
its own, so runs can repeat against a broker that keeps history.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import pytest

import broker
from client import Client, Subscription
from package import (
    PACKAGE,
    ErrorCode,
    GapEvent,
    InvalidArgument,
    MessageEvent,
    ResourceExhausted,
    SubscribeAnswer,
    SubscribeRequest,
    UnsubscribeRequest,
)
from protocol import FrameDecoder
from server import Server
from tests.helpers import (
    ROOT,
    clean_env,
    running_server,
    start_server_process,
    wait_until,
)

URLS = {
    "memory": "memory://",
    "nats": os.environ.get("PYASYNC_NATS_URL", "nats://127.0.0.1:4222"),
    "redis": os.environ.get("PYASYNC_REDIS_URL", "redis://127.0.0.1:6379"),
}
SHARED = ["nats", "redis"]  # brokers that reach other processes and keep history


def require_broker(url: str) -> None:
    """Skip (or fail under PYASYNC_REQUIRE_DB=1) when the broker's port does not answer."""
    parts = urlsplit(url)
    if parts.scheme == "memory":
        return
    try:
        socket.create_connection((parts.hostname, parts.port), timeout=3).close()
    except OSError as exc:
        reason = f"{url} unreachable: {exc}"
        if os.environ.get("PYASYNC_REQUIRE_DB") == "1":
            pytest.fail(f"PYASYNC_REQUIRE_DB=1 but {reason}")
        pytest.skip(reason)


@pytest.fixture(params=list(URLS))
def broker_url(request: pytest.FixtureRequest) -> str:
    url = URLS[request.param]
    require_broker(url)
    return url


@pytest.fixture
def topic() -> str:
    """A topic prefix of this test's own."""
    return f"t{uuid.uuid4().hex[:10]}"


@contextlib.asynccontextmanager
async def connected(server: Server, count: int = 1) -> AsyncIterator[list[Client]]:
    clients = [Client("127.0.0.1", server.port, timeout=10) for _ in range(count)]
    try:
        await asyncio.gather(*(client.connect() for client in clients))
        yield clients
    finally:
        await asyncio.gather(*(client.close() for client in clients))


async def collect(events: Subscription, count: int, timeout: float = 20) -> list[Any]:
    """The next ``count`` events of a subscription."""
    got: list[Any] = []
    async with asyncio.timeout(timeout):
        async for event in events:
            got.append(event)
            if len(got) == count:
                break
    return got


def offsets(events: list[Any]) -> list[int]:
    assert all(isinstance(event, MessageEvent) for event in events), events
    return [event.offset for event in events]


async def test_fan_out_reaches_every_subscriber_in_order(broker_url: str, topic: str) -> None:
    async with (
        running_server(broker_url=broker_url) as server,
        connected(server, 20) as clients,
    ):
        subscriptions = [client.subscribe(f"{topic}.news") for client in clients]
        for subscription in subscriptions:
            await subscription.__aenter__()
        try:
            publisher = clients[0]
            published = [await publisher.publish(f"{topic}.news", b"%d" % i) for i in range(100)]
            assert published == list(range(1, 101))
            for subscription in subscriptions:
                events = await collect(subscription, 100)
                assert offsets(events) == published
                assert [event.data for event in events] == [b"%d" % i for i in range(100)]
        finally:
            for subscription in subscriptions:
                await subscription.__aexit__(None, None, None)


async def test_wildcards_route_each_topic(broker_url: str, topic: str) -> None:
    async with running_server(broker_url=broker_url) as server, connected(server) as [client]:
        async with (
            client.subscribe(f"{topic}.a.*") as one_token,
            client.subscribe(f"{topic}.a.>") as rest,
            client.subscribe(f"{topic}.a.b") as exact,
        ):
            for name in ("a.b", "a.b.c", "x.y", "a.c"):
                await client.publish(f"{topic}.{name}", name.encode())
            assert [e.data for e in await collect(one_token, 2)] == [b"a.b", b"a.c"]
            assert [e.data for e in await collect(rest, 3)] == [b"a.b", b"a.b.c", b"a.c"]
            assert [e.data for e in await collect(exact, 1)] == [b"a.b"]


async def test_bad_topics_are_invalid_argument(broker_url: str) -> None:
    async with running_server(broker_url=broker_url) as server, connected(server) as [client]:
        for bad in ("", "a..b", "a b", "a.*", "a.>"):
            with pytest.raises(InvalidArgument):
                await client.publish(bad, b"x")
        for bad in ("a.>.b", "a.b*", "", "a. b"):
            with pytest.raises(InvalidArgument):
                async with client.subscribe(bad):
                    pass


async def test_concurrent_publishers_keep_per_topic_order(broker_url: str, topic: str) -> None:
    async with running_server(broker_url=broker_url) as server, connected(server, 5) as clients:
        async with clients[0].subscribe(f"{topic}.x") as events:
            await asyncio.gather(
                *(c.publish(f"{topic}.x", b"m") for c in clients[1:] for _ in range(50))
            )
            assert offsets(await collect(events, 200)) == list(range(1, 201))


async def test_since_replays_then_goes_live_without_gap_or_duplicate(
    broker_url: str, topic: str
) -> None:
    async with (
        running_server(broker_url=broker_url, history_size=1000) as server,
        connected(server, 2) as [publisher, subscriber],
    ):
        for i in range(50):
            await publisher.publish(f"{topic}.feed", b"%d" % i)

        async def keep_publishing() -> None:
            for i in range(50, 150):
                await publisher.publish(f"{topic}.feed", b"%d" % i)

        sender = asyncio.create_task(keep_publishing())
        async with subscriber.subscribe(f"{topic}.feed", since=20) as events:
            assert events.complete
            got = await collect(events, 130)
        await sender
        assert offsets(got) == list(range(21, 151))  # the seam: no gap, no duplicate


async def test_history_that_no_longer_reaches_back_says_so(broker_url: str, topic: str) -> None:
    async with (
        running_server(broker_url=broker_url, history_size=10) as server,
        connected(server) as [client],
    ):
        for _ in range(30):
            await client.publish(f"{topic}.log", b"x")
        async with client.subscribe(f"{topic}.log", since=5) as events:
            assert not events.complete and events.position == 30
            first, *rest = await collect(events, 11)
            assert isinstance(first, GapEvent)
            assert (first.first_missing, first.last_missing) == (6, 20)
            assert offsets(rest) == list(range(21, 31))


async def test_wildcard_since_zero_replays_every_topic(broker_url: str, topic: str) -> None:
    async with running_server(broker_url=broker_url) as server, connected(server) as [client]:
        for name in ("a", "b", "a", "c"):
            await client.publish(f"{topic}.{name}", name.encode())
        async with client.subscribe(f"{topic}.*", since=0) as events:
            got = await collect(events, 4)
        by_topic = sorted((e.topic.rsplit(".", 1)[1], e.offset) for e in got)
        assert by_topic == [("a", 1), ("a", 2), ("b", 1), ("c", 1)]
        async with client.subscribe(f"{topic}.*", positions={f"{topic}.a": 1}) as events:
            await client.publish(f"{topic}.b", b"b")
            got = await collect(events, 2)  # a's second (resumed), then b's new one
        assert sorted((e.topic.rsplit(".", 1)[1], e.offset) for e in got) == [("a", 2), ("b", 2)]


async def test_wildcard_since_says_where_each_topic_starts_and_what_history_lost(
    broker_url: str, topic: str
) -> None:
    async with (
        running_server(broker_url=broker_url, history_size=3) as server,
        connected(server) as [client],
    ):
        for _ in range(5):
            await client.publish(f"{topic}.old", b"x")  # 1 and 2 have left history
        await client.publish(f"{topic}.new", b"y")
        for since, given, complete, positions in [
            (1, {}, False, {"old": 1, "new": 1}),  # .old lost 2
            (0, {}, False, {"old": 0, "new": 0}),
            (2, {}, False, {"old": 2, "new": 1}),  # 2 is ahead of .new
            (2, {"new": 0}, True, {"old": 2, "new": 0}),  # .old keeps 3-5
        ]:
            request = SubscribeRequest(
                topic=f"{topic}.*",
                since=since,
                positions={f"{topic}.{k}": v for k, v in given.items()},
            )
            answer = await client.request(PACKAGE.REQUEST_SUBSCRIBE, request)
            assert isinstance(answer, SubscribeAnswer)
            assert answer.complete is complete, request
            assert answer.positions == {f"{topic}.{k}": v for k, v in positions.items()}, request
            await client.request(
                PACKAGE.REQUEST_UNSUBSCRIBE, UnsubscribeRequest(subscription=answer.subscription)
            )
        async with client.subscribe(f"{topic}.*", since=1) as events:
            assert not events.complete
            got = await collect(events, 4)  # .new's 1 is not above since
        gap, *messages = sorted(got, key=lambda e: (e.topic, isinstance(e, MessageEvent)))
        assert isinstance(gap, GapEvent) and (gap.first_missing, gap.last_missing) == (2, 2)
        assert [(e.topic, e.offset) for e in messages] == [(f"{topic}.old", n) for n in (3, 4, 5)]


async def test_limits(broker_url: str, topic: str) -> None:
    async with (
        running_server(broker_url=broker_url, max_subscriptions=2, max_frame_size=4096) as server,
        connected(server) as [client],
    ):
        async with client.subscribe(f"{topic}.a"), client.subscribe(f"{topic}.b"):
            with pytest.raises(ResourceExhausted, match="MAX_SUBSCRIPTIONS"):
                async with client.subscribe(f"{topic}.c"):
                    pass
        with pytest.raises(InvalidArgument, match="exceeds"):
            await client.publish(f"{topic}.a", bytes(4000))
        with pytest.raises(InvalidArgument, match="topic must be"):
            await client.publish("x" * 300, b"")


async def test_a_subscribe_names_at_most_a_thousand_positions(topic: str) -> None:
    async with running_server() as server, connected(server) as [client]:
        too_many = {f"{topic}.p{i}": 1 for i in range(1001)}
        with pytest.raises(InvalidArgument, match="at most 1000"):
            async with client.subscribe(f"{topic}.>", positions=too_many):
                pass
        assert await client.ping() > 0  # the connection lives on


async def test_unsubscribe_stops_pushes_and_the_broker_lets_go(broker_url: str, topic: str) -> None:
    async with running_server(broker_url=broker_url) as server, connected(server) as [client]:
        listeners = server.app.broker.listeners if server.app.broker else {}
        async with client.subscribe(f"{topic}.z") as events:
            await client.publish(f"{topic}.z", b"1")
            assert offsets(await collect(events, 1)) == [1]
            assert f"{topic}.z" in listeners
        await wait_until(lambda: f"{topic}.z" not in listeners)
        frame = await client.request_raw(
            PACKAGE.REQUEST_UNSUBSCRIBE, b"\x81\xacsubscription\x07", timeout=5
        )
        assert frame.kind == PACKAGE.ANSWER_ERROR  # not a subscription of this connection


async def test_a_closed_connection_drops_its_subscriptions(broker_url: str, topic: str) -> None:
    async with running_server(broker_url=broker_url) as server:
        listeners = server.app.broker.listeners if server.app.broker else {}
        async with connected(server, 3) as clients:
            for client in clients:
                await client.subscribe(f"{topic}.gone").__aenter__()
            assert len(listeners[f"{topic}.gone"].subscriptions) == 3
        await wait_until(lambda: f"{topic}.gone" not in listeners)


async def test_subscribe_answer_comes_before_its_events(topic: str) -> None:
    async with running_server() as server, connected(server) as [client]:
        for _ in range(5):
            await client.publish(f"{topic}.q", b"x")
        request = SubscribeRequest(topic=f"{topic}.q", since=0)
        answer = await client.request(PACKAGE.REQUEST_SUBSCRIBE, request)
        assert answer.subscription > 0  # type: ignore[attr-defined]


# ---- slow readers ------------------------------------------------------------------------------


class CountingReader(asyncio.Protocol):
    """A raw subscriber that decodes frames and checks each topic's offsets run 1, 2, 3, ..."""

    def __init__(self) -> None:
        self.decoder = FrameDecoder()
        self.transport: asyncio.Transport | None = None
        self.last = 0
        self.errors: list[str] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.decoder.feed(data)
        while (frame := self.decoder.next_frame()) is not None:
            if frame.kind == PACKAGE.EVENT_MESSAGE:
                # The offset is the Int64 after b"offset" in the map: parse just enough.
                index = frame.body.index(b"\xa6offset") + 7
                offset = _read_uint(frame.body, index)
                if offset != self.last + 1:
                    self.errors.append(f"offset {offset} after {self.last}")
                self.last = offset
            elif frame.kind != PACKAGE.ANSWER_SUBSCRIBE:
                self.errors.append(f"unexpected frame type {frame.kind}")


def _read_uint(body: bytes, index: int) -> int:
    marker = body[index]
    if marker < 0x80:
        return marker
    size = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}[marker]
    return int.from_bytes(body[index + 1 : index + 1 + size])


def subscribe_frame(topic: str) -> bytes:
    from package import pack
    from protocol import encode_frame

    return encode_frame(
        PACKAGE.REQUEST_SUBSCRIBE, 1, pack(PACKAGE.REQUEST_SUBSCRIBE, SubscribeRequest(topic=topic))
    )


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def test_a_stalled_reader_with_a_small_push_budget_is_not_retried_in_a_loop(
    monkeypatch: pytest.MonkeyPatch, topic: str
) -> None:
    """With PUSH_BUFFER_SIZE far below what the socket holds unpaused, a reader that stopped
    is caught up once half its budget is free again, not by reading history at every pass."""
    reads = 0
    original = broker.Broker._replay_once

    async def counted(self: broker.Broker, subscription: broker.Subscription) -> bool:
        nonlocal reads
        reads += 1
        return await original(self, subscription)

    monkeypatch.setattr(broker.Broker, "_replay_once", counted)
    async with running_server(push_buffer_size=4096, history_size=100) as server:
        async with Client("127.0.0.1", server.port) as publisher:
            stalled = socket.create_connection(("127.0.0.1", server.port))
            try:
                stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                stalled.sendall(subscribe_frame(f"{topic}.slow"))
                await wait_until(lambda: server.app.broker is not None
                                 and f"{topic}.slow" in server.app.broker.listeners)  # fmt: skip
                data = b"x" * 4000
                for _ in range(2500):  # 10 MB: more than the socket buffers hold
                    await publisher.publish(f"{topic}.slow", data)
                # Pushes stopped at 4 KiB unsent, below the socket's high-water mark (64 KiB),
                # so no pause says when to try again; retrying at every pass of the loop would
                # read history hundreds of thousands of times meanwhile.
                assert reads < 1000
                assert await publisher.ping() > 0
            finally:
                stalled.close()


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_readers_get_everything_while_non_readers_stay_bounded(
    broker_url: str, topic: str
) -> None:
    """1,000 subscribers, 100 of which never read; every reader gets every message in order
    and the server's memory stays bounded. ``PYASYNC_MESSAGES`` raises the message count
    (100,000 is the full-size run; CI runs 1,000)."""
    messages = int(os.environ.get("PYASYNC_MESSAGES", "1000"))
    env = clean_env(
        BROKER_URL=broker_url, HISTORY_SIZE=str(messages), LOG_LEVEL="INFO",
        MAX_CONNECTIONS="2000", MAX_CONNECTIONS_PER_IP="0", DB_BACKEND="none",
    )  # fmt: skip
    server = start_server_process(ROOT, env=env)
    loop = asyncio.get_running_loop()
    readers: list[CountingReader] = []
    transports: list[asyncio.Transport] = []
    try:
        for index in range(1000):
            transport, reader = await loop.create_connection(
                CountingReader, "127.0.0.1", server.port
            )
            transports.append(transport)
            transport.write(subscribe_frame(f"{topic}.load"))
            if index < 100:
                transport.pause_reading()  # a subscriber that never reads
            else:
                readers.append(reader)
        await wait_until(lambda: all(r.decoder.buffered == 0 for r in readers), timeout=30)
        await asyncio.sleep(0.5)  # let the last SUBSCRIBE land before publishing
        before = rss_bytes(server.process.pid)
        async with Client("127.0.0.1", server.port, timeout=30) as publisher:
            window = asyncio.Semaphore(64)  # a bounded number of publishes not yet answered

            async def publish_one() -> None:
                async with window:
                    await publisher.publish(f"{topic}.load", b"x" * 32)

            await asyncio.gather(*(publish_one() for _ in range(messages)))
        await wait_until(lambda: all(r.last == messages for r in readers), timeout=120)
        growth = rss_bytes(server.process.pid) - before
        assert not [e for r in readers for e in r.errors]
        # 100 stalled connections may each hold PUSH_BUFFER_SIZE (1 MiB) and socket buffers.
        assert growth < 400 * 1024 * 1024, f"server grew by {growth / 2**20:.0f} MiB"
    finally:
        for transport in transports:
            transport.abort()
        await asyncio.sleep(0)  # the aborted transports close on the next loop pass
        assert server.stop() == 0


# ---- across processes and restarts -------------------------------------------------------------


@pytest.mark.parametrize("shared", SHARED)
async def test_two_servers_share_one_broker(shared: str, topic: str) -> None:
    url = URLS[shared]
    require_broker(url)
    async with (
        running_server(broker_url=url) as first,
        running_server(broker_url=url) as second,
        connected(first) as [subscriber],
        connected(second) as [publisher],
    ):
        async with subscriber.subscribe(f"{topic}.>") as events:
            for i in range(10):
                await publisher.publish(f"{topic}.room", b"%d" % i)
            assert offsets(await collect(events, 10)) == list(range(1, 11))


@pytest.mark.parametrize("shared", SHARED)
async def test_history_survives_a_server_restart(shared: str, topic: str) -> None:
    url = URLS[shared]
    require_broker(url)
    async with running_server(broker_url=url) as server, connected(server) as [client]:
        for i in range(5):
            await client.publish(f"{topic}.keep", b"%d" % i)
    async with running_server(broker_url=url) as server, connected(server) as [client]:
        async with client.subscribe(f"{topic}.keep", since=2) as events:
            assert events.complete and events.position == 5
            assert offsets(await collect(events, 3)) == [3, 4, 5]


async def test_memory_history_ends_with_its_server(topic: str) -> None:
    async with running_server() as server, connected(server) as [client]:
        for _ in range(5):
            await client.publish(f"{topic}.mem", b"x")
    async with running_server() as server, connected(server) as [client]:
        async with client.subscribe(f"{topic}.mem", since=5) as events:
            assert not events.complete  # offset 5 is ahead of this broker: resynchronise
            await client.publish(f"{topic}.mem", b"new")
            assert offsets(await collect(events, 1)) == [1]


def test_error_code_of_a_bad_topic_is_invalid_argument() -> None:
    with pytest.raises(InvalidArgument) as raised:
        broker.check_topic("a..b", max_length=10)
    assert raised.value.code == ErrorCode.INVALID_ARGUMENT
