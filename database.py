"""One small database API over SQLite (aiosqlite), MariaDB (aiomysql) and PostgreSQL (asyncpg).

Actions write ``async with connect() as db:`` and call ``fetch``/``fetchrow``/``fetchval``/
``execute``/``executemany`` with ``$1, $2`` placeholders on every backend; parameters are always
bound by the driver. A connection whose query was cancelled, timed out or lost its server is
closed, never handed to the next request. Driver errors are translated here, once:
unreachable -> ``Unavailable``, too slow -> ``DeadlineExceeded``, duplicate key ->
``UniqueViolation``, anything else -> ``Internal`` (logged, not sent).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import re
import sqlite3
import time
import warnings
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Sequence
from typing import Any, Protocol

from context import current_app
from package import DeadlineExceeded, Internal, Unavailable
from pyasync.deadlines import within
from server_config import DatabaseSettings

__all__ = [
    "Database",
    "DatabaseManager",
    "Record",
    "UniqueViolation",
    "connect",
    "current_manager",
    "declare_schema",
]

log = logging.getLogger("pyasync.database")

Record = dict[str, Any]  # column name -> value, the same on every backend
RETRY_CONNECT_AFTER = 1.0  # seconds between attempts to reach a database that was down


class UniqueViolation(Exception):
    """Raised when an insert or update hits an existing primary or unique key."""


class Database(Protocol):
    """A pooled connection, as actions see it. ``timeout=None`` means DB_QUERY_TIMEOUT."""

    backend: str

    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> int:
        """Run a statement; return the number of rows it changed."""

    async def executemany(
        self, query: str, args: Iterable[Sequence[Any]], *, timeout: float | None = None
    ) -> None:
        """Run a statement once per argument tuple."""

    async def fetch(self, query: str, *args: Any, timeout: float | None = None) -> list[Record]:
        """All rows of a query."""

    async def fetchrow(self, query: str, *args: Any, timeout: float | None = None) -> Record | None:
        """The first row, or None."""

    async def fetchval(self, query: str, *args: Any, timeout: float | None = None) -> Any:
        """The first column of the first row, or None."""

    def transaction(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Commit on success, roll back on any exception."""


# ---- placeholders ---------------------------------------------------------------------------

PLACEHOLDER = re.compile(r"\$(\d+)")


@functools.lru_cache(maxsize=512)
def _to_sqlite(query: str) -> str:
    return PLACEHOLDER.sub(r"?\1", query)  # SQLite numbers its parameters the same way


@functools.lru_cache(maxsize=512)
def _to_pyformat(query: str) -> tuple[str, tuple[int, ...]]:
    """``$2 ... $1`` -> ``%s ... %s`` and the argument order (1-based) that fills them."""
    order = tuple(int(number) for number in PLACEHOLDER.findall(query))
    return PLACEHOLDER.sub("%s", query.replace("%", "%%")), order


# ---- adapters: one per driver ------------------------------------------------------------


