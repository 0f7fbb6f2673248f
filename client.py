"""The pyasync-server client: an async ``Client`` that multiplexes requests, and a CLI.

Use it from code::

    async with Client("127.0.0.1", 1145) as client:
        answer = await client.request(PACKAGE.REQUEST_ECHO, EchoRequest(text="hi"), timeout=5)

or from a shell: ``python client.py ping``, ``python client.py call ECHO '{"text": "hi"}'``.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import itertools
import math
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import msgspec

import config
from config import ConfigError, Settings
from package import (
    PACKAGE,
    Body,
    DeadlineExceeded,
    EchoAnswer,
    EchoRequest,
    ErrorAnswer,
    InvalidArgument,
    KvDeleteAnswer,
    KvDeleteRequest,
    KvGetAnswer,
    KvGetRequest,
    KvListAnswer,
    KvListRequest,
    KvPutAnswer,
    KvPutRequest,
    PingRequest,
    RPCError,
    ServerInfoAnswer,
    ServerInfoRequest,
    answer_kind_for,
    body_type,
    error_from_answer,
    is_request,
    pack,
    unpack,
)
from protocol import (
    DEFAULT_MAX_FRAME_SIZE,
    MAX_REQUEST_ID,
    MAX_TIMEOUT_MS,
    Compression,
    Frame,
    FrameDecoder,
    ProtocolError,
    encode_frame,
)
from utils import EXIT_CONFIG, handle_run_main, resolve_client_ssl_context

__all__ = ["Client", "ConnectionClosed", "EventHandler", "main"]

EventHandler = Callable[[PACKAGE, Body], None]

# The server answers DEADLINE_EXCEEDED itself when a request's timeout runs out; the client waits
# this much longer before giving up on the answer, so that the server's reply usually wins.
TIMEOUT_GRACE = 0.5  # seconds


class ConnectionClosed(ConnectionError):
    """Raised for every pending and later request once the connection is gone."""


class Client(asyncio.Protocol):
    """A connection to a pyasync-server carrying many concurrent requests.

    Args:
        host: server address.
        port: server port.
        ssl: TLS context (see ``utils.resolve_client_ssl_context``), or None for plain TCP.
        server_hostname: name to check the certificate against; ``host`` by default.
        connect_timeout: seconds for the TCP connect and TLS handshake.
        timeout: default per-request timeout in seconds, sent to the server which enforces it;
            None leaves it to the server's REQUEST_TIMEOUT.
        compression: when to compress request bodies; None never compresses.
        max_frame_size: largest answer body accepted, in bytes.
        on_event: called with (type, body) for packages the server pushes unasked.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 1145,
        *,
        ssl: Any = None,
        server_hostname: str | None = None,
        connect_timeout: float = 10.0,
        timeout: float | None = 30.0,
        compression: Compression | None = None,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        on_event: EventHandler | None = None,
    ) -> None:
        self.host, self.port = host, port
        self.ssl = ssl
        self.server_hostname = server_hostname
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.compression = compression if compression is not None else Compression()
        self.on_event = on_event
        self._decoder = FrameDecoder(max_frame_size)
        self._pending: dict[int, asyncio.Future[Frame]] = {}
        self._ids = itertools.count(1)
        self._transport: asyncio.Transport | None = None
        self._closed_error: Exception | None = None
        self._server_error: RPCError | None = None
        self._received_frame = False  # a valid frame came: the peer speaks this protocol
        self._write_ready: asyncio.Future[None] | None = None  # set while writing is paused
        self._lost: asyncio.Future[None] | None = None

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs: Any) -> Client:
        """A client for the server these settings describe (same HOST, PORT, TLS, limits)."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(
            settings.host, settings.host
        )
        kwargs.setdefault(
            "ssl",
            resolve_client_ssl_context(
                tls=settings.enable_tls, cafile=settings.tls_ca_file or None
            ),
        )
        kwargs.setdefault("connect_timeout", settings.connect_timeout)
        kwargs.setdefault("timeout", settings.request_timeout)
        kwargs.setdefault("compression", settings.compression)
        kwargs.setdefault("max_frame_size", settings.max_frame_size)
        return cls(host, settings.port, **kwargs)

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_connected(self) -> bool:
        return self._transport is not None and self._closed_error is None

    async def connect(self) -> Client:
        """Open the connection.

        Raises:
            ConnectionRefusedError: nothing listens at the address.
            TimeoutError: connecting or the TLS handshake took longer than ``connect_timeout``.
            ssl.SSLError: the TLS handshake failed (e.g. the server does not speak TLS).
            OSError: any other network failure.
        """
        loop = asyncio.get_running_loop()
        self._lost = loop.create_future()
        try:
            async with asyncio.timeout(self.connect_timeout):
                await loop.create_connection(
                    lambda: self,
                    self.host,
                    self.port,
                    ssl=self.ssl,
                    server_hostname=(self.server_hostname or self.host) if self.ssl else None,
                )
        except TimeoutError:
            raise TimeoutError(
                f"connecting to {self.address} took longer than {self.connect_timeout:g} s"
            ) from None
        except ConnectionRefusedError:
            raise ConnectionRefusedError(
                errno.ECONNREFUSED, f"cannot connect to {self.address}: connection refused"
            ) from None
        return self

    async def close(self) -> None:
        """Close the connection; pending requests fail with ``ConnectionClosed``."""
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()
        if self._lost is not None:
            await self._lost

    async def __aenter__(self) -> Client:
        return await self.connect()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def request(
        self, kind: PACKAGE, body: Body | None = None, *, timeout: float | None = -1.0
    ) -> Body:
        """Send one request and return its answer body.

        Args:
            kind: a ``REQUEST_*`` type.
            body: its body; the type's empty body when None.
            timeout: seconds, enforced by the server and here; -1 for the client's default,
                None for the server's default.

        Raises:
            RPCError: the server answered ``ANSWER_ERROR`` (the subclass matches the code).
            DeadlineExceeded: no answer within the timeout.
            ConnectionClosed: the connection was lost before the answer came.
        """
        if body is None:
            body = body_type(kind)()
        payload = pack(kind, body)
        if timeout is not None and timeout < 0:
            timeout = self.timeout
        frame = await self.request_raw(kind, payload, timeout=timeout)
        if frame.kind == PACKAGE.ANSWER_ERROR:
            error_body = unpack(PACKAGE.ANSWER_ERROR, frame.body)
            assert isinstance(error_body, ErrorAnswer)
            raise error_from_answer(error_body)
        expected = answer_kind_for(kind)
        if frame.kind != expected:
            raise ProtocolError(f"{kind.name} was answered with type {frame.kind}")
        return unpack(expected, frame.body)

    async def request_raw(self, kind: int, payload: bytes, *, timeout: float | None) -> Frame:
        """Send an already packed body of any type number and return the answer frame."""
        if self._closed_error is not None:
            raise self._closed_error
        if self._transport is None:
            raise ConnectionClosed(f"not connected to {self.address}; call connect() first")
        if self._write_ready is not None:
            await asyncio.shield(self._write_ready)
        request_id = self._next_id()
        timeout_ms = 0 if timeout is None else min(math.ceil(timeout * 1000), MAX_TIMEOUT_MS)
        future: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            self._transport.write(
                encode_frame(
                    kind, request_id, payload, timeout_ms=timeout_ms, compression=self.compression
                )
            )
            if timeout is None:
                return await future
            async with asyncio.timeout(timeout + TIMEOUT_GRACE):
                return await future
        except TimeoutError:
            raise _deadline_exceeded(timeout) from None
        finally:
            self._pending.pop(request_id, None)

    def _next_id(self) -> int:
        while True:
            request_id = next(self._ids)
            if request_id > MAX_REQUEST_ID:
                self._ids = itertools.count(1)
                continue
            if request_id not in self._pending:
                return request_id

    # ---- conveniences for the built-in actions ---------------------------------------------

    async def ping(self) -> float:
        """Round-trip time of one PING, in seconds."""
        started = time.perf_counter()
        await self.request(PACKAGE.REQUEST_PING, PingRequest())
        return time.perf_counter() - started

    async def echo(self, text: str) -> str:
        """The server's echo of ``text``."""
        answer = await self.request(PACKAGE.REQUEST_ECHO, EchoRequest(text=text))
        assert isinstance(answer, EchoAnswer) and answer.text is not None
        return answer.text

    async def server_info(self) -> ServerInfoAnswer:
        """Version, uptime, load and configuration of the server."""
        answer = await self.request(PACKAGE.REQUEST_SERVER_INFO, ServerInfoRequest())
        assert isinstance(answer, ServerInfoAnswer)
        return answer

    # ---- asyncio.Protocol callbacks -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self._decoder.feed(data)
        try:
            while (frame := self._decoder.next_frame()) is not None:
                self._dispatch(frame)
        except ProtocolError as exc:
            hint = ""
            if not self._received_frame and self.ssl is None:
                hint = "; if the server requires TLS, use --tls (and --cafile)"
            self._closed_error = ConnectionClosed(
                f"the server at {self.address} sent a broken stream ({exc}){hint}"
            )
            assert self._transport is not None
            self._transport.abort()

    def _dispatch(self, frame: Frame) -> None:
        self._received_frame = True
        if frame.request_id:
            future = self._pending.pop(frame.request_id, None)
            if future is not None and not future.done():
                future.set_result(frame)
            return
        # Request id 0: the server speaks about the connection, or pushes an event.
        if frame.kind == PACKAGE.ANSWER_ERROR:
            error = unpack(PACKAGE.ANSWER_ERROR, frame.body)
            assert isinstance(error, ErrorAnswer)
            self._server_error = error_from_answer(error)
        elif self.on_event is not None:
            try:
                kind = PACKAGE(frame.kind)
                self.on_event(kind, unpack(kind, frame.body))
            except (ValueError, RPCError):
                pass  # an event this client does not know yet

    def eof_received(self) -> bool | None:
        return False  # let the transport close; connection_lost tells the waiters

    def connection_lost(self, exc: Exception | None) -> None:
        if self._closed_error is None:
            self._closed_error = self._describe_loss(exc)
        for future in self._pending.values():
            if not future.done():
                future.set_exception(self._closed_error)
        self._pending.clear()
        if self._write_ready is not None and not self._write_ready.done():
            self._write_ready.set_exception(self._closed_error)
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)

    def _describe_loss(self, exc: Exception | None) -> Exception:
        if self._server_error is not None:
            return self._server_error
        if self._transport is not None and self._transport.is_closing() and exc is None:
            if not self._received_frame and self.ssl is None:
                return ConnectionClosed(
                    f"the server at {self.address} closed the connection without answering; "
                    "if it requires TLS, use --tls (and --cafile)"
                )
        cause = f": {exc}" if exc else ""
        return ConnectionClosed(f"connection to {self.address} closed{cause}")

    def pause_writing(self) -> None:
        self._write_ready = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._write_ready is not None and not self._write_ready.done():
            self._write_ready.set_result(None)
        self._write_ready = None


