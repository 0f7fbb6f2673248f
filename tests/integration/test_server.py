"""A real server and client over loopback: actions, pipelining, errors, limits, shutdown."""

from __future__ import annotations

import asyncio
import logging
import os

import pytest

import config
from client import Client, ConnectionClosed
from context import Context
from package import (
    PACKAGE,
    ChangeQuestionMarkAnswer,
    ChangeQuestionMarkRequest,
    DeadlineExceeded,
    EchoAnswer,
    EchoRequest,
    ErrorAnswer,
    ErrorCode,
    Internal,
    InvalidArgument,
    ResourceExhausted,
    ServerInfoAnswer,
    Unavailable,
    UnknownPackageType,
    pack,
    unpack,
)
from protocol import FLAG_COMPRESSED, HEADER, MAGIC, encode_frame
from pyasync.router import ROUTER, make_route
from server import Server
from tests.helpers import NO_DATABASE, RawConnection, running_server, wait_until


class SlowEcho:
    """An ECHO action that sleeps first and records how its runs ended."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.running = 0
        self.most_running = 0
        self.cancelled = 0
        self.finished = 0

    async def __call__(self, request: EchoRequest, ctx: Context) -> EchoAnswer:
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await asyncio.sleep(self.seconds)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.running -= 1
        self.finished += 1
        return EchoAnswer(text=request.text, data=request.data)


@pytest.fixture
def slow_echo(monkeypatch: pytest.MonkeyPatch) -> SlowEcho:
    action = SlowEcho(0.3)
    monkeypatch.setitem(
        ROUTER.routes, PACKAGE.REQUEST_ECHO, make_route(PACKAGE.REQUEST_ECHO, action)
    )
    return action


# ---- built-in actions ------------------------------------------------------------------------


async def test_builtin_actions(client: Client) -> None:
    assert await client.ping() > 0
    assert await client.echo("hello") == "hello"
    data = await client.request(PACKAGE.REQUEST_ECHO, EchoRequest(data=b"\x00\xff"))
    assert data == EchoAnswer(data=b"\x00\xff")
    answer = await client.request(
        PACKAGE.REQUEST_CHANGE_QUESTION_MARK, ChangeQuestionMarkRequest(text="How are you?")
    )
    assert answer == ChangeQuestionMarkAnswer(text="How are you!")
    info = await client.server_info()
    assert isinstance(info, ServerInfoAnswer)
    assert info.open_connections == 1 and info.requests_served == 4
    assert info.config["max_frame_size"] == 16 * 1024 * 1024
    assert "tls_key_password" not in info.config


async def test_thousand_pipelined_requests_on_one_connection(client: Client) -> None:
    texts = [f"request {i}" for i in range(1000)]
    answers = await asyncio.gather(
        *(client.request(PACKAGE.REQUEST_ECHO, EchoRequest(text=text)) for text in texts)
    )
    assert [answer.text for answer in answers if isinstance(answer, EchoAnswer)] == texts


async def test_thousand_frames_in_one_write_are_each_answered_once(raw: RawConnection) -> None:
    stream = b"".join(
        encode_frame(PACKAGE.REQUEST_ECHO, i, pack(PACKAGE.REQUEST_ECHO, EchoRequest(text=str(i))))
        for i in range(1, 1001)
    )
    await raw.send(stream)
    seen: dict[int, str | None] = {}
    for _ in range(1000):
        frame = await raw.read_frame()
        assert frame is not None and frame.kind == PACKAGE.ANSWER_ECHO
        assert frame.request_id not in seen
        answer = unpack(PACKAGE.ANSWER_ECHO, frame.body)
        assert isinstance(answer, EchoAnswer)
        seen[frame.request_id] = answer.text
    assert seen == {i: str(i) for i in range(1, 1001)}


async def test_a_pipelined_burst_does_not_hold_up_another_connection(
    server: Server, raw: RawConnection
) -> None:
    """A thousand requests in one write are answered a few dozen per pass of the server's loop,
    so another connection's request, received at the same time, is served in between."""
    await raw.send(b"".join(encode_frame(PACKAGE.REQUEST_PING, i, b"\x80") for i in range(1, 1001)))
    other = await RawConnection.open(server.port)
    await other.send(encode_frame(PACKAGE.REQUEST_SERVER_INFO, 1, b"\x80"))
    frame = await other.read_frame()
    assert frame is not None and frame.kind == PACKAGE.ANSWER_SERVER_INFO
    info = unpack(PACKAGE.ANSWER_SERVER_INFO, frame.body)
    assert isinstance(info, ServerInfoAnswer)
    assert info.requests_served < 1000  # served while the burst was being answered
    answered = set()
    for _ in range(1000):  # and the burst is still answered whole, each request once
        frame = await raw.read_frame()
        assert frame is not None and frame.kind == PACKAGE.ANSWER_PING
        answered.add(frame.request_id)
    assert answered == set(range(1, 1001))
    await other.close()


