"""The client's side of one connection: frames out, answers matched to their requests.

``ClientProtocol`` is the asyncio protocol under ``client.Client`` (as asyncpg keeps its
protocol apart from its connection): it owns the decoder, the table of requests waiting for an
answer and the write pause, and says why a connection ended.
"""

from __future__ import annotations

import asyncio
import itertools
import ssl
from collections.abc import Callable
from typing import Protocol

from package import (
    PACKAGE,
    ErrorAnswer,
    GapEvent,
    MessageEvent,
    ResourceExhausted,
    RPCError,
    error_from_answer,
    unpack,
)
from protocol import (
    CONNECTION_REQUEST_ID,
    MAX_REQUEST_ID,
    Compression,
    Frame,
    FrameDecoder,
    Payload,
    ProtocolError,
    encode_frame,
)
from pyasync.tls import describe_tls_rejection, presents_client_certificate

__all__ = [
    "ClientClosed",
    "ClientProtocol",
    "ConnectionBroken",
    "ConnectionClosed",
    "EventSink",
    "ServerClosed",
    "TLSMismatch",
]

TLS_HINT = "if the server requires TLS, use --tls (and --cafile)"
# A TLS record starts with its content type (20 to 23) and major version 3: a plain client
# reading one is talking to a TLS server.
TLS_RECORD_TYPES = range(20, 24)


class ConnectionClosed(ConnectionError):
    """Raised for a request on a connection that is gone; the subclass says why."""


class ClientClosed(ConnectionClosed):
    """Raised when this side closed the connection (or never opened it)."""


class ServerClosed(ConnectionClosed):
    """Raised when the server ended the connection in an orderly way (shutdown, idle timeout)."""


class ConnectionBroken(ConnectionClosed):
    """Raised when the connection broke: reset, cut, or a stream this side cannot decode."""


class TLSMismatch(ConnectionBroken):
    """Raised when the connection failed over TLS before any answer: this side spoke plain TCP
    to a TLS server, or the server refused the client certificate (or wanted one)."""


class EventSink(Protocol):
    """A client-side subscription: takes the events the server pushes for it."""

    def take(self, event: MessageEvent | GapEvent) -> bool:
        """Queue one event; False when its queue is full (the client then stops reading)."""


