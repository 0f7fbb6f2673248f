"""Settings of the server and client: one frozen object, loaded once, validated.

Each value comes from, in rising precedence: the field's default, a ``.env`` file, the process
environment, then explicit overrides (command-line flags). The environment variable of a field is
its name in capitals (``port`` -> ``PORT``). A bad value stops start-up with one line that names
the variable, its source and what is expected. Settings built in code pass the same checks
(``validate``, called by ``__post_init__``), and choices match in any case.
"""

from __future__ import annotations

import dataclasses
import difflib
import io
import math
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

from dotenv import dotenv_values
from dotenv.parser import parse_stream

from protocol import (
    DEFAULT_COMPRESSION_LEVEL,
    DEFAULT_COMPRESSION_THRESHOLD,
    DEFAULT_MAX_FRAME_SIZE,
    Compression,
)

__all__ = [
    "DEFAULT_ENV_FILE",
    "ConfigError",
    "LogLevel",
    "Settings",
    "load",
    "load_settings",
    "misspelt_settings",
    "parse_upstreams",
    "setting",
    "validate",
]

BROKER_SCHEMES = ("memory", "nats", "redis", "rediss")
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
MIB = 1024 * 1024
MAX_WORKERS = 256  # processes; far above any CPU count this server would sensibly use
# The one settings file that may be missing: a bare machine runs on defaults. Any other file
# named (``--env-file``) must exist, or a typo would silently run on defaults.
DEFAULT_ENV_FILE: Final = ".env"


class ConfigError(Exception):
    """Raised when a setting is missing, malformed or out of range; the message is one line."""


def setting(
    default: Any,
    help: str,
    *,
    low: float | None = None,
    high: float | None = None,
    secret: bool = False,
) -> Any:
    """Declare one setting: its default, one line of help, its range and whether it is secret.

    ``low`` and ``high`` bound numbers (inclusive); a secret is kept out of ``repr``, summaries
    and error messages.
    """
    return field(
        default=default,
        repr=not secret,
        metadata={"help": help, "low": low, "high": high, "secret": secret},
    )


