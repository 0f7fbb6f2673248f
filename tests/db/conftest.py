"""Database fixtures: the same suite on SQLite, MariaDB and PostgreSQL, and a faulty TCP proxy.

Addresses come from ``PYASYNC_PG_URL`` (default ``postgresql://postgres@127.0.0.1:5432/test``)
and ``PYASYNC_MYSQL_URL`` (default ``mysql://root@127.0.0.1:3306/test``). An unreachable server
skips its tests with a one-line reason, unless ``PYASYNC_REQUIRE_DB=1``: then they fail.
Each test gets its own table, dropped afterwards, so runs can repeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

import config
import database
from client import Client
from server import Server, serve
from server_config import DatabaseSettings

URLS = {
    "postgres": os.environ.get("PYASYNC_PG_URL", "postgresql://postgres@127.0.0.1:5432/test"),
    "mariadb": os.environ.get("PYASYNC_MYSQL_URL", "mysql://root@127.0.0.1:3306/test"),
}
BACKENDS = ["sqlite", "mariadb", "postgres"]


def settings_for(backend: str, tmp_path: Any, **overrides: Any) -> DatabaseSettings:
    """Database settings for ``backend`` with a table of the test's own."""
    table = f"test_kv_{uuid.uuid4().hex[:12]}"
    if backend == "sqlite":
        base = DatabaseSettings(
            db_backend="SQLITE", sqlite_path=str(tmp_path / "test.sqlite3"), kv_table=table
        )
    else:
        base = DatabaseSettings(db_url=URLS[backend], kv_table=table)
    return dataclasses.replace(base, **overrides)


async def require_reachable(settings: DatabaseSettings) -> None:
    """Skip (or fail under PYASYNC_REQUIRE_DB=1) when the database cannot be reached."""
    pool = database.Pool(dataclasses.replace(settings, db_connect_timeout=3.0))
    try:
        async with pool.acquire() as db:
            await db.fetchval("SELECT 1")
    except Exception as exc:
        reason = f"{settings.describe()} unreachable: {exc}"
        if os.environ.get("PYASYNC_REQUIRE_DB") == "1":
            pytest.fail(f"PYASYNC_REQUIRE_DB=1 but {reason}")
        pytest.skip(reason)
    finally:
        await pool.close()


async def drop_table(settings: DatabaseSettings) -> None:
    pool = database.Pool(settings)
    try:
        async with pool.acquire() as db:
            await db.execute(f"DROP TABLE IF EXISTS {settings.kv_table}")
    finally:
        await pool.close()


@pytest.fixture(params=BACKENDS)
async def db_settings(request: pytest.FixtureRequest, tmp_path: Any) -> AsyncIterator[Any]:
    settings = settings_for(request.param, tmp_path)
    await require_reachable(settings)
    yield settings
    await drop_table(settings)


@contextlib.asynccontextmanager
async def running(settings: DatabaseSettings, **server: Any) -> AsyncIterator[Server]:
    async with serve(config.Settings(port=0, **server), db_settings=settings) as running:
        yield running


@pytest.fixture
async def kv_client(db_settings: DatabaseSettings) -> AsyncIterator[Client]:
    async with running(db_settings) as server:
        async with Client("127.0.0.1", server.port, timeout=10) as client:
            yield client


class FaultyProxy:
    """A TCP proxy on 127.0.0.1 between the server and a database that tests can break.

    ``refuse()`` drops new connections at once (database down), ``cut()`` resets every open
    one, ``stall()`` stops forwarding bytes (database hangs); ``heal()`` undoes all three.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.is_refusing = False
        self.is_stalled = asyncio.Event()
        self.is_stalled.set()  # set means "flowing"
        self.writers: set[asyncio.StreamWriter] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.listener: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> FaultyProxy:
        self.listener = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self.listener.sockets[0].getsockname()[1]
        return self

    def refuse(self) -> None:
        self.is_refusing = True
        self.cut()

    def cut(self) -> None:
        for writer in list(self.writers):
            writer.transport.abort()

    def stall(self) -> None:
        self.is_stalled.clear()

    def heal(self) -> None:
        self.is_refusing = False
        self.is_stalled.set()

    async def close(self) -> None:
        self.cut()
        if self.listener is not None:
            self.listener.close()
            await self.listener.wait_closed()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.is_refusing:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.writers |= {writer, up_writer}
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            pipe = asyncio.get_running_loop().create_task(self._pipe(source, sink))
            self.tasks.add(pipe)
            pipe.add_done_callback(self.tasks.discard)

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                await self.is_stalled.wait()
                sink.write(data)
                await sink.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self.writers.discard(sink)
            sink.transport.abort()


@contextlib.asynccontextmanager
async def proxied(settings: DatabaseSettings) -> AsyncIterator[tuple[FaultyProxy, Any]]:
    """A proxy in front of a MariaDB/PostgreSQL server, and settings that go through it."""
    address = settings.address
    proxy = await FaultyProxy(address["host"], address["port"]).start()
    through = dataclasses.replace(settings, db_url="", db_host="127.0.0.1", db_port=proxy.port,
                                  db_user=address["user"], db_password=address["password"],
                                  db_name=address["database"])  # fmt: skip
    try:
        yield proxy, through
    finally:
        await proxy.close()