class _Adapter:
    """Shared behaviour: timeouts, error translation, marking a connection as broken."""

    backend = ""
    detach_calls = False  # run driver calls in their own task (see _run)

    def __init__(self, raw: Any, query_timeout: float) -> None:
        self.raw = raw
        self.query_timeout = query_timeout
        self.is_broken = False
        self.abandoned: asyncio.Task[Any] | None = None  # a driver call left running

    def classify(self, exc: BaseException) -> str:
        """'connection', 'unique' or 'other' for a driver exception."""
        raise NotImplementedError

    def _abandon(self, task: asyncio.Task[Any] | None) -> None:
        self.is_broken = True
        self.stop_running()
        if task is not None:
            self.abandoned = task
            task.cancel()

    def stop_running(self) -> None:
        """Ask the database to stop a statement whose caller has gone (where a driver can)."""

    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> int:
        raise NotImplementedError

    async def executemany(
        self, query: str, args: Iterable[Sequence[Any]], *, timeout: float | None = None
    ) -> None:
        raise NotImplementedError

    async def fetch(self, query: str, *args: Any, timeout: float | None = None) -> list[Record]:
        raise NotImplementedError

    async def _run(
        self, call: Callable[[], Coroutine[Any, Any, Any]], timeout: float | None
    ) -> Any:
        # With ``detach_calls`` the driver call runs in a task of its own, so that a timeout or
        # a cancelled request returns at once even though the driver would not stop promptly
        # (aiomysql waits for the server to finish a cancelled query). Either way the
        # connection is then closed, never reused.
        limit = self.query_timeout if timeout is None else timeout
        task = asyncio.get_running_loop().create_task(call()) if self.detach_calls else None
        try:
            async with within(limit):
                return await (asyncio.shield(task) if task is not None else call())
        except TimeoutError:
            self._abandon(task)
            raise DeadlineExceeded(f"database query took longer than {limit:g} s") from None
        except asyncio.CancelledError:
            self._abandon(task)
            raise
        except Exception as exc:
            kind = self.classify(exc)
            if kind == "unique":
                raise UniqueViolation(str(exc)) from exc
            if kind == "connection":
                self.is_broken = True
                raise Unavailable(
                    f"lost the database connection: {exc or type(exc).__name__}"
                ) from exc
            log.error("%s query failed: %s: %s", self.backend, type(exc).__name__, exc)
            raise Internal("a database query failed; the server log has details") from exc

    async def fetchrow(self, query: str, *args: Any, timeout: float | None = None) -> Record | None:
        rows = await self.fetch(query, *args, timeout=timeout)
        return rows[0] if rows else None

    async def fetchval(self, query: str, *args: Any, timeout: float | None = None) -> Any:
        row = await self.fetchrow(query, *args, timeout=timeout)
        return next(iter(row.values())) if row else None

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        await self._begin()
        try:
            yield
        except BaseException:
            if not self.is_broken:
                try:
                    await self._run(self._rollback, None)
                except Exception:
                    self.is_broken = True
            raise
        await self._run(self._commit, None)

    async def _begin(self) -> None:
        raise NotImplementedError

    async def _commit(self) -> None:
        raise NotImplementedError

    async def _rollback(self) -> None:
        raise NotImplementedError


class PostgresAdapter(_Adapter):
    backend = "postgres"

    def classify(self, exc: BaseException) -> str:
        import asyncpg

        if isinstance(exc, asyncpg.UniqueViolationError):
            return "unique"
        if isinstance(
            exc,
            OSError | asyncpg.PostgresConnectionError | asyncpg.InterfaceError
            | asyncpg.CannotConnectNowError | asyncpg.AdminShutdownError,
        ):  # fmt: skip
            return "connection"
        return "other"

    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> int:
        status = await self._run(lambda: self.raw.execute(query, *args), timeout)
        last = status.rsplit(" ", 1)[-1]
        return int(last) if last.isdigit() else 0

    async def executemany(
        self, query: str, args: Iterable[Sequence[Any]], *, timeout: float | None = None
    ) -> None:
        await self._run(lambda: self.raw.executemany(query, list(args)), timeout)

    async def fetch(self, query: str, *args: Any, timeout: float | None = None) -> list[Record]:
        rows = await self._run(lambda: self.raw.fetch(query, *args), timeout)
        return [dict(row) for row in rows]

    async def _begin(self) -> None:
        await self._run(lambda: self.raw.execute("BEGIN"), None)

    async def _commit(self) -> None:
        await self.raw.execute("COMMIT")

    async def _rollback(self) -> None:
        await self.raw.execute("ROLLBACK")


