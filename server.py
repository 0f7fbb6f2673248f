"""The pyasync-server: listens, owns connections and their tasks, enforces limits, shuts down.

Run it with ``python server.py``; embed it with ``async with serve(settings) as server:``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
import signal
import ssl
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, cast

import actions
import config
import server_config
from actions import (
    AppHook,
    ConnectionHook,
    error_answer,
    process_inline,
    unpack_and_process,
)
from config import ConfigError, Settings
from context import App, Context, TLSInfo
from package import (
    PACKAGE,
    DeadlineExceeded,
    ProtocolViolation,
    ResourceExhausted,
    RPCError,
    Unavailable,
)
from protocol import Frame, FrameDecoder, ProtocolError, encode_frame, encode_frame_parts
from pyasync.deadlines import within
from pyasync.tls import build_server_ssl_context, make_self_signed_cert, openssl_command
from server_config import DatabaseSettings
from utils import EXIT_CONFIG, handle_run_main, reuse_large_buffers, setup_logging

__all__ = ["Connection", "Server", "main", "serve"]

log = logging.getLogger("pyasync.server")

SHUTDOWN_REQUEST_ID = 0  # error frames about the connection itself, not one request
LARGE_WRITE = 64 * 1024  # bytes; answers larger than this are written without joining them


class Connection(asyncio.Protocol):
    """One client connection: decodes frames, runs each request as a task, writes answers.

    Backpressure: the transport stops reading while ``max_in_flight`` requests run or while the
    transport's write buffer is above its high-water mark, so neither side can grow memory
    without bound. Every task it starts is cancelled when the connection ends.
    """

    __slots__ = (
        "closed", "ctx", "decoder", "id", "is_closing", "is_draining", "is_read_paused",
        "is_ready", "is_write_paused", "last_activity", "loop", "partial_frame_since",
        "requests_answered", "server", "settings", "tasks", "transport", "watchdog",
    )  # fmt: skip  # thousands of idle connections: no per-instance dict

    def __init__(self, server: Server, connection_id: int) -> None:
        self.server = server
        self.settings = server.settings
        self.id = connection_id
        self.decoder = FrameDecoder(self.settings.max_frame_size)
        self.tasks: set[asyncio.Task[None]] = set()
        self.ctx = Context(app=server.app, connection_id=connection_id)
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()
        self.is_closing = False
        self.is_draining = False  # shutting down: no new requests, finish the running ones
        self.is_write_paused = False
        self.is_read_paused = False
        self.is_ready = False  # connect hooks have run
        self.last_activity = self.loop.time()
        self.partial_frame_since: float | None = None
        self.watchdog: asyncio.TimerHandle | None = None
        self.requests_answered = 0
        self.closed = self.loop.create_future()

    # ---- asyncio.Protocol callbacks -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop: not a subclass
        peer = transport.get_extra_info("peername")
        self.ctx.peer = peer
        self.ctx.tls = _tls_info(transport.get_extra_info("ssl_object"))
        server = self.server
        if len(server.connections) >= self.settings.max_connections or server.is_shutting_down:
            reason = (
                "server is shutting down"
                if server.is_shutting_down
                else (f"MAX_CONNECTIONS={self.settings.max_connections} reached")
            )
            log.warning("c%d refused from %s: %s", self.id, _address(peer), reason)
            self._send_error(
                SHUTDOWN_REQUEST_ID, ResourceExhausted(f"connection refused: {reason}")
            )
            self.is_closing = True
            transport.close()
            return
        server.connections.add(self)
        server.app.stats.open_connections += 1
        tls = f" over {self.ctx.tls.version}" if self.ctx.tls else ""
        log.info("c%d connected from %s%s", self.id, _address(peer), tls)
        if actions.CONNECT_HOOKS:
            self._set_reading()  # paused until the hooks ran
            self.server.track(self._run_connect_hooks())
        else:
            self.is_ready = True
        self._arm_watchdog()

    def data_received(self, data: bytes) -> None:
        self.last_activity = self.loop.time()
        self.decoder.feed(data)
        self._take_frames()

    def eof_received(self) -> bool | None:
        # A peer that stops sending is gone: TCP cannot tell a half-close from a close, and
        # running on for a vanished client wastes work, so its requests are cancelled.
        log.debug("c%d end of stream from the client", self.id)
        self.close()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.is_closing = True
        if self.watchdog is not None:
            self.watchdog.cancel()
        for task in self.tasks:
            task.cancel()
        if self not in self.server.connections:
            self.closed.set_result(None)
            return
        self.server.connections.discard(self)
        self.server.app.stats.open_connections -= 1
        cause = f": {exc}" if exc else ""
        log.info(
            "c%d closed after %d requests%s, %d cancelled",
            self.id, self.requests_answered, cause, len(self.tasks),
        )  # fmt: skip
        if actions.DISCONNECT_HOOKS:
            self.server.track(self._run_hooks(actions.DISCONNECT_HOOKS, "disconnect"))
        self.closed.set_result(None)

    def pause_writing(self) -> None:
        self.is_write_paused = True
        self._set_reading()

    def resume_writing(self) -> None:
        self.is_write_paused = False
        self._set_reading()
        self._take_frames()

    # ---- requests ---------------------------------------------------------------------------

    def _take_frames(self) -> None:
        """Answer or start every complete frame while under the in-flight limit.

        Requests whose action never waits are answered inline, and those answers leave in one
        write at the end: a pipelined burst costs one system call, not one per request.
        """
        if not self.is_ready or self.is_closing:
            return
        decoder, tasks, ctx = self.decoder, self.tasks, self.ctx
        limit = self.settings.max_in_flight
        refuse = self.is_draining and self.server.is_shutting_down
        answers: list[bytes] = []  # encoded frames, or header and body apart for large ones
        answered = 0
        large = False
        took_any = False
        room = limit - len(tasks)
        try:
            while room > 0:
                frame = decoder.next_frame()
                if frame is None:
                    break
                took_any = True
                if refuse:
                    kind, body = error_answer(
                        Unavailable("server is shutting down; retry elsewhere")
                    )
                elif (answer := process_inline(frame, ctx)) is not None:
                    kind, body = answer
                else:
                    task = self.loop.create_task(self._serve(frame))
                    tasks.add(task)
                    task.add_done_callback(self._request_done)
                    room -= 1
                    continue
                answered += 1
                large |= self._add_answer(answers, kind, frame.request_id, body)
        except ProtocolError as exc:
            self._write(answers, large)
            self._fail_stream(exc)
            return
        if answers:
            self._answered(answered)
            self._write(answers, large)
        if not decoder.buffered:
            self.partial_frame_since = None
        elif took_any or self.partial_frame_since is None:
            self.partial_frame_since = self.loop.time()
            self._arm_watchdog()
        if self.is_read_paused or room <= 0:
            self._set_reading()

    def _add_answer(self, answers: list[bytes], kind: int, request_id: int, body: bytes) -> bool:
        """Append one answer's frame to ``answers``: whole when small, header and body apart
        when large; True for large."""
        compression = self.server.compression
        if len(body) < LARGE_WRITE:
            answers.append(encode_frame(kind, request_id, body, compression=compression))
            return False
        answers += encode_frame_parts(kind, request_id, body, compression=compression)
        return True

    def _write(self, pieces: Sequence[bytes], large: bool) -> None:
        """Write small frames joined (one TLS record, one segment) and large bodies as they
        are, beside their headers (no copy)."""
        transport = self.transport
        if not pieces or transport is None or transport.is_closing():
            return
        if large:
            transport.writelines(pieces)
        else:
            transport.write(pieces[0] if len(pieces) == 1 else b"".join(pieces))

    async def _serve(self, frame: Frame) -> None:
        settings = self.settings
        timeout = frame.timeout_ms / 1000 if frame.timeout_ms else settings.request_timeout
        timeout = min(timeout, settings.max_request_timeout)
        try:
            async with within(timeout):
                kind, body = await unpack_and_process(frame, self.ctx)
        except TimeoutError:
            kind, body = error_answer(
                DeadlineExceeded(f"request did not finish within its {timeout:g} s timeout")
            )
        except asyncio.CancelledError:
            if self.server.is_shutting_down and not self.is_closing:
                self._send_error(
                    frame.request_id, Unavailable("server shut down before the request finished")
                )
            raise
        self._send(kind, frame.request_id, body)
        self._answered(1)

    def _answered(self, count: int) -> None:
        self.requests_answered += count
        self.server.app.stats.requests_served += count

    def _request_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("c%d request task failed", self.id, exc_info=task.exception())
        if self.is_closing:
            return
        self._take_frames()
        self._close_if_done()

    def _send(self, kind: PACKAGE, request_id: int, body: bytes) -> None:
        answers: list[bytes] = []
        self._write(answers, self._add_answer(answers, kind, request_id, body))

    def _send_error(self, request_id: int, error: RPCError) -> None:
        kind, body = error_answer(error)
        self._send(kind, request_id, body)

    # ---- connection state ---------------------------------------------------------------

    def _set_reading(self) -> None:
        """Read only while ready, not draining, under the in-flight limit and able to write."""
        transport = self.transport
        if transport is None or self.is_closing:
            return
        should_read = (
            self.is_ready
            and not self.is_draining
            and not self.is_write_paused
            and len(self.tasks) < self.settings.max_in_flight
        )
        if should_read and self.is_read_paused:
            self.is_read_paused = False
            transport.resume_reading()
        elif not should_read and not self.is_read_paused:
            self.is_read_paused = True
            transport.pause_reading()

    def _fail_stream(self, exc: ProtocolError) -> None:
        log.warning(
            "c%d protocol error from %s: %s; closing", self.id, _address(self.ctx.peer), exc
        )
        self._send_error(SHUTDOWN_REQUEST_ID, ProtocolViolation(str(exc)))
        self.close()

    def drain(self) -> None:
        """Stop taking requests (server shutdown); close once the running ones answered."""
        self.is_draining = True
        self._set_reading()
        self._take_frames()  # answer requests already received with UNAVAILABLE
        self._close_if_done()

    def _close_if_done(self) -> None:
        if self.is_draining and not self.tasks and not self.is_closing:
            self.close()

    def close(self) -> None:
        """Close after writing what is buffered; running requests are cancelled."""
        if self.is_closing or self.transport is None:
            return
        self.is_closing = True
        for task in self.tasks:
            task.cancel()
        self.transport.close()

    def _arm_watchdog(self) -> None:
        deadline = self._next_deadline()
        if deadline is None:
            return
        if self.watchdog is None or self.watchdog.when() > deadline:
            if self.watchdog is not None:
                self.watchdog.cancel()
            self.watchdog = self.loop.call_at(deadline, self._on_watchdog)

    def _next_deadline(self) -> float | None:
        deadlines = []
        if self.settings.idle_timeout:
            deadlines.append(self.last_activity + self.settings.idle_timeout)
        if self.partial_frame_since is not None:
            deadlines.append(self.partial_frame_since + self.settings.frame_timeout)
        return min(deadlines, default=None)

    def _on_watchdog(self) -> None:
        """Close a connection idle too long or stuck in a frame; otherwise look again later."""
        self.watchdog = None
        if self.is_closing:
            return
        now = self.loop.time()
        settings = self.settings
        if (
            self.partial_frame_since is not None
            and not self.is_read_paused
            and now - self.partial_frame_since >= settings.frame_timeout
        ):
            log.info("c%d sent no rest of a frame within %g s; closing", self.id,
                     settings.frame_timeout)  # fmt: skip
            self.close()
            return
        if self.tasks:
            self.last_activity = now  # a running request is activity
        elif settings.idle_timeout and now - self.last_activity >= settings.idle_timeout:
            log.info("c%d idle for %g s; closing", self.id, settings.idle_timeout)
            self.close()
            return
        if self.partial_frame_since is not None and self.is_read_paused:
            self.partial_frame_since = now  # we stopped reading: the client is not to blame
        self._arm_watchdog()

    async def _run_connect_hooks(self) -> None:
        if await self._run_hooks(actions.CONNECT_HOOKS, "connect"):
            self.is_ready = True
            self._set_reading()
            self._take_frames()
        else:
            self.close()

    async def _run_hooks(self, hooks: Sequence[ConnectionHook], what: str) -> bool:
        try:
            for hook in hooks:
                await hook(self.ctx)
        except Exception:
            log.exception("c%d %s hook failed", self.id, what)
            return False
        return True


class Server:
    """A pyasync-server: ``await start()``, serve, ``await shutdown()`` (or use ``serve()``).

    Args:
        settings: validated settings; ``config.load()`` when None.
        db_settings: database settings; ``server_config.load()`` when None.
        ssl_context: the TLS context; built from the settings when None and TLS is enabled.
        startup_hooks / shutdown_hooks: run with the ``App`` around the listening period,
            after the hooks ``actions.py`` registered.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        db_settings: DatabaseSettings | None = None,
        ssl_context: ssl.SSLContext | None = None,
        startup_hooks: Sequence[AppHook] = (),
        shutdown_hooks: Sequence[AppHook] = (),
    ) -> None:
        self.settings = settings if settings is not None else config.load()
        self.ssl_context = ssl_context
        if self.ssl_context is None:
            self.ssl_context = build_server_ssl_context(self.settings)
        self.app = App(
            self.settings, db_settings if db_settings is not None else server_config.load()
        )
        self.compression = self.settings.compression
        self.connections: set[Connection] = set()
        self.is_shutting_down = False
        self.should_exit = asyncio.Event()
        self.force_exit = False
        self._hook_tasks: set[asyncio.Task[Any]] = set()
        self._startup_hooks = [*actions.STARTUP_HOOKS, *startup_hooks]
        self._shutdown_hooks = [*actions.SHUTDOWN_HOOKS, *shutdown_hooks]
        self._listener: asyncio.Server | None = None
        self._address: tuple[str, int] | None = None
        self._connection_ids = itertools.count(1)

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) of the first listening socket; the real port when PORT=0."""
        assert self._address is not None, "server not started"
        return self._address

    @property
    def port(self) -> int:
        return self.address[1]

    async def start(self) -> None:
        """Check the action table, run start-up hooks, then listen.

        Raises:
            TypeError: a request type has no action.
            OSError: the address cannot be bound.
        """
        actions.check_actions()
        for hook in self._startup_hooks:
            await hook(self.app)
        loop = asyncio.get_running_loop()
        self._install_handshake_logging(loop)
        settings = self.settings
        self._listener = await loop.create_server(
            lambda: Connection(self, next(self._connection_ids)),
            settings.host,
            settings.port,
            ssl=self.ssl_context,
            ssl_handshake_timeout=settings.tls_handshake_timeout if self.ssl_context else None,
            backlog=1024,
        )
        host, port = self._address = self._listener.sockets[0].getsockname()[:2]
        scheme = "TLS" if self.ssl_context else "TCP"
        log.info("listening on %s:%d (%s, %s)", host, port, scheme, type(loop).__module__)

    async def serve(self) -> None:
        """Start, run until SIGINT/SIGTERM, then shut down gracefully."""
        await self.start()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self.handle_exit, signum)
        try:
            await self.should_exit.wait()
        finally:
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)
            await self.shutdown()

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

    async def shutdown(self) -> None:
        """Stop accepting, let running requests finish within SHUTDOWN_TIMEOUT, close all."""
        if self.is_shutting_down:
            return
        self.is_shutting_down = True
        if self._listener is not None:
            self._listener.close()
        for connection in list(self.connections):
            connection.drain()
        running = [task for connection in self.connections for task in connection.tasks]
        if running and not self.force_exit:
            log.info("waiting up to %g s for %d running requests", self.settings.shutdown_timeout,
                     len(running))  # fmt: skip
            _, pending = await asyncio.wait(running, timeout=self.settings.shutdown_timeout)
            if pending:
                log.warning("cancelling %d requests still running after %g s",
                            len(pending), self.settings.shutdown_timeout)  # fmt: skip
                for task in pending:
                    task.cancel()  # each answers UNAVAILABLE while its connection is open
                await asyncio.wait(pending, timeout=1)
        for connection in list(self.connections):
            connection.close()
        closing = [connection.closed for connection in self.connections]
        if closing:
            await asyncio.wait(closing, timeout=5)
            for connection in list(self.connections):
                if connection.transport is not None and not connection.closed.done():
                    connection.transport.abort()
        if self._listener is not None:
            await self._listener.wait_closed()
        if self._hook_tasks:
            await asyncio.wait(self._hook_tasks, timeout=self.settings.shutdown_timeout)
        for hook in self._shutdown_hooks:
            try:
                await hook(self.app)
            except Exception:
                log.exception("shutdown hook %s failed", getattr(hook, "__name__", hook))
        log.info("stopped after serving %d requests", self.app.stats.requests_served)

    def _install_handshake_logging(self, loop: asyncio.AbstractEventLoop) -> None:
        """Log a failed TLS handshake as one line instead of the loop's error with traceback.

        asyncio reports a handshake that fails or times out to the loop's exception handler;
        for a server that is a routine event (scanners, plain-TCP clients), not an error.
        """
        # Left in place after shutdown: a handshake still in progress may fail later. Other
        # events go on to the handler that was there before.
        previous = loop.get_exception_handler()

        def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
            exc = context.get("exception")
            if context.get("message", "").startswith("Error on transport creation") and (
                isinstance(exc, ssl.SSLError | ConnectionError | TimeoutError)
            ):
                transport = context.get("transport")
                peer = transport.get_extra_info("peername") if transport is not None else None
                log.info("TLS handshake from %s failed: %s", _address(peer), exc)
                return
            if previous is not None:
                previous(loop, context)
            else:
                loop.default_exception_handler(context)

        loop.set_exception_handler(handler)

    def track(self, coroutine: Any) -> None:
        """Run a hook coroutine as a task the server waits for at shutdown."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self._hook_tasks.add(task)
        task.add_done_callback(self._hook_tasks.discard)


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


