"""Failures in users' actions answer alike on SQLite, MariaDB and PostgreSQL, without SQL text."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from client import Client
from context import Context
from database import Database, TransientError, UniqueViolation, connect, current_manager
from package import (
    PACKAGE,
    Aborted,
    AlreadyExists,
    DbInfoAnswer,
    Internal,
    KvGetAnswer,
    KvGetRequest,
)
from pyasync.router import ROUTER, make_route
from server import Server
from server_config import DatabaseSettings
from tests.helpers import running_server

UserAction = Callable[[KvGetRequest, Context], Awaitable[KvGetAnswer]]
ServeAction = Callable[[UserAction], contextlib.AbstractAsyncContextManager[tuple[Server, Client]]]


@pytest.fixture
def serve_action(db_settings: DatabaseSettings, monkeypatch: pytest.MonkeyPatch) -> ServeAction:
    """Serve a user's action as KV_GET on a real server over ``db_settings``, with a client."""

    @contextlib.asynccontextmanager
    async def serve(action: UserAction) -> AsyncIterator[tuple[Server, Client]]:
        monkeypatch.setitem(
            ROUTER.routes, PACKAGE.REQUEST_KV_GET, make_route(PACKAGE.REQUEST_KV_GET, action)
        )
        async with (
            running_server(db_settings=db_settings) as server,
            Client("127.0.0.1", server.port) as client,
        ):
            yield server, client

    return serve


async def call(client: Client, key: str = "k") -> KvGetAnswer:
    answer = await client.request(PACKAGE.REQUEST_KV_GET, KvGetRequest(key=key))
    assert isinstance(answer, KvGetAnswer)
    return answer


async def pool_counts(client: Client) -> tuple[int, int]:
    info = await client.request(PACKAGE.REQUEST_DB_INFO)
    assert isinstance(info, DbInfoAnswer) and info.reachable
    return info.pool_size, info.pool_in_use


def table() -> str:
    return current_manager().settings.kv_table


BAD_STATEMENTS = {
    "missing table": "SELECT v FROM secret_missing_table WHERE k = $1",
    "syntax error": "SELEC v FROM {table} WHERE secret_column = $1",
    "missing column": "SELECT secret_column FROM {table} WHERE k = $1",
}


@pytest.mark.parametrize("statement", BAD_STATEMENTS.values(), ids=BAD_STATEMENTS.keys())
async def test_a_bad_statement_is_internal_with_details_only_in_the_log(
    statement: str,
    serve_action: ServeAction,
    caplog: pytest.LogCaptureFixture,
) -> None:
    used: list[object] = []

    async def bad_statement(request: KvGetRequest, ctx: Context) -> KvGetAnswer:
        async with connect() as db:
            await db.fetchval(statement.format(table=table()), request.key)
        return KvGetAnswer(value=b"", version=0)

    async def record_connection(server: Server) -> None:
        assert server.app.database is not None and server.app.database.pool is not None
        used.append(server.app.database.pool.idle[-1])

    async with serve_action(bad_statement) as (server, client):
        await record_connection(server)
        with pytest.raises(Internal) as raised:
            await call(client)
        message = str(raised.value)
        assert "server log has details" in message
        assert "secret" not in message and "SELEC" not in message
        assert "secret_" in caplog.text  # the server log names what failed
        await record_connection(server)
        assert used[0] is used[1]  # the driver said the connection is fine: kept, not reopened
        assert await pool_counts(client) == (1, 0)


async def test_a_unique_violation_is_catchable_and_answers_already_exists_uncaught(
    serve_action: ServeAction,
) -> None:
    async def insert_twice(request: KvGetRequest, ctx: Context) -> KvGetAnswer:
        insert = f"INSERT INTO {table()} (k, v, version) VALUES ($1, $2, 1)"
        async with connect() as db:
            await db.execute(insert, "secret-key", b"first")
            if request.key == "uncaught":
                await db.execute(insert, "secret-key", b"second")
            try:
                await db.execute(insert, "secret-key", b"second")
            except UniqueViolation as exc:
                assert exc.detail  # the driver's own words, for the log
                return KvGetAnswer(value=b"caught", version=0)
        return KvGetAnswer(value=b"not raised", version=0)

    async with serve_action(insert_twice) as (_, client):
        assert (await call(client, "caught")).value == b"caught"
        with pytest.raises(AlreadyExists) as raised:
            await call(client, "uncaught")
        assert "secret" not in str(raised.value)  # the driver's text, quoting the row, stays
        assert await pool_counts(client) == (1, 0)


# ---- transient failures: each backend's own way of losing a race ----------------------------


async def lose_a_race(a: Database, b: Database, table: str) -> None:
    """Make ``a`` or ``b`` fail the way concurrent transactions do on their backend.

    SQLite: a read transaction whose snapshot went stale cannot write (SQLITE_BUSY). MariaDB and
    PostgreSQL: two transactions lock two rows in opposite orders (a deadlock).
    """
    for key in ("a", "b"):
        await a.execute(f"INSERT INTO {table} (k, v, version) VALUES ($1, $2, 1)", key, b"")
    if a.backend == "sqlite":
        await a.execute("BEGIN")  # deferred: reads a snapshot, then tries to write
        try:
            await a.fetchval(f"SELECT count(*) FROM {table}")
            await b.execute(f"UPDATE {table} SET version = 2 WHERE k = $1", "a")
            await a.execute(f"UPDATE {table} SET version = 3 WHERE k = $1", "b")
        finally:
            await a.execute("ROLLBACK")
        return
    holds = {"a": asyncio.Event(), "b": asyncio.Event()}
    update = f"UPDATE {table} SET version = version + 1 WHERE k = $1"

    async def lock(db: Database, first: str, then: str) -> None:
        async with db.transaction():
            await db.execute(update, first)
            holds[first].set()
            await holds[then].wait()
            await db.execute(update, then)

    results = await asyncio.gather(lock(a, "a", "b"), lock(b, "b", "a"), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


async def test_a_lost_race_is_a_transient_error_answered_aborted(
    serve_action: ServeAction,
) -> None:
    seen: list[TransientError] = []

    async def racing(request: KvGetRequest, ctx: Context) -> KvGetAnswer:
        async with connect() as a, connect() as b:
            try:
                await lose_a_race(a, b, table())
            except TransientError as exc:
                seen.append(exc)
                raise
        return KvGetAnswer(value=b"no race lost", version=0)

    async with serve_action(racing) as (_, client):
        with pytest.raises(Aborted, match="concurrent") as raised:
            await call(client)
        assert raised.value.hint == "retry"
        assert await pool_counts(client) == (2, 0)  # both connections kept
    assert len(seen) == 1 and isinstance(seen[0], Aborted)
    assert any(code in seen[0].message for code in ("SQLITE_BUSY", "1213", "40P01"))
