"""Lost races are run again (``database.retrying``), and answer ABORTED when they keep losing."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

import database
from client import Client
from database import Database, retrying
from package import PACKAGE, Aborted, KvPutAnswer, KvPutRequest
from server import Server
from server_config import DatabaseSettings
from tests.helpers import drop_table, require_reachable, running_server, settings_for

# How long a statement waits for a row or file another connection holds, cut short so that the
# wait ends in each backend's "try again" error instead of DB_QUERY_TIMEOUT.
SHORT_LOCK_WAIT = {
    "sqlite": "PRAGMA busy_timeout = 100",  # milliseconds, then SQLITE_BUSY
    "postgres": "SET lock_timeout = '100ms'",  # then 55P03 lock_not_available
    "mariadb": "SET SESSION innodb_lock_wait_timeout = 1",  # seconds (the least), then 1205
}


Release = Callable[[], Awaitable[None]]


class LogWatch(logging.Handler):
    """Sets ``seen`` when the ``pyasync.database`` log says ``text`` (it logs on the loop)."""

    def __init__(self, text: str) -> None:
        super().__init__(logging.DEBUG)
        self.text = text
        self.seen = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.seen.set()


@contextlib.asynccontextmanager
async def one_impatient_connection(settings: DatabaseSettings) -> AsyncIterator[Server]:
    """A server whose pool has one connection, which gives up waiting for locks quickly."""
    settings = dataclasses.replace(settings, db_pool_min_size=1, db_pool_max_size=1)
    async with running_server(db_settings=settings) as server:
        assert server.app.database is not None and server.app.database.pool is not None
        pool = server.app.database.pool
        adapter = await pool.take(None)
        try:
            await adapter.execute(SHORT_LOCK_WAIT[adapter.backend])
        finally:
            pool.give_back(adapter)
        yield server


@contextlib.asynccontextmanager
async def holding(settings: DatabaseSettings, key: str) -> AsyncIterator[Release]:
    """Lock ``key``'s row (SQLite: the whole file) from a connection of its own until released."""
    pool = database.Pool(settings)
    released = False
    try:
        async with pool.acquire() as db:
            sqlite = db.backend == "sqlite"
            await db.execute("BEGIN IMMEDIATE" if sqlite else "BEGIN")
            if not sqlite:
                await db.fetchval(
                    f"SELECT version FROM {settings.kv_table} WHERE k = $1 FOR UPDATE", key
                )

            async def release() -> None:
                nonlocal released
                if not released:
                    released = True
                    await db.execute("ROLLBACK")

            try:
                yield release
            finally:
                await release()
    finally:
        await pool.close()


async def put(client: Client, key: str, value: bytes, expected: int | None = None) -> int:
    answer = await client.request(
        PACKAGE.REQUEST_KV_PUT, KvPutRequest(key=key, value=value, expected_version=expected)
    )
    assert isinstance(answer, KvPutAnswer)
    return answer.version


@pytest.mark.parametrize("expected", [None, 1], ids=["blind", "compare-and-set"])
async def test_a_write_that_keeps_losing_answers_aborted_after_five_tries(
    db_settings: DatabaseSettings, expected: int | None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="pyasync.database")
    async with one_impatient_connection(db_settings) as server:
        async with Client("127.0.0.1", server.port, timeout=30) as client:
            assert await put(client, "k", b"one") == 1
            async with holding(db_settings, "k"):
                with pytest.raises(Aborted, match="concurrent") as raised:
                    await put(client, "k", b"two", expected)
            assert raised.value.hint == "retry"
            assert caplog.text.count("lost a race, again in") == 4  # tries 1 to 4, logged
            assert "gave up after 5 tries" in caplog.text
            assert await put(client, "k", b"three", expected) == 2  # the connection was kept


async def test_a_write_that_loses_a_race_once_is_retried_and_answered(
    db_settings: DatabaseSettings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="pyasync.database")
    watch = LogWatch("lost a race, again in")
    logging.getLogger("pyasync.database").addHandler(watch)
    try:
        async with one_impatient_connection(db_settings) as server:
            async with Client("127.0.0.1", server.port, timeout=30) as client:
                assert await put(client, "k", b"one") == 1
                async with holding(db_settings, "k") as release:
                    writing = asyncio.create_task(put(client, "k", b"two", 1))
                    await asyncio.wait_for(watch.seen.wait(), 10)
                    await release()
                    assert await writing == 2
    finally:
        logging.getLogger("pyasync.database").removeHandler(watch)
    assert "gave up after" not in caplog.text


@pytest.mark.parametrize("backend", ["mariadb", "postgres"])  # SQLite locks files, not rows
async def test_retrying_runs_a_deadlocked_transaction_again(backend: str, tmp_path: Path) -> None:
    """Two transactions locking two rows in opposite orders: one is chosen to lose, both end."""
    db_settings = settings_for(backend, tmp_path)
    await require_reachable(db_settings)
    table = db_settings.kv_table
    update = f"UPDATE {table} SET version = version + 1 WHERE k = $1"
    holds = {"a": asyncio.Event(), "b": asyncio.Event()}
    tries = {"a": 0, "b": 0}
    pool = database.Pool(db_settings)

    async def lock(first: str, then: str) -> None:
        tries[first] += 1
        async with pool.acquire() as db, db.transaction():
            await db.execute(update, first)
            holds[first].set()
            await holds[then].wait()
            await db.execute(update, then)

    try:
        async with running_server(db_settings=db_settings), pool.acquire() as db:
            await insert_rows(db, table, "a", "b")
        await asyncio.gather(retrying(lambda: lock("a", "b")), retrying(lambda: lock("b", "a")))
        async with pool.acquire() as db:
            versions = await db.fetch(f"SELECT version FROM {table} ORDER BY k")
    finally:
        await pool.close()
        await drop_table(db_settings)
    assert sorted(tries.values()) == [1, 2]  # the loser ran twice
    assert [row["version"] for row in versions] == [3, 3]  # both transactions took effect


async def insert_rows(db: Database, table: str, *keys: str) -> None:
    for key in keys:
        await db.execute(f"INSERT INTO {table} (k, v, version) VALUES ($1, $2, 1)", key, b"")
