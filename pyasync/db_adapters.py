"""Database adapters: one class per driver (SQLite, MariaDB, PostgreSQL) behind one API.

Each adapter owns everything its backend does differently: how to open and close a connection,
how to ask for the server's version, how placeholders are written, and what a driver exception
means. A driver exception is translated here, once, into what the request answers:

========================  ===========================  ==========================================
failure                   raised                       the connection
========================  ===========================  ==========================================
lost, unreachable         ``package.Unavailable``      discarded
too slow                  ``package.DeadlineExceeded`` discarded (the query may still run)
duplicate key             ``UniqueViolation``          kept
deadlock, lock timeout,   ``TransientError``           kept
serialization, busy
bad statement             ``package.Internal``         kept if the driver says it is usable
anything else             ``package.Internal``         discarded
========================  ===========================  ==========================================

The details of an ``Internal`` failure (the driver's message, the statement) go to the server
log only, never to the client. ``database.py`` re-exports what users call.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import enum
import functools
import logging
import re
import sqlite3
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Sequence
from typing import Any, ClassVar, Self

from package import Aborted, AlreadyExists, DeadlineExceeded, Internal, Unavailable
from pyasync.deadlines import within
from server_config import DatabaseSettings

__all__ = [
    "ADAPTERS",
    "Adapter",
    "ConnectionReleased",
    "CursorAdapter",
    "Failure",
    "MariaDBAdapter",
    "PostgresAdapter",
    "Record",
    "SQLiteAdapter",
    "TransientError",
    "UniqueViolation",
    "adapter_class",
]

log = logging.getLogger("pyasync.database")

Record = dict[str, Any]  # column name -> value, the same on every backend
STATEMENT_IN_LOG = 300  # characters of a failed statement quoted in the server log


# ---- what users catch ---------------------------------------------------------------------------


class UniqueViolation(AlreadyExists):
    """Raised when an insert or update hits an existing primary or unique key.

    Catch it to answer in the action's own words. Uncaught, the client gets ``ALREADY_EXISTS``
    with this generic message: the driver's own text quotes the row, so it stays in ``detail``.
    """

    def __init__(
        self,
        message: str = "a row with the same unique key exists already",
        *,
        hint: str = "",
        detail: str = "",
    ) -> None:
        super().__init__(message, hint=hint)
        self.detail = detail


class TransientError(Aborted):
    """Raised when the database gave a statement up because of concurrent ones.

    A deadlock (MariaDB 1213, PostgreSQL 40P01), a lock wait timeout (MariaDB 1205, PostgreSQL
    55P03), a serialization failure (PostgreSQL 40001) or a busy SQLite file: the transaction
    was rolled back, or must be, and running it again usually succeeds; ``database.retrying``
    does that. Uncaught, the client gets ``ABORTED`` and may retry the request.
    """

    def __init__(self, message: str, *, hint: str = "retry", detail: str = "") -> None:
        super().__init__(message, hint=hint)
        self.detail = detail


class ConnectionReleased(RuntimeError):
    """Raised when a connection is used after its ``async with connect()`` block ended.

    The connection went back to the pool and may already serve another request, so the call is
    refused instead of running on it. Uncaught in an action, it is a bug: logged, ``INTERNAL``.
    """


class Failure(enum.Enum):
    """What a driver exception means for the request and for its connection."""

    LOST = "lost"  # the connection or the file is unusable: Unavailable, discarded
    UNIQUE = "unique"  # duplicate key: UniqueViolation, kept
    TRANSIENT = "transient"  # lost a race with another transaction: TransientError, kept
    STATEMENT = "statement"  # the database refused this statement: Internal, kept if open
    UNKNOWN = "unknown"  # nothing known about the connection's state: Internal, discarded


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


# ---- the shared part ------------------------------------------------------------------------


class Adapter(abc.ABC):
    """One open driver connection: queries with timeouts, errors translated, broken-ness known.

    Subclasses say how to open, close and classify; ``is_broken`` tells the pool to close the
    connection instead of keeping it.
    """

    backend: ClassVar[str] = ""  # "sqlite", "mariadb", "postgres": for dialect-specific SQL
    detach_calls: ClassVar[bool] = False  # run driver calls in their own task (see _run)

    __slots__ = ("abandoned", "is_broken", "query_timeout", "raw")

    def __init__(self, raw: Any, query_timeout: float) -> None:
        self.raw = raw
        self.query_timeout = query_timeout
        self.is_broken = False
        self.abandoned: asyncio.Task[Any] | None = None  # a driver call left running

    # -- what each backend provides

    @classmethod
    @abc.abstractmethod
    async def open(cls, settings: DatabaseSettings) -> Self:
        """Open one connection as ``settings`` say; driver errors propagate (the pool maps them)."""

    @abc.abstractmethod
    async def version(self) -> str:
        """The database server's name and version, for DB_INFO and the start-up log line."""

    @abc.abstractmethod
    async def _close_driver(self) -> None:
        """Close the driver connection: politely if it is sound, abruptly if it is broken."""

    @abc.abstractmethod
    def classify(self, exc: Exception) -> Failure:
        """What a driver exception raised by a statement means (see ``Failure``)."""

    @abc.abstractmethod
    def is_open(self) -> bool:
        """Whether the driver still considers the connection open."""

    @abc.abstractmethod
    def error_code(self, exc: Exception) -> str:
        """The driver's code for ``exc`` ("error 1213", "SQLSTATE 40001"): short, no SQL."""

    @abc.abstractmethod
    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> int:
        """Run a statement; return the number of rows it changed."""

    @abc.abstractmethod
    async def executemany(
        self, query: str, args: Iterable[Sequence[Any]], *, timeout: float | None = None
    ) -> None:
        """Run a statement once per argument tuple."""

    @abc.abstractmethod
    async def fetch(self, query: str, *args: Any, timeout: float | None = None) -> list[Record]:
        """All rows of a query."""

    @abc.abstractmethod
    async def _begin(self) -> None: ...

    @abc.abstractmethod
    async def _commit(self) -> None: ...

    @abc.abstractmethod
    async def _rollback(self) -> None: ...

    def stop_running(self) -> None:  # noqa: B027  # optional: only SQLite can, from a thread
        """Ask the database to stop a statement whose caller has gone (where a driver can)."""

    # -- shared behaviour

    async def close(self) -> None:
        """Close the connection, after letting a cancelled driver call unwind (asyncpg sends the
        server a cancel request; cutting that short leaves an unretrieved exception)."""
        if self.abandoned is not None:
            await asyncio.wait([self.abandoned], timeout=5)
            if self.abandoned.done() and not self.abandoned.cancelled():
                self.abandoned.exception()  # retrieved, so asyncio does not log it
        await self._close_driver()

    async def fetchrow(self, query: str, *args: Any, timeout: float | None = None) -> Record | None:
        """The first row, or None."""
        rows = await self.fetch(query, *args, timeout=timeout)
        return rows[0] if rows else None

    async def fetchval(self, query: str, *args: Any, timeout: float | None = None) -> Any:
        """The first column of the first row, or None."""
        row = await self.fetchrow(query, *args, timeout=timeout)
        return next(iter(row.values())) if row else None

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        """Commit on success, roll back on any exception."""
        await self._begin()
        try:
            yield
        except BaseException:
            if not self.is_broken:
                try:
                    await self._run(self._rollback, None, "ROLLBACK")
                except Exception:
                    self.is_broken = True
            raise
        await self._run(self._commit, None, "COMMIT")

    async def _run(
        self, call: Callable[[], Coroutine[Any, Any, Any]], timeout: float | None, query: str
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
            raise self._translate(exc, query) from exc

    def _abandon(self, task: asyncio.Task[Any] | None) -> None:
        self.is_broken = True
        self.stop_running()
        if task is not None:
            self.abandoned = task
            task.cancel()

    def _translate(self, exc: Exception, query: str) -> Exception:
        """The exception a failed statement raises to the action (see the module's table)."""
        kind = self.classify(exc)
        code = self.error_code(exc)
        if kind is Failure.UNIQUE:
            return UniqueViolation(detail=str(exc))
        if kind is Failure.TRANSIENT:
            log.info("%s statement lost a race (%s), may be retried: %s", self.backend, code, exc)
            return TransientError(
                f"the database stopped a statement that conflicted with a concurrent one ({code})",
                detail=str(exc),
            )
        if kind is Failure.LOST or not self.is_open():
            self.is_broken = True
            log.warning("%s connection lost (%s): %s", self.backend, code, exc)
            return Unavailable(f"lost the database connection: {exc or type(exc).__name__}")
        if kind is Failure.UNKNOWN:
            self.is_broken = True
        log.error(
            "%s statement failed (%s, connection %s): %s: %s; statement: %.*s",
            self.backend, code, "discarded" if self.is_broken else "kept",
            type(exc).__name__, exc, STATEMENT_IN_LOG, query,
        )  # fmt: skip
        return Internal("a database statement failed; the server log has details")


class CursorAdapter(Adapter):
    """The part MariaDB (aiomysql) and SQLite (aiosqlite) share: statements run on a cursor."""

    __slots__ = ()

    @abc.abstractmethod
    async def _cursor_run(self, query: str, args: Sequence[Any], fetch: bool) -> Any:
        """Run one statement; its rows as ``Record``s if ``fetch``, else its row count."""

    @abc.abstractmethod
    async def _cursor_many(self, query: str, args: list[Sequence[Any]]) -> None:
        """Run one statement once per argument tuple."""

    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> int:
        return int(await self._run(lambda: self._cursor_run(query, args, False), timeout, query))

    async def executemany(
        self, query: str, args: Iterable[Sequence[Any]], *, timeout: float | None = None
    ) -> None:
        await self._run(lambda: self._cursor_many(query, list(args)), timeout, query)

    async def fetch(self, query: str, *args: Any, timeout: float | None = None) -> list[Record]:
        return list(await self._run(lambda: self._cursor_run(query, args, True), timeout, query))

    async def _commit(self) -> None:
        await self.raw.commit()

    async def _rollback(self) -> None:
        await self.raw.rollback()


# ---- PostgreSQL ------------------------------------------------------------------------------


class PostgresAdapter(Adapter):
    """asyncpg: native ``$n`` placeholders, SQLSTATE codes on every server error."""

    backend = "postgres"
    __slots__ = ()

    # 40001 serialization_failure, 40P01 deadlock_detected, 55P03 lock_not_available. Also
    # transient: asyncpg's "cached statement plan is invalid" after a schema change inside a
    # transaction (it has dropped the plan, so the transaction run again works).
    TRANSIENT_STATES = frozenset({"40001", "40P01", "55P03"})

    @classmethod
    async def open(cls, settings: DatabaseSettings) -> Self:
        import asyncpg

        address = settings.address
        raw = await asyncpg.connect(
            host=address["host"], port=address["port"], user=address["user"],
            password=address["password"] or None, database=address["database"],
            timeout=settings.db_connect_timeout,
        )  # fmt: skip
        return cls(raw, settings.db_query_timeout)

    async def version(self) -> str:
        return str(await self.fetchval("SELECT version()"))

    async def _close_driver(self) -> None:
        if self.is_broken:
            self.raw.terminate()
            return
        with contextlib.suppress(Exception):
            await self.raw.close()

    def classify(self, exc: Exception) -> Failure:
        import asyncpg

        if isinstance(exc, asyncpg.UniqueViolationError):
            return Failure.UNIQUE
        if isinstance(exc, asyncpg.InvalidCachedStatementError):
            return Failure.TRANSIENT
        if isinstance(
            exc,
            OSError | asyncpg.PostgresConnectionError | asyncpg.CannotConnectNowError
            | asyncpg.AdminShutdownError | asyncpg.CrashShutdownError,
        ):  # fmt: skip
            return Failure.LOST
        if isinstance(exc, asyncpg.PostgresError):
            if exc.sqlstate in self.TRANSIENT_STATES:
                return Failure.TRANSIENT
            return Failure.STATEMENT  # the server refused it and said so: the session is fine
        if isinstance(exc, asyncpg.InterfaceError):  # closed, or a bad argument client-side
            return Failure.LOST if self.raw.is_closed() else Failure.STATEMENT
        return Failure.UNKNOWN

    def is_open(self) -> bool:
        return not self.raw.is_closed()

    def error_code(self, exc: Exception) -> str:
        sqlstate = getattr(exc, "sqlstate", None)
        return f"SQLSTATE {sqlstate}" if sqlstate else type(exc).__name__

    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> int:
        status = await self._run(lambda: self.raw.execute(query, *args), timeout, query)
        last = status.rsplit(" ", 1)[-1]
        return int(last) if last.isdigit() else 0

    async def executemany(
        self, query: str, args: Iterable[Sequence[Any]], *, timeout: float | None = None
    ) -> None:
        await self._run(lambda: self.raw.executemany(query, list(args)), timeout, query)

    async def fetch(self, query: str, *args: Any, timeout: float | None = None) -> list[Record]:
        rows = await self._run(lambda: self.raw.fetch(query, *args), timeout, query)
        return [dict(row) for row in rows]

    async def _begin(self) -> None:
        await self._run(lambda: self.raw.execute("BEGIN"), None, "BEGIN")

    async def _commit(self) -> None:
        await self.raw.execute("COMMIT")

    async def _rollback(self) -> None:
        await self.raw.execute("ROLLBACK")


# ---- MariaDB ---------------------------------------------------------------------------------


class MariaDBAdapter(CursorAdapter):
    """aiomysql in autocommit mode; ``$n`` becomes ``%s``, error numbers say what went wrong."""

    backend = "mariadb"
    detach_calls = True
    __slots__ = ()

    # Client errors (2000 and up) are about the link; 1927 connection killed, 1053 server
    # shutdown, 4031 disconnected for inactivity.
    CONNECTION_ERRORS = frozenset({1053, 1927, 4031})
    DUPLICATE_KEY = frozenset({1062, 1586, 1022})  # duplicate entry, ... with key name, dup key
    # 1213 deadlock, 1205 lock wait timeout, 1020 record changed since last read (snapshot).
    TRANSIENT_ERRORS = frozenset({1213, 1205, 1020})

    @classmethod
    async def open(cls, settings: DatabaseSettings) -> Self:
        import aiomysql

        address = settings.address
        raw = await aiomysql.connect(
            host=address["host"], port=address["port"], user=address["user"],
            password=address["password"], db=address["database"], autocommit=True,
            charset="utf8mb4", connect_timeout=settings.db_connect_timeout,
        )  # fmt: skip
        return cls(raw, settings.db_query_timeout)

    async def version(self) -> str:
        return str(await self.fetchval("SELECT version()"))

    async def _close_driver(self) -> None:
        self.raw.close()  # synchronous: drops the socket without a goodbye

    def classify(self, exc: Exception) -> Failure:
        import pymysql

        if isinstance(exc, OSError | pymysql.err.InterfaceError) or self.raw.closed:
            return Failure.LOST
        if not isinstance(exc, pymysql.err.MySQLError):
            return Failure.UNKNOWN
        number = exc.args[0] if exc.args and isinstance(exc.args[0], int) else 0
        if number in self.DUPLICATE_KEY:
            return Failure.UNIQUE
        if number in self.TRANSIENT_ERRORS:
            return Failure.TRANSIENT
        if number >= 2000 or number in self.CONNECTION_ERRORS:
            return Failure.LOST
        if number:  # the server answered with an error packet: the session is in step
            return Failure.STATEMENT
        return Failure.UNKNOWN

    def is_open(self) -> bool:
        return not self.raw.closed

    def error_code(self, exc: Exception) -> str:
        number = exc.args[0] if exc.args and isinstance(exc.args[0], int) else None
        return f"error {number}" if number else type(exc).__name__

    async def _cursor_run(self, query: str, args: Sequence[Any], fetch: bool) -> Any:
        import aiomysql

        sql, order = _to_pyformat(query)
        async with self.raw.cursor(aiomysql.DictCursor) as cursor:
            await cursor.execute(sql, tuple(args[number - 1] for number in order))
            return await cursor.fetchall() if fetch else cursor.rowcount

    async def _cursor_many(self, query: str, args: list[Sequence[Any]]) -> None:
        sql, order = _to_pyformat(query)
        async with self.raw.cursor() as cursor:
            await cursor.executemany(sql, [tuple(a[n - 1] for n in order) for a in args])

    async def _begin(self) -> None:
        await self._run(self.raw.begin, None, "BEGIN")


# ---- SQLite ----------------------------------------------------------------------------------


class SQLiteAdapter(CursorAdapter):
    """aiosqlite on a file in WAL mode; ``$n`` becomes ``?n``; result codes say what happened."""

    backend = "sqlite"
    __slots__ = ()

    # Primary result codes (https://sqlite.org/rescode.html).
    BUSY_CODES = frozenset({5, 6})  # SQLITE_BUSY, SQLITE_LOCKED: another connection holds it
    UNIQUE_CODES = frozenset({2067, 1555})  # SQLITE_CONSTRAINT_UNIQUE, _PRIMARYKEY (extended)
    # SQLITE_PERM, READONLY, INTERRUPT, IOERR, CORRUPT, FULL, CANTOPEN, PROTOCOL, NOTADB, NOMEM:
    # the file or the connection cannot serve statements now.
    LOST_CODES = frozenset({3, 7, 8, 9, 10, 11, 13, 14, 15, 26})

    @classmethod
    async def open(cls, settings: DatabaseSettings) -> Self:
        import aiosqlite

        raw = await aiosqlite.connect(settings.sqlite_file, isolation_level=None)
        try:
            raw.row_factory = aiosqlite.Row
            await raw.execute("PRAGMA journal_mode=WAL")
            await raw.execute(f"PRAGMA busy_timeout={int(settings.db_query_timeout * 1000)}")
        except BaseException:
            await raw.close()
            raise
        return cls(raw, settings.db_query_timeout)

    async def version(self) -> str:
        return "SQLite " + str(await self.fetchval("SELECT sqlite_version()"))

    async def _close_driver(self) -> None:
        with contextlib.suppress(Exception):
            await self.raw.close()

    def classify(self, exc: Exception) -> Failure:
        if not self.is_open() or isinstance(exc, OSError):
            return Failure.LOST
        if isinstance(exc, sqlite3.DatabaseError):
            code = getattr(exc, "sqlite_errorcode", None)
            if code is None:  # raised by the sqlite3 module, not the library
                return Failure.STATEMENT
            if code in self.UNIQUE_CODES:
                return Failure.UNIQUE
            if code & 0xFF in self.BUSY_CODES:
                return Failure.TRANSIENT
            if code & 0xFF in self.LOST_CODES:
                return Failure.LOST
            return Failure.STATEMENT  # SQLITE_ERROR (syntax, no such table), other constraints
        if isinstance(exc, sqlite3.Error | OverflowError):  # bad parameters, checked before use
            return Failure.STATEMENT
        return Failure.UNKNOWN

    def is_open(self) -> bool:
        return bool(self.raw._running and self.raw._connection is not None)

    def error_code(self, exc: Exception) -> str:
        name = getattr(exc, "sqlite_errorname", None)
        return str(name) if name else type(exc).__name__

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

    async def _cursor_many(self, query: str, args: list[Sequence[Any]]) -> None:
        await self.raw.executemany(_to_sqlite(query), args)

    async def _begin(self) -> None:
        # IMMEDIATE takes the write lock up front, so two read-then-write transactions cannot
        # deadlock upgrading their locks; busy_timeout makes the second one wait its turn.
        await self._run(lambda: self.raw.execute("BEGIN IMMEDIATE"), None, "BEGIN IMMEDIATE")


ADAPTERS: dict[str, type[Adapter]] = {
    "SQLITE": SQLiteAdapter,
    "MARIADB": MariaDBAdapter,
    "POSTGRES": PostgresAdapter,
}


def adapter_class(settings: DatabaseSettings) -> type[Adapter]:
    """The adapter for ``settings.db_backend``.

    Raises:
        ValueError: the backend is ``NONE`` (no database configured).
    """
    try:
        return ADAPTERS[settings.db_backend]
    except KeyError:
        raise ValueError(f"no database adapter for DB_BACKEND={settings.db_backend}") from None
