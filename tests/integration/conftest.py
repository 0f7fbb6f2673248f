"""Integration fixtures: a real server on 127.0.0.1 port 0 and raw-socket helpers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

import config
from client import Client
from protocol import Frame, FrameDecoder
from server import Server, serve
from server_config import DatabaseSettings

NO_DATABASE = DatabaseSettings(db_backend="NONE")  # tests/db covers the database actions
ServerFactory = Callable[..., contextlib.AbstractAsyncContextManager[Server]]


@pytest.fixture
def running_server() -> ServerFactory:
    """``async with running_server(max_in_flight=2) as server:`` on a free loopback port."""

    @contextlib.asynccontextmanager
    async def start(**overrides: Any) -> AsyncIterator[Server]:
        kwargs = {key: overrides.pop(key) for key in ("ssl_context",) if key in overrides}
        settings = config.Settings(**{"port": 0, "log_level": "DEBUG", **overrides})
        async with serve(settings, db_settings=NO_DATABASE, **kwargs) as server:
            yield server

    return start


@pytest.fixture
async def server(running_server: ServerFactory) -> AsyncIterator[Server]:
    async with running_server() as server:
        yield server


@pytest.fixture
async def client(server: Server) -> AsyncIterator[Client]:
    async with Client("127.0.0.1", server.port, timeout=10) as client:
        yield client


class RawConnection:
    """A plain socket speaking frames by hand, for what the Client would never send."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.decoder = FrameDecoder()

    @classmethod
    async def open(cls, port: int) -> RawConnection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read_frame(self, timeout: float = 5.0) -> Frame | None:
        """The next frame, or None once the server closed the connection."""
        async with asyncio.timeout(timeout):
            while (frame := self.decoder.next_frame()) is None:
                data = await self.reader.read(65536)
                if not data:
                    return None
                self.decoder.feed(data)
            return frame

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


@pytest.fixture
async def raw(server: Server) -> AsyncIterator[RawConnection]:
    connection = await RawConnection.open(server.port)
    yield connection
    await connection.close()
