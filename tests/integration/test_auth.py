"""Authentication and limits: tokens, HELLO, scopes, AUTH_TIMEOUT, an open server refused off
loopback, connections per address and requests per second."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

import config
from client import Client
from config import ConfigError
from package import (
    PACKAGE,
    ErrorAnswer,
    ErrorCode,
    HelloRequest,
    KvGetRequest,
    PermissionDenied,
    Unauthenticated,
    pack,
    unpack,
)
from protocol import encode_frame
from pyasync.auth import Principal, hash_token, new_token_line, pattern_covers
from server import Server
from tests.helpers import NO_DATABASE, RawConnection, running_server

ALICE = "alice-token-0123456789"
PRINCIPALS = (
    f"alice kv.read,publish:chat.>,subscribe:chat.> {hash_token(ALICE)};"
    f"bob * {hash_token('bob-token')}"
)


def error_of(frame: object) -> ErrorAnswer:
    assert frame is not None
    kind, body = frame.kind, frame.body  # type: ignore[attr-defined]
    assert kind == PACKAGE.ANSWER_ERROR
    error = unpack(PACKAGE.ANSWER_ERROR, body)
    assert isinstance(error, ErrorAnswer)
    return error


def test_scopes_cover_topic_patterns() -> None:
    alice = Principal("alice", frozenset({"kv.read", "publish:chat.>", "subscribe:a.*.c"}))
    assert alice.allows("kv.read") and not alice.allows("kv.write")
    assert alice.allows("publish:chat.room1") and alice.allows("publish:chat.room1.typing")
    assert not alice.allows("publish:chat") and not alice.allows("publish:other.x")
    assert alice.allows("subscribe:a.b.c") and alice.allows("subscribe:a.*.c")
    assert not alice.allows("subscribe:a.>") and not alice.allows("subscribe:a.b.d")
    assert pattern_covers("chat.>", "chat.*") and not pattern_covers("chat.*", "chat.>")
    assert Principal("root", frozenset({"*"})).allows("anything:at.all")
    token, line = new_token_line("carol", "kv.read")
    assert line.split() == ["carol", "kv.read", hash_token(token)] and token not in line


async def test_only_hello_and_ping_before_authentication(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with running_server(auth_tokens=PRINCIPALS) as server:
        async with Client("127.0.0.1", server.port, timeout=5) as anonymous:
            assert await anonymous.ping() > 0
            with pytest.raises(Unauthenticated, match="HELLO"):
                await anonymous.echo("x")
        with caplog.at_level(logging.DEBUG):
            async with Client("127.0.0.1", server.port, timeout=5, token=ALICE) as alice:
                assert alice.principal == "alice"
                assert await alice.echo("x") == "x"  # no scope needed
                with pytest.raises(PermissionDenied, match="server.info"):
                    await alice.server_info()
                assert await alice.publish("chat.room1", b"hi") == 1
                with pytest.raises(PermissionDenied, match="publish:other"):
                    await alice.publish("other.room", b"hi")
                async with alice.subscribe("chat.*"):
                    pass
                with pytest.raises(PermissionDenied):
                    async with alice.subscribe(">"):
                        pass
        async with Client("127.0.0.1", server.port, timeout=5, token="bob-token") as bob:
            info = await bob.server_info()  # scope "*"
            assert "auth_tokens" not in info.config  # a secret: never shown
            assert info.config["auth_timeout"] == 10.0
    assert ALICE not in caplog.text and hash_token(ALICE) not in caplog.text


async def test_wrong_tokens_are_slowed_down_then_the_connection_closes() -> None:
    async with running_server(auth_tokens=PRINCIPALS) as server:
        raw = await RawConnection.open(server.port)
        hello = pack(PACKAGE.REQUEST_HELLO, HelloRequest(token="guess"))
        delays = []
        for request_id in range(1, 6):
            began = time.monotonic()
            await raw.send(encode_frame(PACKAGE.REQUEST_HELLO, request_id, hello))
            assert error_of(await raw.read_frame()).code == ErrorCode.UNAUTHENTICATED
            delays.append(time.monotonic() - began)
        assert delays == sorted(delays) and delays[-1] >= 1.0  # 0.1, 0.2, ... 1.6 s
        assert await raw.read_frame() is None  # closed after the fifth failure
        await raw.close()
        with pytest.raises(Unauthenticated, match="not valid"):
            async with Client("127.0.0.1", server.port, timeout=5, token="guess"):
                pass


async def test_a_connection_that_never_authenticates_is_closed() -> None:
    async with running_server(auth_tokens=PRINCIPALS, auth_timeout=0.3) as server:
        raw = await RawConnection.open(server.port)
        frame = await raw.read_frame(timeout=5)
        assert frame is not None and frame.request_id == 0
        assert error_of(frame).code == ErrorCode.UNAUTHENTICATED
        assert await raw.read_frame() is None
        await raw.close()


def test_an_open_server_off_loopback_is_refused() -> None:
    for host in ("0.0.0.0", "::", "192.0.2.1", "example.org"):
        with pytest.raises(ConfigError, match="ALLOW_OPEN=true"):
            Server(config.Settings(host=host), db_settings=NO_DATABASE)
    for settings in (
        config.Settings(host="0.0.0.0", allow_open=True),
        config.Settings(host="0.0.0.0", auth_tokens=PRINCIPALS),
        config.Settings(host="::1"),
        config.Settings(host="localhost"),
    ):
        Server(settings, db_settings=NO_DATABASE)  # accepted: nothing raised


async def test_connections_per_address_are_limited() -> None:
    async with running_server(max_connections_per_ip=3) as server:
        held = [await RawConnection.open(server.port) for _ in range(3)]
        refused = await RawConnection.open(server.port)
        error = error_of(await refused.read_frame())
        assert (
            error.code == ErrorCode.RESOURCE_EXHAUSTED and "MAX_CONNECTIONS_PER_IP" in error.message
        )
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", server.port, local_addr=("127.0.0.2", 0)
        )
        other = RawConnection(reader, writer)  # another address is still served
        await other.send(encode_frame(PACKAGE.REQUEST_PING, 1, b"\x80"))
        frame = await other.read_frame()
        assert frame is not None and frame.kind == PACKAGE.ANSWER_PING
        for connection in (*held, refused, other):
            await connection.close()


async def test_requests_above_the_rate_are_refused_with_a_retry_hint() -> None:
    async with running_server(rate_limit=50, rate_burst=10) as server:
        raw = await RawConnection.open(server.port)
        await raw.send(
            b"".join(encode_frame(PACKAGE.REQUEST_PING, i, b"\x80") for i in range(1, 31))
        )
        frames = [await raw.read_frame() for _ in range(30)]  # every request is answered
        kinds = [frame.kind for frame in frames if frame is not None]
        assert kinds[:10] == [PACKAGE.ANSWER_PING] * 10  # the burst
        refusals = [error_of(f) for f in frames if f and f.kind == PACKAGE.ANSWER_ERROR]
        assert 10 <= len(refusals) < 20  # refused now, or held back until tokens came back
        assert all(r.code == ErrorCode.RESOURCE_EXHAUSTED for r in refusals)
        assert all("retry in" in r.hint for r in refusals)
        await asyncio.sleep(0.1)  # what the hint asked: the bucket refills at 50/s
        await raw.send(encode_frame(PACKAGE.REQUEST_PING, 99, b"\x80"))
        frame = await raw.read_frame()
        assert frame is not None and frame.kind == PACKAGE.ANSWER_PING
        await raw.close()


async def test_scopes_guard_the_key_value_store() -> None:
    async with running_server(auth_tokens="reader - " + hash_token("r")) as server:
        async with Client("127.0.0.1", server.port, timeout=5, token="r") as reader:
            with pytest.raises(PermissionDenied, match="kv.read"):
                await reader.request(PACKAGE.REQUEST_KV_GET, KvGetRequest(key="k"))
