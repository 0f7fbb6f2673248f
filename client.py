"""The pyasync-server client: an async ``Client`` that multiplexes requests, and a CLI.

Use it from code::

    async with Client("127.0.0.1", 1145) as client:
        answer = await client.request(PACKAGE.REQUEST_ECHO, EchoRequest(text="hi"), timeout=5)

or from a shell: ``python client.py ping``, ``python client.py call ECHO '{"text": "hi"}'``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

import config
from config import ConfigError, Settings
from package import (
    IDEMPOTENT,
    PACKAGE,
    Body,
    DeadlineExceeded,
    EchoAnswer,
    EchoRequest,
    ErrorAnswer,
    GapEvent,
    HelloAnswer,
    HelloRequest,
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
    PublishAnswer,
    PublishRequest,
    RPCError,
    ServerInfoAnswer,
    ServerInfoRequest,
    Unavailable,
    __version__,
    answer_kind_for,
    body_type,
    error_from_answer,
    is_request,
    pack,
    pack_payload,
    unpack,
)
from protocol import (
    DEFAULT_MAX_FRAME_SIZE,
    MAX_TIMEOUT_MS,
    Compression,
    Frame,
    Payload,
    ProtocolError,
)
from pyasync.client_protocol import (
    ClientClosed,
    ClientProtocol,
    ConnectionBroken,
    ConnectionClosed,
    ServerClosed,
)
from pyasync.loadgen import run_bench
from pyasync.subscription import Subscription
from utils import EXIT_CONFIG, describe_error, handle_run_main, resolve_client_ssl_context

__all__ = [
    "Client",
    "ClientClosed",
    "ConnectionBroken",
    "ConnectionClosed",
    "ServerClosed",
    "Subscription",
    "main",
]

# The server answers DEADLINE_EXCEEDED itself when a request's timeout runs out; the client waits
# this much longer before giving up on the answer, so that the server's reply usually wins.
TIMEOUT_GRACE = 0.5  # seconds
RECONNECT_FIRST_DELAY = 0.05  # seconds; doubles after each round of failed endpoints
RECONNECT_MAX_DELAY = 2.0  # seconds
# A connection lost sooner than this after it was made counts as a failed round (an endpoint
# that accepts and then drops or refuses clients): the next failover backs off first.
RECONNECT_SETTLED = 1.0  # seconds


class Client:
    """A connection to a pyasync-server carrying many concurrent requests.

    Given several ``endpoints`` (or ``reconnect=True``), a lost connection is replaced by one to
    the next endpoint that answers, at once, then with exponential back-off and jitter while
    none does; subscriptions resume from the last offset they received, requests of types in
    ``package.IDEMPOTENT`` are sent again, and the others fail with ``Unavailable`` (they may or
    may not have run). Requests on a connection the server refused (``MAX_CONNECTIONS``) never
    ran: they are sent again whatever their type.

    Args:
        host: server address.
        port: server port.
        endpoints: ``"host:port"`` strings or ``(host, port)`` pairs to fail over between; when
            given, ``host`` and ``port`` are not used.
        reconnect: replace a lost connection; on by default with ``endpoints``.
        ssl: TLS context (see ``utils.resolve_client_ssl_context``), or None for plain TCP.
        server_hostname: name to check the certificate against; the endpoint's host by default.
        connect_timeout: seconds for the TCP connect and TLS handshake.
        timeout: default per-request timeout in seconds, sent to the server which enforces it;
            None leaves it to the server's REQUEST_TIMEOUT.
        compression: when to compress request bodies; None never compresses.
        max_frame_size: largest answer body accepted, in bytes.
        token: sent in a HELLO as each connection opens, for servers that require one.
        client_name: sent in that HELLO, for the server's logs.
        heartbeat: with ``reconnect``, seconds of silence from the server after which a PING
            is sent; no answer within as long again and the connection counts as lost (a node
            that vanished without closing it, which TCP alone notices only after many
            minutes). None turns it off.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 1145,
        *,
        endpoints: Sequence[str | tuple[str, int]] | None = None,
        reconnect: bool | None = None,
        ssl: Any = None,
        server_hostname: str | None = None,
        connect_timeout: float = 10.0,
        timeout: float | None = 30.0,
        compression: Compression | None = None,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        token: str = "",
        client_name: str = "pyasync-client",
        heartbeat: float | None = 5.0,
    ) -> None:
        self.token = token
        self.client_name = client_name
        self.principal = ""  # who the server took this client for (after a HELLO)
        self.endpoints = [parse_endpoint(e) for e in endpoints] if endpoints else [(host, port)]
        self.host, self.port = self.endpoints[0]
        self.reconnect = bool(endpoints) if reconnect is None else reconnect
        self.heartbeat = heartbeat
        self.ssl = ssl
        self.server_hostname = server_hostname
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.compression = compression if compression is not None else Compression()
        self.max_frame_size = max_frame_size
        self.subscriptions: set[Subscription] = set()
        self._protocol: ClientProtocol | None = None
        self._ready: asyncio.Event | None = None  # set while a connection is up
        self._reconnecting: asyncio.Task[None] | None = None
        self._is_closing = False
        self._next_endpoint = 0
        self._connected_at = 0.0  # loop time the current connection was made
        self._reconnect_delay = RECONNECT_FIRST_DELAY  # the next back-off, before jitter

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs: Any) -> Client:
        """A client for the server these settings describe (same HOST, PORT, TLS, limits).

        TLS uses ``TLS_CA_FILE`` and, for servers that require one, the client certificate
        ``TLS_CLIENT_CERT_FILE`` with ``TLS_CLIENT_KEY_FILE``.

        Raises:
            ConfigError: a TLS file cannot be read or is not valid PEM.
        """
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(
            settings.host, settings.host
        )
        if "ssl" not in kwargs:
            kwargs["ssl"] = resolve_client_ssl_context(
                tls=settings.enable_tls,
                cafile=settings.tls_ca_file or None,
                certfile=settings.tls_client_cert_file or None,
                keyfile=settings.tls_client_key_file or None,
            )
        kwargs.setdefault("connect_timeout", settings.connect_timeout)
        kwargs.setdefault("timeout", settings.request_timeout)
        kwargs.setdefault("compression", settings.compression)
        kwargs.setdefault("max_frame_size", settings.max_frame_size)
        kwargs.setdefault("token", settings.auth_token)
        return cls(host, settings.port, **kwargs)

    @property
    def address(self) -> str:
        """The endpoint connected to (or tried last), as ``host:port``."""
        return _format_address(self.host, self.port)

    async def connect(self) -> Client:
        """Open the connection, to the first endpoint that answers.

        Raises (the failure of the last endpoint tried):
            ConnectionRefusedError: nothing listens at the address.
            TimeoutError: connecting or the TLS handshake took longer than ``connect_timeout``.
            ssl.SSLError: the TLS handshake failed (e.g. the server does not speak TLS).
            OSError: any other network failure.
        """
        self._is_closing = False
        self._ready = asyncio.Event()
        await self._connect_any()
        return self

    async def close(self) -> None:
        """Close the connection; pending requests fail with ``ClientClosed``."""
        self._is_closing = True
        if self._reconnecting is not None:
            self._reconnecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconnecting
        if self._protocol is not None:
            self._protocol.close()
            await self._protocol.lost

    async def __aenter__(self) -> Client:
        return await self.connect()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # ---- connecting and failing over -----------------------------------------------------

    async def _connect_any(self) -> None:
        count = len(self.endpoints)
        failure: BaseException | None = None
        for step in range(count):
            index = (self._next_endpoint + step) % count
            host, port = self.endpoints[index]
            try:
                protocol = await self._open(host, port)
                if self.token:
                    await self._hello(protocol)
            except (OSError, TimeoutError, RPCError) as exc:  # ssl.SSLError is an OSError
                failure = exc  # a HELLO refused or cut off too: another endpoint may serve
                continue
            self._next_endpoint = (index + 1) % count  # the next failover tries another first
            self._connected_at = asyncio.get_running_loop().time()
            self.host, self.port, self._protocol = host, port, protocol
            if self.reconnect:
                protocol.lost.add_done_callback(self._connection_lost)
                if self.heartbeat:
                    self._watch(protocol, self.heartbeat)
            assert self._ready is not None
            self._ready.set()
            return
        assert failure is not None
        raise failure

    async def _open(self, host: str, port: int) -> ClientProtocol:
        loop = asyncio.get_running_loop()
        address = _format_address(host, port)
        protocol = ClientProtocol(
            address, is_tls=self.ssl is not None, max_frame_size=self.max_frame_size,
            compression=self.compression,
        )  # fmt: skip
        self.host, self.port = host, port
        try:
            async with asyncio.timeout(self.connect_timeout):
                await loop.create_connection(
                    lambda: protocol,
                    host,
                    port,
                    ssl=self.ssl,
                    server_hostname=(self.server_hostname or host) if self.ssl else None,
                )
        except TimeoutError:
            raise TimeoutError(
                f"connecting to {address} took longer than {self.connect_timeout:g} s"
            ) from None
        except ConnectionRefusedError:
            raise ConnectionRefusedError(
                errno.ECONNREFUSED, f"cannot connect to {address}: connection refused"
            ) from None
        return protocol

    async def _hello(self, protocol: ClientProtocol) -> None:
        """Authenticate a new connection before any other request may use it."""
        request = HelloRequest(token=self.token, client_name=self.client_name,
                               client_version=__version__)  # fmt: skip
        timeout = self.connect_timeout
        _, future = protocol.send(
            PACKAGE.REQUEST_HELLO, pack(PACKAGE.REQUEST_HELLO, request), math.ceil(timeout * 1000)
        )
        try:
            async with asyncio.timeout(timeout):
                frame = await future
        except BaseException:
            protocol.close()
            raise
        if frame.kind == PACKAGE.ANSWER_ERROR:
            protocol.close()
            error = unpack(PACKAGE.ANSWER_ERROR, frame.body)
            assert isinstance(error, ErrorAnswer)
            raise error_from_answer(error)
        answer = unpack(PACKAGE.ANSWER_HELLO, frame.body)
        assert isinstance(answer, HelloAnswer)
        self.principal = answer.principal

    def _connection_lost(self, lost: asyncio.Future[None]) -> None:
        if self._is_closing or self._ready is None:
            return
        self._ready.clear()
        if self._reconnecting is not None and not self._reconnecting.done():
            # Still resuming subscriptions over the connection just lost: their SUBSCRIBEs
            # would wait for a connection that only a new failover makes.
            self._reconnecting.cancel()
        self._reconnecting = asyncio.get_running_loop().create_task(self._fail_over())

    async def _fail_over(self) -> None:
        """Connect to the next endpoint that answers, then resume every subscription.

        The first try is immediate after a connection that had settled; one lost soon after it
        was made backs off first, so an endpoint that keeps dropping clients is not hammered.
        """
        settled = asyncio.get_running_loop().time() - self._connected_at >= RECONNECT_SETTLED
        if settled:
            self._reconnect_delay = RECONNECT_FIRST_DELAY
        else:
            await self._back_off()
        while True:
            try:
                await self._connect_any()
                break
            except (OSError, TimeoutError, RPCError):  # RPCError: a HELLO refused (for now)
                await self._back_off()
        await asyncio.gather(*(s.resume() for s in list(self.subscriptions)))

    def _watch(self, protocol: ClientProtocol, interval: float) -> None:
        """Check ``protocol``'s server is alive until the connection goes (``_heartbeat``)."""
        task = asyncio.get_running_loop().create_task(self._heartbeat(protocol, interval))
        protocol.lost.add_done_callback(lambda _: task.cancel())

    async def _heartbeat(self, protocol: ClientProtocol, interval: float) -> None:
        """PING after ``interval`` s without a read; abort if nothing comes back as long again.

        Nothing is read either while this client itself stopped reading (a subscriber's queue
        is full): that silence says nothing of the server, so it does not count.
        """
        loop = asyncio.get_running_loop()
        payload = pack(PACKAGE.REQUEST_PING, PingRequest())
        while protocol.closed_error is None:
            silent = loop.time() - max(protocol.received_at, self._connected_at)
            if silent < interval or protocol.is_reading_paused:
                await asyncio.sleep(interval - silent if silent < interval else interval)
                continue
            request_id, future = protocol.send(
                PACKAGE.REQUEST_PING, payload, math.ceil(interval * 1000)
            )
            try:
                async with asyncio.timeout(interval):
                    await future
            except TimeoutError:
                if (
                    loop.time() - protocol.received_at >= interval
                    and not protocol.is_reading_paused
                ):
                    protocol.abort(
                        ConnectionBroken(
                            f"the server at {protocol.address} did not answer a PING in "
                            f"{interval:g} s"
                        )
                    )
                    return
            except (ConnectionClosed, RPCError):
                return
            finally:
                protocol.pending.pop(request_id, None)

    async def _back_off(self) -> None:
        delay = self._reconnect_delay
        await asyncio.sleep(random.uniform(delay / 2, delay))  # jitter: no stampede
        self._reconnect_delay = min(delay * 2, RECONNECT_MAX_DELAY)

    async def _connection(self, deadline: float | None) -> ClientProtocol:
        """The live connection, waiting (until ``deadline``) while one is being replaced."""
        while True:
            protocol = self._protocol
            if protocol is None or self._ready is None:
                raise ClientClosed(f"not connected to {self.address}; call connect() first")
            if protocol.closed_error is None:
                return protocol
            if not self.reconnect or self._is_closing:
                raise protocol.closed_error
            self._ready.clear()
            try:
                async with asyncio.timeout_at(deadline):
                    await self._ready.wait()
            except TimeoutError:
                raise Unavailable(
                    f"no connection to any of {len(self.endpoints)} endpoints in time"
                ) from None

    # ---- requests -----------------------------------------------------------------------------

    async def request(
        self,
        kind: PACKAGE,
        body: Body | None = None,
        *,
        timeout: float | None = -1.0,
        on_answer: Callable[[Frame], None] | None = None,
    ) -> Body:
        """Send one request and return its answer body.

        Args:
            kind: a ``REQUEST_*`` type.
            body: its body; the type's empty body when None.
            timeout: seconds, enforced by the server and here; -1 for the client's default,
                None for the server's default.
            on_answer: called with the answer frame as soon as it is read.

        Raises:
            RPCError: the server answered ``ANSWER_ERROR`` (the subclass matches the code).
            DeadlineExceeded: no answer within the timeout.
            Unavailable: the connection was lost and ``kind`` is not idempotent (failover on).
            ConnectionClosed: the connection is gone (``ClientClosed``, ``ServerClosed`` or
                ``ConnectionBroken`` says how).
        """
        if body is None:
            body = body_type(kind)()
        payload = pack_payload(kind, body)
        if timeout is not None and timeout < 0:
            timeout = self.timeout
        frame = await self.request_raw(kind, payload, timeout=timeout, on_answer=on_answer)
        if frame.kind == PACKAGE.ANSWER_ERROR:
            error_body = unpack(PACKAGE.ANSWER_ERROR, frame.body)
            assert isinstance(error_body, ErrorAnswer)
            raise error_from_answer(error_body)
        expected = answer_kind_for(kind)
        if frame.kind != expected:
            raise ProtocolError(f"{kind.name} was answered with type {frame.kind}")
        return unpack(expected, frame.body)

    async def request_raw(
        self,
        kind: int,
        payload: Payload,
        *,
        timeout: float | None,
        on_answer: Callable[[Frame], None] | None = None,
    ) -> Frame:
        """Send an already packed body of any type number and return the answer frame.

        ``on_answer`` is called with the answer frame as soon as it is read, before any frame
        that came after it in the same read is handled.
        """
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout + TIMEOUT_GRACE
        while True:
            protocol = await self._connection(deadline)
            if protocol.write_ready is not None:
                await asyncio.shield(protocol.write_ready)
            left = None if deadline is None else max(deadline - loop.time() - TIMEOUT_GRACE, 0.001)
            timeout_ms = 0 if left is None else min(math.ceil(left * 1000), MAX_TIMEOUT_MS)
            request_id, future = protocol.send(kind, payload, timeout_ms, on_answer)
            try:
                async with asyncio.timeout_at(deadline):
                    return await future
            except TimeoutError:
                raise DeadlineExceeded(f"no answer within {timeout:g} s") from None
            except RPCError as exc:  # the server's word on the whole connection, or an answer
                refused = protocol.is_refused and exc is protocol.closed_error
                if not refused or not self.reconnect or self._is_closing:
                    raise
                # Refused as it opened, before the server read a byte of it: nothing ran.
            except ConnectionClosed:
                if not self.reconnect or self._is_closing:
                    raise
                if kind not in IDEMPOTENT:
                    raise Unavailable(
                        f"the connection to {protocol.address} was lost before the answer; "
                        "the request may or may not have run",
                        hint="send it again if that is safe",
                    ) from None
            finally:
                protocol.pending.pop(request_id, None)
                protocol.answer_hooks.pop(request_id, None)

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

    # ---- publish/subscribe ------------------------------------------------------------------

    async def publish(self, topic: str, data: bytes) -> int:
        """Publish ``data`` to ``topic``; return its offset once the broker stored it."""
        answer = await self.request(PACKAGE.REQUEST_PUBLISH, PublishRequest(topic=topic, data=data))
        assert isinstance(answer, PublishAnswer)
        return answer.offset

    def subscribe(
        self,
        topic: str,
        *,
        since: int | None = None,
        positions: dict[str, int] | None = None,
        max_queued: int = 10_000,
    ) -> Subscription:
        """``async with client.subscribe("chat.>") as events: async for event in events:``

        Args:
            topic: a topic, or a pattern: ``*`` stands for one token, a last ``>`` for the rest.
            since: also every kept message after this offset (0: all kept history); None for
                new messages only.
            positions: for a pattern, per topic, the last offset already seen.
            max_queued: events kept for a reader that falls behind; past it the client stops
                reading from the server, which holds back and later replays from history.
        """
        return Subscription(self, topic, since, dict(positions or {}), max_queued)


