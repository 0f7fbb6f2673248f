"""Key-value writes under concurrency: never INTERNAL, and no acknowledged write is lost."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time

import pytest

import database
from client import Client
from package import PACKAGE, KvPutAnswer, KvPutRequest, RPCError
from server_config import DatabaseSettings
from tests.helpers import running_server

log = logging.getLogger("tests.db.concurrency")

NEW_KEYS = 1000  # puts of keys that do not exist yet: blind, and every CREATE_EVERY create-only
CREATE_EVERY = 4
CAS_EVERY = 3  # a compare-and-set update of every third key once its creation is acknowledged
IN_FLIGHT = 100  # requests running at once, over CLIENTS connections
CLIENTS = 4
RETRYABLE = {"ABORTED", "UNAVAILABLE"}  # answers that tell the client to try again


class Workload:
    """Sends the puts, counts the answers and remembers what each acknowledgement promised."""

    def __init__(self, clients: list[Client]) -> None:
        self.clients = clients
        self.slots = asyncio.Semaphore(IN_FLIGHT)
        self.answers: collections.Counter[str] = collections.Counter()
        self.acknowledged: dict[str, tuple[int, bytes]] = {}  # key -> (version, value)
        self.created: dict[str, asyncio.Future[int | None]] = {}
        self.sent = 0

    async def put(self, key: str, value: bytes, expected: int | None) -> int | None:
        """The acknowledged version, or None for a refused write (its answer is counted)."""
        async with self.slots:
            client = self.clients[self.sent % len(self.clients)]
            self.sent += 1
            request = KvPutRequest(key=key, value=value, expected_version=expected)
            try:
                answer = await client.request(PACKAGE.REQUEST_KV_PUT, request)
            except RPCError as exc:
                self.answers[exc.code.name] += 1
                return None
        assert isinstance(answer, KvPutAnswer)
        self.answers["OK"] += 1
        self.acknowledged[key] = (answer.version, value)
        return answer.version

    async def create(self, number: int) -> None:
        key = f"key{number:04}"
        future = self.created.setdefault(key, asyncio.get_running_loop().create_future())
        expected = 0 if number % CREATE_EVERY == 0 else None
        version = await self.put(key, f"first {number}".encode(), expected)
        assert version in (None, 1)
        future.set_result(version)

    async def update(self, number: int) -> None:
        key = f"key{number:04}"
        future = self.created.setdefault(key, asyncio.get_running_loop().create_future())
        version = await future
        if version is None:
            self.answers["update skipped: creation refused"] += 1
            return
        new = await self.put(key, f"second {number}".encode(), version)
        assert new in (None, version + 1)


async def stored_rows(settings: DatabaseSettings) -> dict[str, tuple[int, bytes]]:
    """Every row of the table, read straight from the database."""
    pool = database.Pool(settings)
    try:
        async with pool.acquire() as db:
            rows = await db.fetch(f"SELECT k, v, version FROM {settings.kv_table}")
    finally:
        await pool.close()
    return {
        (r["k"].decode() if isinstance(r["k"], bytes) else r["k"]): (r["version"], bytes(r["v"]))
        for r in rows
    }


@pytest.mark.slow
async def test_concurrent_puts_never_answer_internal_and_lose_no_acknowledged_write(
    db_settings: DatabaseSettings,
) -> None:
    """1,000 new-key puts and 334 compare-and-set updates, 100 in flight, pool of 10."""
    assert db_settings.db_pool_max_size == 10
    async with contextlib.AsyncExitStack() as stack:
        server = await stack.enter_async_context(running_server(db_settings=db_settings))
        clients = [
            await stack.enter_async_context(Client("127.0.0.1", server.port, timeout=30))
            for _ in range(CLIENTS)
        ]
        workload = Workload(clients)
        started = time.perf_counter()
        await asyncio.gather(
            *(workload.create(number) for number in range(NEW_KEYS)),
            *(workload.update(number) for number in range(0, NEW_KEYS, CAS_EVERY)),
        )
        elapsed = time.perf_counter() - started
    stored = await stored_rows(db_settings)
    lost = {key: (promised, stored.get(key)) for key, promised in workload.acknowledged.items()
            if stored.get(key) != promised}  # fmt: skip
    log.info(
        "%s: %d requests in %.2f s, answers %s, %d acknowledged writes lost",
        db_settings.db_backend, workload.sent, elapsed, dict(workload.answers), len(lost),
    )  # fmt: skip
    assert workload.answers["INTERNAL"] == 0, dict(workload.answers)
    assert set(workload.answers) - RETRYABLE <= {"OK", "update skipped: creation refused"}
    assert not lost, list(lost.items())[:5]
    assert workload.answers["OK"] > 0