class MariaDBAdapter(_Adapter):
    backend = "mariadb"
    detach_calls = True
    CONNECTION_ERRORS = {2003, 2006, 2013, 2014, 2055, 1927}  # can't connect, gone, lost, ...

    def classify(self, exc: BaseException) -> str:
        import pymysql

        if isinstance(exc, pymysql.err.IntegrityError) and exc.args and exc.args[0] == 1062:
            return "unique"
        if isinstance(exc, OSError | pymysql.err.InterfaceError) or (
            isinstance(exc, pymysql.err.OperationalError)
            and exc.args
            and exc.args[0] in self.CONNECTION_ERRORS
        ):
            return "connection"
        return "other"

    async def _cursor_run(self, query: str, args: Sequence[Any], fetch: bool) -> Any:
        import aiomysql

        sql, order = _to_pyformat(query)
        async with self.raw.cursor(aiomysql.DictCursor) as cursor:
            await cursor.execute(sql, tuple(args[number - 1] for number in order))
            return await cursor.fetchall() if fetch else cursor.rowcount

    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> int:
        return int(await self._run(lambda: self._cursor_run(query, args, False), timeout))

    async def executemany(
        self, query: str, args: Iterable[Sequence[Any]], *, timeout: float | None = None
    ) -> None:
        sql, order = _to_pyformat(query)

        async def run() -> None:
            async with self.raw.cursor() as cursor:
                await cursor.executemany(sql, [tuple(a[n - 1] for n in order) for a in args])

        await self._run(run, timeout)

    async def fetch(self, query: str, *args: Any, timeout: float | None = None) -> list[Record]:
        return list(await self._run(lambda: self._cursor_run(query, args, True), timeout))

    async def _begin(self) -> None:
        await self._run(self.raw.begin, None)

    async def _commit(self) -> None:
        await self.raw.commit()

    async def _rollback(self) -> None:
        await self.raw.rollback()


class SQLiteAdapter(_Adapter):
    backend = "sqlite"

    def classify(self, exc: BaseException) -> str:
        if isinstance(exc, sqlite3.IntegrityError) and "UNIQUE" in str(exc):
            return "unique"
        if isinstance(exc, sqlite3.OperationalError | ValueError | OSError):
            return "connection"  # locked past busy_timeout, unopenable file, closed connection
        return "other"

    def stop_running(self) -> None:
        # The statement runs on aiosqlite's thread; sqlite3's interrupt() may be called from
        # any thread, and without it the thread (and the file's lock) stays busy until it ends.
        with contextlib.suppress(Exception):
            self.raw._conn.interrupt()

    async def _cursor_run(self, query: str, args: Sequence[Any], fetch: bool) -> Any:
        if fetch:  # one trip to aiosqlite's thread instead of three (execute, fetch, close)
            return [dict(row) for row in await self.raw.execute_fetchall(_to_sqlite(query), args)]
        async with self.raw.execute(_to_sqlite(query), args) as cursor:
            return cursor.rowcount

    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> int:
        return int(await self._run(lambda: self._cursor_run(query, args, False), timeout))

    async def executemany(
        self, query: str, args: Iterable[Sequence[Any]], *, timeout: float | None = None
    ) -> None:
        await self._run(lambda: self.raw.executemany(_to_sqlite(query), list(args)), timeout)

    async def fetch(self, query: str, *args: Any, timeout: float | None = None) -> list[Record]:
        return list(await self._run(lambda: self._cursor_run(query, args, True), timeout))

    async def _begin(self) -> None:
        # IMMEDIATE takes the write lock up front, so two read-then-write transactions cannot
        # deadlock upgrading their locks; busy_timeout makes the second one wait its turn.
        await self._run(lambda: self.raw.execute("BEGIN IMMEDIATE"), None)

    async def _commit(self) -> None:
        await self.raw.commit()

    async def _rollback(self) -> None:
        await self.raw.rollback()


# ---- opening and closing raw connections -----------------------------------------------------


async def _open_raw(settings: DatabaseSettings) -> tuple[Any, type[_Adapter]]:
    address = settings.address
    if settings.db_backend == "POSTGRES":
        import asyncpg

        raw = await asyncpg.connect(
            host=address["host"], port=address["port"], user=address["user"],
            password=address["password"] or None, database=address["database"],
            timeout=settings.db_connect_timeout,
        )  # fmt: skip
        return raw, PostgresAdapter
    if settings.db_backend == "MARIADB":
        import aiomysql

        raw = await aiomysql.connect(
            host=address["host"], port=address["port"], user=address["user"],
            password=address["password"], db=address["database"], autocommit=True,
            charset="utf8mb4",
            connect_timeout=settings.db_connect_timeout,
        )  # fmt: skip
        return raw, MariaDBAdapter
    import aiosqlite

    raw = await aiosqlite.connect(settings.sqlite_file, isolation_level=None)
    raw.row_factory = aiosqlite.Row
    await raw.execute("PRAGMA journal_mode=WAL")
    await raw.execute(f"PRAGMA busy_timeout={int(settings.db_query_timeout * 1000)}")
    return raw, SQLiteAdapter