@dataclass(frozen=True, slots=True)
class Settings:
    """Server and client settings; see the README's configuration table."""

    host: str = setting("127.0.0.1", "Address the server listens on (clients connect to it).")
    port: int = setting(1145, "TCP port.", low=0, high=65535)
    log_level: LogLevel = setting("INFO", "DEBUG, INFO, WARNING or ERROR.")
    use_uvloop: bool = setting(True, "Run on uvloop when it is installed.")
    reuse_large_buffers: bool = setting(
        True, "Server: keep freed large buffers for reuse (glibc); faster large frames."
    )
    max_connections: int = setting(10_000, "Connections served at once; more are refused.", low=1)
    max_in_flight: int = setting(
        128, "Requests one connection may have running; beyond it the server stops reading.", low=1
    )
    max_frame_size: int = setting(
        DEFAULT_MAX_FRAME_SIZE,
        "Largest frame body in bytes, before and after decompression.",
        low=1024,
        high=1024 * MIB,
    )
    compression_threshold: int = setting(
        DEFAULT_COMPRESSION_THRESHOLD,
        "Bodies of at least this many bytes are zstd-compressed; 0 turns compression off.",
        low=0,
    )
    compression_level: int = setting(
        DEFAULT_COMPRESSION_LEVEL,
        "zstd level: 1 (fast) to 22 (small), or negative for faster.",
        low=-7,
        high=22,
    )
    request_timeout: float = setting(
        30.0, "Seconds a request may run when the client sets none.", low=0.001
    )
    max_request_timeout: float = setting(
        300.0, "Longest timeout a client may ask for, seconds.", low=0.001
    )
    idle_timeout: float = setting(
        300.0, "Close a connection idle this long, seconds; 0 = never.", low=0
    )
    frame_timeout: float = setting(
        30.0, "Seconds allowed to receive the rest of a started frame.", low=0.001
    )
    shutdown_timeout: float = setting(
        10.0, "Seconds in-flight requests get to finish at shutdown.", low=0
    )
    connect_timeout: float = setting(
        10.0, "Client: seconds to connect, TLS handshake included.", low=0.001
    )
    enable_tls: bool = setting(False, "Serve TLS only (never plain TCP) with the files below.")
    tls_cert_file: str = setting("", "Server certificate chain (PEM).")
    tls_key_file: str = setting("", "Server private key (PEM).")
    tls_key_password: str = setting("", "Password of the private key, if it has one.", secret=True)
    tls_client_ca_file: str = setting(
        "", "If set, clients must present a certificate from this CA."
    )
    tls_handshake_timeout: float = setting(10.0, "Seconds a TLS handshake may take.", low=0.001)
    tls_ca_file: str = setting("", "Client: CA file to verify the server; empty = system CAs.")
    tls_client_cert_file: str = setting(
        "", "Client: certificate chain (PEM) to present to servers that require one."
    )
    tls_client_key_file: str = setting(
        "", "Client: private key (PEM) of that certificate; empty = in the certificate file."
    )
    broker_url: str = setting(
        "memory://", "Publish/subscribe broker: memory://, nats://host:4222 or redis://host:6379."
    )
    history_size: int = setting(1000, "Messages each topic keeps for late subscribers.", low=0)
    history_ttl: float = setting(3600.0, "Seconds a topic keeps a message.", low=0.001)
    max_subscriptions: int = setting(100, "Subscriptions one connection may hold.", low=0)
    max_topic_length: int = setting(256, "Longest topic or pattern, characters.", low=1, high=65535)
    push_buffer_size: int = setting(
        1024 * 1024,
        "Bytes of pushes one connection may have unsent; beyond, it is caught up from history.",
        low=1024,
    )
    auth_tokens_file: str = setting(
        "", "Principals, scopes and token hashes, one per line (python server.py --new-token)."
    )
    auth_tokens: str = setting(
        "", "Principals as in AUTH_TOKENS_FILE, lines separated by ';'.", secret=True
    )
    auth_timeout: float = setting(
        10.0, "Seconds a connection may stay unauthenticated when tokens are required.", low=0.001
    )
    auth_token: str = setting("", "Client: the token it sends in its HELLO.", secret=True)
    allow_open: bool = setting(
        False, "Serve a non-loopback address without authentication (anyone may call)."
    )
    max_connections_per_ip: int = setting(
        256, "Connections one client address may hold; 0 = no limit.", low=0
    )
    rate_limit: float = setting(
        20_000.0, "Requests per second one connection may send; 0 = no limit.", low=0
    )
    rate_burst: int = setting(
        100, "Requests a connection may send at once above RATE_LIMIT's pace.", low=1
    )
    upstreams: str = setting(
        "", "Other pyasync servers actions call: name=host:port,host:port;name2=host:port."
    )
    workers: str = setting(
        "1", "Server processes sharing the port: a number, or auto for one per CPU."
    )
    drain_idle_timeout: float = setting(
        1.0,
        "Workers stopping: close a connection this long after its last request, seconds.",
        low=0,
    )
    node_id: str = setting(
        "", "This server's name in SERVER_INFO; empty = hostname:port (workers add /w<k>)."
    )

    def __post_init__(self) -> None:
        validate(self)  # types, ranges and choices, as for values read by ``load()``
        _normalise_workers(self)
        if self.enable_tls and not (self.tls_cert_file and self.tls_key_file):
            raise ConfigError(
                "ENABLE_TLS=true needs TLS_CERT_FILE and TLS_KEY_FILE "
                "(make a pair with: python server.py --make-cert certs)"
            )
        if self.max_request_timeout < self.request_timeout:
            raise ConfigError(
                f"MAX_REQUEST_TIMEOUT ({self.max_request_timeout}) must not be below "
                f"REQUEST_TIMEOUT ({self.request_timeout})"
            )
        parse_upstreams(self.upstreams)  # raises ConfigError naming the bad part
        scheme = self.broker_url.partition("://")[0].lower()
        if scheme not in BROKER_SCHEMES or "://" not in self.broker_url:
            raise ConfigError(
                "BROKER_URL must be memory://, nats://HOST:PORT or redis://HOST:PORT, "
                f"got {self.broker_url!r}"
            )

    @property
    def compression(self) -> Compression:
        """The body compression policy these settings describe."""
        return Compression(threshold=self.compression_threshold, level=self.compression_level)

    def summary(self) -> dict[str, Any]:
        """Every setting except secrets, for ``SERVER_INFO`` and logs."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if not f.metadata.get("secret")
        }


def _normalise_workers(settings: Settings) -> None:
    """Check WORKERS (``auto`` or 1 to ``MAX_WORKERS``) and store it as ``auto`` or digits."""
    text = settings.workers.strip().lower()
    if text != "auto":
        count = int(text) if text.isdigit() else 0
        if not 1 <= count <= MAX_WORKERS:
            raise ConfigError(
                f"WORKERS must be auto or a whole number from 1 to {MAX_WORKERS}, "
                f"got {settings.workers!r}"
            )
        text = str(count)
    object.__setattr__(settings, "workers", text)


SettingsT = TypeVar("SettingsT")


def parse_upstreams(text: str) -> dict[str, list[tuple[str, int]]]:
    """``UPSTREAMS`` as {name: [(host, port), ...]}.

    Raises:
        ConfigError: a part is not ``name=host:port[,host:port...]``.
    """
    upstreams: dict[str, list[tuple[str, int]]] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, _, endpoints = part.partition("=")
        addresses: list[tuple[str, int]] = []
        for endpoint in filter(None, (e.strip() for e in endpoints.split(","))):
            host, _, port = endpoint.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                addresses = []
                break
            addresses.append((host.strip("[]"), int(port)))
        if not name.strip() or not addresses:
            raise ConfigError(
                f"UPSTREAMS must be name=host:port[,host:port...] separated by ';', got {part!r}"
            )
        upstreams[name.strip()] = addresses
    return upstreams


def load_settings(
    cls: type[SettingsT],
    *,
    env_file: str | Path | None = DEFAULT_ENV_FILE,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> SettingsT:
    """Build a settings dataclass from defaults < ``env_file`` < ``environ`` < ``overrides``.

    Args:
        cls: a frozen dataclass whose fields were declared with ``setting``.
        env_file: a ``.env`` file to read; it must exist unless it is ``DEFAULT_ENV_FILE``
            (which may be absent). None to read none.
        environ: the environment; ``os.environ`` when None.
        overrides: typed values by field name (e.g. from command-line flags), None ones ignored.

    Raises:
        ConfigError: a value does not parse or is out of range, or ``env_file`` is missing or
            unreadable; the message is one line and names the variable or the file.
    """
    environ = os.environ if environ is None else environ
    from_file = _read_env_file(env_file)
    values: dict[str, Any] = {}
    for f, kind in _fields(cls):
        name = f.name.upper()
        if overrides is not None and overrides.get(f.name) is not None:
            raw, source = overrides[f.name], "command line"
        elif name in environ:
            raw, source = environ[name], "environment"
        elif from_file.get(name) is not None:
            raw, source = from_file[name], f"{env_file}"
        else:
            continue
        value = _parse(name, raw, source, kind, f.metadata)
        values[f.name] = _check(name, value, raw, source, kind, f.metadata)
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from None


def validate(settings: Any) -> None:
    """Check every field of a settings dataclass and normalise it in place.

    The one validator of both ways to make settings: ``__post_init__`` calls it, so values set
    in code meet the same types, ranges and choices as those ``load_settings`` read. Choices
    (``Literal`` fields) match in any case and are stored as declared; whole numbers are
    accepted for float fields and stored as floats.

    Raises:
        ConfigError: a field has the wrong type, is out of range or is no known choice; one line
            naming the variable.
    """
    cls = type(settings)
    for f, kind in _fields(cls):
        value = getattr(settings, f.name)
        checked = _check(
            f.name.upper(), value, value, f"{cls.__name__}({f.name}=...)", kind, f.metadata
        )
        if checked is not value:
            object.__setattr__(settings, f.name, checked)


def load(
    *,
    env_file: str | Path | None = DEFAULT_ENV_FILE,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Load and validate the server/client ``Settings`` (see ``load_settings``)."""
    return load_settings(Settings, env_file=env_file, environ=environ, overrides=overrides)


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


