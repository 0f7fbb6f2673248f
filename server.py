"""The pyasync-server: listens, owns connections and their tasks, enforces limits, shuts down.

Run it with ``python server.py``; embed it with ``async with serve(settings) as server:``.
``python server.py --workers N`` runs ``pyasync.supervisor`` instead, which starts N copies of
this program on one listening socket they inherit (``--listen-fd``); such a worker retires
(``Server.retire``) rather than shutting down at once, so that the others take over its share.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import itertools
import logging
import signal
import socket
import ssl
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import actions  # noqa: F401  # registers the built-in and the user's actions and hooks
import config
import server_config
from broker import Broker, BrokerSettings
from config import ConfigError, Settings
from context import App, set_current_app
from database import DatabaseManager
from pyasync import supervisor
from pyasync.connection import Connection, address_of
from pyasync.router import ROUTER, AppHook, Router
from pyasync.tls import build_server_ssl_context, make_self_signed_cert, openssl_command
from server_config import DatabaseSettings
from utils import (
    EXIT_CONFIG,
    LOG_FORMAT,
    describe_error,
    handle_run_main,
    reuse_large_buffers,
    setup_logging,
)

__all__ = ["Server", "main", "serve"]

log = logging.getLogger("pyasync.server")


class Server:
    """A pyasync-server: ``await start()``, serve, ``await shutdown()`` (or use ``serve()``).

    Args:
        settings: validated settings; ``config.load()`` when None.
        db_settings: database settings; ``server_config.load()`` when None.
        ssl_context: the TLS context; built from the settings when None and TLS is enabled.
        router: the actions, hooks and interceptors to serve; those of ``actions.py`` by default.
        startup_hooks / shutdown_hooks: run with the ``App`` around the listening period,
            after the router's hooks.
        sock: a listening socket to accept on instead of binding HOST and PORT (a worker's,
            shared with its siblings); the server then retires instead of shutting down.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        db_settings: DatabaseSettings | None = None,
        ssl_context: ssl.SSLContext | None = None,
        router: Router = ROUTER,
        startup_hooks: Sequence[AppHook] = (),
        shutdown_hooks: Sequence[AppHook] = (),
        sock: socket.socket | None = None,
    ) -> None:
        self.settings = settings if settings is not None else config.load()
        self.sock = sock
        self.ssl_context = ssl_context
        if self.ssl_context is None:
            self.ssl_context = build_server_ssl_context(self.settings)
        self.app = App(
            self.settings, db_settings if db_settings is not None else server_config.load()
        )
        self.router = router
        self.compression = self.settings.compression
        self.is_shutting_down = False
        self.should_exit = asyncio.Event()
        self.force_exit = False
        self._hook_tasks: set[asyncio.Task[Any]] = set()
        self._extra_startup_hooks = tuple(startup_hooks)
        self._extra_shutdown_hooks = tuple(shutdown_hooks)
        self._listener: asyncio.Server | None = None
        self._address: tuple[str, int] | None = None
        self._connection_ids = itertools.count(1)
        self._previous_exception_handler: Any = None

    @property
    def connections(self) -> set[Connection]:
        """The open connections (owned by the ``App``)."""
        return self.app.connections

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) of the first listening socket; the real port when PORT=0."""
        assert self._address is not None, "server not started"
        return self._address

    @property
    def port(self) -> int:
        return self.address[1]

    def refusal(self) -> str:
        """Why a new connection is refused right now, or "" to accept it."""
        if self.is_shutting_down:
            return "server is shutting down"
        if len(self.app.connections) >= self.settings.max_connections:
            return f"MAX_CONNECTIONS={self.settings.max_connections} reached"
        return ""

    async def start(self) -> None:
        """Check the action table, open the database, run start-up hooks, then listen.

        Raises:
            TypeError: a request type has no action.
            OSError: the address cannot be bound.
        """
        self.router.check()
        set_current_app(self.app)  # connections, their tasks and the hooks inherit it
        if self.app.db_settings.db_backend != "NONE":
            self.app.database = DatabaseManager(self.app.db_settings)
            await self.app.database.start()
        self.app.broker = Broker(broker_settings(self.settings))
        await self.app.broker.start()
        for hook in (*self.router.hooks.startup, *self._extra_startup_hooks):
            await hook(self.app)
        loop = asyncio.get_running_loop()
        self._install_handshake_logging(loop)
        settings = self.settings
        where: dict[str, Any] = (
            {"sock": self.sock} if self.sock else {"host": settings.host, "port": settings.port}
        )
        self._listener = await loop.create_server(
            lambda: Connection(self, next(self._connection_ids)),
            **where,
            ssl=self.ssl_context,
            ssl_handshake_timeout=settings.tls_handshake_timeout if self.ssl_context else None,
            backlog=1024,
        )
        host, port = self._address = self._listener.sockets[0].getsockname()[:2]
        if not settings.node_id:  # the real port is known only now (PORT=0)
            self._set_settings(node_id=f"{socket.gethostname()}:{port}")
        scheme = "TLS" if self.ssl_context else "TCP"
        shared = ", shared socket" if self.sock else ""
        log.info("listening on %s:%d (%s, %s%s)", host, port, scheme, type(loop).__module__, shared)

    def _set_settings(self, **changes: Any) -> None:
        self.settings = self.app.settings = dataclasses.replace(self.settings, **changes)

    async def serve(self, ready: Callable[[], object] | None = None) -> None:
        """Start, run until SIGINT/SIGTERM, then shut down gracefully (retire, on a shared
        socket).

        Args:
            ready: called once the server accepts connections (a worker tells its supervisor).
        """
        await self.start()
        if ready is not None:
            ready()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self.handle_exit, signum)
        try:
            await self.should_exit.wait()
        finally:
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)
            await (self.retire() if self.sock else self.shutdown())

    def handle_exit(self, signum: int = signal.SIGTERM) -> None:
        """First signal: shut down gracefully. Second: stop waiting for requests."""
        if self.should_exit.is_set():
            log.warning("%s again: cancelling running requests now", signal.Signals(signum).name)
            self.force_exit = True
            for connection in list(self.connections):
                connection.close()
            return
        log.info("%s received: shutting down", signal.Signals(signum).name)
        self.should_exit.set()

    async def retire(self) -> None:
        """Leave the shared socket to the other workers, let connections end, shut down.

        A worker's listening socket is shared, so once this one stops accepting the other
        workers take the new connections. Its own connections are served as usual for up to
        half of SHUTDOWN_TIMEOUT, and each is closed DRAIN_IDLE_TIMEOUT after its last exchange
        in that time (a request received or answered, then nothing running, nothing
        half-received): right after a client got its answers, the moment it is least likely to
        be sending. A client of short connections closes them itself; one that pauses between
        requests is closed in a pause. A connection silent all that time, and any left, then
        get ``shutdown()`` within the rest of SHUTDOWN_TIMEOUT: it stops reading, and a request
        the client sends after that gets no answer (it did not run).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.shutdown_timeout
        if self._listener is not None:
            self._listener.close()  # this process's copy: the socket stays with the others
        count = len(self.connections)
        closed = await self._close_after_exchanges(loop.time() + self.settings.shutdown_timeout / 2)
        log.info(
            "stopped accepting; %d of %d connections closed after their last exchange, %d left",
            closed, count, len(self.connections),
        )  # fmt: skip
        await self.shutdown(timeout=max(0.0, deadline - loop.time()))

    async def _close_after_exchanges(self, until: float) -> int:
        """Close each connection DRAIN_IDLE_TIMEOUT after its last exchange from now on, until
        none is left or ``until`` (loop time); return how many were closed here."""
        loop = asyncio.get_running_loop()
        began = loop.time()
        idle_for = self.settings.drain_idle_timeout
        tick = min(0.05, max(idle_for / 4, 0.005))  # seconds between looks
        answers: dict[Connection, tuple[int, float]] = {}  # answered count, when it last grew
        closed = 0
        while self.connections and not self.force_exit and loop.time() < until:
            now = loop.time()
            seen = {}
            for connection in list(self.connections):
                count, grew_at = answers.get(connection, (connection.requests_answered, began))
                if count != connection.requests_answered:
                    count, grew_at = connection.requests_answered, now
                seen[connection] = (count, grew_at)
                last = max(grew_at, connection.watchdog.last_activity)
                if began < last <= now - idle_for and _is_idle(connection):
                    connection.drain()  # closes at once: nothing runs, nothing is buffered
                    closed += 1
            answers = seen
            await asyncio.sleep(tick)
        return closed

    async def shutdown(self, timeout: float | None = None) -> None:
        """Stop accepting, let running requests finish within SHUTDOWN_TIMEOUT, close all.

        Args:
            timeout: seconds running requests get, instead of SHUTDOWN_TIMEOUT.
        """
        if self.is_shutting_down:
            return
        self.is_shutting_down = True
        if self._listener is not None:
            self._listener.close()
        for connection in list(self.connections):
            connection.drain()
        await self._finish_running_requests(
            self.settings.shutdown_timeout if timeout is None else timeout
        )
        await self._close_connections()
        if self._listener is not None:
            await self._listener.wait_closed()
        if self._hook_tasks:
            await asyncio.wait(self._hook_tasks, timeout=self.settings.shutdown_timeout)
        for hook in (*self.router.hooks.shutdown, *self._extra_shutdown_hooks):
            try:
                await hook(self.app)
            except Exception:
                log.exception("shutdown hook %s failed", getattr(hook, "__name__", hook))
        if self.app.broker is not None:
            await self.app.broker.close()
        if self.app.database is not None:
            await self.app.database.close()
        self._restore_exception_handler()
        log.info("stopped after serving %d requests", self.app.stats.requests_served)

    async def _finish_running_requests(self, timeout: float) -> None:
        running = [task for c in self.connections for task in c.tasks.values()]
        if not running or self.force_exit:
            return
        log.info("waiting up to %g s for %d running requests", timeout, len(running))
        _, pending = await asyncio.wait(running, timeout=timeout)
        if pending:
            log.warning("cancelling %d requests still running after %g s", len(pending), timeout)
            for task in pending:
                task.cancel()  # each answers UNAVAILABLE while its connection is open
            await asyncio.wait(pending, timeout=1)

    async def _close_connections(self) -> None:
        for connection in list(self.connections):
            connection.close()
        closing = [connection.closed for connection in self.connections]
        if closing:
            await asyncio.wait(closing, timeout=5)
            for connection in list(self.connections):
                if connection.transport is not None and not connection.closed.done():
                    connection.transport.abort()

    def _install_handshake_logging(self, loop: asyncio.AbstractEventLoop) -> None:
        """Log a failed TLS handshake as one line instead of the loop's error with traceback.

        asyncio reports a handshake that fails or times out to the loop's exception handler;
        for a server that is a routine event (scanners, plain-TCP clients), not an error. Other
        events go on to the handler that was there before, which ``shutdown()`` puts back.
        """
        previous = self._previous_exception_handler = loop.get_exception_handler()

        def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
            exc = context.get("exception")
            if context.get("message", "").startswith("Error on transport creation") and (
                isinstance(exc, ssl.SSLError | ConnectionError | TimeoutError)
            ):
                transport = context.get("transport")
                peer = transport.get_extra_info("peername") if transport is not None else None
                log.info("TLS handshake from %s failed: %s", address_of(peer), exc)
                return
            if previous is not None:
                previous(loop, context)
            else:
                loop.default_exception_handler(context)

        loop.set_exception_handler(handler)

    def _restore_exception_handler(self) -> None:
        """Put back the loop's exception handler that ``start()`` replaced.

        A TLS handshake accepted before the listener closed may still fail up to
        TLS_HANDSHAKE_TIMEOUT later, so with TLS the handler is put back only then.
        """
        if self._listener is None:
            return
        loop = asyncio.get_running_loop()
        ours = loop.get_exception_handler()

        def restore() -> None:
            if loop.get_exception_handler() is ours:  # nobody replaced it since
                loop.set_exception_handler(self._previous_exception_handler)

        if self.ssl_context is None:
            restore()
        else:
            loop.call_later(self.settings.tls_handshake_timeout, restore)

    def track(self, coroutine: Any) -> None:
        """Run a hook coroutine as a task the server waits for at shutdown."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self._hook_tasks.add(task)
        task.add_done_callback(self._hook_tasks.discard)


def _is_idle(connection: Connection) -> bool:
    """Nothing runs, nothing half-received, nothing waiting unread in the kernel."""
    return not (
        connection.tasks
        or connection.decoder.buffered
        or connection.is_read_paused
        or connection.is_closing
        or _unread_bytes(connection)
    )


def _unread_bytes(connection: Connection) -> int:
    """Bytes the kernel holds for ``connection`` that its loop has not read yet.

    A loop that was not scheduled for a while may run its timers before it reads what came
    meanwhile (libuv, under uvloop, does), so ``last_activity`` alone can look quiet while a
    request waits in the socket.
    """
    transport = connection.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return 0
    try:
        import fcntl
        import termios

        answer = fcntl.ioctl(sock.fileno(), termios.FIONREAD, bytes(4))
    except (ImportError, OSError, ValueError):
        return 0  # no such query here, or the socket is gone: nothing to wait for
    return int.from_bytes(answer, sys.byteorder, signed=True)


def broker_settings(settings: Settings) -> BrokerSettings:
    """The broker's part of the settings; a message leaves room in its frame for its topic."""
    return BrokerSettings(
        url=settings.broker_url,
        history_size=settings.history_size,
        history_ttl=settings.history_ttl,
        max_topic_length=settings.max_topic_length,
        max_message_size=settings.max_frame_size - 4 * settings.max_topic_length - 64,
    )


