"""A client given several endpoints survives losing its server: it reconnects to another,
sends idempotent requests again, fails the others with UNAVAILABLE, and resumes subscriptions
from their last offset with no message lost or repeated (on a broker the servers share). An
endpoint that takes the connection and then drops or refuses it is passed over too.

The three-node version, with server processes killed by SIGKILL, is
``tests/e2e/test_cluster_failover.py``."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import cast

import pytest

from client import Client
from context import Context
from package import (
    PACKAGE,
    DeadlineExceeded,
    EchoAnswer,
    EchoRequest,
    MessageEvent,
    PublishAnswer,
    PublishRequest,
    Unavailable,
)
from pyasync.auth import hash_token
from pyasync.router import ROUTER, make_route
from server import Server
from tests.db.test_messaging import URLS, require_broker
from tests.helpers import FaultyProxy, running_server, wait_until


def crash(server: Server) -> None:
    """Stop ``server`` the way SIGKILL would look to its clients: no goodbye, no drain."""
    if server._listener is not None:
        server._listener.close()
    for connection in list(server.connections):
        if connection.transport is not None:
            connection.transport.abort()


class Trap(asyncio.Protocol):
    """An endpoint that accepts a connection and drops it at the first bytes it reads: a node
    dying just as clients fail over to it, or a proxy whose backend is gone."""

    accepted = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        Trap.accepted += 1
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.transport.abort()


@contextlib.asynccontextmanager
async def trap() -> AsyncIterator[str]:
    """A ``Trap`` listening on 127.0.0.1; yields its endpoint."""
    Trap.accepted = 0
    listener = await asyncio.get_running_loop().create_server(Trap, "127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{listener.sockets[0].getsockname()[1]}"
    finally:
        listener.close()
        await listener.wait_closed()


async def test_idempotent_requests_are_sent_again_and_others_fail(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    running = 0

    async def slow_echo(request: EchoRequest, ctx: Context) -> EchoAnswer:
        nonlocal running
        running += 1
        await asyncio.sleep(0.3)
        return EchoAnswer(text=request.text)

    async def slow_publish(request: PublishRequest, ctx: Context) -> PublishAnswer:
        nonlocal running
        running += 1
        await asyncio.sleep(0.3)
        return PublishAnswer(offset=1)

    routes = ROUTER.routes
    monkeypatch.setitem(routes, PACKAGE.REQUEST_ECHO, make_route(PACKAGE.REQUEST_ECHO, slow_echo))
    monkeypatch.setitem(
        routes, PACKAGE.REQUEST_PUBLISH, make_route(PACKAGE.REQUEST_PUBLISH, slow_publish)
    )
    async with running_server() as first, running_server() as second:
        endpoints = [f"127.0.0.1:{first.port}", f"127.0.0.1:{second.port}"]
        async with Client(endpoints=endpoints, timeout=10) as client:
            assert client.port == first.port
            echo = asyncio.create_task(client.echo("again"))
            publish = asyncio.create_task(client.publish("t.x", b"maybe"))
            await wait_until(lambda: running == 2)
            crash(first)
            assert await echo == "again"  # idempotent: sent again to the second server
            with pytest.raises(Unavailable, match="may or may not have run"):
                await publish
            assert client.port == second.port
            assert await client.ping() > 0


async def test_a_client_waits_for_a_server_to_come_back() -> None:
    async with running_server() as server:
        port = server.port
        async with Client("127.0.0.1", port, reconnect=True, timeout=10) as client:
            crash(server)
            await server.shutdown()
            began = time.monotonic()
            waiting = asyncio.create_task(client.ping())
            await asyncio.sleep(0.3)
            assert not waiting.done()
            async with running_server(port=port):
                assert await waiting > 0
            assert time.monotonic() - began < 5


@pytest.mark.parametrize("heartbeat", [0.3, None])
async def test_a_server_that_stops_answering_is_left_for_another(heartbeat: float | None) -> None:
    """A node that hangs (or vanishes without closing its connections) is noticed by the
    heartbeat and failed over; without one, the request waits for its deadline."""
    async with running_server() as first, running_server() as second:
        proxy = await FaultyProxy("127.0.0.1", first.port).start()
        try:
            endpoints = [f"127.0.0.1:{proxy.port}", f"127.0.0.1:{second.port}"]
            async with Client(endpoints=endpoints, timeout=3, heartbeat=heartbeat) as client:
                assert await client.echo("first") == "first"
                proxy.stall()  # the connection stays open; nothing passes any more
                if heartbeat is None:
                    with pytest.raises(DeadlineExceeded):
                        await client.echo("stuck")
                    assert client.port == proxy.port
                else:
                    assert await client.echo("moved") == "moved"  # ECHO is sent again
                    assert client.port == second.port
        finally:
            await proxy.close()


async def test_a_subscriber_that_stops_reading_keeps_its_connection() -> None:
    """While the client itself does not read (a subscription's queue is full), the server's
    silence is not held against it: no heartbeat failover."""
    async with running_server() as server, running_server() as other:
        endpoints = [f"127.0.0.1:{server.port}", f"127.0.0.1:{other.port}"]
        async with (
            Client(endpoints=endpoints, timeout=5, heartbeat=0.2) as client,
            Client("127.0.0.1", server.port) as publisher,
        ):
            async with client.subscribe("t.full", max_queued=1) as events:
                for n in range(200):  # far more than the queue holds: reading pauses
                    await publisher.publish("t.full", b"%d" % n)
                await wait_until(lambda: client._protocol is not None
                                 and client._protocol.is_reading_paused)  # fmt: skip
                await asyncio.sleep(1.0)  # five heartbeat intervals without reading
                assert client.port == server.port
                first = await anext(aiter(events))
                assert isinstance(first, MessageEvent) and first.offset == 1


@pytest.mark.parametrize("shared", ["nats", "redis"])
async def test_subscriptions_resume_on_another_server_without_loss_or_duplicate(
    shared: str,
) -> None:
    url = URLS[shared]
    require_broker(url)
    topic = f"failover.t{time.monotonic_ns()}"
    async with (
        running_server(broker_url=url) as first,
        running_server(broker_url=url) as second,
        Client("127.0.0.1", second.port, timeout=10) as publisher,
    ):
        endpoints = [f"127.0.0.1:{first.port}", f"127.0.0.1:{second.port}"]
        async with Client(endpoints=endpoints, timeout=10) as client:
            async with client.subscribe(topic) as events:
                received: list[int] = []

                async def read() -> None:
                    async for event in events:
                        assert isinstance(event, MessageEvent), event
                        received.append(event.offset)
                        if event.offset == 200:
                            return

                reader = asyncio.create_task(read())
                for index in range(200):
                    await publisher.publish(topic, b"%d" % index)
                    if index == 80:
                        await wait_until(lambda: len(received) > 40)
                        crash(first)
                await asyncio.wait_for(reader, 20)
        assert received == list(range(1, 201))  # nothing lost, nothing twice


@pytest.mark.parametrize("shared", ["nats", "redis"])
async def test_a_connection_lost_while_subscriptions_resume_is_replaced_too(shared: str) -> None:
    url = URLS[shared]
    require_broker(url)
    topic = f"failover.t{time.monotonic_ns()}"
    async with (
        trap() as dropping,
        running_server(broker_url=url) as first,
        running_server(broker_url=url) as second,
        Client("127.0.0.1", second.port, timeout=10) as publisher,
    ):
        endpoints = [f"127.0.0.1:{first.port}", dropping, f"127.0.0.1:{second.port}"]
        async with (
            Client(endpoints=endpoints, timeout=10) as client,
            client.subscribe(topic) as events,
        ):
            await publisher.publish(topic, b"before")
            async with asyncio.timeout(10):
                first_event = await anext(events)
            assert isinstance(first_event, MessageEvent) and first_event.offset == 1
            crash(first)  # the client moves to the trap, which drops its SUBSCRIBE, then on
            await publisher.publish(topic, b"after")
            async with asyncio.timeout(5):
                event = await anext(events)
            assert isinstance(event, MessageEvent) and (event.offset, event.data) == (2, b"after")
            assert client.port == second.port and Trap.accepted == 1


async def test_an_endpoint_that_drops_the_hello_is_passed_over() -> None:
    token = "failover-token-0123456789"
    principals = f"app * {hash_token(token)}"
    async with (
        trap() as dropping,
        running_server(auth_tokens=principals) as first,
        running_server(auth_tokens=principals) as second,
    ):
        endpoints = [f"127.0.0.1:{first.port}", dropping, f"127.0.0.1:{second.port}"]
        async with Client(endpoints=endpoints, token=token, timeout=5) as client:
            crash(first)
            async with asyncio.timeout(5):
                assert await client.echo("on") == "on"
            assert client.port == second.port


async def test_a_node_at_its_connection_limit_is_passed_over_without_losing_requests() -> None:
    async with (
        running_server() as first,
        running_server(max_connections=1) as full,
        running_server() as third,
        Client("127.0.0.1", full.port) as holder,  # takes the full node's one connection
    ):
        endpoints = [f"127.0.0.1:{port}" for port in (first.port, full.port, third.port)]
        async with Client(endpoints=endpoints, timeout=5) as client:
            crash(first)
            answers = await asyncio.gather(*(client.echo(f"{n}") for n in range(5)))
            assert answers == [f"{n}" for n in range(5)] and client.port == third.port
        assert await holder.ping() > 0


async def test_an_endpoint_that_keeps_dropping_clients_is_retried_with_back_off() -> None:
    async with trap() as dropping, running_server() as first:
        endpoints = [f"127.0.0.1:{first.port}", dropping]
        async with Client(endpoints=endpoints, timeout=1.0) as client:
            crash(first)
            await first.shutdown()  # refused from now on: only the trap accepts
            with pytest.raises((Unavailable, DeadlineExceeded)):
                await client.echo("nobody serves this")
            # About 1.5 s of retries at 25 ms doubling to 2 s: a few rounds, not a busy loop.
            assert 1 <= Trap.accepted <= 10, Trap.accepted
