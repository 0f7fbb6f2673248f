"""Server-to-server calls: an action borrows a named upstream's client, which fails over between
its endpoints and keeps within the deadline of the request being served."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest

import config
from client import Client
from context import Context
from package import (
    PACKAGE,
    DeadlineExceeded,
    EchoAnswer,
    EchoRequest,
    NotFound,
    ServerInfoAnswer,
)
from pyasync.router import ROUTER, Router
from server import Server, serve
from tests.helpers import NO_DATABASE, running_server, wait_until
from upstream import upstream


def router_with_echo(action: object) -> Router:
    """The built-in router with ECHO served by ``action``."""
    router = Router()
    router.routes.update(ROUTER.routes)
    router.add(PACKAGE.REQUEST_ECHO, action, replace=True)  # type: ignore[arg-type]
    return router


@contextlib.asynccontextmanager
async def caller(router: Router, upstreams: str) -> AsyncIterator[Server]:
    settings = config.Settings(host="127.0.0.1", port=0, upstreams=upstreams)
    async with serve(settings, db_settings=NO_DATABASE, router=router) as server:
        yield server


async def ask_billing(request: EchoRequest, ctx: Context) -> EchoAnswer:
    async with upstream("billing") as billing:
        info = await billing.request(PACKAGE.REQUEST_SERVER_INFO)
    assert isinstance(info, ServerInfoAnswer)
    return EchoAnswer(text=str(info.config["port"]))


async def test_an_action_calls_another_server_and_fails_over() -> None:
    async with running_server() as first, running_server() as second:
        endpoints = f"billing=127.0.0.1:{first.port},127.0.0.1:{second.port}"
        async with (
            caller(router_with_echo(ask_billing), endpoints) as front,
            Client("127.0.0.1", front.port, timeout=10) as client,
        ):
            assert await client.echo("who") == "0"  # the first endpoint (configured port 0)
            assert front.app.upstreams is not None
            borrowed = front.app.upstreams.clients["billing"]
            assert borrowed.port == first.port
            await first.shutdown()
            assert await client.echo("who") == "0"  # answered by the second server now
            assert borrowed.port == second.port


async def test_an_upstream_call_keeps_within_the_callers_deadline() -> None:
    ended: list[float] = []

    async def slow(request: EchoRequest, ctx: Context) -> EchoAnswer:
        try:
            await asyncio.sleep(5)
        finally:
            ended.append(time.monotonic())  # the upstream server stops at the passed deadline
        return EchoAnswer(text="late")

    async def relay(request: EchoRequest, ctx: Context) -> EchoAnswer:
        async with upstream("billing") as billing:
            answer = await billing.request(PACKAGE.REQUEST_ECHO, request)
        assert isinstance(answer, EchoAnswer)
        return answer

    settings = config.Settings(host="127.0.0.1", port=0)
    async with serve(settings, db_settings=NO_DATABASE, router=router_with_echo(slow)) as back:
        async with (
            caller(router_with_echo(relay), f"billing=127.0.0.1:{back.port}") as front,
            Client("127.0.0.1", front.port) as client,
        ):
            began = time.monotonic()
            with pytest.raises(DeadlineExceeded):
                await client.request(PACKAGE.REQUEST_ECHO, EchoRequest(text="x"), timeout=0.5)
            await wait_until(lambda: ended, timeout=3)
            assert ended[0] - began < 1.5  # not after its own 5 s or REQUEST_TIMEOUT


async def test_an_unknown_upstream_is_not_found() -> None:
    async def unknown(request: EchoRequest, ctx: Context) -> EchoAnswer:
        async with upstream("nowhere"):
            raise AssertionError("unreachable")

    async with (
        caller(router_with_echo(unknown), "") as front,
        Client("127.0.0.1", front.port, timeout=5) as client,
    ):
        with pytest.raises(NotFound, match="UPSTREAMS"):
            await client.echo("x")