def parse_endpoint(endpoint: str | tuple[str, int]) -> tuple[str, int]:
    """``"host:port"``, ``"[v6]:port"`` or ``(host, port)`` as ``(host, port)``."""
    if isinstance(endpoint, tuple):
        return endpoint
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"endpoint must be host:port, got {endpoint!r}")
    return host.strip("[]"), int(port)


def _format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


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
    parser.add_argument("--token", help="token to authenticate with (AUTH_TOKEN)")
    parser.add_argument(
        "--endpoints", metavar="H:P,H:P", type=_endpoints,
        help="servers to fail over between, instead of --host/--port",
    )  # fmt: skip
    _add_tls_arguments(parser)
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
    sub = commands.add_parser("sub", help="print the messages of TOPIC as they arrive (Ctrl-C)")
    sub.add_argument("topic", metavar="TOPIC", help="a topic or pattern: a.b, a.*, a.>")
    sub.add_argument("--since", type=int, help="first replay kept messages after offset N")
    pub = commands.add_parser("pub", help="publish DATA (text) to TOPIC; print its offset")
    pub.add_argument("topic", metavar="TOPIC")
    pub.add_argument("data", metavar="DATA")
    bench = commands.add_parser("bench", help="measure requests/s and latency")
    bench.add_argument("-c", "--connections", type=int, default=1, help="connections (1)")
    bench.add_argument("-k", "--in-flight", type=int, default=1, help="per connection (1)")
    bench.add_argument("-d", "--duration", type=float, default=5.0, help="seconds (5)")
    bench.add_argument("--payload", type=int, default=32, help="echo payload bytes (32)")
    bench.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds (1)")
    return parser.parse_args(argv)


