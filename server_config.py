"""Database settings, loaded and validated like ``config.Settings``."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, unquote, urlsplit

from config import DEFAULT_ENV_FILE, ConfigError, load_settings, setting, validate

__all__ = ["DatabaseBackend", "DatabaseSettings", "load"]

DatabaseBackend = Literal["SQLITE", "MARIADB", "POSTGRES", "NONE"]
DEFAULT_PORTS = {"MARIADB": 3306, "POSTGRES": 5432}
URL_SCHEMES = {"postgresql": "POSTGRES", "postgres": "POSTGRES", "mysql": "MARIADB",
               "mariadb": "MARIADB", "sqlite": "SQLITE"}  # fmt: skip
TABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


@dataclass(frozen=True, slots=True)
class DatabaseSettings:
    """Which database the database actions use, how to reach it, and its pool."""

    db_backend: DatabaseBackend = setting("SQLITE", "sqlite, mariadb, postgres or none.")
    db_url: str = setting(
        "", "postgresql://user:pw@host:port/db or mysql://...; overrides the DB_* parts below.",
        secret=True,
    )  # fmt: skip
    db_host: str = setting("127.0.0.1", "MariaDB/PostgreSQL host.")
    db_port: int = setting(0, "Port; 0 = the backend's usual (3306, 5432).", low=0, high=65535)
    db_user: str = setting("", "User; empty = root (MariaDB) or postgres (PostgreSQL).")
    db_password: str = setting("", "Password.", secret=True)
    db_name: str = setting("test", "Database name.")
    db_pool_min_size: int = setting(1, "Connections the pool keeps open.", low=0)
    db_pool_max_size: int = setting(10, "Most connections the pool opens.", low=1)
    db_connect_timeout: float = setting(5.0, "Seconds to open a connection.", low=0.001)
    db_query_timeout: float = setting(10.0, "Seconds a query may take (default).", low=0.001)
    sqlite_path: str = setting("pyasync.sqlite3", "SQLite file (DB_BACKEND=sqlite).")
    kv_table: str = setting("pyasync_kv", "Table of the built-in key-value actions.")

    def __post_init__(self) -> None:
        validate(self)  # types, ranges and choices, as for values read by ``load()``
        if self.db_pool_min_size > self.db_pool_max_size:
            raise ConfigError("DB_POOL_MIN_SIZE must not be above DB_POOL_MAX_SIZE")
        if not TABLE_NAME.fullmatch(self.kv_table):
            raise ConfigError(f"KV_TABLE must be a plain SQL name, got {self.kv_table!r}")
        if self.db_url:
            scheme = urlsplit(self.db_url).scheme
            if scheme not in URL_SCHEMES:
                raise ConfigError(
                    f"DB_URL must start with postgresql://, mysql:// or sqlite://, got {scheme!r}"
                )
            object.__setattr__(self, "db_backend", URL_SCHEMES[scheme])

    @property
    def address(self) -> dict[str, Any]:
        """host, port, user, password, database: from DB_URL when set, else the DB_* parts."""
        backend = self.db_backend
        parts = {
            "host": self.db_host,
            "port": self.db_port or DEFAULT_PORTS.get(backend, 0),
            "user": self.db_user or ("root" if backend == "MARIADB" else "postgres"),
            "password": self.db_password,
            "database": self.db_name,
        }
        if self.db_url and backend != "SQLITE":
            url = urlsplit(self.db_url)
            parts.update(
                host=url.hostname or parts["host"],
                port=url.port or parts["port"],
                user=unquote(url.username) if url.username else parts["user"],
                password=unquote(url.password) if url.password else parts["password"],
                database=url.path.lstrip("/") or parts["database"],
            )
        return parts

    @property
    def sqlite_file(self) -> str:
        if self.db_url and self.db_backend == "SQLITE":
            return unquote(urlsplit(self.db_url).path) or self.sqlite_path
        return self.sqlite_path

    def describe(self) -> str:
        """Where the database is, without secrets, for logs and DB_INFO."""
        if self.db_backend == "SQLITE":
            return f"sqlite {self.sqlite_file}"
        a = self.address
        return (
            f"{self.db_backend.lower()} {quote(a['user'])}@{a['host']}:{a['port']}/{a['database']}"
        )

    def summary(self) -> dict[str, Any]:
        """Every setting except secrets."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if not f.metadata.get("secret")
        }


def load(
    *,
    env_file: str | Path | None = DEFAULT_ENV_FILE,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> DatabaseSettings:
    """Load and validate the ``DatabaseSettings`` (see ``config.load_settings``)."""
    return load_settings(DatabaseSettings, env_file=env_file, environ=environ, overrides=overrides)
