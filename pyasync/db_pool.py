"""The database pool: one for all three drivers, leases that end with their block."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Coroutine, Iterable, Sequence
from typing import Any

from package import Unavailable
from pyasync.db_adapters import Adapter, ConnectionReleased, Record, adapter_class
from pyasync.deadlines import within
from server_config import DatabaseSettings

__all__ = ["Lease", "Pool", "PooledConnection"]


class Pool:
    """At most ``max_size`` connections; broken ones are closed instead of kept.

    One pool for all three drivers, so that "a failed connection is never reused" means the
    same thing everywhere (aiomysql's own pool, for one, keeps cancelled connections).
    """

    def __init__(self, settings: DatabaseSettings) -> None:
        self.settings = settings
        self.adapter_class = adapter_class(settings)
        self.idle: collections.deque[Adapter] = collections.deque()
        self.in_use = 0
        self.slots = asyncio.Semaphore(settings.db_pool_max_size)
        self.closing_tasks: set[asyncio.Task[None]] = set()
        self.connecting: set[asyncio.Task[Adapter]] = set()  # adopted: requester gone
        self.opening = 0  # connections being opened for a requester that still waits
        self.is_closed = False

    @property
    def size(self) -> int:
        return self.in_use + len(self.idle)

    def acquire(self, timeout: float | None = None) -> Lease:
        """``async with pool.acquire() as db``: a connection for the block.

        Raises (on entry):
            Unavailable: every connection stayed busy for ``timeout`` (DB_CONNECT_TIMEOUT), or
                a new connection could not be opened.
        """
        return Lease(self, timeout)

    async def take(self, timeout: float | None) -> Adapter:
        """A connection, idle or new; pair it with ``give_back``."""
        wait = self.settings.db_connect_timeout if timeout is None else timeout
        try:
            if self.slots.locked():  # only a full pool needs a timer
                async with within(wait):
                    await self.slots.acquire()
            else:
                await self.slots.acquire()
        except TimeoutError:
            raise Unavailable(
                f"all {self.settings.db_pool_max_size} database connections stayed busy "
                f"for {wait:g} s"
            ) from None
        try:
            adapter = self.idle.pop() if self.idle else await self._connect()
        except BaseException:
            self.slots.release()
            raise
        self.in_use += 1
        return adapter

    def give_back(self, adapter: Adapter) -> None:
        """Return a connection taken with ``take``; a broken one is closed instead."""
        self.in_use -= 1
        if adapter.is_broken or self.is_closed:
            self._discard(adapter)
        else:
            self.idle.append(adapter)
        self.slots.release()

    async def fill(self) -> None:
        """Open connections until DB_POOL_MIN_SIZE are open."""
        for _ in range(self.settings.db_pool_min_size - self.size):
            self.idle.append(await self._connect())

    async def _connect(self) -> Adapter:
        # Connecting runs in a task of its own: a request cancelled meanwhile leaves the new
        # connection to the pool instead of cutting the driver's handshake short (asyncpg
        # then reports "unexpected connection_lost()" as an unretrieved future).
        task = asyncio.get_running_loop().create_task(self.adapter_class.open(self.settings))
        self.opening += 1
        try:
            async with asyncio.timeout(self.settings.db_connect_timeout):
                return await asyncio.shield(task)
        except TimeoutError:
            self._adopt(task)  # the driver's own connect timeout ends it
            raise Unavailable(
                f"could not connect to {self.settings.describe()} within "
                f"{self.settings.db_connect_timeout:g} s"
            ) from None
        except asyncio.CancelledError:
            self._adopt(task)
            raise
        except (OSError, ConnectionError) as exc:
            raise Unavailable(f"could not connect to {self.settings.describe()}: {exc}") from None
        except Exception as exc:  # driver-specific refusals: bad password, missing database
            raise Unavailable(
                f"could not connect to {self.settings.describe()}: {type(exc).__name__}: {exc}"
            ) from None
        finally:
            self.opening -= 1

    def _adopt(self, task: asyncio.Task[Adapter]) -> None:
        """Keep a connection that arrives after its requester left, if there is room."""
        self.connecting.add(task)

        def done(task: asyncio.Task[Adapter]) -> None:
            self.connecting.discard(task)
            if task.cancelled() or task.exception() is not None:
                return
            adapter = task.result()
            # Room is what the waiting requesters (in use, or still connecting) leave over.
            if self.is_closed or self.size + self.opening >= self.settings.db_pool_max_size:
                self._discard(adapter)
            else:
                self.idle.append(adapter)

        task.add_done_callback(done)

    def _discard(self, adapter: Adapter) -> None:
        task = asyncio.get_running_loop().create_task(adapter.close())
        self.closing_tasks.add(task)
        task.add_done_callback(self.closing_tasks.discard)

    async def close(self) -> None:
        """Close every idle connection; one still leased is closed when it is given back."""
        self.is_closed = True
        if self.connecting:
            await asyncio.wait(self.connecting, timeout=self.settings.db_connect_timeout)
        while self.idle:
            self._discard(self.idle.pop())
        if self.closing_tasks:
            await asyncio.wait(self.closing_tasks, timeout=5)


class Lease:
    """One borrowed connection: ``async with`` takes it and gives it back, even on error.

    A class rather than a generator-based context manager: it is entered once per database
    request, and this costs a fraction of ``contextlib.asynccontextmanager``.
    """

    __slots__ = ("connection", "pool", "timeout")

    def __init__(self, pool: Pool, timeout: float | None) -> None:
        self.pool = pool
        self.timeout = timeout
        self.connection: PooledConnection | None = None

    async def __aenter__(self) -> PooledConnection:
        self.connection = PooledConnection(await self.pool.take(self.timeout))
        return self.connection

    async def __aexit__(self, *exc_info: object) -> None:
        connection, self.connection = self.connection, None
        if connection is not None:
            self.pool.give_back(connection.detach())


class PooledConnection:
    """What ``async with connect() as db`` hands out: a connection for that block only.

    A thin stand-in that passes each call on to the pool's connection, and is cut loose from
    it when the block ends: a call after that raises ``ConnectionReleased`` instead of running
    on a connection another request may hold by then (asyncpg's pool does the same). Calls are
    passed on without an ``await`` of their own, so the stand-in costs one function call.
    """

    __slots__ = ("_adapter", "backend")

    def __init__(self, adapter: Adapter) -> None:
        self._adapter: Adapter | None = adapter
        self.backend = adapter.backend  # "sqlite", "mariadb" or "postgres"

    def detach(self) -> Adapter:
        """Cut the stand-in loose and return the connection, for the pool to take back."""
        adapter = self._adapter
        if adapter is None:
            raise ConnectionReleased("the connection was released already")
        self._adapter = None
        return adapter

    def _released(self, method: str) -> ConnectionReleased:
        return ConnectionReleased(
            f"cannot call {method}(): the connection has been released back to the pool "
            "(use it only inside its 'async with connect()' block)"
        )

    def execute(
        self, query: str, *args: Any, timeout: float | None = None
    ) -> Coroutine[Any, Any, int]:
        """Run a statement; return the number of rows it changed."""
        if (adapter := self._adapter) is None:
            raise self._released("execute")
        return adapter.execute(query, *args, timeout=timeout)

    def executemany(
        self, query: str, args: Iterable[Sequence[Any]], *, timeout: float | None = None
    ) -> Coroutine[Any, Any, None]:
        """Run a statement once per argument tuple."""
        if (adapter := self._adapter) is None:
            raise self._released("executemany")
        return adapter.executemany(query, args, timeout=timeout)

    def fetch(
        self, query: str, *args: Any, timeout: float | None = None
    ) -> Coroutine[Any, Any, list[Record]]:
        """All rows of a query."""
        if (adapter := self._adapter) is None:
            raise self._released("fetch")
        return adapter.fetch(query, *args, timeout=timeout)

    def fetchrow(
        self, query: str, *args: Any, timeout: float | None = None
    ) -> Coroutine[Any, Any, Record | None]:
        """The first row, or None."""
        if (adapter := self._adapter) is None:
            raise self._released("fetchrow")
        return adapter.fetchrow(query, *args, timeout=timeout)

    def fetchval(
        self, query: str, *args: Any, timeout: float | None = None
    ) -> Coroutine[Any, Any, Any]:
        """The first column of the first row, or None."""
        if (adapter := self._adapter) is None:
            raise self._released("fetchval")
        return adapter.fetchval(query, *args, timeout=timeout)

    def transaction(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Commit on success, roll back on any exception."""
        if (adapter := self._adapter) is None:
            raise self._released("transaction")
        return adapter.transaction()

    def __repr__(self) -> str:
        state = "released" if self._adapter is None else "leased"
        return f"<PooledConnection {self.backend} {state}>"