class ClientProtocol(asyncio.Protocol):
    """Sends request frames and resolves each waiting future with its answer frame.

    Args:
        address: ``host:port`` of the server, for messages.
        is_tls: the connection uses TLS (a broken first answer then has another cause).
        max_frame_size: largest answer body accepted, in bytes.
        compression: when to compress request bodies; None never compresses.
    """

    def __init__(
        self,
        address: str,
        *,
        is_tls: bool,
        max_frame_size: int,
        compression: Compression | None,
    ) -> None:
        self.address = address
        self.is_tls = is_tls
        self.compression = compression
        self.decoder = FrameDecoder(max_frame_size)
        self.pending: dict[int, asyncio.Future[Frame]] = {}
        self.ids = itertools.count(1)
        self.transport: asyncio.Transport | None = None
        self.closed_error: ConnectionClosed | RPCError | None = None  # set once it is gone
        self.server_error: RPCError | None = None  # what the server said about the connection
        self.is_refused = False  # the server refused the connection before reading from it
        self.received_frame = False  # a valid frame came: the peer speaks this protocol
        self.write_ready: asyncio.Future[None] | None = None  # set while writing is paused
        self.lost = asyncio.get_running_loop().create_future()
        self.received_at = 0.0  # loop time of the last read: the peer is alive
        self.subscriptions: dict[int, EventSink] = {}
        # Called with an answer frame as it arrives, before later frames of the same read: a
        # SUBSCRIBE answer registers its subscription before its first event is dispatched.
        self.answer_hooks: dict[int, Callable[[Frame], None]] = {}
        self.is_reading_paused = False  # a subscription's queue is full
        self.presents_certificate: bool | None = None  # over TLS: a client certificate was sent

    def send(
        self,
        kind: int,
        payload: Payload,
        timeout_ms: int,
        on_answer: Callable[[Frame], None] | None = None,
    ) -> tuple[int, asyncio.Future[Frame]]:
        """Write one request; return its id and the future its answer frame will resolve.

        The caller removes the id from ``pending`` once it stops waiting.
        """
        if self.closed_error is not None:
            raise self.closed_error
        assert self.transport is not None
        request_id = self._next_id()
        future: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self.pending[request_id] = future
        if on_answer is not None:
            self.answer_hooks[request_id] = on_answer
        self.transport.write(
            encode_frame(
                kind, request_id, payload, timeout_ms=timeout_ms, compression=self.compression
            )
        )
        return request_id, future

    def abort(self, error: ConnectionClosed) -> None:
        """Drop the connection at once, failing what waits on it with ``error`` (a peer that
        stopped answering: a clean close would wait on it)."""
        if self.closed_error is None:
            self.closed_error = error
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        if self.closed_error is None:
            self.closed_error = ClientClosed(f"the connection to {self.address} was closed here")
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _next_id(self) -> int:
        while True:
            request_id = next(self.ids)
            if request_id > MAX_REQUEST_ID:
                self.ids = itertools.count(1)
                continue
            if request_id not in self.pending:
                return request_id

    # ---- asyncio.Protocol callbacks -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        if self.is_tls:
            context = transport.get_extra_info("sslcontext")
            self.presents_certificate = presents_client_certificate(context)

    def data_received(self, data: bytes) -> None:
        self.received_at = self.lost.get_loop().time()
        self.decoder.feed(data)
        try:
            while (frame := self.decoder.next_frame()) is not None:
                self._dispatch(frame)
        except ProtocolError as exc:
            is_first = not self.received_frame and not self.is_tls
            if is_first and len(data) > 1 and data[0] in TLS_RECORD_TYPES and data[1] == 3:
                self.closed_error = TLSMismatch(
                    f"the server at {self.address} speaks TLS: connect with --tls (and --cafile)"
                )
            else:
                hint = f"; {TLS_HINT}" if is_first else ""
                self.closed_error = ConnectionBroken(
                    f"the server at {self.address} sent a broken stream ({exc}){hint}"
                )
            assert self.transport is not None
            self.transport.abort()

    def _dispatch(self, frame: Frame) -> None:
        is_first, self.received_frame = not self.received_frame, True
        if frame.request_id != CONNECTION_REQUEST_ID:
            if self.answer_hooks and (hook := self.answer_hooks.pop(frame.request_id, None)):
                hook(frame)
            future = self.pending.pop(frame.request_id, None)
            if future is not None and not future.done():
                future.set_result(frame)
            return
        # Request id 0: the server pushes an event, or speaks about the connection.
        if frame.kind in (PACKAGE.EVENT_MESSAGE, PACKAGE.EVENT_GAP):
            try:
                event = unpack(PACKAGE(frame.kind), frame.body)
            except RPCError:
                return  # an event this client cannot read: nothing to deliver
            assert isinstance(event, MessageEvent | GapEvent)
            sink = self.subscriptions.get(event.subscription)
            if sink is not None and not sink.take(event) and not self.is_reading_paused:
                self.is_reading_paused = True  # the server holds further pushes back
                assert self.transport is not None
                self.transport.pause_reading()
        elif frame.kind == PACKAGE.ANSWER_ERROR:
            error = unpack(PACKAGE.ANSWER_ERROR, frame.body)
            assert isinstance(error, ErrorAnswer)
            self.server_error = error_from_answer(error)
            # A server over its connection limits says so first thing, and reads nothing.
            self.is_refused = is_first and isinstance(self.server_error, ResourceExhausted)
        # Other event types are newer than this client: ignored.

    def resume_reading(self) -> None:
        """A full subscription queue has room again."""
        if self.is_reading_paused and self.transport is not None:
            self.is_reading_paused = False
            self.transport.resume_reading()

    def eof_received(self) -> bool | None:
        return False  # let the transport close; connection_lost tells the waiters

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed_error is None:
            self.closed_error = self._describe_loss(exc)
        for future in self.pending.values():
            if not future.done():
                future.set_exception(self.closed_error)
        self.pending.clear()
        if self.write_ready is not None and not self.write_ready.done():
            self.write_ready.set_exception(self.closed_error)
            self.write_ready.exception()  # retrieved: a writer may not be waiting
        if not self.lost.done():
            self.lost.set_result(None)

    def _describe_loss(self, exc: Exception | None) -> ConnectionClosed | RPCError:
        if self.server_error is not None:
            return self.server_error
        # Requests went out and the connection ended before any answer. Over TLS the server
        # refused this client after the handshake: under TLS 1.3 that shows only now, as an
        # alert or, from a Python server (which sends none), a bare close or reset. Over plain
        # TCP, a server that closes on a request without a word most likely expects TLS.
        is_unanswered = bool(self.pending) and not self.received_frame
        if isinstance(exc, ssl.SSLError) or (is_unanswered and (self.is_tls or exc is None)):
            return self._tls_mismatch(exc)
        if exc is not None:
            return ConnectionBroken(f"connection to {self.address} broke: {exc}")
        if not self.received_frame and not self.is_tls:
            return ServerClosed(
                f"the server at {self.address} closed the connection without answering; {TLS_HINT}"
            )
        return ServerClosed(f"the server at {self.address} closed the connection")

    def _tls_mismatch(self, exc: Exception | None) -> ConnectionClosed:
        if not self.is_tls:
            return TLSMismatch(
                f"the server at {self.address} closed the connection without answering: it "
                "probably expects TLS; connect with --tls (and --cafile)"
            )
        why = describe_tls_rejection(exc, presents_certificate=self.presents_certificate)
        if not why:  # an SSLError that says nothing about certificates
            return TLSMismatch(f"TLS with the server at {self.address} failed: {exc}")
        why = why.removeprefix("the server ")
        return TLSMismatch(f"the server at {self.address} {why}")

    def pause_writing(self) -> None:
        self.write_ready = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self.write_ready is not None and not self.write_ready.done():
            self.write_ready.set_result(None)
        self.write_ready = None
