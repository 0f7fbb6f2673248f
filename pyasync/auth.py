"""Who is calling, and what they may do: principals, tokens (stored as hashes) and scopes.

Principals come from ``AUTH_TOKENS_FILE`` and/or ``AUTH_TOKENS``, one per line (``;`` separates
lines in the setting)::

    # name      scopes                                 token hash (optional)
    alice       kv.read,kv.write,publish:chat.>        sha256:9f86d081884c7d65...
    sensor-7    publish:devices.7.>

A principal without a hash can only be authenticated by a client certificate whose name (see
``pyasync.tls``) is its name. ``python server.py --new-token NAME SCOPES`` makes a token and
prints its line. A token is compared by its SHA-256 hash in constant time and never logged.

Scopes: ``*`` allows everything; ``kv.read``, ``kv.write`` and ``server.info`` guard built-in
actions; ``publish:PATTERN`` and ``subscribe:PATTERN`` allow the topics a pattern covers.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from pathlib import Path

from config import ConfigError, Settings
from context import Context
from package import PACKAGE, Body, PermissionDenied, Unauthenticated
from pyasync.router import Interceptor, Router

__all__ = [
    "ANONYMOUS",
    "AuthInterceptor",
    "Principal",
    "Principals",
    "hash_token",
    "new_token_line",
    "pattern_covers",
]

HASH_PREFIX = "sha256:"
# Requests a connection may send before it has authenticated.
BEFORE_AUTHENTICATION = frozenset({PACKAGE.REQUEST_HELLO, PACKAGE.REQUEST_PING})


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller (``ctx.principal``): a name and the scopes granted to it."""

    name: str
    scopes: frozenset[str]
    via: str = "token"  # "token", "certificate" or "open" (no authentication configured)

    def allows(self, scope: str) -> bool:
        """True when ``scope`` is granted (``publish:a.b`` is granted by ``publish:a.>``)."""
        if "*" in self.scopes or scope in self.scopes:
            return True
        kind, _, topic = scope.partition(":")
        if not topic:
            return False
        prefix = kind + ":"
        return any(
            granted.startswith(prefix) and pattern_covers(granted[len(prefix) :], topic)
            for granted in self.scopes
        )


ANONYMOUS = Principal("anonymous", frozenset({"*"}), "open")  # a server with no authentication


def pattern_covers(granted: str, requested: str) -> bool:
    """True when every topic ``requested`` (a topic or pattern) matches is one ``granted`` does."""
    have, want = granted.split("."), requested.split(".")
    for index, token in enumerate(have):
        if token == ">":
            return len(want) > index
        if index >= len(want):
            return False
        if token == "*":
            if want[index] == ">":
                return False
            continue
        if token != want[index]:
            return False
    return len(want) == len(have)


def hash_token(token: str) -> str:
    return HASH_PREFIX + hashlib.sha256(token.encode()).hexdigest()


def new_token_line(name: str, scopes: str) -> tuple[str, str]:
    """A new random token for ``name`` and the principals-file line that grants ``scopes``."""
    token = secrets.token_urlsafe(32)
    return token, f"{name} {scopes or '-'} {hash_token(token)}"


class Principals:
    """The principals a server knows, by token hash and by name.

    Raises (on construction):
        ConfigError: a line of the file or setting is malformed, or the file cannot be read.
    """

    def __init__(self, settings: Settings) -> None:
        lines = settings.auth_tokens.split(";")
        if settings.auth_tokens_file:
            try:
                lines += Path(settings.auth_tokens_file).read_text().splitlines()
            except OSError as exc:
                raise ConfigError(
                    f"AUTH_TOKENS_FILE {settings.auth_tokens_file!r} cannot be read: "
                    f"{exc.strerror or exc}"
                ) from None
        self.by_hash: dict[str, Principal] = {}
        self.by_name: dict[str, Principal] = {}
        for number, line in enumerate(lines, 1):
            self._add(line, number)
        self.certificates_name_principals = bool(settings.tls_client_ca_file)

    @property
    def is_enabled(self) -> bool:
        """Authentication is required: tokens are configured, or client certificates are."""
        return bool(self.by_name) or self.certificates_name_principals

    def _add(self, line: str, number: int) -> None:
        fields = line.split("#", 1)[0].split()
        if not fields:
            return
        if len(fields) not in (2, 3) or (
            len(fields) == 3 and not fields[2].startswith(HASH_PREFIX)
        ):
            raise ConfigError(
                f"principal line {number} must be 'NAME SCOPES [sha256:HASH]', got {line.strip()!r}"
            )
        scopes = frozenset(s for s in fields[1].split(",") if s and s != "-")
        principal = Principal(fields[0], scopes)
        self.by_name[principal.name] = principal
        if len(fields) == 3:
            self.by_hash[fields[2].lower()] = principal

    def for_token(self, token: str) -> Principal | None:
        """The principal whose token this is: its hash is compared with every stored one, in
        constant time and without stopping at a match, so timing tells nothing."""
        candidate = hash_token(token).encode()
        found = None
        for stored, principal in self.by_hash.items():
            if hmac.compare_digest(stored.encode(), candidate):
                found = principal
        return found

    def for_certificate(self, name: str | None) -> Principal | None:
        """The principal a verified client certificate names (TLS_CLIENT_CA_FILE set)."""
        if name is None or not self.certificates_name_principals:
            return None
        known = self.by_name.get(name)
        return Principal(name, known.scopes if known else frozenset(), "certificate")


class AuthInterceptor(Interceptor):
    """Refuses every request but HELLO and PING before authentication, and any request whose
    action declares a scope the principal lacks."""

    def __init__(self, router: Router) -> None:
        self.routes = router.routes

    def before(self, kind: PACKAGE, request: Body, ctx: Context) -> None:
        principal = ctx.principal
        if principal is None:
            if kind in BEFORE_AUTHENTICATION:
                return
            raise Unauthenticated(
                f"{kind.name} needs an authenticated connection",
                hint="send REQUEST_HELLO with a token first (client.py --token)",
            )
        route = self.routes.get(kind)
        for scope in route.scopes if route is not None else ():
            if not principal.allows(scope):
                raise PermissionDenied(
                    f"{principal.name} lacks the scope {scope!r} for {kind.name}"
                )
