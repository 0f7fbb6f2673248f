"""The key-value actions through a real server, on SQLite, MariaDB and PostgreSQL."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from client import Client
from context import Context
from database import connect
from package import (
    PACKAGE,
    Conflict,
    DbInfoAnswer,
    DeadlineExceeded,
    InvalidArgument,
    KvDeleteAnswer,
    KvDeleteRequest,
    KvGetAnswer,
    KvGetRequest,
    KvListAnswer,
    KvListRequest,
    KvPutAnswer,
    KvPutRequest,
    NotFound,
    Unavailable,
)
from pyasync.router import ROUTER, make_route
from server_config import DatabaseSettings
from tests.helpers import (
    drop_table,
    proxied,
    require_reachable,
    running_server,
    settings_for,
    wait_until,
)


async def put(client: Client, key: str, value: bytes, expected: int | None = None) -> int:
    answer = await client.request(
        PACKAGE.REQUEST_KV_PUT, KvPutRequest(key=key, value=value, expected_version=expected)
    )
    assert isinstance(answer, KvPutAnswer)
    return answer.version


async def get(client: Client, key: str) -> KvGetAnswer:
    answer = await client.request(PACKAGE.REQUEST_KV_GET, KvGetRequest(key=key))
    assert isinstance(answer, KvGetAnswer)
    return answer


async def test_put_get_compare_and_set_delete(kv_client: Client) -> None:
    with pytest.raises(NotFound, match="no key 'k'"):
        await get(kv_client, "k")
    assert await put(kv_client, "k", b"one") == 1
    assert await put(kv_client, "k", b"two") == 2
    assert await get(kv_client, "k") == KvGetAnswer(value=b"two", version=2)
    assert await put(kv_client, "k", b"three", expected=2) == 3
    with pytest.raises(Conflict, match="not at version 2"):
        await put(kv_client, "k", b"stale", expected=2)
    with pytest.raises(Conflict, match="exists already"):
        await put(kv_client, "k", b"new", expected=0)
    assert await put(kv_client, "fresh", b"\x00\xff", expected=0) == 1
    with pytest.raises(Conflict):
        await kv_client.request(
            PACKAGE.REQUEST_KV_DELETE, KvDeleteRequest(key="k", expected_version=1)
        )
    deleted = await kv_client.request(PACKAGE.REQUEST_KV_DELETE, KvDeleteRequest(key="k"))
    assert deleted == KvDeleteAnswer(deleted=True)
    again = await kv_client.request(PACKAGE.REQUEST_KV_DELETE, KvDeleteRequest(key="k"))
    assert again == KvDeleteAnswer(deleted=False)
    assert (await get(kv_client, "fresh")).value == b"\x00\xff"


async def test_keys_are_exact_and_case_sensitive(kv_client: Client) -> None:
    await put(kv_client, "Key", b"upper")
    await put(kv_client, "key", b"lower")
    await put(kv_client, "ключ ", b"unicode with a trailing space")
    assert (await get(kv_client, "Key")).value == b"upper"
    assert (await get(kv_client, "key")).value == b"lower"
    with pytest.raises(NotFound):
        await get(kv_client, "ключ")


async def test_documented_limits(kv_client: Client) -> None:
    await put(kv_client, "k" * 256, b"")  # the largest key
    await put(kv_client, "big", bytes(1024 * 1024))  # the largest value
    for key in ("", "k" * 257, "é" * 129):
        with pytest.raises(InvalidArgument, match="1 to 256 UTF-8 bytes"):
            await put(kv_client, key, b"x")
    with pytest.raises(InvalidArgument, match="at most 1048576 bytes"):
        await put(kv_client, "big", bytes(1024 * 1024 + 1))
    for limit in (0, 1001):
        with pytest.raises(InvalidArgument, match="limit must be 1 to 1000"):
            await kv_client.request(PACKAGE.REQUEST_KV_LIST, KvListRequest(limit=limit))


async def test_list_pages_through_a_prefix_in_byte_order(kv_client: Client) -> None:
    keys = sorted([f"user/{i:03}" for i in range(23)] + ["user/é", "user/z"], key=str.encode)
    for key in [*keys, "other", "user", "users/1"]:
        await put(kv_client, key, key.encode())
    seen: list[str] = []
    cursor = ""
    for _ in range(10):
        page = await kv_client.request(
            PACKAGE.REQUEST_KV_LIST, KvListRequest(prefix="user/", limit=10, cursor=cursor)
        )
        assert isinstance(page, KvListAnswer)
        seen += [item.key for item in page.items]
        assert all(item.size == len(item.key.encode()) for item in page.items)
        cursor = page.next_cursor
        if not cursor:
            break
    assert seen == keys


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_no_lost_updates_under_concurrent_compare_and_set(
    db_settings: DatabaseSettings,
) -> None:
    """100 compare-and-set increments from 10 clients on one key end at exactly 100."""
    async with running_server(db_settings=db_settings) as server:

        async def increment_ten_times() -> int:
            conflicts = 0
            async with Client("127.0.0.1", server.port, timeout=30) as client:
                for _ in range(10):
                    while True:
                        try:
                            current = await get(client, "counter")
                        except NotFound:
                            current = KvGetAnswer(value=b"0", version=0)
                        value = str(int(current.value) + 1).encode()
                        try:
                            await put(client, "counter", value, expected=current.version)
                            break
                        except Conflict:
                            conflicts += 1
            return conflicts

        conflicts = await asyncio.gather(*(increment_ten_times() for _ in range(10)))
        async with Client("127.0.0.1", server.port) as client:
            final = await get(client, "counter")
    assert final.value == b"100" and final.version == 100
    assert sum(conflicts) > 0  # the clients really raced


async def test_db_info_and_server_info(kv_client: Client, db_settings: DatabaseSettings) -> None:
    info = await kv_client.request(PACKAGE.REQUEST_DB_INFO)
    assert isinstance(info, DbInfoAnswer)
    assert info.reachable and info.backend == db_settings.db_backend.lower()
    assert info.server_version and info.pool_size >= 1 and info.pool_in_use == 0
    server_info = await kv_client.server_info()
    assert server_info.database is not None and server_info.database["reachable"] is True
    assert "db_password" not in server_info.config and "db_url" not in server_info.config


async def test_no_database_configured_answers_unavailable_with_the_fix() -> None:
    async with running_server(db_settings=DatabaseSettings(db_backend="NONE")) as server:
        async with Client("127.0.0.1", server.port) as client:
            with pytest.raises(Unavailable, match="no database is configured") as raised:
                await get(client, "k")
            assert "DB_BACKEND=sqlite" in str(raised.value)
            assert await client.ping() > 0


# ---- faults ---------------------------------------------------------------------------------

REMOTE = ["mariadb", "postgres"]
SLEEP_QUERY = {"postgres": "SELECT pg_sleep($1)", "mariadb": "SELECT SLEEP($1)"}


@pytest.fixture
def slow_query_action(monkeypatch: pytest.MonkeyPatch) -> None:
    """KV_GET runs a query that sleeps for float(key) seconds (a database that takes its time)."""

    async def slow(request: KvGetRequest, ctx: Context) -> KvGetAnswer:
        async with connect() as db:
            backend = db.backend
            if backend == "sqlite":  # no sleep(): count long enough to be slow
                sql = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c " \
                      "LIMIT $1) SELECT count(*) FROM c"  # fmt: skip
                await db.fetchval(sql, int(float(request.key) * 20_000_000))
            else:
                await db.fetchval(SLEEP_QUERY[backend], float(request.key))
        return KvGetAnswer(value=b"", version=0)

    monkeypatch.setitem(
        ROUTER.routes, PACKAGE.REQUEST_KV_GET, make_route(PACKAGE.REQUEST_KV_GET, slow)
    )


@pytest.mark.slow
@pytest.mark.parametrize("backend", REMOTE)
async def test_unreachable_at_startup_then_back_without_restart(
    backend: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_for(backend, tmp_path)

    await require_reachable(settings)
    async with proxied(settings) as (proxy, through):
        proxy.refuse()
        async with running_server(db_settings=through) as server:
            assert "database not reachable at start-up" in caplog.text
            async with Client("127.0.0.1", server.port) as client:
                assert await client.ping() > 0
                with pytest.raises(Unavailable):
                    await get(client, "k")
                proxy.heal()
                async with asyncio.timeout(10):
                    while True:
                        try:
                            await put(client, "k", b"back")
                            break
                        except Unavailable:
                            await asyncio.sleep(0.2)
                assert (await get(client, "k")).value == b"back"
    await drop_table(settings)


@pytest.mark.slow
@pytest.mark.parametrize("backend", REMOTE)
async def test_cut_and_stalled_connections_are_discarded(
    backend: str, tmp_path: Path, slow_query_action: None
) -> None:

    settings = settings_for(backend, tmp_path, db_query_timeout=0.5, db_connect_timeout=1.0)
    await require_reachable(settings)
    async with proxied(settings) as (proxy, through), running_server(db_settings=through) as server:
        async with Client("127.0.0.1", server.port, timeout=10) as client:
            sent = proxy.forwarded
            running_query = asyncio.create_task(get(client, "5"))
            await wait_until(lambda: proxy.forwarded > sent)  # the query reached the database
            proxy.cut()
            async with asyncio.timeout(3):
                with pytest.raises(Unavailable, match="lost the database connection"):
                    await running_query
            assert (await get(client, "0")).version == 0  # a new connection, now idle
            proxy.stall()
            async with asyncio.timeout(3):  # a stalled query: DB_QUERY_TIMEOUT
                with pytest.raises(DeadlineExceeded, match="longer than 0.5 s"):
                    await get(client, "0")
            async with asyncio.timeout(3):  # a stalled connect: DB_CONNECT_TIMEOUT
                with pytest.raises(Unavailable, match="within 1 s"):
                    await get(client, "0")
            proxy.heal()
            assert (await get(client, "0")).version == 0  # a fresh connection works
            info = await client.request(PACKAGE.REQUEST_DB_INFO)
            assert isinstance(info, DbInfoAnswer) and info.pool_in_use == 0


@pytest.mark.slow
async def test_a_thousand_cancelled_queries_leave_the_pool_clean(
    db_settings: DatabaseSettings, slow_query_action: None
) -> None:
    """Client timeouts cancel running queries; the pool ends idle and the next query works."""
    async with running_server(db_settings=db_settings) as server:
        async with Client("127.0.0.1", server.port) as client:
            cancelled = 0
            others: list[object] = []
            for _ in range(100):
                results = await asyncio.gather(
                    *(
                        client.request(
                            PACKAGE.REQUEST_KV_GET, KvGetRequest(key="0.05"), timeout=0.01
                        )
                        for _ in range(10)
                    ),
                    return_exceptions=True,
                )
                cancelled += sum(isinstance(r, DeadlineExceeded) for r in results)
                others += results
            assert cancelled == 1000, [r for r in others if not isinstance(r, DeadlineExceeded)][:3]
            info = await client.request(PACKAGE.REQUEST_DB_INFO)
            assert isinstance(info, DbInfoAnswer)
            assert info.reachable and info.pool_in_use == 0  # nothing still holds a connection
            assert info.pool_size <= db_settings.db_pool_max_size
            assert (await get(client, "0")).version == 0