async def _close_raw(adapter: _Adapter) -> None:
    raw = adapter.raw
    if adapter.abandoned is not None:  # let the cancelled driver call unwind (asyncpg sends
        await asyncio.wait([adapter.abandoned], timeout=5)  # the server a cancel request)
        if adapter.abandoned.done() and not adapter.abandoned.cancelled():
            adapter.abandoned.exception()  # retrieved, so asyncio does not log it
    if adapter.backend == "mariadb":
        raw.close()  # aiomysql: synchronous, drops the socket without a goodbye
    elif adapter.backend == "postgres" and adapter.is_broken:
        raw.terminate()
    else:
        with contextlib.suppress(Exception):
            await raw.close()


# ---- the pool ---------------------------------------------------------------------------------


class Pool:
    """At most ``max_size`` connections; broken ones are closed instead of kept.

    One pool for all three drivers, so that "a failed connection is never reused" means the
    same thing everywhere (aiomysql's own pool, for one, keeps cancelled connections).
    """

    def __init__(self, settings: DatabaseSettings) -> None:
        self.settings = settings
        self.idle: collections.deque[_Adapter] = collections.deque()
        self.in_use = 0
        self.slots = asyncio.Semaphore(settings.db_pool_max_size)
        self.closing_tasks: set[asyncio.Task[None]] = set()
        self.connecting: set[asyncio.Task[_Adapter]] = set()  # adopted: requester gone
        self.opening = 0  # connections being opened for a requester that still waits
        self.is_closed = False

    @property
    def size(self) -> int:
        return self.in_use + len(self.idle)

    async def open_connection(self) -> _Adapter:
        raw, adapter_class = await _open_raw(self.settings)
        return adapter_class(raw, self.settings.db_query_timeout)

    def acquire(self, timeout: float | None = None) -> Lease:
        """``async with pool.acquire() as db``: a connection for the block.

        Raises (on entry):
            Unavailable: every connection stayed busy for ``timeout`` (DB_CONNECT_TIMEOUT), or
                a new connection could not be opened.
        """
        return Lease(self, timeout)

    async def take(self, timeout: float | None) -> _Adapter:
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

    def give_back(self, adapter: _Adapter) -> None:
        """Return a connection taken with ``take``; a broken one is closed instead."""
        self.in_use -= 1
        if adapter.is_broken or self.is_closed:
            self._discard(adapter)
        else:
            self.idle.append(adapter)
        self.slots.release()

    async def _connect(self) -> _Adapter:
        # Connecting runs in a task of its own: a request cancelled meanwhile leaves the new
        # connection to the pool instead of cutting the driver's handshake short (asyncpg
        # then reports "unexpected connection_lost()" as an unretrieved future).
        task = asyncio.get_running_loop().create_task(self.open_connection())
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

    def _adopt(self, task: asyncio.Task[_Adapter]) -> None:
        """Keep a connection that arrives after its requester left, if there is room."""
        self.connecting.add(task)

        def done(task: asyncio.Task[_Adapter]) -> None:
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

    def _discard(self, adapter: _Adapter) -> None:
        task = asyncio.get_running_loop().create_task(_close_raw(adapter))
        self.closing_tasks.add(task)
        task.add_done_callback(self.closing_tasks.discard)

    async def close(self) -> None:
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

    __slots__ = ("adapter", "manager", "pool", "timeout")

    def __init__(
        self, pool: Pool | None, timeout: float | None, manager: DatabaseManager | None = None
    ) -> None:
        self.pool = pool
        self.manager = manager
        self.timeout = timeout
        self.adapter: _Adapter | None = None

    async def __aenter__(self) -> _Adapter:
        if self.pool is None:
            assert self.manager is not None
            self.pool = self.manager.pool or await self.manager.ensure_pool()
        self.adapter = await self.pool.take(self.timeout)
        return self.adapter

    async def __aexit__(self, *exc_info: object) -> None:
        if self.pool is not None and self.adapter is not None:
            self.pool.give_back(self.adapter)
            self.adapter = None


# ---- the manager: one per server --------------------------------------------------------------

Schema = dict[str, list[str]]  # backend ("sqlite", "mariadb", "postgres") -> statements
SchemaSource = Schema | Callable[[DatabaseSettings], Schema]  # a callable sees the settings

