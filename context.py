"""What an action can see: the running server (``App``) and its own connection (``Context``).

Plain data, no sockets: ``server.py`` fills these in, actions and hooks read them, and tests
build them by hand.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from config import Settings
from server_config import DatabaseSettings

__all__ = ["App", "Context", "ServerStats", "TLSInfo"]


@dataclass(slots=True)
class ServerStats:
    """Counters the server keeps current; ``SERVER_INFO`` reports them."""

    started_at: float = field(default_factory=time.monotonic)
    open_connections: int = 0
    requests_served: int = 0

    @property
    def uptime_s(self) -> float:
        return time.monotonic() - self.started_at


@dataclass(slots=True, eq=False)
class App:
    """One per running server, shared by every connection.

    Attributes:
        settings: the validated configuration the server was started with.
        db_settings: the database part of it (``server_config.py``).
        stats: live counters.
        state: resources that start-up hooks create for actions (a database pool, a cache).
    """

    settings: Settings
    db_settings: DatabaseSettings = field(default_factory=DatabaseSettings)
    stats: ServerStats = field(default_factory=ServerStats)
    state: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TLSInfo:
    """The negotiated TLS session of a connection."""

    version: str | None
    cipher: str | None
    peer_certificate: dict[str, Any] | None  # only when clients must present one


@dataclass(slots=True, eq=False)
class Context:
    """One per connection, passed to every action that connection runs.

    Attributes:
        app: the server-wide ``App``.
        connection_id: a number unique within this server process, as used in its log lines.
        peer: the client's address as the socket reports it.
        tls: the TLS session, or None over plain TCP.
        state: free for actions and hooks to keep per-connection data in; dropped on close.
    """

    app: App
    connection_id: int
    peer: Any = None
    tls: TLSInfo | None = None
    state: dict[str, Any] = field(default_factory=dict)
