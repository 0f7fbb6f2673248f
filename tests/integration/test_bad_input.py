"""Client faults answered precisely: bodies the schema refuses, reserved and reused request ids,
answers too large for a frame, and large bodies kept off the inline path."""

from __future__ import annotations

import asyncio
import logging
import tracemalloc
from typing import Any

import msgspec
import pytest

from client import Client
from context import Context
from package import (
    PACKAGE,
    EchoAnswer,
    EchoRequest,
    ErrorAnswer,
    ErrorCode,
    Int64,
    ResourceExhausted,
    body_type,
    is_request,
    pack,
    unpack,
)
from protocol import FLAG_COMPRESSED, HEADER, Compression, encode_frame
from pyasync.connection import INLINE_MAX_BODY
from pyasync.router import ROUTER, make_route
from server import Server
from tests.helpers import RawConnection, running_server


def error_of(frame: Any) -> ErrorAnswer:
    assert frame is not None and frame.kind == PACKAGE.ANSWER_ERROR
    error = unpack(PACKAGE.ANSWER_ERROR, frame.body)
    assert isinstance(error, ErrorAnswer)
    return error


KV_PUT_HEAD = b"\x83\xa3key\xa1k\xa5value\xc4\x00\xb0expected_version"


@pytest.mark.parametrize(
    ("kind", "body", "names"),
    [
        (PACKAGE.REQUEST_ECHO, b"\x81\xa4text\xa2\xff\xfe", "$.text"),  # invalid UTF-8
        (PACKAGE.REQUEST_ECHO, b"\x81\xa1z" + b"\x91" * 100_000 + b"\xc0", "nested"),
        (PACKAGE.REQUEST_KV_PUT, KV_PUT_HEAD + b"\xcf" + (2**63).to_bytes(8), "expected_version"),
        (PACKAGE.REQUEST_KV_PUT, KV_PUT_HEAD + b"\xcf" + b"\xff" * 8, "expected_version"),
        (PACKAGE.REQUEST_ECHO, b"", "body"),  # empty: not even the empty map
    ],
    ids=["bad-utf8", "deep-nesting", "int-2^63", "int-2^64-1", "empty"],
)
async def test_malformed_bodies_are_invalid_argument_without_a_traceback(
    client: Client, caplog: pytest.LogCaptureFixture, kind: PACKAGE, body: bytes, names: str
) -> None:
    with caplog.at_level(logging.DEBUG):
        frame = await client.request_raw(kind, body, timeout=5)
        assert await client.echo("still here") == "still here"
    error = error_of(frame)
    assert error.code == ErrorCode.INVALID_ARGUMENT and names in error.message
    assert not [r for r in caplog.records if r.levelno > logging.INFO or r.exc_info]


def test_every_builtin_integer_field_is_range_checked() -> None:
    for kind in PACKAGE:
        for field in msgspec.structs.fields(body_type(kind)):
            if field.type is int or field.type == int | None:
                raise AssertionError(f"{kind.name}.{field.name} is a plain int; use Int64")
    assert Int64 is not int


async def test_request_id_zero_is_a_protocol_error(raw: RawConnection) -> None:
    await raw.send(encode_frame(PACKAGE.REQUEST_PING, 0, b"\x80"))
    error_frame = await raw.read_frame()
    assert error_frame is not None and error_frame.request_id == 0
    error = error_of(error_frame)
    assert error.code == ErrorCode.PROTOCOL_ERROR and "request id 0" in error.message
    assert await raw.read_frame() is None  # closed, as the spec says


