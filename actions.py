"""Actions: one function per request type. This is the file to extend.

To add a feature, declare a ``REQUEST_X``/``ANSWER_X`` pair with their bodies in ``package.py``,
then write one function here::

    @action(PACKAGE.REQUEST_X)
    async def x(request: XRequest, ctx: Context) -> XAnswer:
        return XAnswer(...)

An action that never waits (no ``await``) may be a plain ``def``: it then runs inline as its
frame is decoded, with no task, several times cheaper. The price: an inline action has no
timeout and does not count towards ``MAX_IN_FLIGHT`` (it finishes before the next frame is
read), and while it runs nothing else on the server does: keep it to microseconds of work.

Raise an ``RPCError`` subclass (``InvalidArgument``, ``NotFound``, ...) to answer with an error.
Any other exception is logged with its traceback and answered as ``INTERNAL``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import TypeVar

import database
from broker import Broker
from context import Context
from database import UniqueViolation, connect
from package import (
    PACKAGE,
    ChangeQuestionMarkAnswer,
    ChangeQuestionMarkRequest,
    Conflict,
    DbInfoAnswer,
    DbInfoRequest,
    EchoAnswer,
    EchoRequest,
    FailedPrecondition,
    HelloAnswer,
    HelloRequest,
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
    PermissionDenied,
    PingAnswer,
    PingRequest,
    PublishAnswer,
    PublishRequest,
    ResourceExhausted,
    ServerInfoAnswer,
    ServerInfoRequest,
    SubscribeAnswer,
    SubscribeRequest,
    Unauthenticated,
    Unavailable,
    UnsubscribeAnswer,
    UnsubscribeRequest,
    __version__,
)
from protocol import Frame
from pyasync.router import (
    ROUTER,
    Action,
    Answer,
    AppHook,
    ConnectionHook,
    Interceptor,
)

__all__ = [
    "Action",
    "Interceptor",
    "action",
    "check_actions",
    "interceptor",
    "on_connect",
    "on_disconnect",
    "on_shutdown",
    "on_startup",
    "unpack_and_process",
]

log = logging.getLogger("pyasync.actions")

ActionT = TypeVar("ActionT", bound=Action)
AppHookT = TypeVar("AppHookT", bound=AppHook)
ConnectionHookT = TypeVar("ConnectionHookT", bound=ConnectionHook)


def action(kind: PACKAGE, *, scopes: Iterable[str] = ()) -> Callable[[ActionT], ActionT]:
    """Register the decorated function as the action for request type ``kind``.

    ``scopes``: what a caller needs when authentication is on (``PERMISSION_DENIED`` else);
    ``ctx.principal`` tells the action who calls.

    Raises:
        TypeError: ``kind`` is not a request type, or already has an action.
    """

    def register(function: ActionT) -> ActionT:
        ROUTER.add(kind, function, scopes=scopes)
        return function

    return register


def interceptor(step: Interceptor) -> Interceptor:
    """Run ``step`` (an ``Interceptor`` instance) around every request, in registration order."""
    ROUTER.add_interceptor(step)
    return step


def on_startup(hook: AppHookT) -> AppHookT:
    """Run ``hook(app)`` before the server accepts connections; the database is open by then."""
    ROUTER.hooks.startup.append(hook)
    return hook


def on_shutdown(hook: AppHookT) -> AppHookT:
    """Run ``hook(app)`` after the last connection closed, before the database closes."""
    ROUTER.hooks.shutdown.append(hook)
    return hook


def on_connect(hook: ConnectionHookT) -> ConnectionHookT:
    """Run ``hook(ctx)`` when a connection opens, before its first request."""
    ROUTER.hooks.connect.append(hook)
    return hook


def on_disconnect(hook: ConnectionHookT) -> ConnectionHookT:
    """Run ``hook(ctx)`` when a connection has closed."""
    ROUTER.hooks.disconnect.append(hook)
    return hook


def check_actions() -> None:
    """Prove every request type has an action (``TypeError`` names those without)."""
    ROUTER.check()


async def unpack_and_process(frame: Frame, ctx: Context) -> Answer:
    """Run the action for one request frame and return ``(answer type, body)``; any failure
    is answered as ``ANSWER_ERROR``. The server takes a shorter path to the same result."""
    return await ROUTER.unpack_and_process(frame, ctx)


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


@action(PACKAGE.REQUEST_SERVER_INFO, scopes=("server.info",))
async def server_info(request: ServerInfoRequest, ctx: Context) -> ServerInfoAnswer:
    """Version, uptime, load, the configuration (never its secrets) and which node answers."""
    app = ctx.app
    manager = app.database
    return ServerInfoAnswer(
        version=__version__,
        uptime_s=round(app.stats.uptime_s, 3),
        open_connections=len(app.connections),
        requests_served=app.stats.requests_served,
        config={**app.settings.summary(), **app.db_settings.summary()},
        database=await manager.info() if manager is not None else None,
        node_id=app.settings.node_id,
    )


# ---- the database and the built-in key-value store -------------------------------------------
# The statements below are the model for database actions: each action owns its SQL, uses
# $1, $2 placeholders on every backend, and never builds SQL from what a client sent.

MAX_KEY_BYTES = 256  # UTF-8 bytes; the key column is sized for this
MAX_VALUE_BYTES = 1024 * 1024  # 1 MiB
MAX_LIST_LIMIT = 1000
MAX_VERSION = 2**63 - 1  # versions are signed 64-bit on every backend (BIGINT, SQLite INTEGER)

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


database.declare_schema(
    lambda settings: {
        backend: [sql.format(table=settings.kv_table) for sql in statements]
        for backend, statements in KV_SCHEMA.items()
    }
)


def _kv_table() -> str:
    return database.current_manager().settings.kv_table  # validated as a plain SQL name


def _check_key(key: str) -> None:
    size = len(key.encode())
    if not 1 <= size <= MAX_KEY_BYTES:
        raise InvalidArgument(f"key must be 1 to {MAX_KEY_BYTES} UTF-8 bytes, got {size}")


def _check_version(expected: int | None) -> None:
    # Checked here, not left to the driver: past the column's range the backends disagree
    # (SQLite and asyncpg refuse the parameter, MariaDB compares and finds no match).
    if expected is not None and not 0 <= expected <= MAX_VERSION:
        raise InvalidArgument(
            f"expected_version must be 0 to {MAX_VERSION} (signed 64-bit), got {expected}"
        )


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value  # MariaDB returns VARBINARY


# Each write is one atomic statement. A blind put written as UPDATE, then INSERT if nothing
# matched, in one transaction, deadlocks on MariaDB under load: at REPEATABLE READ the UPDATE of
# a missing key locks the gap where it would be, and concurrent inserts of new keys wait on each
# other's gaps. What still loses a race (TransientError) is run again by database.retrying,
# and answers ABORTED if it keeps losing, never INTERNAL.
KV_INSERT = "INSERT INTO {table} (k, v, version) VALUES ($1, $2, 1)"  # create only
_UPSERT_RETURNING = (  # PostgreSQL, SQLite 3.35+
    KV_INSERT + " ON CONFLICT (k) DO UPDATE SET v = excluded.v, version = {table}.version + 1 "
    "RETURNING version"
)
KV_UPSERT = {  # a blind put: insert at version 1, or replace the value and bump the version
    "sqlite": _UPSERT_RETURNING,
    "postgres": _UPSERT_RETURNING,
    # MariaDB has no RETURNING with ON DUPLICATE KEY UPDATE. It reports 1 row changed for an
    # insert (version 1) and 2 for an update, whose new version LAST_INSERT_ID(expr) keeps
    # for this session, where no other connection can change it.
    "mariadb": KV_INSERT
    + " ON DUPLICATE KEY UPDATE v = VALUES(v), version = LAST_INSERT_ID(version + 1)",
}


@action(PACKAGE.REQUEST_KV_PUT, scopes=("kv.write",))
async def kv_put(request: KvPutRequest, ctx: Context) -> KvPutAnswer:
    """Store a value; with ``expected_version``, only if the stored version matches."""
    _check_key(request.key)
    if len(request.value) > MAX_VALUE_BYTES:
        raise InvalidArgument(f"value must be at most {MAX_VALUE_BYTES} bytes")
    key, value, expected = request.key, request.value, request.expected_version
    _check_version(expected)
    table = _kv_table()
    version = await database.retrying(lambda: _put(table, key, value, expected))
    return KvPutAnswer(version=version)


async def _put(table: str, key: str, value: bytes, expected: int | None) -> int:
    """One try of a put; the new version. Raises ``Conflict`` for a compare-and-set miss."""
    async with connect() as db:
        if expected is None:
            upsert = KV_UPSERT[db.backend].format(table=table)
            if db.backend != "mariadb":
                return int(await db.fetchval(upsert, key, value))
            if await db.execute(upsert, key, value) == 1:
                return 1
            return int(await db.fetchval("SELECT LAST_INSERT_ID()"))
        if expected == 0:
            try:
                await db.execute(KV_INSERT.format(table=table), key, value)
            except UniqueViolation:
                raise Conflict(
                    f"key {key!r} exists already", hint="expected_version=0 creates"
                ) from None
            return 1
        changed = await db.execute(
            f"UPDATE {table} SET v = $1, version = version + 1 WHERE k = $2 AND version = $3",
            value, key, expected,
        )  # fmt: skip
    if not changed:
        raise Conflict(f"key {key!r} is not at version {expected}")
    return expected + 1


@action(PACKAGE.REQUEST_KV_GET, scopes=("kv.read",))
async def kv_get(request: KvGetRequest, ctx: Context) -> KvGetAnswer:
    """The value and version stored under a key."""
    _check_key(request.key)
    async with connect() as db:
        row = await db.fetchrow(f"SELECT v, version FROM {_kv_table()} WHERE k = $1", request.key)
    if row is None:
        raise NotFound(f"no key {request.key!r}")
    return KvGetAnswer(value=bytes(row["v"]), version=int(row["version"]))


@action(PACKAGE.REQUEST_KV_DELETE, scopes=("kv.write",))
async def kv_delete(request: KvDeleteRequest, ctx: Context) -> KvDeleteAnswer:
    """Delete a key; with ``expected_version``, only at that version (else CONFLICT)."""
    _check_key(request.key)
    _check_version(request.expected_version)
    table, key, expected = _kv_table(), request.key, request.expected_version
    deleted = await database.retrying(lambda: _delete(table, key, expected))
    return KvDeleteAnswer(deleted=deleted)


async def _delete(table: str, key: str, expected: int | None) -> bool:
    """One try of a delete: whether a row went. Raises ``Conflict`` for a version miss."""
    async with connect() as db:
        if expected is None:
            return bool(await db.execute(f"DELETE FROM {table} WHERE k = $1", key))
        if await db.execute(f"DELETE FROM {table} WHERE k = $1 AND version = $2", key, expected):
            return True
        if await db.fetchval(f"SELECT 1 FROM {table} WHERE k = $1", key):
            raise Conflict(f"key {key!r} is not at version {expected}")
    return False


@action(PACKAGE.REQUEST_KV_LIST, scopes=("kv.read",))
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


@action(PACKAGE.REQUEST_DB_INFO, scopes=("kv.read",))
async def db_info(request: DbInfoRequest, ctx: Context) -> DbInfoAnswer:
    """Backend, server version, pool use, and whether the database answers right now."""
    return DbInfoAnswer(**await database.current_manager().info())


# ---- publish/subscribe -----------------------------------------------------------------------


def _broker(ctx: Context) -> Broker:
    if ctx.app.broker is None:
        raise Unavailable("this server has no broker", hint="set BROKER_URL")
    return ctx.app.broker


@action(PACKAGE.REQUEST_SUBSCRIBE)
async def subscribe(request: SubscribeRequest, ctx: Context) -> SubscribeAnswer:
    """Push the topic's messages to this connection: kept ones after ``since``, then live."""
    broker = _broker(ctx)
    limit = ctx.app.settings.max_subscriptions
    if len(ctx.subscriptions) >= limit:
        raise ResourceExhausted(
            f"this connection holds {limit} subscriptions (MAX_SUBSCRIPTIONS)",
            hint="unsubscribe first, or use one wildcard subscription",
        )
    if ctx.pushes is None:
        raise FailedPrecondition("this connection cannot take pushes")
    _require(ctx, f"subscribe:{request.topic}")
    subscription, position, complete = await broker.subscribe(
        ctx.pushes, request.topic, since=request.since, positions=dict(request.positions)
    )
    ctx.subscriptions[subscription.id] = subscription
    # Pushes start after this answer has left, so the client knows the id before any event.
    asyncio.get_running_loop().call_soon(broker.start_pushing, subscription)
    return SubscribeAnswer(
        subscription=subscription.id,
        position=position,
        complete=complete,
        positions=dict(subscription.positions),
    )