def _tls_info(ssl_object: ssl.SSLObject | None) -> TLSInfo | None:
    if ssl_object is None:
        return None
    cipher = ssl_object.cipher()
    return TLSInfo(
        version=ssl_object.version(),
        cipher=cipher[0] if cipher else None,
        peer_certificate=ssl_object.getpeercert() or None,
    )


def _address(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[:2]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(peer)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="server.py",
        description="Run the pyasync-server. Settings come from the environment and .env; "
        "flags override them.",
    )
    parser.add_argument("--host", help="address to listen on (HOST)")
    parser.add_argument("--port", type=int, help="port to listen on (PORT)")
    parser.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="log level (LOG_LEVEL)")  # fmt: skip
    parser.add_argument("--env-file", default=".env", help="settings file (default: .env)")
    parser.add_argument(
        "--make-cert", metavar="DIR", type=Path,
        help="write a self-signed cert.pem/key.pem for localhost into DIR and exit",
    )  # fmt: skip
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point: ``python server.py [--host H] [--port P]``."""
    args = _parse_args(argv)
    try:
        if args.make_cert is not None:
            cert, key = make_self_signed_cert(args.make_cert)
            print(f"wrote {cert} and {key}; the same with openssl:")
            print(" ".join(openssl_command(args.make_cert)))
            print(f"then: ENABLE_TLS=true TLS_CERT_FILE={cert} TLS_KEY_FILE={key} python server.py")
            return
        overrides = {"host": args.host, "port": args.port, "log_level": args.log_level}
        settings = config.load(env_file=args.env_file, overrides=overrides)
        db_settings = server_config.load(env_file=args.env_file)
        setup_logging(settings.log_level)
        server = Server(settings, db_settings=db_settings)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    if settings.reuse_large_buffers:
        reuse_large_buffers(settings.max_frame_size)
    handle_run_main(server.serve, use_uvloop=settings.use_uvloop)


if __name__ == "__main__":
    main()
