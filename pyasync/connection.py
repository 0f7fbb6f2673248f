"""One client connection of the server: frames in, requests run, answers out.

``Connection`` is the asyncio protocol the server's listener makes per accepted socket. It
decodes frames, answers plain-function actions inline and runs the others as tasks it owns,
batches the answers of one read into one write, and applies backpressure. Timeouts of the
connection itself live in ``Watchdog``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

from context import REQUEST_DEADLINE, Context, TLSInfo
from package import (
    BrokenStream,
    DeadlineExceeded,
    ResourceExhausted,
    RPCError,
    Unauthenticated,
    Unavailable,
)
from protocol import (
    CONNECTION_REQUEST_ID,
    Frame,
    FrameDecoder,
    Payload,
    ProtocolError,
    encode_frame,
    encode_frame_parts,
)
from pyasync.auth import ANONYMOUS
from pyasync.deadlines import within
from pyasync.ratelimit import TokenBucket
from pyasync.router import Answer, ConnectionHook, Route, error_answer
from pyasync.watchdog import Watchdog

if TYPE_CHECKING:
    from server import Server

__all__ = ["FRAMES_PER_PASS", "INLINE_MAX_BODY", "LARGE_WRITE", "Connection", "address_of"]

log = logging.getLogger("pyasync.server")

LARGE_WRITE = 64 * 1024  # bytes; answers larger than this are written without joining them
# A plain-function action runs inline only on bodies up to this size: decoding and answering a
# large body holds the event loop (16 MiB: ~55 ms), so it runs in a task like any other.
INLINE_MAX_BODY = 64 * 1024  # bytes
# A connection takes at most this many frames per pass of the event loop, the rest on the next
# pass (reading paused meanwhile): a pipelined burst, or a flood's read of thousands of frames,
# then holds the loop ~0.1 ms at a time, not a millisecond, and other clients are served between.
FRAMES_PER_PASS = 32
BACKED_UP_RETRY = 0.01  # seconds between looks at a socket that drains below its high-water mark


class Connection(asyncio.Protocol):
    """One client connection: decodes frames, runs each request, writes answers.

    Backpressure: the transport stops reading while ``max_in_flight`` requests run or while the
    transport's write buffer is above its high-water mark, so neither side can grow memory
    without bound. Every task it starts is cancelled when the connection ends.
    """

    __slots__ = (
        "address", "auth_timer", "backlog", "cancelled", "closed", "ctx", "decoder", "id",
        "is_closing", "is_draining", "is_read_paused", "is_ready", "is_write_paused", "limit",
        "loop", "push_bytes", "push_room", "push_waiter", "pushes", "requests_answered",
        "router", "server", "settings", "small_answer", "stats", "tasks", "transport",
        "watchdog",
    )  # fmt: skip  # thousands of idle connections: no per-instance dict

    def __init__(self, server: Server, connection_id: int) -> None:
        self.server = server
        self.settings = settings = server.settings
        self.router = server.router
        self.id = connection_id
        self.decoder = FrameDecoder(settings.max_frame_size)
        # Answers below this many bytes are encoded as they are made; larger ones (or too
        # large ones) by ``_add_answer``.
        self.small_answer = min(LARGE_WRITE, settings.max_frame_size + 1)
        self.tasks: dict[int, asyncio.Task[None]] = {}  # request id -> its running task
        self.ctx = Context(app=server.app, connection_id=connection_id)
        self.stats = server.app.stats  # the server's counters, touched per request
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()
        self.is_closing = False
        self.is_draining = False  # shutting down: no new requests, finish the running ones
        self.is_write_paused = False
        self.is_read_paused = False
        self.is_ready = False  # connect hooks have run
        self.requests_answered = 0
        self.cancelled = 0  # requests cancelled (by a shutdown) before their connection closed
        self.closed = self.loop.create_future()
        self.pushes: list[bytes] = []  # event frames waiting for this loop pass's write
        self.push_bytes = 0
        self.push_room = 0  # bytes of pushes that fit this pass (PUSH_BUFFER_SIZE less the queue)
        self.push_waiter: asyncio.Future[None] | None = None  # a replay waiting for room
        self.address = ""  # the client's IP address, as counted for MAX_CONNECTIONS_PER_IP
        self.auth_timer: asyncio.TimerHandle | None = None
        self.limit = (
            TokenBucket(settings.rate_limit, settings.rate_burst, self.loop.time())
            if settings.rate_limit
            else None
        )  # RATE_LIMIT; None when there is none
        self.backlog: asyncio.Handle | None = None  # the next pass, when frames wait for it
        self.ctx.pushes = self
        self.ctx.close = self._expire
        self.watchdog = Watchdog(
            self.loop, self, idle_timeout=settings.idle_timeout,
            frame_timeout=settings.frame_timeout, expire=self._expire,
        )  # fmt: skip

    @property
    def is_busy(self) -> bool:
        return bool(self.tasks)

    # ---- asyncio.Protocol callbacks -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop: not a subclass
        peer = transport.get_extra_info("peername")
        self.ctx.peer = peer
        self.ctx.tls = _tls_info(transport.get_extra_info("ssl_object"))
        address = peer[0] if isinstance(peer, tuple) else str(peer)
        refusal = self.server.refusal(address)
        if refusal:
            self.server.log_refusal(self.id, address_of(peer), address, refusal)
            self._send_error(
                CONNECTION_REQUEST_ID, ResourceExhausted(f"connection refused: {refusal}")
            )
            self.is_closing = True
            transport.close()
            return
        self.ctx.app.connections.add(self)
        self.address = address
        self.server.connections_per_ip[address] += 1
        self._authenticate_by_certificate()
        tls = f" over {self.ctx.tls.version}" if self.ctx.tls else ""
        log.info("c%d connected from %s%s", self.id, address_of(peer), tls)
        if self.router.hooks.connect:
            self._set_reading()  # paused until the hooks ran
            self.server.track(self._run_connect_hooks())
        else:
            self.is_ready = True
        self.watchdog.start()

    def data_received(self, data: bytes) -> None:
        self.watchdog.last_activity = self.loop.time()  # Watchdog.received(), on the hot path
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
        self.watchdog.stop()
        for task in self.tasks.values():
            task.cancel()
        connections = self.ctx.app.connections
        if self not in connections:  # refused: never counted
            self.closed.set_result(None)
            return
        connections.discard(self)
        self._forget_address()
        if self.auth_timer is not None:
            self.auth_timer.cancel()
        self._wake_pusher()
        if self.ctx.subscriptions and self.ctx.app.broker is not None:
            self.ctx.app.broker.drop(self.ctx.subscriptions.values())
            self.ctx.subscriptions.clear()
        cause = f": {exc}" if exc else ""
        log.info(
            "c%d closed after %d requests%s, %d cancelled",
            self.id, self.requests_answered, cause, self.cancelled + len(self.tasks),
        )  # fmt: skip
        if self.router.hooks.disconnect:
            self.server.track(self._run_hooks(self.router.hooks.disconnect, "disconnect"))
        self.closed.set_result(None)

    def pause_writing(self) -> None:
        self.is_write_paused = True
        self._set_reading()

    def resume_writing(self) -> None:
        self.is_write_paused = False
        self._set_reading()
        self._take_frames()
        self._wake_pusher()

    # ---- pushes (the broker's events) ---------------------------------------------------------

    def push(self, frame: bytes) -> bool:
        """Queue an event frame for this loop pass's one write; False when over PUSH_BUFFER_SIZE.

        A slow reader's pushes stop here, bounded; the broker replays them from history once
        ``writable()`` returns.
        """
        if self.is_closing or self.transport is None:
            return True  # going away: nothing to keep
        pushes = self.pushes
        if not pushes:  # the first of this pass: what the socket holds is read once per pass
            self.push_room = self.settings.push_buffer_size - self.transport.get_write_buffer_size()
            self.loop.call_soon(self._flush_pushes)
        if self.push_bytes + len(frame) > self.push_room:
            return False
        pushes.append(frame)
        self.push_bytes += len(frame)
        return True

    def push_now(self, frames: bytes) -> bool:
        """Write event frames at once (the broker joined this pass's for this connection), or
        behind the queued ones; False, writing nothing, when over PUSH_BUFFER_SIZE."""
        transport = self.transport
        if self.pushes or transport is None or self.is_closing:
            return self.push(frames)
        if transport.get_write_buffer_size() + len(frames) > self.settings.push_buffer_size:
            return False
        transport.write(frames)
        return True

    async def writable(self) -> None:
        """Return once pushes fit again: queued ones written and the socket not backed up, to
        half of PUSH_BUFFER_SIZE at most."""
        while not self.is_closing:
            if self.pushes or self.is_write_paused:
                if self.push_waiter is None:
                    self.push_waiter = self.loop.create_future()
                await self.push_waiter
            elif self._is_backed_up():
                # Below the high-water mark (a budget under 128 KiB), so no resume_writing()
                # will say when it drained: look again soon instead.
                await asyncio.sleep(BACKED_UP_RETRY)
            else:
                return

    def _is_backed_up(self) -> bool:
        transport = self.transport
        unsent = 0 if transport is None else transport.get_write_buffer_size()
        return unsent > self.settings.push_buffer_size // 2

    def _flush_pushes(self) -> None:
        pushes = self.pushes
        if pushes:
            self.pushes, self.push_bytes = [], 0
            transport = self.transport
            if transport is not None and not transport.is_closing():
                transport.write(pushes[0] if len(pushes) == 1 else b"".join(pushes))
        if not self.is_write_paused:
            self._wake_pusher()

    def _wake_pusher(self) -> None:
        waiter, self.push_waiter = self.push_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # ---- requests ---------------------------------------------------------------------------

    def _take_frames(self) -> None:
        """Answer or start the complete frames while under the in-flight limit, at most
        FRAMES_PER_PASS of them; more wait for the next pass of the loop (``_take_backlog``).

        Requests whose action is a plain function are answered inline, and those answers leave
        in one write at the end: a pipelined burst costs one system call per pass, not one per
        request.
        """
        if not self.is_ready or self.is_closing:
            return
        decoder = self.decoder  # one local each: four at once would build a tuple per read
        tasks = self.tasks
        router = self.router
        ctx = self.ctx
        routes = router.routes
        refuse = self.is_draining and self.server.is_shutting_down
        limit = self.limit
        if limit is not None:
            limit.refill(self.loop.time())
        answers: list[Payload] = []  # encoded frames, or header and body apart for large ones
        answered = 0
        large = False
        took_any = False
        room = self.settings.max_in_flight - len(tasks)
        compression = self.server.compression
        small = self.small_answer
        inline_limit = INLINE_MAX_BODY
        taken = 0
        try:
            while room > 0:
                if limit is not None and limit.has_refused_enough:
                    break  # the rest waits until the throttling ends
                if taken == FRAMES_PER_PASS and not refuse:  # shutting down: refuse all now
                    self._take_later()
                    break
                frame = decoder.next_frame()
                if frame is None:
                    break
                taken += 1
                took_any = True
                request_id = frame.request_id
                if request_id in tasks or not request_id:  # 0: CONNECTION_REQUEST_ID
                    raise ProtocolError(_bad_request_id(request_id))
                if refuse:
                    kind, body = error_answer(
                        Unavailable("server is shutting down; retry elsewhere")
                    )
                elif limit is not None and not limit.admit():
                    kind, body = self._throttle(limit)
                else:
                    route = routes.get(frame.kind)
                    if route is None:  # unknown, an answer type, or no action: say which
                        try:
                            router.route(frame.kind)
                        except RPCError as exc:
                            kind, body = error_answer(exc)
                    else:
                        if not route.inline or len(frame.body) > inline_limit:
                            self._start(route, frame)
                            room -= 1
                            continue
                        kind, body = router.answer_inline(route, frame, ctx)
                answered += 1
                if len(body) < small:  # the common case, without a call
                    answers.append(encode_frame(kind, request_id, body, compression=compression))
                else:
                    large |= self._add_answer(answers, kind, request_id, body)
        except ProtocolError as exc:
            self._write(answers, large)
            self._fail_stream(exc)
            return
        if answers:
            self._answered(answered)
            self._write(answers, large)
        buffered = decoder.buffered
        if buffered or self.watchdog.partial_frame_since is not None:
            self.watchdog.frames_taken(took_any=took_any, buffered=buffered)
        if self.is_read_paused or room <= 0 or self.backlog is not None:
            self._set_reading()

    def _take_later(self) -> None:
        """Frames are left after this pass's share: take them on the next pass, not reading
        meanwhile (what is received waits in the socket, not in memory)."""
        if self.backlog is None:
            self.backlog = self.loop.call_soon(self._take_backlog)

    def _take_backlog(self) -> None:
        self.backlog = None
        self._take_frames()
        self._close_if_done()

    # ---- limits -----------------------------------------------------------------------------

    def _throttle(self, limit: TokenBucket) -> Answer:
        """The answer to a request over RATE_LIMIT; the first of an episode stops reading
        until the episode's pause is over."""
        answer, pause = limit.refuse()
        if pause is not None:
            self._set_reading()
            self.loop.call_later(pause, self._unthrottle)
        return answer

    def _unthrottle(self) -> None:
        """The pause is over: take the waiting frames on a pass of their own, then read again.

        Not here: a timer runs before the loop looks for input, so another client whose request
        arrived in the same pass would wait for two passes of this one instead of one.
        """
        if self.limit is not None:
            self.limit.resume()
        self._take_later()

    def _forget_address(self) -> None:
        counts = self.server.connections_per_ip
        counts[self.address] -= 1
        if counts[self.address] <= 0:
            del counts[self.address]

    def _authenticate_by_certificate(self) -> None:
        """Everyone is anonymous without authentication; else a verified client certificate
        names the principal, or the client has AUTH_TIMEOUT to send a HELLO with a token."""
        principals = self.ctx.app.principals
        if principals is None or not principals.is_enabled:
            self.ctx.principal = ANONYMOUS
            return
        tls = self.ctx.tls
        self.ctx.principal = principals.for_certificate(tls.principal if tls else None)
        if self.ctx.principal is None:
            self.auth_timer = self.loop.call_later(self.settings.auth_timeout, self._auth_expired)

    def _auth_expired(self) -> None:
        self.auth_timer = None
        if self.ctx.principal is None and not self.is_closing:
            timeout = self.settings.auth_timeout
            self._send_error(
                CONNECTION_REQUEST_ID,
                Unauthenticated(f"no HELLO with a valid token within AUTH_TIMEOUT={timeout:g} s"),
            )
            self._expire(f"not authenticated within {timeout:g} s")

    def _start(self, route: Route, frame: Frame) -> None:
        request_id = frame.request_id
        task = self.loop.create_task(self._serve(route, frame))
        self.tasks[request_id] = task
        task.add_done_callback(lambda task: self._request_done(request_id, task))

    async def _serve(self, route: Route, frame: Frame) -> None:
        settings = self.settings
        timeout = frame.timeout_ms / 1000 if frame.timeout_ms else settings.request_timeout
        timeout = min(timeout, settings.max_request_timeout)
        request_id = frame.request_id
        REQUEST_DEADLINE.set(self.loop.time() + timeout)  # this task's own context
        answering = self.router.answer(route, frame, self.ctx)
        del frame  # the router lets go of a large body once decoded; hold no copy here
        try:
            async with within(timeout):
                kind, body = await answering
        except TimeoutError:
            kind, body = error_answer(
                DeadlineExceeded(f"request did not finish within its {timeout:g} s timeout")
            )
        except asyncio.CancelledError:
            self.cancelled += 1
            if self.server.is_shutting_down and not self.is_closing:
                self._free_id(request_id)
                self._send_error(
                    request_id, Unavailable("server shut down before the request finished")
                )
            raise
        self._free_id(request_id)
        answers: list[Payload] = []
        self._write(answers, self._add_answer(answers, kind, request_id, body))
        self._answered(1)

    def _free_id(self, request_id: int) -> None:
        """The answer is about to leave: its id is free from now on, as the spec says, for the
        client may send it again as soon as the answer arrives, before this task has ended."""
        self.tasks.pop(request_id, None)

    def _request_done(self, request_id: int, task: asyncio.Task[None]) -> None:
        if self.tasks.get(request_id) is task:  # not freed already, nor reused since
            del self.tasks[request_id]
        if not task.cancelled() and task.exception() is not None:
            log.error("c%d request task failed", self.id, exc_info=task.exception())
        if self.is_closing:
            return
        self._take_frames()
        self._close_if_done()

    def _answered(self, count: int) -> None:
        self.requests_answered += count
        self.stats.requests_served += count

    # ---- writing ----------------------------------------------------------------------------

    def _add_answer(
        self, answers: list[Payload], kind: int, request_id: int, body: Payload
    ) -> bool:
        """Append one answer's frame to ``answers``: whole when small, header and body apart
        when large; True for large. An answer above MAX_FRAME_SIZE, which the client would
        refuse, becomes RESOURCE_EXHAUSTED for that request alone."""
        compression = self.server.compression
        if len(body) > self.settings.max_frame_size:
            kind, body = _oversize_answer(len(body), self.settings.max_frame_size)
        if len(body) < LARGE_WRITE:
            answers.append(encode_frame(kind, request_id, body, compression=compression))
            return False
        answers += encode_frame_parts(kind, request_id, body, compression=compression)
        return True

    def _write(self, pieces: Sequence[Payload], large: bool) -> None:
        """Write small frames joined (one TLS record, one segment) and large bodies as they
        are, beside their headers (no copy)."""
        transport = self.transport
        if not pieces or transport is None or transport.is_closing():
            return
        if self.pushes:  # events generated before this answer leave before it
            self._flush_pushes()
        if large:
            transport.writelines(pieces)
        else:
            transport.write(pieces[0] if len(pieces) == 1 else b"".join(pieces))

    def _send_error(self, request_id: int, error: RPCError) -> None:
        kind, body = error_answer(error)
        self._write([encode_frame(kind, request_id, body)], False)

    # ---- connection state -------------------------------------------------------------------

    def _set_reading(self) -> None:
        """Read only while ready, not draining, under the in-flight limit and able to write."""
        transport = self.transport
        if transport is None or self.is_closing:
            return
        should_read = (
            self.is_ready
            and not (self.limit is not None and self.limit.is_throttled)
            and self.backlog is None
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
        log.info("c%d protocol error from %s: %s; closing", self.id, address_of(self.ctx.peer), exc)
        self._send_error(CONNECTION_REQUEST_ID, BrokenStream(str(exc)))
        self.close()

    def _expire(self, reason: str) -> None:
        log.info("c%d %s; closing", self.id, reason)
        self.close()

    def drain(self) -> None:
        """Stop taking requests (server shutdown); close once the running ones answered."""
        self.is_draining = True
        self._set_reading()
        self._take_frames()  # answer requests already received with UNAVAILABLE
        self._close_if_done()

    def _close_if_done(self) -> None:
        if self.is_draining and not self.tasks and self.backlog is None and not self.is_closing:
            self.close()

    def close(self) -> None:
        """Close after writing what is buffered; running requests are cancelled."""
        if self.is_closing or self.transport is None:
            return
        self.is_closing = True
        self.watchdog.stop()
        for task in self.tasks.values():
            task.cancel()
        self.transport.close()

    async def _run_connect_hooks(self) -> None:
        if await self._run_hooks(self.router.hooks.connect, "connect"):
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


def _oversize_answer(size: int, limit: int) -> Answer:
    return error_answer(
        ResourceExhausted(
            f"the answer of {size} bytes exceeds the frame limit of {limit} bytes (MAX_FRAME_SIZE)",
            hint="ask for less at a time",
        )
    )


def _bad_request_id(request_id: int) -> str:
    if request_id == CONNECTION_REQUEST_ID:
        return "request id 0 is reserved for frames about the connection; number requests from 1"
    return f"request id {request_id} is still in flight; a request id may be reused once answered"


def _tls_info(ssl_object: Any) -> TLSInfo | None:
    if ssl_object is None:
        return None
    cipher = ssl_object.cipher()
    return TLSInfo(
        version=ssl_object.version(),
        cipher=cipher[0] if cipher else None,
        peer_certificate=ssl_object.getpeercert() or None,
    )


def address_of(peer: Any) -> str:
    """``host:port`` (``[host]:port`` for IPv6) of a socket address, for log lines."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[:2]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(peer)