@action(PACKAGE.REQUEST_UNSUBSCRIBE)
async def unsubscribe(request: UnsubscribeRequest, ctx: Context) -> UnsubscribeAnswer:
    """End a subscription of this connection; no event of it follows the answer."""
    subscription = ctx.subscriptions.pop(request.subscription, None)
    if subscription is None:
        raise NotFound(f"this connection has no subscription {request.subscription}")
    await _broker(ctx).unsubscribe(subscription)
    return UnsubscribeAnswer()


@action(PACKAGE.REQUEST_PUBLISH)
async def publish(request: PublishRequest, ctx: Context) -> PublishAnswer:
    """Publish to a topic; answered once the broker stored the message."""
    _require(ctx, f"publish:{request.topic}")
    return PublishAnswer(offset=await _broker(ctx).publish(request.topic, request.data))


def _require(ctx: Context, scope: str) -> None:
    if ctx.principal is not None and not ctx.principal.allows(scope):
        raise PermissionDenied(f"{ctx.principal.name} lacks a scope for {scope!r}")


# ---- authentication --------------------------------------------------------------------------

MAX_FAILED_HELLOS = 5  # then the connection is closed


@action(PACKAGE.REQUEST_HELLO)
async def hello(request: HelloRequest, ctx: Context) -> HelloAnswer:
    """Authenticate the connection with a token (or its client certificate) and say who it is.

    A wrong token is answered more slowly each time, and the connection is closed after
    ``MAX_FAILED_HELLOS`` of them, so guessing is slow.
    """
    principals = ctx.app.principals
    if request.token and principals is not None and principals.is_enabled:
        principal = principals.for_token(request.token)
        if principal is None:
            failures = ctx.state["failed_hellos"] = ctx.state.get("failed_hellos", 0) + 1
            log.info("c%d HELLO with an unknown token (%d so far)", ctx.connection_id, failures)
            await asyncio.sleep(min(0.1 * 2 ** (failures - 1), 2.0))
            if failures >= MAX_FAILED_HELLOS and ctx.close is not None:
                asyncio.get_running_loop().call_soon(ctx.close, f"{failures} failed HELLOs")
            raise Unauthenticated("the token is not valid", hint="check the token you were given")
        ctx.principal = principal
    if ctx.principal is None:
        raise Unauthenticated("this server needs a token", hint="client.py --token (AUTH_TOKEN)")
    if request.client_name:
        ctx.state["client"] = f"{request.client_name} {request.client_version}".strip()
    return HelloAnswer(
        principal=ctx.principal.name,
        scopes=sorted(ctx.principal.scopes),
        server_version=__version__,
    )