def _deadline_exceeded(timeout: float | None) -> RPCError:
    return DeadlineExceeded(f"no answer within {timeout:g} s")


# ---- command line -------------------------------------------------------------------------


def _package_by_name(name: str) -> PACKAGE:
    key = name.strip().upper().replace("-", "_")
    for candidate in (key, "REQUEST_" + key):
        if candidate in PACKAGE.__members__ and is_request(PACKAGE[candidate]):
            return PACKAGE[candidate]
    known = ", ".join(k.name.removeprefix("REQUEST_") for k in PACKAGE if is_request(k))
    raise InvalidArgument(f"no request type {name!r}; known: {known}")


def _body_from_json(kind: PACKAGE, text: str | None) -> Body:
    try:
        return msgspec.json.decode(text or "{}", type=body_type(kind))
    except msgspec.DecodeError as exc:
        raise InvalidArgument(
            f"invalid JSON body for {kind.name}: {exc}", hint="bytes fields take base64 strings"
        ) from None


def _to_json(value: Any) -> str:
    return msgspec.json.format(msgspec.json.encode(value), indent=2).decode()


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="client.py", description="Talk to a pyasync-server from the command line."
    )
    parser.add_argument("--host", help="server address (HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="server port (PORT, default 1145)")
    parser.add_argument("--tls", action="store_true", default=None, help="connect with TLS")
    parser.add_argument("--cafile", help="CA that signed the server certificate (implies --tls)")
    parser.add_argument("--timeout", type=float, help="per-request timeout in seconds")
    parser.add_argument("--env-file", default=".env", help="settings file (default: .env)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("ping", help="print the round-trip time")
    echo = commands.add_parser("echo", help="print TEXT as the server sends it back")
    echo.add_argument("text", metavar="TEXT")
    commands.add_parser("info", help="print the server's information as JSON")
    call = commands.add_parser("call", help="send any request, print the answer as JSON")
    call.add_argument("package", metavar="PACKAGE_NAME", help="e.g. ECHO or REQUEST_ECHO")
    call.add_argument("body", metavar="JSON_BODY", nargs="?", help="the body as JSON")
    kv = commands.add_parser("kv", help="the key-value store: get, put, delete, list")
    kv_commands = kv.add_subparsers(dest="kv_command", required=True, metavar="KV_COMMAND")
    kv_get = kv_commands.add_parser("get", help="print the value of KEY")
    kv_get.add_argument("key", metavar="KEY")
    kv_put = kv_commands.add_parser("put", help="store VALUE (text) under KEY")
    kv_put.add_argument("key", metavar="KEY")
    kv_put.add_argument("value", metavar="VALUE")
    kv_put.add_argument("--expect", type=int, help="only if KEY is at this version (0: new)")
    kv_delete = kv_commands.add_parser("delete", help="delete KEY")
    kv_delete.add_argument("key", metavar="KEY")
    kv_delete.add_argument("--expect", type=int, help="only if KEY is at this version")
    kv_list = kv_commands.add_parser("list", help="list keys starting with PREFIX")
    kv_list.add_argument("prefix", metavar="PREFIX", nargs="?", default="")
    kv_list.add_argument("--limit", type=int, default=100, help="keys per page (100)")
    bench = commands.add_parser("bench", help="measure requests/s and latency")
    bench.add_argument("-c", "--connections", type=int, default=1, help="connections (1)")
    bench.add_argument("-k", "--in-flight", type=int, default=1, help="per connection (1)")
    bench.add_argument("-d", "--duration", type=float, default=5.0, help="seconds (5)")
    bench.add_argument("--payload", type=int, default=32, help="echo payload bytes (32)")
    bench.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds (1)")
    return parser.parse_args(argv)


async def _run_command(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "bench":
        return await _bench(args, lambda: _client(args, settings))
    async with _client(args, settings) as client:
        if args.command == "ping":
            rtt = await client.ping()
            print(f"pong from {client.address} in {rtt * 1000:.3f} ms")
        elif args.command == "echo":
            print(await client.echo(args.text))
        elif args.command == "info":
            print(_to_json(await client.server_info()))
        elif args.command == "kv":
            await _kv_command(client, args)
        elif args.command == "call":
            kind = _package_by_name(args.package)
            print(_to_json(await client.request(kind, _body_from_json(kind, args.body))))
    return 0


async def _kv_command(client: Client, args: argparse.Namespace) -> None:
    """``kv get|put|delete|list``: values as text on stdout, versions on stderr."""
    if args.kv_command == "get":
        got = await client.request(PACKAGE.REQUEST_KV_GET, KvGetRequest(key=args.key))
        assert isinstance(got, KvGetAnswer)
        sys.stdout.buffer.write(got.value + b"\n")
        print(f"version {got.version}", file=sys.stderr)
    elif args.kv_command == "put":
        request = KvPutRequest(
            key=args.key, value=args.value.encode(), expected_version=args.expect
        )
        put = await client.request(PACKAGE.REQUEST_KV_PUT, request)
        assert isinstance(put, KvPutAnswer)
        print(f"version {put.version}")
    elif args.kv_command == "delete":
        deleted = await client.request(
            PACKAGE.REQUEST_KV_DELETE, KvDeleteRequest(key=args.key, expected_version=args.expect)
        )
        assert isinstance(deleted, KvDeleteAnswer)
        print("deleted" if deleted.deleted else "not found")
    else:
        cursor = ""
        while True:  # every page, so the listing is complete
            page = await client.request(
                PACKAGE.REQUEST_KV_LIST,
                KvListRequest(prefix=args.prefix, limit=args.limit, cursor=cursor),
            )
            assert isinstance(page, KvListAnswer)
            for item in page.items:
                print(f"{item.key}\tversion {item.version}\t{item.size} bytes")
            if not (cursor := page.next_cursor):
                break


async def _bench(args: argparse.Namespace, new_client: Callable[[], Client]) -> int:
    """Keep connections x in-flight ECHO requests going; print requests/s and latencies."""
    if min(args.connections, args.in_flight) < 1 or args.duration <= 0:
        raise InvalidArgument("bench needs --connections, --in-flight and --duration above 0")
    clients = [new_client() for _ in range(args.connections)]
    await asyncio.gather(*(client.connect() for client in clients))
    request = EchoRequest(data=bytes(args.payload))
    latencies: list[float] = []
    completed = 0
    loop = asyncio.get_running_loop()
    measure_from = loop.time() + args.warmup
    stop_at = measure_from + args.duration

    async def worker(client: Client) -> None:
        nonlocal completed
        # loop.time() has millisecond resolution on uvloop; latencies need perf_counter.
        while loop.time() < stop_at:
            started = time.perf_counter()
            await client.request(PACKAGE.REQUEST_ECHO, request)
            if loop.time() >= measure_from:
                latencies.append(time.perf_counter() - started)
                completed += 1

    async def progress() -> None:
        while (now := loop.time()) < stop_at:
            await asyncio.sleep(1)
            if now >= measure_from:
                rate = completed / max(loop.time() - measure_from, 1e-9)
                print(f"\r  {loop.time() - measure_from:5.1f} s  {rate:10,.0f} req/s",
                      end="", file=sys.stderr, flush=True)  # fmt: skip

    workers = [worker(client) for client in clients for _ in range(args.in_flight)]
    reporter = asyncio.create_task(progress())
    try:
        await asyncio.gather(*workers)
    finally:
        reporter.cancel()
        await asyncio.gather(*(client.close() for client in clients))
    print(file=sys.stderr)
    latencies.sort()

    def percentile(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(len(latencies) * p))] * 1000

    shape = f"{args.connections} connections x {args.in_flight} in flight"
    print(f"{shape}, {args.payload}-byte echo, {args.duration:g} s after {args.warmup:g} s warm-up")
    if not latencies:
        print("no request completed")
        return 1
    print(f"requests: {completed:,}  rate: {completed / args.duration:,.0f} req/s")
    print(f"latency ms: p50 {percentile(0.50):.3f}  p99 {percentile(0.99):.3f}  "
          f"max {latencies[-1] * 1000:.3f}")  # fmt: skip
    return 0


def _client(args: argparse.Namespace, settings: Settings) -> Client:
    ssl = resolve_client_ssl_context(
        tls=bool(args.tls or settings.enable_tls or args.cafile),
        cafile=args.cafile or settings.tls_ca_file or None,
    )
    kwargs: dict[str, Any] = {"ssl": ssl}
    if args.timeout is not None:
        kwargs["timeout"] = args.timeout
    return Client.from_settings(settings, **kwargs)


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point; see ``python client.py --help``."""
    args = _parse_args(argv)
    try:
        settings = config.load(
            env_file=args.env_file, overrides={"host": args.host, "port": args.port}
        )
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    handle_run_main(lambda: _run_command(args, settings), use_uvloop=settings.use_uvloop)


if __name__ == "__main__":
    main()