@contextlib.asynccontextmanager
async def serve(settings: Settings | None = None, **kwargs: Any) -> AsyncIterator[Server]:
    """Run a server for the duration of an ``async with`` block (tests, embedding).

    Args:
        settings: as for ``Server``; use ``port=0`` for a free port, then read ``server.port``.
        **kwargs: passed to ``Server``.
    """
    server = Server(settings, **kwargs)
    await server.start()
    try:
        yield server
    finally:
        await server.shutdown()


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="server.py",
        description="Run the pyasync-server. Settings come from the environment and .env; "
        "flags override them.",
    )
    parser.add_argument("--host", help="address to listen on (HOST)")
    parser.add_argument("--port", type=int, help="port to listen on (PORT)")
    parser.add_argument(
        "--workers", metavar="N", help="processes sharing the port, or auto: one per CPU (WORKERS)"
    )
    parser.add_argument(
        "--log-level", type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level (LOG_LEVEL), in any case",
    )  # fmt: skip
    parser.add_argument("--env-file", default=".env", help="settings file (default: .env)")
    parser.add_argument(
        "--make-cert", metavar="DIR", type=Path,
        help="write a self-signed cert.pem/key.pem for localhost into DIR and exit",
    )  # fmt: skip
    # Set by the supervisor for its workers: the shared listening socket, the control pair
    # ("ready", and its end when the supervisor dies) and the worker's number.
    parser.add_argument("--listen-fd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--control-fd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point: ``python server.py [--host H] [--port P] [--workers N]``."""
    args = _parse_args(argv)
    try:
        if args.make_cert is not None:
            cert, key = make_self_signed_cert(args.make_cert)
            print(f"wrote {cert} and {key}; the same with openssl:")
            print(" ".join(openssl_command(args.make_cert)))
            print(f"then: ENABLE_TLS=true TLS_CERT_FILE={cert} TLS_KEY_FILE={key} python server.py")
            return
        overrides = {
            "host": args.host, "port": args.port, "log_level": args.log_level,
            "workers": args.workers,
        }  # fmt: skip
        settings = config.load(env_file=args.env_file, overrides=overrides)
        db_settings = server_config.load(env_file=args.env_file)
        setup_logging(settings.log_level)
        count = 1 if args.listen_fd is not None else supervisor.worker_count(settings.workers)
        if count > 1:
            supervisor.check_broker(settings, count)
            build_server_ssl_context(settings)  # bad TLS files stop here, not in every worker
        elif args.listen_fd is not None:
            server = _worker_server(args, settings, db_settings)
        else:
            server = Server(settings, db_settings=db_settings)
    except ConfigError as exc:
        print(f"error: {describe_error(exc)[0]}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    if count > 1:
        _supervise(sys.argv[1:] if argv is None else argv, settings, count)
    if settings.reuse_large_buffers:
        reuse_large_buffers(settings.max_frame_size)
    if args.control_fd is not None:
        control = socket.socket(fileno=args.control_fd)
        handle_run_main(
            functools.partial(_serve_worker, server, control), use_uvloop=settings.use_uvloop
        )
    handle_run_main(server.serve, use_uvloop=settings.use_uvloop)


def _supervise(argv: Sequence[str], settings: Settings, count: int) -> NoReturn:
    """Bind the one listening socket and run ``count`` workers on it (``pyasync.supervisor``)."""
    try:
        listener = supervisor.bind(settings.host, settings.port)
    except OSError as exc:
        message, code = describe_error(exc)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(code)
    # Until the supervisor's loop handles it, a reload is moot: the workers are not started yet.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    command = [sys.executable, str(Path(__file__).resolve()), *argv]
    boss = supervisor.Supervisor(settings, listener, command, count)
    handle_run_main(boss.run, use_uvloop=False)  # the supervisor only waits on its children


def _worker_server(
    args: argparse.Namespace, settings: Settings, db_settings: DatabaseSettings
) -> Server:
    """The server of worker ``args.worker``, on the listening socket it inherited."""
    listener = socket.socket(fileno=args.listen_fd)
    port = listener.getsockname()[1]
    node_id = f"{settings.node_id or f'{socket.gethostname()}:{port}'}/w{args.worker}"
    label = f"w{args.worker}"
    formatter = logging.Formatter(LOG_FORMAT.replace("%(name)s", f"{label} %(name)s"))
    for handler in logging.getLogger().handlers:
        handler.setFormatter(formatter)  # every line says which worker wrote it
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a reload is the supervisor's to do
    return Server(
        dataclasses.replace(settings, node_id=node_id), db_settings=db_settings, sock=listener
    )


async def _serve_worker(server: Server, control: socket.socket) -> None:
    """Serve; say "ready" to the supervisor once accepting; retire if the supervisor dies."""
    reader, writer = await asyncio.open_connection(sock=control)

    async def retire_when_orphaned() -> None:
        with contextlib.suppress(ConnectionError):
            await reader.read()  # the supervisor never writes: this returns when it is gone
        if not server.should_exit.is_set():
            log.warning("the supervisor is gone: shutting down")
            server.should_exit.set()

    orphaned = asyncio.get_running_loop().create_task(retire_when_orphaned())
    try:
        await server.serve(ready=lambda: writer.write(b"ready\n"))
    finally:
        orphaned.cancel()
        writer.close()


if __name__ == "__main__":
    main()
