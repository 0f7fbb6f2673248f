"""The direct-driver side of the database benchmark: fill a table, then time lookups in it.

``python bench/kv_get.py fill --backend B`` (re)creates a 10,000-row key-value table;
``python bench/kv_get.py direct --backend B`` runs 64 concurrent ``SELECT``s of random keys
through the driver's own pool of 10 and prints one JSON line. ``bench/run.py`` compares that
with ``KV_GET`` through the server on the same table, with the same concurrency and pool size.
MariaDB and PostgreSQL are found at PYASYNC_MYSQL_URL / PYASYNC_PG_URL (defaults as in tests/db).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import warnings
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiomysql  # noqa: E402
import aiosqlite  # noqa: E402
import asyncpg  # noqa: E402
import uvloop  # noqa: E402

import actions  # noqa: E402
from database import Pool  # noqa: E402
from server_config import DatabaseSettings  # noqa: E402

ROWS = 10_000
CONCURRENCY = 64
POOL_SIZE = 10
TABLE = "bench_kv"
URLS = {
    "postgres": os.environ.get("PYASYNC_PG_URL", "postgresql://postgres@127.0.0.1:5432/test"),
    "mariadb": os.environ.get("PYASYNC_MYSQL_URL", "mysql://root@127.0.0.1:3306/test"),
}
KEYS = [f"key{i:05}" for i in range(ROWS)]


async def fill(settings: DatabaseSettings) -> None:
    """(Re)create the table with ROWS rows of 100 bytes."""
    pool = Pool(settings)
    async with pool.acquire() as db:
        with warnings.catch_warnings():  # MariaDB warns that the table exists already
            warnings.simplefilter("ignore")
            for statement in actions.KV_SCHEMA[db.backend]:
                await db.execute(statement.format(table=TABLE))
        async with db.transaction():  # one commit, not one per row (SQLite syncs each)
            await db.execute(f"DELETE FROM {TABLE}")
            await db.executemany(
                f"INSERT INTO {TABLE} (k, v, version) VALUES ($1, $2, 1)",
                [(key, os.urandom(100)) for key in KEYS],
            )
    await pool.close()


async def measure(lookup: Callable[[str], Awaitable[Any]], warmup: float, seconds: float) -> float:
    """Lookups per second with CONCURRENCY workers, counted after ``warmup`` seconds."""
    loop = asyncio.get_running_loop()
    done = 0
    start = loop.time() + warmup
    stop = start + seconds

    async def worker() -> None:
        nonlocal done
        while (now := loop.time()) < stop:
            await lookup(random.choice(KEYS))
            if now >= start:
                done += 1

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return done / seconds


async def direct(backend: str, settings: DatabaseSettings, warmup: float, seconds: float) -> float:
    """The same SELECT through the driver's own pool (or 10 aiosqlite connections)."""
    sql = f"SELECT v, version FROM {TABLE} WHERE k = "
    address = settings.address
    if backend == "postgres":
        pg = await asyncpg.create_pool(
            host=address["host"], port=address["port"], user=address["user"],
            database=address["database"], min_size=POOL_SIZE, max_size=POOL_SIZE,
        )  # fmt: skip
        try:
            return await measure(lambda key: pg.fetchrow(sql + "$1", key), warmup, seconds)
        finally:
            await pg.close()
    if backend == "mariadb":
        my = await aiomysql.create_pool(
            host=address["host"], port=address["port"], user=address["user"],
            db=address["database"], minsize=POOL_SIZE, maxsize=POOL_SIZE, autocommit=True,
        )  # fmt: skip

        async def my_lookup(key: str) -> Any:
            async with my.acquire() as conn, conn.cursor() as cursor:
                await cursor.execute(sql + "%s", (key,))
                return await cursor.fetchone()

        try:
            return await measure(my_lookup, warmup, seconds)
        finally:
            my.close()
            await my.wait_closed()
    connections: asyncio.Queue[aiosqlite.Connection] = asyncio.Queue()
    for _ in range(POOL_SIZE):
        connections.put_nowait(await aiosqlite.connect(settings.sqlite_file))

    async def sqlite_lookup(key: str) -> Any:
        conn = await connections.get()
        try:
            return await conn.execute_fetchall(sql + "?", (key,))
        finally:
            connections.put_nowait(conn)

    try:
        return await measure(sqlite_lookup, warmup, seconds)
    finally:
        while not connections.empty():
            await connections.get_nowait().close()


def settings_for(backend: str, sqlite_path: str) -> DatabaseSettings:
    if backend == "sqlite":
        return DatabaseSettings(sqlite_path=sqlite_path)
    return DatabaseSettings(db_url=URLS[backend])


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["fill", "direct"])
    parser.add_argument("--backend", choices=["sqlite", "mariadb", "postgres"], required=True)
    parser.add_argument("--sqlite-path", default="bench.sqlite3")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=8.0)
    args = parser.parse_args()
    settings = settings_for(args.backend, args.sqlite_path)
    if args.command == "fill":
        await fill(settings)
        return
    rate = await direct(args.backend, settings, args.warmup, args.duration)
    print(json.dumps({"rps": rate, "duration_s": args.duration}))


if __name__ == "__main__":
    uvloop.run(main())