_DECLARED_SCHEMAS: list[SchemaSource] = []


def declare_schema(schema: SchemaSource) -> SchemaSource:
    """Create these tables whenever the server opens its database, before any request.

    Declare at import time (top level of ``actions.py``), in any order: each statement runs once
    per start-up, so write ``CREATE TABLE IF NOT EXISTS``. A callable receives the database
    settings, for names that come from them.
    """
    _DECLARED_SCHEMAS.append(schema)
    return schema


class DatabaseManager:
    """Owns the pool and the schema; reconnects lazily when the database comes back."""

    def __init__(self, settings: DatabaseSettings) -> None:
        self.settings = settings
        self.pool: Pool | None = None
        self.server_version = ""
        self._lock = asyncio.Lock()
        self._last_attempt = -RETRY_CONNECT_AFTER
        self._last_error = ""

    @property
    def backend(self) -> str:
        return self.settings.db_backend.lower()

    async def start(self) -> None:
        """Open the pool and create the schema; on failure log one line and carry on."""
        try:
            await self.ensure_pool()
        except Unavailable as exc:
            log.warning("database not reachable at start-up (%s); will retry on use", exc.message)

    async def ensure_pool(self) -> Pool:
        if self.pool is not None:
            return self.pool
        async with self._lock:
            if self.pool is not None:  # another request opened it while this one waited
                return self.pool  # type: ignore[unreachable]
            if time.monotonic() - self._last_attempt < RETRY_CONNECT_AFTER:
                raise Unavailable(f"database unreachable: {self._last_error}", hint="retry later")
            self._last_attempt = time.monotonic()
            pool = Pool(self.settings)
            try:
                async with pool.acquire() as db:
                    self.server_version = await self._version(db)
                    with warnings.catch_warnings():
                        # MariaDB warns "table already exists" for CREATE ... IF NOT EXISTS.
                        warnings.simplefilter("ignore")
                        for source in _DECLARED_SCHEMAS:
                            schema = source(self.settings) if callable(source) else source
                            for statement in schema.get(db.backend, []):
                                await db.execute(statement)
                for _ in range(self.settings.db_pool_min_size - pool.size):
                    pool.idle.append(await pool._connect())
            except Unavailable as exc:
                self._last_error = exc.message
                await pool.close()
                raise
            log.info("database ready: %s (%s)", self.settings.describe(), self.server_version)
            self.pool = pool
            return pool

    @staticmethod
    async def _version(db: _Adapter) -> str:
        if db.backend == "sqlite":
            return "SQLite " + str(await db.fetchval("SELECT sqlite_version()"))
        return str(await db.fetchval("SELECT version()"))

    def connection(self, timeout: float | None = None) -> Lease:
        """``async with manager.connection() as db``: opens the pool first if needed."""
        return Lease(None, timeout, self)

    async def info(self) -> dict[str, Any]:
        """Backend, version, pool counts and whether a trivial query works right now."""
        reachable = True
        try:
            async with self.connection(timeout=1.0) as db:
                await db.fetchval("SELECT 1", timeout=1.0)
        except (Unavailable, DeadlineExceeded, Internal):
            reachable = False
        pool = self.pool
        return {
            "backend": self.backend,
            "server_version": self.server_version,
            "pool_size": pool.size if pool else 0,
            "pool_in_use": pool.in_use if pool else 0,
            "pool_idle": len(pool.idle) if pool else 0,
            "reachable": reachable,
        }

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()
            self.pool = None


def current_manager() -> DatabaseManager:
    """The database manager of the server this code runs under.

    Raises:
        Unavailable: no database is configured (DB_BACKEND=none) or no server is running.
    """
    try:
        manager = current_app().database
    except LookupError:
        manager = None
    if manager is None:
        raise Unavailable(
            "no database is configured",
            hint="set DB_BACKEND=sqlite, mariadb or postgres and restart the server",
        )
    return manager


def connect(*, timeout: float | None = None) -> contextlib.AbstractAsyncContextManager[Database]:
    """A pooled connection for the duration of the block.

    Args:
        timeout: seconds to wait for a free connection; DB_CONNECT_TIMEOUT when None.

    Raises:
        Unavailable: no database configured, unreachable, or every connection stayed busy.
    """
    return current_manager().connection(timeout)
