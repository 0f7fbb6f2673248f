"""Helpers for programs: run an async main cleanly, build a client TLS context, set up logging."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import ssl
import sys
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn

from config import ConfigError
from protocol import ProtocolError
from pyasync.client_protocol import TLSMismatch
from pyasync.tls import describe_tls_error, note_client_certificate

__all__ = [
    "EXIT_CONFIG",
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_PROTOCOL",
    "EXIT_TEMPFAIL",
    "EXIT_UNAVAILABLE",
    "describe_error",
    "handle_run_main",
    "new_event_loop_factory",
    "resolve_client_ssl_context",
    "setup_logging",
]

# Exit codes from BSD sysexits.h, so scripts can tell "try later" from "fix your setup".
EXIT_ERROR = 1
EXIT_UNAVAILABLE = 69  # EX_UNAVAILABLE: server not reachable
EXIT_TEMPFAIL = 75  # EX_TEMPFAIL: timed out, try again
EXIT_PROTOCOL = 76  # EX_PROTOCOL: TLS or framing mismatch
EXIT_CONFIG = 78  # EX_CONFIG: bad configuration
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: str = "INFO") -> None:
    """Log one line per event to stderr at ``level``."""
    logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stderr, force=True)


def new_event_loop_factory(use_uvloop: bool = True) -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop's loop when it is installed and wanted, else asyncio's default loop."""
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.new_event_loop
    return asyncio.new_event_loop


def describe_error(exc: BaseException) -> tuple[str, int]:
    """One line for a person (what failed, what to do) and the exit code, for ``exc``.

    Every exit code of the project's programs is decided here, by the exception's type.
    """
    if isinstance(exc, KeyboardInterrupt | asyncio.CancelledError):
        return "interrupted", EXIT_INTERRUPTED
    if isinstance(exc, ssl.SSLError):
        return describe_tls_error(exc), EXIT_PROTOCOL
    if isinstance(exc, TLSMismatch):
        return str(exc), EXIT_PROTOCOL
    if isinstance(exc, ConnectionRefusedError):
        return f"{_os_message(exc)}: is the server running?", EXIT_UNAVAILABLE
    if isinstance(exc, TimeoutError):
        return f"timed out: {exc}" if str(exc) else "timed out", EXIT_TEMPFAIL
    if isinstance(exc, OSError):
        return _os_message(exc), EXIT_UNAVAILABLE
    if isinstance(exc, ConfigError):
        return str(exc), EXIT_CONFIG
    if isinstance(exc, ProtocolError):
        return str(exc), EXIT_PROTOCOL
    return str(exc) or type(exc).__name__, EXIT_ERROR


def _os_message(exc: OSError) -> str:
    return exc.strerror or str(exc)


def reuse_large_buffers(size: int) -> bool:
    """Have glibc serve allocations up to ``size`` bytes from its heap and keep freed memory.

    By default glibc maps each allocation above 128 KiB afresh and unmaps it when freed, so
    every large frame pays a page fault per 4 KiB touched, which costs more than copying the
    frame. The price: memory freed after a burst of large frames stays with the process.
    Returns False (and changes nothing) where the C library is not glibc.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    largest = min(size, 32 * 1024 * 1024)  # glibc's ceiling for the mmap threshold (64-bit)
    return bool(mallopt(m_mmap_threshold, largest)) and bool(mallopt(m_trim_threshold, 4 * largest))


def handle_run_main(
    main: Callable[[], Coroutine[Any, Any, int | None]], *, use_uvloop: bool = True
) -> NoReturn:
    """Run ``main()`` on a fresh event loop and exit with its return code.

    Ctrl-C, refused or reset connections, timeouts, TLS mismatches and errors of this project
    end the program with one line on stderr and a sysexits-style code instead of a traceback.
    Set ``LOG_LEVEL=DEBUG`` in the environment to see the traceback as well.
    """
    try:
        with asyncio.Runner(loop_factory=new_event_loop_factory(use_uvloop)) as runner:
            code = runner.run(main())
    except (Exception, KeyboardInterrupt) as exc:
        message, code = describe_error(exc)
        if os.environ.get("LOG_LEVEL", "").upper() == "DEBUG":
            logging.getLogger("pyasync").exception("main failed")
        print(f"error: {message}", file=sys.stderr)
    sys.exit(code or 0)


def resolve_client_ssl_context(
    *,
    tls: bool = False,
    cafile: str | None = None,
    certfile: str | None = None,
    keyfile: str | None = None,
    check_hostname: bool = True,
) -> ssl.SSLContext | None:
    """The client's TLS context, or None for plain TCP.

    Args:
        tls: use TLS; implied when ``cafile`` or ``certfile`` is given.
        cafile: CA bundle that signed the server's certificate; the system's CAs when None.
        certfile: client certificate chain (PEM), for servers that require one.
        keyfile: its private key, unencrypted PEM (defaults to ``certfile``).
        check_hostname: verify the certificate names the host connected to.

    Raises:
        ConfigError: a file cannot be read or is not what it should be; one line naming it.
    """
    if not (tls or cafile or certfile):
        return None
    for what, path in (("CA file", cafile), ("client certificate", certfile),
                       ("client key", keyfile)):  # fmt: skip
        if path:
            _check_readable(what, path)
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile or None)
    except ssl.SSLError as exc:
        raise ConfigError(
            f"CA file {cafile!r} (--cafile, TLS_CA_FILE) holds no PEM certificate "
            f"({exc.reason or exc})"
        ) from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = check_hostname
    if certfile:
        try:
            # An encrypted key would make OpenSSL prompt on the terminal; refuse it instead.
            context.load_cert_chain(certfile, keyfile or None, password=lambda: b"")
        except ssl.SSLError as exc:
            raise ConfigError(
                f"client certificate {certfile!r} and key {keyfile or certfile!r} (--cert/--key, "
                "TLS_CLIENT_CERT_FILE/TLS_CLIENT_KEY_FILE) are not a matching PEM certificate "
                f"and unencrypted key ({exc.reason or exc})"
            ) from None
    note_client_certificate(context, presents=bool(certfile))
    return context


def _check_readable(what: str, path: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ConfigError(f"{what} {path!r} cannot be read: {exc.strerror or exc}") from None
