"""One small database API over SQLite (aiosqlite), MariaDB (aiomysql) and PostgreSQL (asyncpg).

Actions write ``async with connect() as db:`` and call ``fetch``/``fetchrow``/``fetchval``/
``execute``/``executemany`` with ``$1, $2`` placeholders on every backend; parameters are always
bound by the driver. A connection whose query was cancelled, timed out or lost its server is
closed, never handed to the next request. Driver errors are translated once, alike on every
backend, by the adapter of each driver (``pyasync/db_adapters.py``): a lost connection ->
``Unavailable``, too slow -> ``DeadlineExceeded``, duplicate key -> ``UniqueViolation``
(``ALREADY_EXISTS``), deadlock or busy -> ``TransientError`` (``ABORTED``), a bad statement ->
``Internal`` (details in the server log only); ``retrying()`` runs a unit of work again when
it lost such a race. The adapters and the pool live in ``pyasync/``; this module is the face.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any, Protocol, TypeVar

from context import current_app
from package import DeadlineExceeded, Internal, Unavailable
from pyasync.db_adapters import (
    Adapter,
    ConnectionReleased,
    Record,
    TransientError,
    UniqueViolation,
)
from pyasync.db_pool import Pool
from server_config import DatabaseSettings

__all__ = [
    "ConnectionReleased",
    "Database",
    "DatabaseManager",
    "Pool",
    "Record",
    "TransientError",
    "UniqueViolation",
    "connect",
    "current_manager",
    "declare_schema",
    "retrying",
]

log = logging.getLogger("pyasync.database")

RETRY_CONNECT_AFTER = 1.0  # seconds between attempts to reach a database that was down
RETRY_ATTEMPTS = 5  # tries of an operation that keeps losing races (see retrying)
RETRY_FIRST_PAUSE = 0.002  # seconds before the second try; doubled for each one after it

T = TypeVar("T")


class Database(Protocol):
    """A pooled connection, as actions see it. ``timeout=None`` means DB_QUERY_TIMEOUT.

    Valid inside its ``async with connect()`` block only: afterwards every call raises
    ``ConnectionReleased``. ``backend`` ("sqlite", "mariadb", "postgres") picks dialect SQL.
    """

    @property
    def backend(self) -> str: ...

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
        self.pool: Pool | None = None  # None until the database was reached once
        self.server_version = ""
        self._lock = asyncio.Lock()
        self._last_attempt = -RETRY_CONNECT_AFTER
        self._last_error = ""

    @property
    def backend(self) -> str:
        """The backend as ``db.backend`` names it: "sqlite", "mariadb" or "postgres"."""
        return self.settings.db_backend.lower()

    async def start(self) -> None:
        """Open the pool and create the schema; on failure log one line and carry on."""
        try:
            await self.ensure_pool()
        except Unavailable as exc:
            log.warning("database not reachable at start-up (%s); will retry on use", exc.message)

    async def ensure_pool(self) -> Pool:
        """The pool, opened (with the declared schema created) on first use.

        Raises:
            Unavailable: the database cannot be reached (tried again after
                RETRY_CONNECT_AFTER seconds, not on every request meanwhile).
            Internal: a declared schema statement failed (the server log names it).
        """
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
                await self._prepare(pool)
            except BaseException as exc:
                if isinstance(exc, Unavailable):
                    self._last_error = exc.message
                await pool.close()
                raise
            log.info("database ready: %s (%s)", self.settings.describe(), self.server_version)
            self.pool = pool
            return pool

    async def _prepare(self, pool: Pool) -> None:
        """Read the server's version, create the declared schema, open DB_POOL_MIN_SIZE."""
        adapter = await pool.take(None)
        try:
            self.server_version = await adapter.version()
            await self._create_schema(adapter)
        finally:
            pool.give_back(adapter)
        await pool.fill()

    async def _create_schema(self, db: Adapter) -> None:
        with warnings.catch_warnings():
            # MariaDB warns "table already exists" for CREATE ... IF NOT EXISTS.
            warnings.simplefilter("ignore")
            for source in _DECLARED_SCHEMAS:
                schema = source(self.settings) if callable(source) else source
                for statement in schema.get(db.backend, []):
                    await db.execute(statement)

    def connection(
        self, timeout: float | None = None
    ) -> contextlib.AbstractAsyncContextManager[Database]:
        """``async with manager.connection() as db``: opens the pool first if needed.

        Once the pool is open this is the pool's own lease, with nothing in between.
        """
        pool = self.pool
        if pool is not None:
            return pool.acquire(timeout)
        return self._connection_after_opening(timeout)

    @contextlib.asynccontextmanager
    async def _connection_after_opening(self, timeout: float | None) -> AsyncIterator[Database]:
        pool = await self.ensure_pool()
        async with pool.acquire(timeout) as db:
            yield db

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
        """Close the pool (the server calls this last, after its shutdown hooks)."""
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


async def retrying(operation: Callable[[], Awaitable[T]], *, attempts: int = RETRY_ATTEMPTS) -> T:
    """Run ``operation()``; run it again while it raises ``TransientError``, up to ``attempts``.

    A deadlock, lock wait timeout, serialization failure or busy SQLite file means the database
    undid the transaction so that a concurrent one could finish; run again, it usually
    succeeds. ``operation`` must therefore redo the whole unit of work, connection included::

        async def add() -> int:
            async with connect() as db, db.transaction():
                ...

        total = await retrying(add)

    so that each try starts afresh and the connection serves others during the pause. Pauses
    grow from RETRY_FIRST_PAUSE (2, 4, 8, 16 ms), each one randomly between half and one and a
    half times that, so that the transactions that collided do not collide again in step.
    Other exceptions propagate at once: only a lost race is known to have changed nothing.

    Raises:
        TransientError: the last try lost its race too (answered ``ABORTED``: retry later).
    """
    for attempt in range(1, attempts):
        try:
            return await operation()
        except TransientError as exc:
            pause = RETRY_FIRST_PAUSE * 2 ** (attempt - 1) * random.uniform(0.5, 1.5)
            log.debug("try %d of %d lost a race, again in %.1f ms: %s",
                      attempt, attempts, pause * 1000, exc.message)  # fmt: skip
            await asyncio.sleep(pause)
    try:
        return await operation()
    except TransientError as exc:
        log.warning("gave up after %d tries, each lost a race: %s", attempts, exc.message)
        raise
