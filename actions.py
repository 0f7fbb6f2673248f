"""Actions: one async function per request type, and ``unpack_and_process()`` that routes to them.

To add a feature, declare a ``REQUEST_X``/``ANSWER_X`` pair with their bodies in ``package.py``,
then write one function here::

    @action(PACKAGE.REQUEST_X)
    async def x(request: XRequest, ctx: Context) -> XAnswer:
        return XAnswer(...)

An action that never waits (no ``await``) may be a plain ``def``: it then runs inline as its
frame is decoded, with no task, several times cheaper (keep it to microseconds of work, as it
holds the event loop).

Raise an ``RPCError`` subclass (``InvalidArgument``, ``NotFound``, ...) to answer with an error.
Any other exception is logged with its traceback and answered as ``INTERNAL``.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec

import database
from context import App, Context
from database import DatabaseManager, UniqueViolation, connect
from package import (
    PACKAGE,
    Body,
    ChangeQuestionMarkAnswer,
    ChangeQuestionMarkRequest,
    Conflict,
    DbInfoAnswer,
    DbInfoRequest,
    DeadlineExceeded,
    EchoAnswer,
    EchoRequest,
    Internal,
    InvalidArgument,
    KvDeleteAnswer,
    KvDeleteRequest,
    KvGetAnswer,
    KvGetRequest,
    KvItem,
    KvListAnswer,
    KvListRequest,
    KvPutAnswer,
    KvPutRequest,
    NotFound,
    PingAnswer,
    PingRequest,
    RPCError,
    ServerInfoAnswer,
    ServerInfoRequest,
    Unavailable,
    Unimplemented,
    UnknownPackageType,
    __version__,
    answer_kind_for,
    body_type,
    is_request,
    pack,
)
from protocol import Frame

__all__ = [
    "ACTIONS",
    "Action",
    "action",
    "check_actions",
    "error_answer",
    "on_connect",
    "on_disconnect",
    "on_shutdown",
    "on_startup",
    "process_inline",
    "route_for",
    "unpack_and_process",
]

log = logging.getLogger("pyasync.actions")

Action = Callable[[Any, Context], Awaitable[Body]] | Callable[[Any, Context], Body]
ActionT = TypeVar("ActionT", bound=Action)
AppHook = Callable[[App], Awaitable[None]]
ConnectionHook = Callable[[Context], Awaitable[None]]

ACTIONS: dict[PACKAGE, Action] = {}  # the action table: request type -> action
STARTUP_HOOKS: list[AppHook] = []
SHUTDOWN_HOOKS: list[AppHook] = []
CONNECT_HOOKS: list[ConnectionHook] = []
DISCONNECT_HOOKS: list[ConnectionHook] = []


def action(kind: PACKAGE) -> Callable[[ActionT], ActionT]:
    """Register the decorated function as the action for request type ``kind``.

    A coroutine function runs as a task of its own; a plain function runs inline.

    Raises:
        TypeError: ``kind`` is not a request type, or already has an action.
    """

    def register(function: ActionT) -> ActionT:
        if not is_request(kind):
            raise TypeError(f"{kind.name} is not a request type; actions serve REQUEST_*")
        if kind in ACTIONS:
            raise TypeError(f"{kind.name} already has action {ACTIONS[kind].__name__}")
        ACTIONS[kind] = function
        return function

    return register


def on_startup(hook: AppHook) -> AppHook:
    """Run ``hook(app)`` before the server accepts connections (open pools here)."""
    STARTUP_HOOKS.append(hook)
    return hook


def on_shutdown(hook: AppHook) -> AppHook:
    """Run ``hook(app)`` after the last connection closed (close pools here)."""
    SHUTDOWN_HOOKS.append(hook)
    return hook


def on_connect(hook: ConnectionHook) -> ConnectionHook:
    """Run ``hook(ctx)`` when a connection opens, before its first request."""
    CONNECT_HOOKS.append(hook)
    return hook


def on_disconnect(hook: ConnectionHook) -> ConnectionHook:
    """Run ``hook(ctx)`` when a connection has closed."""
    DISCONNECT_HOOKS.append(hook)
    return hook


def check_actions() -> None:
    """Prove every request type has an action; the server calls this before it listens.

    Raises:
        TypeError: names each ``REQUEST_*`` without an action.
    """
    missing = [kind.name for kind in PACKAGE if is_request(kind) and kind not in ACTIONS]
    if missing:
        raise TypeError("no action for " + ", ".join(missing) + " (add one with @action)")


async def unpack_and_process(frame: Frame, ctx: Context) -> tuple[PACKAGE, bytes]:
    """Run the action for one request frame and return its answer, never raising an RPC failure.

    Args:
        frame: a decoded request frame.
        ctx: the context of the connection it came on.

    Returns:
        ``(ANSWER_X, body)`` on success, ``(ANSWER_ERROR, body)`` for any failure.

    Raises:
        asyncio.CancelledError: the request was cancelled (timeout, disconnect, shutdown).
    """
    try:
        route = route_for(frame.kind)
        answer = route.function(route.decode(frame.body), ctx)
        if inspect.isawaitable(answer):
            answer = await answer
        return route.answer, route.encode(answer)
    except Exception as exc:
        return _failure(exc, frame, ctx)


def process_inline(frame: Frame, ctx: Context) -> tuple[PACKAGE, bytes] | None:
    """Answer a request at once if its action is a plain function (or it has none).

    Returns None, having run nothing, when the action is a coroutine function or turns out to
    make a coroutine (an object with an ``async def __call__``, say): give the frame to
    ``unpack_and_process()`` in a task.
    """
    try:
        route = route_for(frame.kind)
        if not route.inline:
            return None
        answer = route.function(route.decode(frame.body), ctx)
        if type(answer) is route.answer_type:  # the common case, checked first: no call
            return route.answer, _ENCODE(answer)
        if inspect.iscoroutine(answer):
            answer.close()  # not started: no effect happened
            _ROUTES[frame.kind] = dataclasses.replace(route, inline=False)
            return None
        return route.answer, route.encode(answer)  # type: ignore[arg-type]  # raises TypeError
    except Exception as exc:
        return _failure(exc, frame, ctx)


@dataclasses.dataclass(frozen=True, slots=True)
class Route:
    """What serving one request type needs, looked up once instead of per request."""

    kind: PACKAGE
    answer: PACKAGE
    function: Action
    inline: bool  # a plain function: runs without a task
    decoder: msgspec.msgpack.Decoder[Body]
    answer_type: type[Body]

    def decode(self, body: bytes) -> Body:
        try:
            return self.decoder.decode(body)
        except msgspec.DecodeError as exc:
            raise InvalidArgument(f"invalid {self.kind.name} body: {exc}") from None

    def encode(self, answer: Body) -> bytes:
        if type(answer) is not self.answer_type:
            raise TypeError(
                f"{self.answer.name} carries {self.answer_type.__name__}, "
                f"not {type(answer).__name__}"
            )
        return _ENCODE(answer)


_ROUTES: dict[int, Route] = {}
_ENCODE = msgspec.msgpack.Encoder().encode


def route_for(number: int) -> Route:
    """The route of request type ``number``, rebuilt when ``ACTIONS`` changed.

    Raises:
        UnknownPackageType: ``number`` is no request type of this server.
        Unimplemented: it is, but has no action.
    """
    route = _ROUTES.get(number)
    function = ACTIONS.get(number)  # type: ignore[call-overload]  # PACKAGE hashes as its int
    if route is not None and route.function is function:
        return route
    try:
        kind = PACKAGE(number)
    except ValueError:
        raise UnknownPackageType(f"package type {number} is unknown to this server") from None
    if not is_request(kind):
        raise UnknownPackageType(f"{kind.name} ({number}) is not a request type")
    if function is None:
        raise Unimplemented(f"{kind.name} has no action on this server")
    answer = answer_kind_for(kind)
    route = _ROUTES[number] = Route(
        kind, answer, function, not inspect.iscoroutinefunction(function),
        msgspec.msgpack.Decoder(body_type(kind)), body_type(answer),
    )  # fmt: skip
    return route


def _failure(exc: Exception, frame: Frame, ctx: Context) -> tuple[PACKAGE, bytes]:
    """The error answer for an exception an action (or routing) raised."""
    if isinstance(exc, RPCError):
        return error_answer(exc)
    if isinstance(exc, TimeoutError):
        return error_answer(DeadlineExceeded("an operation inside the action timed out"))
    log.error(
        "c%d request %d (type %d) failed",
        ctx.connection_id, frame.request_id, frame.kind, exc_info=exc,
    )  # fmt: skip
    return error_answer(
        Internal(f"the server failed on request {frame.request_id}; its log has details")
    )


def error_answer(error: RPCError) -> tuple[PACKAGE, bytes]:
    """The ``ANSWER_ERROR`` package for ``error``."""
    return PACKAGE.ANSWER_ERROR, pack(PACKAGE.ANSWER_ERROR, error.to_answer())


# ---- built-in actions -----------------------------------------------------------------------


@action(PACKAGE.REQUEST_PING)
def ping(request: PingRequest, ctx: Context) -> PingAnswer:
    """Answer at once; clients time the round trip."""
    return PingAnswer()


@action(PACKAGE.REQUEST_ECHO)
def echo(request: EchoRequest, ctx: Context) -> EchoAnswer:
    """Send back the text or bytes received."""
    if (request.text is None) == (request.data is None):
        raise InvalidArgument("ECHO takes exactly one of 'text' or 'data'")
    return EchoAnswer(text=request.text, data=request.data)


@action(PACKAGE.REQUEST_CHANGE_QUESTION_MARK)
def change_question_mark(
    request: ChangeQuestionMarkRequest, ctx: Context
) -> ChangeQuestionMarkAnswer:
    """Turn every '?' into '!': "How are you?" answers "How are you!"."""
    return ChangeQuestionMarkAnswer(text=request.text.replace("?", "!"))


@action(PACKAGE.REQUEST_SERVER_INFO)
async def server_info(request: ServerInfoRequest, ctx: Context) -> ServerInfoAnswer:
    """Version, uptime, load and the configuration (never its secrets)."""
    stats = ctx.app.stats
    manager = ctx.app.state.get("database")
    return ServerInfoAnswer(
        version=__version__,
        uptime_s=round(stats.uptime_s, 3),
        open_connections=stats.open_connections,
        requests_served=stats.requests_served,
        config={**ctx.app.settings.summary(), **ctx.app.db_settings.summary()},
        database=await manager.info() if manager is not None else None,
    )


# ---- the database and the built-in key-value store -------------------------------------------
# The statements below are the model for database actions: each action owns its SQL, uses
# $1, $2 placeholders on every backend, and never builds SQL from what a client sent.

MAX_KEY_BYTES = 256  # UTF-8 bytes; the key column is sized for this
MAX_VALUE_BYTES = 1024 * 1024  # 1 MiB
MAX_LIST_LIMIT = 1000
PUT_ATTEMPTS = 5  # a blind put retries when another client created the key meanwhile

KV_SCHEMA = {
    "sqlite": [
        "CREATE TABLE IF NOT EXISTS {table} "
        "(k TEXT PRIMARY KEY, v BLOB NOT NULL, version INTEGER NOT NULL)"
    ],
    "postgres": [
        'CREATE TABLE IF NOT EXISTS {table} (k TEXT COLLATE "C" PRIMARY KEY, '
        "v BYTEA NOT NULL, version BIGINT NOT NULL)"
    ],
    "mariadb": [  # VARBINARY: byte order and exact match, unlike a case-insensitive VARCHAR
        "CREATE TABLE IF NOT EXISTS {table} (k VARBINARY(256) PRIMARY KEY, "
        "v LONGBLOB NOT NULL, version BIGINT NOT NULL) ENGINE=InnoDB"
    ],
}


@on_startup
async def open_database(app: App) -> None:
    """Open the pool and create the schema; an unreachable database is retried on use."""
    settings = app.db_settings
    if settings.db_backend == "NONE":
        database.install(None)
        return
    manager = DatabaseManager(settings)
    manager.schemas.append(
        {backend: [sql.format(table=settings.kv_table) for sql in statements]
         for backend, statements in KV_SCHEMA.items()}
    )  # fmt: skip
    database.install(manager)
    app.state["database"] = manager
    await manager.start()


@on_shutdown
async def close_database(app: App) -> None:
    manager = app.state.pop("database", None)
    if manager is not None:
        await manager.close()
        database.install(None)


def _kv_table() -> str:
    return database.current_manager().settings.kv_table  # validated as a plain SQL name


def _check_key(key: str) -> None:
    size = len(key.encode())
    if not 1 <= size <= MAX_KEY_BYTES:
        raise InvalidArgument(f"key must be 1 to {MAX_KEY_BYTES} UTF-8 bytes, got {size}")


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value  # MariaDB returns VARBINARY


@action(PACKAGE.REQUEST_KV_PUT)
async def kv_put(request: KvPutRequest, ctx: Context) -> KvPutAnswer:
    """Store a value; with ``expected_version``, only if the stored version matches."""
    _check_key(request.key)
    if len(request.value) > MAX_VALUE_BYTES:
        raise InvalidArgument(f"value must be at most {MAX_VALUE_BYTES} bytes")
    key, value, expected = request.key, request.value, request.expected_version
    if expected is not None and expected < 0:
        raise InvalidArgument("expected_version must be 0 (create) or a stored version")
    table = _kv_table()
    insert = f"INSERT INTO {table} (k, v, version) VALUES ($1, $2, 1)"
    async with connect() as db:
        if expected == 0:
            try:
                await db.execute(insert, key, value)
            except UniqueViolation:
                raise Conflict(
                    f"key {key!r} exists already", hint="expected_version=0 creates"
                ) from None
            return KvPutAnswer(version=1)
        if expected is not None:
            changed = await db.execute(
                f"UPDATE {table} SET v = $1, version = version + 1 WHERE k = $2 AND version = $3",
                value, key, expected,
            )  # fmt: skip
            if not changed:
                raise Conflict(f"key {key!r} is not at version {expected}")
            return KvPutAnswer(version=expected + 1)
        for _ in range(PUT_ATTEMPTS):
            try:
                async with db.transaction():
                    if await db.execute(
                        f"UPDATE {table} SET v = $1, version = version + 1 WHERE k = $2", value, key
                    ):
                        version = await db.fetchval(
                            f"SELECT version FROM {table} WHERE k = $1", key
                        )
                        return KvPutAnswer(version=int(version))
                    await db.execute(insert, key, value)
                    return KvPutAnswer(version=1)
            except UniqueViolation:
                continue  # created by someone else between our UPDATE and INSERT: update it
    raise Unavailable(f"key {key!r} kept changing under {PUT_ATTEMPTS} attempts", hint="retry")


@action(PACKAGE.REQUEST_KV_GET)
async def kv_get(request: KvGetRequest, ctx: Context) -> KvGetAnswer:
    """The value and version stored under a key."""
    _check_key(request.key)
    async with connect() as db:
        row = await db.fetchrow(f"SELECT v, version FROM {_kv_table()} WHERE k = $1", request.key)
    if row is None:
        raise NotFound(f"no key {request.key!r}")
    return KvGetAnswer(value=bytes(row["v"]), version=int(row["version"]))


@action(PACKAGE.REQUEST_KV_DELETE)
async def kv_delete(request: KvDeleteRequest, ctx: Context) -> KvDeleteAnswer:
    """Delete a key; with ``expected_version``, only at that version (else CONFLICT)."""
    _check_key(request.key)
    table, key, expected = _kv_table(), request.key, request.expected_version
    async with connect() as db:
        if expected is None:
            deleted = await db.execute(f"DELETE FROM {table} WHERE k = $1", key)
        else:
            deleted = await db.execute(
                f"DELETE FROM {table} WHERE k = $1 AND version = $2", key, expected
            )
            if not deleted and await db.fetchval(f"SELECT 1 FROM {table} WHERE k = $1", key):
                raise Conflict(f"key {key!r} is not at version {expected}")
    return KvDeleteAnswer(deleted=bool(deleted))


@action(PACKAGE.REQUEST_KV_LIST)
async def kv_list(request: KvListRequest, ctx: Context) -> KvListAnswer:
    """Keys with a prefix, in byte order, a page at a time."""
    if not 1 <= request.limit <= MAX_LIST_LIMIT:
        raise InvalidArgument(f"limit must be 1 to {MAX_LIST_LIMIT}, got {request.limit}")
    # Every key with the prefix sorts below prefix + the highest code point (UTF-8 byte order).
    upper = request.prefix + "\U0010ffff"
    async with connect() as db:
        rows = await db.fetch(
            f"SELECT k, version, length(v) AS size FROM {_kv_table()} "
            "WHERE k > $1 AND k >= $2 AND k < $3 ORDER BY k LIMIT $4",
            request.cursor, request.prefix, upper, request.limit,
        )  # fmt: skip
    items = [
        KvItem(key=_text(r["k"]), version=int(r["version"]), size=int(r["size"])) for r in rows
    ]
    next_cursor = items[-1].key if len(items) == request.limit else ""
    return KvListAnswer(items=items, next_cursor=next_cursor)


@action(PACKAGE.REQUEST_DB_INFO)
async def db_info(request: DbInfoRequest, ctx: Context) -> DbInfoAnswer:
    """Backend, server version, pool use, and whether the database answers right now."""
    return DbInfoAnswer(**await database.current_manager().info())