def _add_tls_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tls", action="store_true", default=None, help="connect with TLS")
    parser.add_argument("--cafile", help="CA that signed the server certificate (implies --tls)")
    parser.add_argument(
        "--cert", metavar="FILE",
        help="client certificate (PEM) for servers that require one (implies --tls; "
        "TLS_CLIENT_CERT_FILE)",
    )  # fmt: skip
    parser.add_argument(
        "--key", metavar="FILE",
        help="private key of --cert, unencrypted PEM, if not in its file (TLS_CLIENT_KEY_FILE)",
    )  # fmt: skip


async def _run_command(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "bench":
        return await run_bench(args, lambda: _client(args, settings))
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
        elif args.command == "pub":
            print(f"offset {await client.publish(args.topic, args.data.encode())}")
        elif args.command == "sub":
            await _print_messages(client, args.topic, args.since)
        elif args.command == "call":
            kind = _package_by_name(args.package)
            print(_to_json(await client.request(kind, _body_from_json(kind, args.body))))
    return 0


async def _print_messages(client: Client, topic: str, since: int | None) -> None:
    """One line per message (``topic offset data``) until Ctrl-C, which ends it cleanly."""
    with contextlib.suppress(asyncio.CancelledError):
        async with client.subscribe(topic, since=since) as events:
            if not events.complete:
                print(f"history no longer reaches back to offset {since}", file=sys.stderr)
            async for event in events:
                if isinstance(event, GapEvent):
                    print(f"{event.topic}: messages {event.first_missing} to "
                          f"{event.last_missing} are gone", file=sys.stderr)  # fmt: skip
                    continue
                text = event.data.decode(errors="backslashreplace")
                print(f"{event.topic} {event.offset} {text}", flush=True)


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


def _client(args: argparse.Namespace, settings: Settings) -> Client:
    """The client the flags and settings describe; flags win over settings.

    Raises:
        ConfigError: a TLS file cannot be read or is not valid PEM (exit code 78).
    """
    certfile = args.cert or settings.tls_client_cert_file or None
    # A --cert from the command line never pairs with TLS_CLIENT_KEY_FILE from the settings.
    ssl = resolve_client_ssl_context(
        tls=bool(args.tls or settings.enable_tls or args.cafile or certfile),
        cafile=args.cafile or settings.tls_ca_file or None,
        certfile=certfile,
        keyfile=args.key or (None if args.cert else settings.tls_client_key_file) or None,
    )
    kwargs: dict[str, Any] = {"ssl": ssl}
    if args.timeout is not None:
        kwargs["timeout"] = args.timeout
    if args.endpoints:
        kwargs["endpoints"] = args.endpoints
    if args.token:
        kwargs["token"] = args.token
    return Client.from_settings(settings, **kwargs)


def _endpoints(text: str) -> list[tuple[str, int]]:
    try:
        return [parse_endpoint(part.strip()) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point; see ``python client.py --help``."""
    args = _parse_args(argv)
    try:
        settings = config.load(
            env_file=args.env_file, overrides={"host": args.host, "port": args.port}
        )
    except ConfigError as exc:
        print(f"error: {describe_error(exc)[0]}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    handle_run_main(lambda: _run_command(args, settings), use_uvloop=settings.use_uvloop)


if __name__ == "__main__":
    main()
