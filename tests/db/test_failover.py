"""A client given several endpoints survives losing its server: it reconnects to another,
sends idempotent requests again, fails the others with UNAVAILABLE, and resumes subscriptions
from their last offset with no message lost or repeated (on a broker the servers share)."""

from __future__ import annotations

import asyncio
import time

import pytest

from client import Client
from context import Context
from package import (
    PACKAGE,
    EchoAnswer,
    EchoRequest,
    MessageEvent,
    PublishAnswer,
    PublishRequest,
    Unavailable,
)
from pyasync.router import ROUTER, make_route
from server import Server
from tests.db.test_messaging import URLS, require_broker
from tests.helpers import running_server, wait_until


def crash(server: Server) -> None:
    """Stop ``server`` the way SIGKILL would look to its clients: no goodbye, no drain."""
    if server._listener is not None:
        server._listener.close()
    for connection in list(server.connections):
        if connection.transport is not None:
            connection.transport.abort()


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
