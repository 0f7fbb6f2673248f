"""The pyasync-server: listens, owns connections and their tasks, enforces limits, shuts down.

Run it with ``python server.py``; embed it with ``async with serve(settings) as server:``.
``python server.py --workers N`` runs ``pyasync.supervisor`` instead, which starts N copies of
this program on one listening socket they inherit (``--listen-fd``); such a worker retires
(``Server.retire``) rather than shutting down at once, so that the others take over its share.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import functools
import ipaddress
import itertools
import logging
import signal
import socket
import ssl
import sys
import time
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
from pyasync.auth import AuthInterceptor, Principals, new_token_line
from pyasync.connection import Connection, address_of
from pyasync.router import ROUTER, AppHook, Router
from pyasync.tls import (
    TLSHandshake,
    build_server_ssl_context,
    describe_handshake_failure,
    make_certificates,
)
from server_config import DatabaseSettings
from upstream import Upstreams
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
        self.app.principals = principals = Principals(self.settings)
        if not principals.is_enabled and not self.settings.allow_open:
            _refuse_open_off_loopback(self.settings.host)
        # Authentication is this server's own step, not one of the shared router.
        self.router = (
            router.with_interceptors(AuthInterceptor(router)) if principals.is_enabled else router
        )
        self.compression = self.settings.compression
        self.connections_per_ip: collections.Counter[str] = collections.Counter()
        self._refusals_logged: dict[str, tuple[float, int]] = {}  # address -> (logged at, since)
        self.is_shutting_down = False
        self.should_exit = asyncio.Event()
        self.force_exit = False
        self._hook_tasks: set[asyncio.Task[Any]] = set()
        self._extra_startup_hooks = tuple(startup_hooks)
        self._extra_shutdown_hooks = tuple(shutdown_hooks)
        self._listener: asyncio.Server | None = None
        self._address: tuple[str, int] | None = None
        self._connection_ids = itertools.count(1)
        self._handshakes: set[TLSHandshake] = set()  # TLS handshakes under way

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

    def refusal(self, address: str) -> str:
        """Why a new connection from ``address`` is refused right now, or "" to accept it."""
        settings = self.settings
        if self.is_shutting_down:
            return "server is shutting down"
        if len(self.app.connections) >= settings.max_connections:
            return f"MAX_CONNECTIONS={settings.max_connections} reached"
        per_ip = settings.max_connections_per_ip
        if per_ip and self.connections_per_ip[address] >= per_ip:
            return f"MAX_CONNECTIONS_PER_IP={per_ip} reached for {address}"
        return ""

    def log_refusal(self, connection_id: int, peer: str, address: str, reason: str) -> None:
        """Log a refused connection: one line per client address and second at most, so that a
        flood of connections cannot make the server spend its time writing its log."""
        now = time.monotonic()
        since, skipped = self._refusals_logged.get(address, (0.0, 0))
        if now - since < 1.0:
            self._refusals_logged[address] = (since, skipped + 1)
            return
        if len(self._refusals_logged) > 10_000:  # an attack from many addresses: start over
            self._refusals_logged.clear()
        self._refusals_logged[address] = (now, 0)
        more = f" (and {skipped} more from {address} in the last second)" if skipped else ""
        level = logging.WARNING if "MAX_CONNECTIONS=" in reason else logging.INFO
        log.log(level, "c%d refused from %s: %s%s", connection_id, peer, reason, more)

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
        self.app.upstreams = Upstreams(self.settings)
        for hook in (*self.router.hooks.startup, *self._extra_startup_hooks):
            await hook(self.app)
        loop = asyncio.get_running_loop()
        settings = self.settings
        where: dict[str, Any] = (
            {"sock": self.sock} if self.sock else {"host": settings.host, "port": settings.port}
        )
        self._listener = await loop.create_server(self._accept, **where, backlog=1024)
        host, port = self._address = self._listener.sockets[0].getsockname()[:2]
        if not settings.node_id:  # the real port is known only now (PORT=0)
            self._set_settings(node_id=f"{socket.gethostname()}:{port}")
        scheme = "TLS" if self.ssl_context else "TCP"
        shared = ", shared socket" if self.sock else ""
        log.info("listening on %s:%d (%s, %s%s)", host, port, scheme, type(loop).__module__, shared)
        assert self.app.principals is not None
        if self.app.principals.by_hash and not self.ssl_context and not is_loopback(host):
            log.warning("tokens travel in the clear on %s: enable TLS (ENABLE_TLS)", host)

    def _accept(self) -> asyncio.Protocol:
        """The protocol for a new connection: the connection itself, or its TLS handshake first."""
        if self.ssl_context is None:
            return Connection(self, next(self._connection_ids))
        return TLSHandshake(
            self.ssl_context,
            self.settings.tls_handshake_timeout,
            lambda: Connection(self, next(self._connection_ids)),
            self._handshake_failed,
            self._handshakes,
        )

    def _handshake_failed(self, handshake: TLSHandshake, exc: BaseException) -> None:
        """Log a failed TLS handshake as one line and count it (``stats``).

        A failed handshake is routine for a server (scanners, plain-TCP clients, certificates
        from elsewhere), so it is INFO, not an error with a traceback.
        """
        peer = address_of(handshake.peer)
        if self.is_shutting_down:
            log.debug("TLS handshake from %s abandoned at shutdown", peer)
            return
        self.app.stats.tls_handshake_failures += 1
        reason = describe_handshake_failure(exc, self.settings.tls_handshake_timeout)
        log.info("TLS handshake from %s failed: %s", peer, reason)

    def _set_settings(self, **changes: Any) -> None:
        self.settings = self.app.settings = dataclasses.replace(self.settings, **changes)

    async def serve(self, ready: Callable[[], object] | None = None) -> None:
        """Start, run until SIGINT/SIGTERM, then shut down gracefully (retire, on a shared
        socket).

        Args:
            ready: called once the server accepts connections (a worker tells its supervisor).
        """
        # Handlers first: a signal that comes as soon as "listening on" is logged (or while the
        # server starts) is a graceful shutdown, not the default abrupt exit.
        loop = asyncio.get_running_loop()
        for signum in EXIT_SIGNALS:
            loop.add_signal_handler(signum, self.handle_exit, signum)
        try:
            await self.start()
        except BaseException:
            _remove_signal_handlers(loop)
            raise
        try:
            if ready is not None:
                ready()
            await self.should_exit.wait()
        finally:
            _remove_signal_handlers(loop)
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
        for handshake in list(self._handshakes):
            handshake.abort()
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
        if self.app.upstreams is not None:
            await self.app.upstreams.close()
        if self.app.broker is not None:
            await self.app.broker.close()
        if self.app.database is not None:
            await self.app.database.close()
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

    def track(self, coroutine: Any) -> None:
        """Run a hook coroutine as a task the server waits for at shutdown."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self._hook_tasks.add(task)
        task.add_done_callback(self._hook_tasks.discard)


