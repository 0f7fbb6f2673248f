"""What an action can see: the running server (``App``) and its own connection (``Context``).

Plain data, no sockets: ``server.py`` fills these in, actions and hooks read them, and tests
build them by hand.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from config import Settings
from pyasync.tls import principal_from_certificate
from server_config import DatabaseSettings

if TYPE_CHECKING:
    from broker import Broker, PushTarget, Subscription
    from database import DatabaseManager
    from pyasync.auth import Principal, Principals
    from upstream import Upstreams

__all__ = [
    "REQUEST_DEADLINE",
    "App",
    "Context",
    "ServerStats",
    "TLSInfo",
    "current_app",
    "set_current_app",
]


@dataclass(slots=True)
class ServerStats:
    """Counters the server keeps current; ``SERVER_INFO`` reports them."""

    started_at: float = field(default_factory=time.monotonic)
    requests_served: int = 0
    tls_handshake_failures: int = 0  # handshakes that failed or timed out; each is logged

    @property
    def uptime_s(self) -> float:
        return time.monotonic() - self.started_at


@dataclass(slots=True, eq=False)
class App:
    """One per running server, shared by every connection; the one owner of server-wide state.

    Attributes:
        settings: the validated configuration the server was started with.
        db_settings: the database part of it (``server_config.py``).
        stats: live counters.
        connections: the open connections (their count is ``len(connections)``).
        database: the database manager, or None with ``DB_BACKEND=none``; ``connect()`` uses it.
        broker: the publish/subscribe broker (``BROKER_URL``); ``broker.publish()`` uses it.
        upstreams: the other servers actions call (``UPSTREAMS``); ``upstream()`` uses them.
        principals: who may authenticate, and with which scopes (``AUTH_TOKENS_FILE``).
        state: resources that start-up hooks create for actions (a cache, a client).
    """

    settings: Settings
    db_settings: DatabaseSettings = field(default_factory=DatabaseSettings)
    stats: ServerStats = field(default_factory=ServerStats)
    connections: set[Any] = field(default_factory=set)
    database: DatabaseManager | None = None
    broker: Broker | None = None
    upstreams: Upstreams | None = None
    principals: Principals | None = None
    state: dict[str, Any] = field(default_factory=dict)


_current_app: ContextVar[App] = ContextVar("pyasync_current_app")

# The event-loop time by which the request being served must be answered (None outside one):
# the server sets it for each request that runs as a task; calls to upstreams stay within it.
REQUEST_DEADLINE: ContextVar[float | None] = ContextVar("pyasync_request_deadline", default=None)


def current_app() -> App:
    """The ``App`` of the server this code runs under (actions, hooks and their tasks).

    Raises:
        LookupError: no server was started in this context.
    """
    return _current_app.get()


def set_current_app(app: App) -> None:
    """Make ``app`` the one ``current_app()`` returns here and in every task started from here.

    The server calls this as it starts: connections, their requests and hooks then inherit it,
    so two servers in one process each see their own.
    """
    _current_app.set(app)


@dataclass(frozen=True, slots=True)
class TLSInfo:
    """The negotiated TLS session of a connection.

    Attributes:
        version: the TLS version, e.g. ``TLSv1.3``.
        cipher: the cipher suite's name.
        peer_certificate: the client's certificate as ``getpeercert()`` gives it, once verified
            against ``TLS_CLIENT_CA_FILE``; None when clients present none.
        principal: the name that certificate gives its holder (see
            ``pyasync.tls.principal_from_certificate``: the first URI, DNS name or email of its
            subject alternative names, else its common name); taken from ``peer_certificate``
            when not given. None without a client certificate.
    """

    version: str | None
    cipher: str | None
    peer_certificate: dict[str, Any] | None  # only when clients must present one
    principal: str | None = None  # the name a verified client certificate gives

    def __post_init__(self) -> None:
        if self.principal is None and self.peer_certificate:
            object.__setattr__(self, "principal", principal_from_certificate(self.peer_certificate))


@dataclass(slots=True, eq=False)
class Context:
    """One per connection, passed to every action that connection runs.

    Attributes:
        app: the server-wide ``App``.
        connection_id: a number unique within this server process, as used in its log lines.
        peer: the client's address as the socket reports it.
        tls: the TLS session, or None over plain TCP.
        state: free for actions and hooks to keep per-connection data in; dropped on close.
        pushes: where the broker pushes this connection's events (the server's connection).
        subscriptions: this connection's subscriptions by id; ended when it closes.
        principal: who is calling: None until authenticated (only HELLO and PING are served
            then); everyone is ``anonymous`` with every scope when authentication is off.
        close: ends the connection (after what is already written), giving a reason to log.
    """

    app: App
    connection_id: int
    peer: Any = None
    tls: TLSInfo | None = None
    state: dict[str, Any] = field(default_factory=dict)
    pushes: PushTarget | None = None
    subscriptions: dict[int, Subscription] = field(default_factory=dict)
    principal: Principal | None = None
    close: Callable[[str], None] | None = None
