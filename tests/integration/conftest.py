"""Integration fixtures: a real server on 127.0.0.1 port 0, a Client and a raw connection."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from client import Client
from server import Server
from tests.helpers import RawConnection, running_server


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    # These tests pipeline bursts of up to 1,000 requests; RATE_LIMIT has tests of its own.
    async with running_server(rate_limit=0) as server:
        yield server


@pytest.fixture
async def client(server: Server) -> AsyncIterator[Client]:
    async with Client("127.0.0.1", server.port, timeout=10) as client:
        yield client


@pytest.fixture
async def raw(server: Server) -> AsyncIterator[RawConnection]:
    connection = await RawConnection.open(server.port)
    yield connection
    await connection.close()