def is_loopback(host: str) -> bool:
    """True for an address only this machine reaches (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def _refuse_open_off_loopback(host: str) -> None:
    if not is_loopback(host):
        raise ConfigError(
            f"HOST={host} lets other machines call every action without authentication: set "
            "AUTH_TOKENS_FILE or TLS_CLIENT_CA_FILE, or ALLOW_OPEN=true to serve anyone"
        )


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


EXIT_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # a graceful shutdown; the second one hurries it


def _remove_signal_handlers(loop: asyncio.AbstractEventLoop) -> None:
    for signum in EXIT_SIGNALS:
        loop.remove_signal_handler(signum)


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
        "--new-token", nargs=2, metavar=("NAME", "SCOPES"),
        help="print a new token for NAME and the AUTH_TOKENS_FILE line granting SCOPES "
        "(comma-separated, e.g. kv.read,publish:chat.>), and exit",
    )  # fmt: skip
    parser.add_argument(
        "--make-cert", metavar="DIR", type=Path,
        help="write a test CA, a server certificate for localhost and a client certificate "
        "into DIR, print the settings that use them, and exit",
    )  # fmt: skip
    parser.add_argument(
        "--client-name", metavar="NAME", default="client",
        help="with --make-cert: the principal the client certificate names: a name, "
        "user@domain or a URI (default: client)",
    )  # fmt: skip
    # Set by the supervisor for its workers: the shared listening socket, the control pair
    # ("ready", and its end when the supervisor dies) and the worker's number.
    parser.add_argument("--listen-fd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--control-fd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _print_make_cert(directory: Path, client_name: str) -> None:
    """``--make-cert``: write the certificates and say how both sides use them."""
    files = make_certificates(directory, client_name)
    print(
        f"wrote a test CA ({files.ca.name}, {files.ca_key.name}), a server certificate for "
        f"localhost ({files.cert.name}, {files.key.name}) and a client certificate for "
        f"{client_name!r} ({files.client_cert.name}, {files.client_key.name}) into {directory}"
    )
    print(
        f"server: ENABLE_TLS=true TLS_CERT_FILE={files.cert} TLS_KEY_FILE={files.key} "
        f"TLS_CLIENT_CA_FILE={files.ca} python server.py"
    )
    print(
        f"client: python client.py --cafile {files.ca} --cert {files.client_cert} "
        f"--key {files.client_key} ping"
    )
    print("without client certificates: leave out TLS_CLIENT_CA_FILE, --cert and --key")


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point: ``python server.py [--host H] [--port P] [--workers N]``."""
    args = _parse_args(argv)
    try:
        if args.new_token is not None:
            token, line = new_token_line(*args.new_token)
            print(f"token (give it to the client; it is not stored): {token}")
            print(f"line for AUTH_TOKENS_FILE: {line}")
            return
        if args.make_cert is not None:
            _print_make_cert(args.make_cert, args.client_name)
            return
        overrides = {
            "host": args.host, "port": args.port, "log_level": args.log_level,
            "workers": args.workers,
        }  # fmt: skip
        settings = config.load(env_file=args.env_file, overrides=overrides)
        db_settings = server_config.load(env_file=args.env_file)
        setup_logging(settings.log_level)
        for line in config.misspelt_settings(
            args.env_file, Settings, server_config.DatabaseSettings
        ):
            log.warning("%s", line)
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