async def test_large_bodies_are_compressed_when_they_shrink(raw: RawConnection) -> None:
    for request_id, data in ((1, b"abc" * 400_000), (2, os.urandom(64 * 1024)), (3, b"tiny")):
        await raw.send(
            encode_frame(
                PACKAGE.REQUEST_ECHO, request_id, pack(PACKAGE.REQUEST_ECHO, EchoRequest(data=data))
            )
        )
        header = await raw.reader.readexactly(HEADER.size)
        _, _, flags, kind, rid, _, length = HEADER.unpack(header)
        body = await raw.reader.readexactly(length)
        raw.decoder.feed(header + body)
        frame = raw.decoder.next_frame()
        assert frame is not None and rid == request_id and kind == PACKAGE.ANSWER_ECHO
        assert unpack(PACKAGE.ANSWER_ECHO, frame.body) == EchoAnswer(data=data)
        assert bool(flags & FLAG_COMPRESSED) == (request_id == 1)
        if request_id == 1:
            assert length < len(data) // 10


# ---- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "payload", "error", "message"),
    [
        (999, b"\x80", UnknownPackageType, "package type 999 is unknown"),
        (PACKAGE.ANSWER_ECHO, b"\x80", UnknownPackageType, "ANSWER_ECHO (5) is not a request"),
        (PACKAGE.REQUEST_ECHO, b"\xc1garbage", InvalidArgument, "invalid REQUEST_ECHO body"),
        (PACKAGE.REQUEST_ECHO, b"\x81\xa4text\x05", InvalidArgument, "at `$.text`"),
        (PACKAGE.REQUEST_ECHO, b"\x80", InvalidArgument, "exactly one of 'text' or 'data'"),
    ],
)
async def test_bad_requests_get_an_error_and_the_connection_lives(
    client: Client, kind: int, payload: bytes, error: type[Exception], message: str
) -> None:
    frame = await client.request_raw(kind, payload, timeout=5)
    assert frame.kind == PACKAGE.ANSWER_ERROR
    answer = unpack(PACKAGE.ANSWER_ERROR, frame.body)
    assert isinstance(answer, ErrorAnswer)
    assert answer.code == getattr(error, "code", None)
    assert message in answer.message
    assert await client.echo("still here") == "still here"