FieldSpec = tuple[dataclasses.Field[Any], Any]  # a field and its resolved type
_FIELD_SPECS: dict[type[Any], tuple[FieldSpec, ...]] = {}


def _fields(cls: type[Any]) -> tuple[FieldSpec, ...]:
    """(field, resolved type) of each field of a settings dataclass, resolved once per class."""
    specs = _FIELD_SPECS.get(cls)
    if specs is None:
        hints = typing.get_type_hints(cls)
        specs = _FIELD_SPECS[cls] = tuple((f, hints[f.name]) for f in dataclasses.fields(cls))
    return specs


def _read_env_file(env_file: str | Path | None) -> Mapping[str, str | None]:
    """The variables of ``env_file``; {} for None, os.devnull or a missing ``DEFAULT_ENV_FILE``."""
    if env_file is None or str(env_file) == os.devnull:  # --env-file /dev/null: read none
        return {}
    path = Path(env_file)
    if not path.exists():
        if path == Path(DEFAULT_ENV_FILE):
            return {}
        raise ConfigError(f"settings file {str(env_file)!r} does not exist")
    if not path.is_file():
        raise ConfigError(f"settings file {str(env_file)!r} is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"cannot read settings file {str(env_file)!r}: {reason}") from None
    for binding in parse_stream(io.StringIO(text)):  # python-dotenv only warns, and goes on
        if binding.error:
            line = binding.original.string.strip()[:40]
            raise ConfigError(
                f"settings file {str(env_file)!r} line {binding.original.line}: cannot parse "
                f"{line!r}; write NAME=value"
            )
    return dotenv_values(stream=io.StringIO(text))


def misspelt_settings(env_file: str | Path | None, *classes: type[Any]) -> list[str]:
    """One line for each name in ``env_file`` that is no setting of ``classes`` but looks like
    one (another case, a typo): such a line is ignored, which is rarely what its author meant.

    Other names are left alone: the file may hold variables of the project's own actions.
    """
    from_file = _read_env_file(env_file)
    known = [f.name.upper() for cls in classes for f, _ in _fields(cls)]
    lines = []
    for name in from_file:
        if name in known:
            continue
        close = difflib.get_close_matches(name.upper(), known, n=1, cutoff=0.85)
        if close:
            lines.append(
                f"settings file {str(env_file)!r}: {name} is no setting and is ignored; "
                f"did you mean {close[0]}?"
            )
    return lines


def _fail(name: str, expected: str, raw: Any, source: str, meta: Mapping[str, Any]) -> ConfigError:
    shown = "<hidden>" if meta.get("secret") else repr(raw)
    return ConfigError(f"{name} must be {expected}, got {shown} (from {source})")


def _parse(name: str, raw: Any, source: str, kind: Any, meta: Mapping[str, Any]) -> Any:
    """Turn text from a file or the environment into the field's type; other values pass."""
    if not isinstance(raw, str):
        return raw
    text = raw.strip()
    if kind is bool:
        word = text.lower()
        if word not in _TRUE | _FALSE:
            raise _fail(name, "true or false", raw, source, meta)
        return word in _TRUE
    if kind is int:
        try:
            return int(text.replace("_", ""))
        except ValueError:
            raise _fail(name, "a whole number", raw, source, meta) from None
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise _fail(name, "a number", raw, source, meta) from None
    return text


def _check(name: str, value: Any, raw: Any, source: str, kind: Any, meta: Mapping[str, Any]) -> Any:
    """``value`` if it has the field's type, choice and range (normalised), else ConfigError.

    ``raw`` is what the message shows as received (the text before parsing).
    """
    if typing.get_origin(kind) is Literal:
        choices: tuple[str, ...] = typing.get_args(kind)
        by_name = {choice.casefold(): choice for choice in choices}
        choice = by_name.get(value.strip().casefold()) if isinstance(value, str) else None
        if choice is None:
            raise _fail(name, "one of " + ", ".join(choices), raw, source, meta)
        return choice
    if kind is bool:
        if not isinstance(value, bool):
            raise _fail(name, "true or false", raw, source, meta)
    elif kind is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise _fail(name, "a whole number", raw, source, meta)
    elif kind is float:
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise _fail(name, "a number", raw, source, meta)
        if not math.isfinite(value):
            raise _fail(name, "a finite number", raw, source, meta)
        value = float(value)
    elif kind is str:
        if not isinstance(value, str):
            raise _fail(name, "text", raw, source, meta)
    low, high = meta.get("low"), meta.get("high")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"at least {low}" if high is None else f"from {low} to {high}"
        raise _fail(name, bounds, raw, source, meta)
    return value
