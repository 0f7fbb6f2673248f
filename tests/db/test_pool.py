"""The pool's leases: a connection belongs to its ``async with`` block and no longer."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from client import Client
from context import Context
from database import ConnectionReleased, Database, DatabaseManager, connect
from package import PACKAGE, DbInfoAnswer, Internal, KvGetAnswer, KvGetRequest
from pyasync.router import ROUTER, make_route
from server_config import DatabaseSettings
from tests.helpers import running_server

CALLS_AFTER_RELEASE: dict[str, Callable[[Database], Awaitable[Any]]] = {
    "execute": lambda db: db.execute("SELECT 1"),
    "executemany": lambda db: db.executemany("SELECT $1", [(1,)]),
    "fetch": lambda db: db.fetch("SELECT 1"),
    "fetchrow": lambda db: db.fetchrow("SELECT 1"),
    "fetchval": lambda db: db.fetchval("SELECT 1"),
}


async def test_a_connection_used_after_its_block_raises(db_settings: DatabaseSettings) -> None:
    manager = DatabaseManager(db_settings)
    await manager.start()
    try:
        async with manager.connection() as db:
            assert await db.fetchval("SELECT 1") == 1
        assert manager.pool is not None
        assert manager.pool.in_use == 0 and manager.pool.size == 1  # the adapter went back
        for name, call in CALLS_AFTER_RELEASE.items():
            with pytest.raises(ConnectionReleased, match="released back to the pool") as raised:
                await call(db)
            assert f"{name}()" in str(raised.value)
        with pytest.raises(ConnectionReleased, match="transaction"):
            db.transaction()
        assert db.backend == db_settings.db_backend.lower()  # still says what it was
        async with manager.connection() as again:  # the same connection, leased anew, works
            assert await again.fetchval("SELECT 2") == 2
        assert manager.pool.size == 1
    finally:
        await manager.close()


async def test_an_action_that_keeps_its_connection_fails_loudly(
    db_settings: DatabaseSettings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Kept past its block, ``db`` refuses to run: INTERNAL, the log says why, pool intact."""
    kept: list[Database] = []

    async def keeps_its_connection(request: KvGetRequest, ctx: Context) -> KvGetAnswer:
        async with connect() as db:
            await db.fetchval("SELECT 1")
        kept.append(db)
        await asyncio.sleep(0)
        await db.fetchval("SELECT 1")
        return KvGetAnswer(value=b"", version=0)

    route = make_route(PACKAGE.REQUEST_KV_GET, keeps_its_connection)
    monkeypatch.setitem(ROUTER.routes, PACKAGE.REQUEST_KV_GET, route)
    async with (
        running_server(db_settings=db_settings) as server,
        Client("127.0.0.1", server.port) as client,
    ):
        with pytest.raises(Internal):
            await client.request(PACKAGE.REQUEST_KV_GET, KvGetRequest(key="k"))
        assert "ConnectionReleased" in caplog.text and "released back to the pool" in caplog.text
        info = await client.request(PACKAGE.REQUEST_DB_INFO)
        assert isinstance(info, DbInfoAnswer) and info.reachable and info.pool_in_use == 0
        assert info.pool_size == 1  # the connection itself was not lost
    assert len(kept) == 1