async def test_a_request_id_reused_while_in_flight_is_a_protocol_error(
    raw: RawConnection, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = asyncio.Event()

    async def slow(request: EchoRequest, ctx: Context) -> EchoAnswer:
        await release.wait()
        return EchoAnswer(text=request.text)

    monkeypatch.setitem(ROUTER.routes, PACKAGE.REQUEST_ECHO, make_route(PACKAGE.REQUEST_ECHO, slow))
    echo = pack(PACKAGE.REQUEST_ECHO, EchoRequest(text="a"))
    await raw.send(encode_frame(PACKAGE.REQUEST_ECHO, 7, echo))
    await raw.send(encode_frame(PACKAGE.REQUEST_PING, 7, b"\x80"))
    frames = [await raw.read_frame(), await raw.read_frame()]
    assert frames[-1] is None  # closed after the one error about the connection
    error_frame = frames[0]
    assert error_frame is not None and error_frame.request_id == 0
    assert error_of(error_frame).code == ErrorCode.PROTOCOL_ERROR


async def test_a_request_id_may_be_reused_once_answered(raw: RawConnection) -> None:
    for text in ("one", "two"):
        await raw.send(
            encode_frame(
                PACKAGE.REQUEST_ECHO, 5, pack(PACKAGE.REQUEST_ECHO, EchoRequest(text=text))
            )
        )
        frame = await raw.read_frame()
        assert frame is not None and frame.request_id == 5
        assert unpack(PACKAGE.ANSWER_ECHO, frame.body) == EchoAnswer(text=text)


async def test_an_answer_above_the_frame_limit_fails_that_request_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def huge(request: EchoRequest, ctx: Context) -> EchoAnswer:
        return EchoAnswer(data=bytes(8192) if request.text == "big" else b"ok")

    monkeypatch.setitem(ROUTER.routes, PACKAGE.REQUEST_ECHO, make_route(PACKAGE.REQUEST_ECHO, huge))
    async with (
        running_server(max_frame_size=4096) as server,
        Client("127.0.0.1", server.port, timeout=5) as client,
    ):
        with pytest.raises(ResourceExhausted, match="MAX_FRAME_SIZE"):
            await client.request(PACKAGE.REQUEST_ECHO, EchoRequest(text="big"))
        answer = await client.request(PACKAGE.REQUEST_ECHO, EchoRequest(text="small"))
        assert answer == EchoAnswer(data=b"ok")  # the same connection lives on


async def test_large_bodies_are_answered_in_a_task_not_inline(
    server: Server, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    in_task: list[bool] = []

    def echo(request: EchoRequest, ctx: Context) -> EchoAnswer:
        in_task.append(asyncio.current_task() is not None)
        return EchoAnswer(data=b"")

    monkeypatch.setitem(ROUTER.routes, PACKAGE.REQUEST_ECHO, make_route(PACKAGE.REQUEST_ECHO, echo))
    await client.request(PACKAGE.REQUEST_ECHO, EchoRequest(data=b"x" * 100))
    await client.request(PACKAGE.REQUEST_ECHO, EchoRequest(data=b"x" * (1024 * 1024)))
    assert in_task == [False, True]


def test_requests_are_the_only_types_a_client_may_send() -> None:
    assert all(is_request(kind) == kind.name.startswith("REQUEST_") for kind in PACKAGE)


# ---- one maximum-size frame ------------------------------------------------------------------

LIMIT = 8 * 1024 * 1024  # MAX_FRAME_SIZE of these tests: large enough for the large-body path


def compressed_echo(size: int) -> bytes:
    """A REQUEST_ECHO whose body decompresses to ``size`` bytes (a few KiB on the wire)."""
    body = pack(PACKAGE.REQUEST_ECHO, EchoRequest(data=bytes(size - 16)))
    assert size - 16 < len(body) <= size
    return encode_frame(PACKAGE.REQUEST_ECHO, 1, body, compression=Compression(threshold=1))


async def test_a_maximum_size_frame_costs_at_most_twice_the_frame_limit() -> None:
    """Decoding a compressed body, the request and its answer: never more than two at once."""
    async with running_server(max_frame_size=LIMIT) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        request = compressed_echo(LIMIT)
        tracemalloc.start()
        try:
            writer.write(request)
            header = HEADER.unpack(await reader.readexactly(HEADER.size))
            await reader.readexactly(header[-1])  # compressed: small, left undecoded here
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
            writer.close()
    assert header[3] == PACKAGE.ANSWER_ECHO and header[2] == FLAG_COMPRESSED
    assert peak < 2.1 * LIMIT, f"peak {peak / LIMIT:.2f} x MAX_FRAME_SIZE"


async def test_a_plain_function_action_takes_a_large_body_in_a_task(
    raw: RawConnection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inline, a large body would hold every other connection while it is decoded."""
    ran_in: list[asyncio.Task[Any] | None] = []

    def echo(request: EchoRequest, ctx: Context) -> EchoAnswer:
        ran_in.append(asyncio.current_task())
        return EchoAnswer(data=b"ok")

    monkeypatch.setitem(ROUTER.routes, PACKAGE.REQUEST_ECHO, make_route(PACKAGE.REQUEST_ECHO, echo))
    small = pack(PACKAGE.REQUEST_ECHO, EchoRequest(data=bytes(100)))
    large = pack(PACKAGE.REQUEST_ECHO, EchoRequest(data=bytes(INLINE_MAX_BODY)))
    for request_id, body in ((1, small), (2, large)):
        await raw.send(encode_frame(PACKAGE.REQUEST_ECHO, request_id, body))
        frame = await raw.read_frame()
        assert frame is not None and frame.kind == PACKAGE.ANSWER_ECHO
    assert ran_in[0] is None  # inline: no task
    assert ran_in[1] is not None
