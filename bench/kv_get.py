"""KV_GET through the server versus the same lookup straight through the driver, per backend.

Run ``python bench/kv_get.py`` with MariaDB and PostgreSQL at PYASYNC_MYSQL_URL/PYASYNC_PG_URL
(defaults as in tests/db). Both sides run 64 concurrent lookups of random keys in a
10,000-row table with a pool of 10 connections; the server runs as ``python server.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiomysql  # noqa: E402
import aiosqlite  # noqa: E402
import asyncpg  # noqa: E402

import actions  # noqa: E402
from client import Client  # noqa: E402
from database import Pool  # noqa: E402
from package import PACKAGE, KvGetRequest  # noqa: E402
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
        for statement in actions.KV_SCHEMA[db.backend]:
            await db.execute(statement.format(table=TABLE))
        await db.execute(f"DELETE FROM {TABLE}")
        await db.executemany(
            f"INSERT INTO {TABLE} (k, v, version) VALUES ($1, $2, 1)",
            [(key, os.urandom(100)) for key in KEYS],
        )
    await pool.close()


async def measure(lookup: Callable[[str], Awaitable[Any]], seconds: float) -> float:
    """Lookups per second with CONCURRENCY workers, after a one-second warm-up."""
    loop = asyncio.get_running_loop()
    done = 0
    start = loop.time() + 1.0
    stop = start + seconds

    async def worker() -> None:
        nonlocal done
        while (now := loop.time()) < stop:
            await lookup(random.choice(KEYS))
            if now >= start:
                done += 1

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return done / seconds


async def direct(backend: str, settings: DatabaseSettings, seconds: float) -> float:
    """The same SELECT through the driver's own pool (or 10 aiosqlite connections)."""
    sql = f"SELECT v, version FROM {TABLE} WHERE k = "
    address = settings.address
    if backend == "postgres":
        pg = await asyncpg.create_pool(
            host=address["host"], port=address["port"], user=address["user"],
            database=address["database"], min_size=POOL_SIZE, max_size=POOL_SIZE,
        )  # fmt: skip
        try:
            return await measure(lambda key: pg.fetchrow(sql + "$1", key), seconds)
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
            return await measure(my_lookup, seconds)
        finally:
            my.close()
            await my.wait_closed()
    connections: asyncio.Queue[aiosqlite.Connection] = asyncio.Queue()
    for _ in range(POOL_SIZE):
        connections.put_nowait(await aiosqlite.connect(settings.sqlite_file))

    async def sqlite_lookup(key: str) -> Any:
        conn = await connections.get()
        try:
            async with conn.execute(sql + "?", (key,)) as cursor:
                return await cursor.fetchone()
        finally:
            connections.put_nowait(conn)

    try:
        return await measure(sqlite_lookup, seconds)
    finally:
        while not connections.empty():
            await connections.get_nowait().close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def through_server(backend: str, settings: DatabaseSettings, seconds: float) -> float:
    """KV_GET over 8 connections x 8 in flight to ``python server.py`` on its own process."""
    port = free_port()
    env = {
        **os.environ, "PORT": str(port), "LOG_LEVEL": "WARNING", "KV_TABLE": TABLE,
        "DB_POOL_MIN_SIZE": str(POOL_SIZE), "DB_POOL_MAX_SIZE": str(POOL_SIZE),
        "DB_BACKEND": backend, "DB_URL": URLS.get(backend, ""),
        "SQLITE_PATH": settings.sqlite_file,
    }  # fmt: skip
    server = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "server.py"), "--env-file", os.devnull, env=env
    )
    try:
        for _ in range(100):
            try:
                clients = [await Client("127.0.0.1", port).connect() for _ in range(8)]
                break
            except ConnectionRefusedError:
                await asyncio.sleep(0.1)
        else:
            raise RuntimeError("server did not start")
        turn = iter(range(1 << 62))

        async def lookup(key: str) -> Any:
            client = clients[next(turn) % len(clients)]
            return await client.request(PACKAGE.REQUEST_KV_GET, KvGetRequest(key=key))

        rate = await measure(lookup, seconds)
        for client in clients:
            await client.close()
        return rate
    finally:
        server.terminate()
        await asyncio.wait_for(server.wait(), 15)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backends", default="sqlite,mariadb,postgres")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    args = parser.parse_args()
    print(f"{CONCURRENCY} concurrent KV_GET, pool {POOL_SIZE}, {ROWS:,} rows, {args.duration:g} s")
    print(f"{'backend':10} {'direct/s':>10} {'server/s':>10} {'ratio':>7}")
    with tempfile.TemporaryDirectory() as folder:
        for backend in args.backends.split(","):
            if backend == "sqlite":
                settings = DatabaseSettings(sqlite_path=str(Path(folder) / "bench.sqlite3"))
            else:
                settings = DatabaseSettings(db_url=URLS[backend])
            await fill(settings)
            started = time.perf_counter()
            rate_direct = await direct(backend, settings, args.duration)
            rate_server = await through_server(backend, settings, args.duration)
            print(
                f"{backend:10} {rate_direct:10,.0f} {rate_server:10,.0f} "
                f"{rate_server / rate_direct:7.2f}   ({time.perf_counter() - started:.0f} s)",
                flush=True,
            )


if __name__ == "__main__":
    asyncio.run(main())