async def test_unexpected_exception_is_internal_and_logged(
    client: Client, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(request: EchoRequest, ctx: Context) -> EchoAnswer:
        raise RuntimeError("secret detail")

    monkeypatch.setitem(
        ROUTER.routes, PACKAGE.REQUEST_ECHO, make_route(PACKAGE.REQUEST_ECHO, broken)
    )
    with caplog.at_level(logging.ERROR), pytest.raises(Internal) as raised:
        await client.echo("x")
    assert "secret detail" not in str(raised.value)
    assert "RuntimeError: secret detail" in caplog.text  # the traceback is in the log
    assert await client.ping() > 0


async def test_broken_stream_closes_only_that_connection(server: Server, client: Client) -> None:
    raw = await RawConnection.open(server.port)
    await raw.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    frame = await raw.read_frame()
    assert frame is not None and frame.kind == PACKAGE.ANSWER_ERROR and frame.request_id == 0
    answer = unpack(PACKAGE.ANSWER_ERROR, frame.body)
    assert isinstance(answer, ErrorAnswer)
    assert answer.code == ErrorCode.PROTOCOL_ERROR and "bad magic" in answer.message
    assert await raw.read_frame() is None  # closed
    await raw.close()
    assert await client.echo("unaffected") == "unaffected"


async def test_oversized_header_is_refused_before_the_body() -> None:
    async with running_server(max_frame_size=4096) as server:
        raw = await RawConnection.open(server.port)
        await raw.send(HEADER.pack(MAGIC, 1, 0, PACKAGE.REQUEST_ECHO, 1, 0, 1 << 30))
        frame = await raw.read_frame()
        assert frame is not None and frame.request_id == 0
        answer = unpack(PACKAGE.ANSWER_ERROR, frame.body)
        assert isinstance(answer, ErrorAnswer) and answer.code == ErrorCode.PROTOCOL_ERROR
        assert await raw.read_frame() is None
        await raw.close()


# ---- timeouts, cancellation, limits -----------------------------------------------------------


async def test_client_timeout_is_enforced_by_the_server(
    client: Client, slow_echo: SlowEcho
) -> None:
    slow_echo.seconds = 10
    with pytest.raises(DeadlineExceeded, match="0.2 s timeout"):
        await client.request(PACKAGE.REQUEST_ECHO, EchoRequest(text="x"), timeout=0.2)
    await wait_until(lambda: slow_echo.cancelled == 1)
    assert await client.ping() > 0


async def test_server_default_timeout_applies(slow_echo: SlowEcho) -> None:
    slow_echo.seconds = 10
    async with running_server(request_timeout=0.2) as server:
        async with Client("127.0.0.1", server.port, timeout=None) as client:
            with pytest.raises(DeadlineExceeded):
                await client.request(PACKAGE.REQUEST_ECHO, EchoRequest(text="x"))


async def test_disconnect_cancels_running_actions(server: Server, slow_echo: SlowEcho) -> None:
    slow_echo.seconds = 10
    client = await Client("127.0.0.1", server.port).connect()
    pending = [
        asyncio.create_task(client.request(PACKAGE.REQUEST_ECHO, EchoRequest(text="x")))
        for _ in range(3)
    ]
    await wait_until(lambda: slow_echo.running == 3)
    await client.close()
    for task in pending:
        with pytest.raises(ConnectionClosed):
            await task
    await wait_until(lambda: slow_echo.cancelled == 3)


async def test_in_flight_cap_holds_back_without_refusing(slow_echo: SlowEcho) -> None:
    slow_echo.seconds = 0.05
    async with running_server(max_in_flight=2) as server:
        async with Client("127.0.0.1", server.port) as client:
            answers = await asyncio.gather(
                *(client.request(PACKAGE.REQUEST_ECHO, EchoRequest(text=str(i))) for i in range(10))
            )
    assert [a.text for a in answers if isinstance(a, EchoAnswer)] == [str(i) for i in range(10)]
    assert slow_echo.most_running == 2


async def test_connection_limit_refuses_with_a_reason() -> None:
    async with running_server(max_connections=2) as server:
        async with (
            Client("127.0.0.1", server.port) as first,
            Client("127.0.0.1", server.port) as second,
        ):
            third = await Client("127.0.0.1", server.port).connect()
            with pytest.raises(ResourceExhausted, match="MAX_CONNECTIONS=2"):
                await third.ping()
            await third.close()
            assert await first.ping() > 0 and await second.ping() > 0


async def test_idle_connections_are_closed() -> None:
    async with running_server(idle_timeout=0.3) as server:
        idle = await RawConnection.open(server.port)
        assert await idle.read_frame(timeout=3) is None
        await idle.close()


async def test_half_sent_frames_are_closed_long_before_the_idle_timeout() -> None:
    async with running_server(idle_timeout=60, frame_timeout=0.3) as server:
        half = await RawConnection.open(server.port)
        await half.send(GOLDEN_HALF_FRAME)
        assert await half.read_frame(timeout=3) is None
        await half.close()


GOLDEN_HALF_FRAME = encode_frame(PACKAGE.REQUEST_ECHO, 1, b"\x81\xa4text\xa2hi")[:-3]


# ---- shutdown -------------------------------------------------------------------------------


async def test_graceful_shutdown_answers_every_request_in_flight(slow_echo: SlowEcho) -> None:
    async with running_server() as server:
        client = await Client("127.0.0.1", server.port).connect()
        pending = [
            asyncio.create_task(client.request(PACKAGE.REQUEST_ECHO, EchoRequest(text=str(i))))
            for i in range(20)
        ]
        await wait_until(lambda: slow_echo.running == 20)
        await server.shutdown()
        answers = await asyncio.gather(*pending)
        assert [a.text for a in answers if isinstance(a, EchoAnswer)] == [str(i) for i in range(20)]
        with pytest.raises(ConnectionRefusedError):
            await Client("127.0.0.1", server.port).connect()
        await client.close()
    assert slow_echo.finished == 20


async def test_shutdown_grace_ends_with_unavailable_not_a_hang(
    slow_echo: SlowEcho, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pyasync.server")
    slow_echo.seconds = 30
    async with running_server(shutdown_timeout=0.2) as server:
        client = await Client("127.0.0.1", server.port).connect()
        pending = [
            asyncio.create_task(client.request(PACKAGE.REQUEST_ECHO, EchoRequest(text="x")))
            for _ in range(5)
        ]
        await wait_until(lambda: slow_echo.running == 5)
        async with asyncio.timeout(5):
            await server.shutdown()
        for task in pending:
            with pytest.raises(Unavailable, match="shut down"):
                await task
        await client.close()
    assert slow_echo.cancelled == 5
    assert asyncio.all_tasks() == {asyncio.current_task()}
    assert any(r.getMessage().endswith(", 5 cancelled") for r in caplog.records), caplog.text


async def test_a_request_waiting_at_shutdown_is_answered_unavailable(slow_echo: SlowEcho) -> None:
    """Shutdown lets the running request finish and refuses the one received behind it.

    A request sent after shutdown began is never read (the server stops reading), so the one
    refused here arrived with the running one and waited for the in-flight cap.
    """
    slow_echo.seconds = 1.0
    echo = [
        encode_frame(PACKAGE.REQUEST_ECHO, i, pack(PACKAGE.REQUEST_ECHO, EchoRequest(text=str(i))))
        for i in (1, 2)
    ]
    async with running_server(max_in_flight=1) as server:
        raw = await RawConnection.open(server.port)
        await raw.send(b"".join(echo))  # one write: both are received at once
        await wait_until(lambda: slow_echo.running == 1)
        shutdown = asyncio.create_task(server.shutdown())
        await wait_until(lambda: server.is_shutting_down)
        answered = await raw.read_frame()
        assert answered is not None and answered.request_id == 1
        assert unpack(PACKAGE.ANSWER_ECHO, answered.body) == EchoAnswer(text="1")
        refused = await raw.read_frame()
        assert refused is not None and refused.request_id == 2
        assert refused.kind == PACKAGE.ANSWER_ERROR
        error = unpack(PACKAGE.ANSWER_ERROR, refused.body)
        assert isinstance(error, ErrorAnswer) and error.code == ErrorCode.UNAVAILABLE
        assert "shutting down" in error.message
        assert await raw.read_frame() is None  # closed once nothing runs
        await shutdown
        await raw.close()
    assert slow_echo.finished == 1 and slow_echo.most_running == 1


async def test_every_request_waiting_at_shutdown_is_answered(slow_echo: SlowEcho) -> None:
    """However many requests wait behind the running one, each gets its UNAVAILABLE (once the
    running one answered, as above) before the server closes the connection."""
    slow_echo.seconds = 1.0
    waiting = 200
    echo = pack(PACKAGE.REQUEST_ECHO, EchoRequest(text="x"))
    async with running_server(max_in_flight=1) as server:
        raw = await RawConnection.open(server.port)
        await raw.send(b"".join(encode_frame(PACKAGE.REQUEST_ECHO, i, echo) for i in range(1, 202)))
        await wait_until(lambda: slow_echo.running == 1)
        shutdown = asyncio.create_task(server.shutdown())
        answered = await raw.read_frame()
        assert answered is not None and answered.request_id == 1
        assert answered.kind == PACKAGE.ANSWER_ECHO
        refused = set()
        for _ in range(waiting):
            frame = await raw.read_frame()
            assert frame is not None and frame.kind == PACKAGE.ANSWER_ERROR
            error = unpack(PACKAGE.ANSWER_ERROR, frame.body)
            assert isinstance(error, ErrorAnswer) and error.code == ErrorCode.UNAVAILABLE
            refused.add(frame.request_id)
        assert refused == set(range(2, 202))
        assert await raw.read_frame() is None  # closed once nothing runs
        await shutdown
        await raw.close()


async def test_hooks_run_once_each() -> None:
    events: list[str] = []

    async def on_connect(ctx: Context) -> None:
        events.append(f"connect {ctx.connection_id}")

    async def on_disconnect(ctx: Context) -> None:
        events.append(f"disconnect {ctx.connection_id}")

    async def startup(app: object) -> None:
        events.append("startup")

    async def shutdown(app: object) -> None:
        events.append("shutdown")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ROUTER.hooks, "connect", [on_connect])
        patch.setattr(ROUTER.hooks, "disconnect", [on_disconnect])
        server = Server(
            config.Settings(port=0),
            db_settings=NO_DATABASE,
            startup_hooks=[startup],
            shutdown_hooks=[shutdown],
        )
        await server.start()
        async with Client("127.0.0.1", server.port) as client:
            assert await client.ping() > 0
        await server.shutdown()
    assert events == ["startup", "connect 1", "disconnect 1", "shutdown"]


async def test_a_client_that_does_not_read_is_held_back_not_buffered(
    server: Server, raw: RawConnection
) -> None:
    """A client that sends and never reads: the server stops reading from it instead of piling
    up answers, and once the client reads, every answer arrives."""
    data = os.urandom(256 * 1024)  # incompressible: sent as it is
    request = pack(PACKAGE.REQUEST_ECHO, EchoRequest(data=data))
    total = 200  # 50 MiB of answers
    frames = [encode_frame(PACKAGE.REQUEST_ECHO, i, request) for i in range(1, total + 1)]
    sender = asyncio.create_task(raw.send(b"".join(frames)))
    await wait_until(lambda: any(c.is_write_paused for c in server.connections))
    (connection,) = server.connections
    assert connection.is_read_paused  # its answers back up, so it stops taking requests
    assert not sender.done()  # and the client cannot send it all
    assert connection.transport is not None
    assert connection.transport.get_write_buffer_size() < 4 * 1024 * 1024
    seen = set()
    for _ in range(total):
        frame = await raw.read_frame(timeout=10)
        assert frame is not None and frame.kind == PACKAGE.ANSWER_ECHO
        answer = unpack(PACKAGE.ANSWER_ECHO, frame.body)
        assert isinstance(answer, EchoAnswer) and answer.data == data
        seen.add(frame.request_id)
    await sender
    assert seen == set(range(1, total + 1))
