"""Fuzz targets over the pure layers: the frame decoder, the router and body decoding.

``one_input(data)`` is the single entry point a fuzzer calls: its first byte picks a target and
the rest is that target's input. Every target checks properties and raises ``Finding`` when one
breaks; nothing else escapes. ``bench/fuzz_server.py`` drives it with atheris;
``tests/unit/test_fuzz_properties.py`` runs it with hypothesis at CI size.

The properties, by target:

- ``decoder``: ``FrameDecoder`` fed a byte stream in arbitrary chunks raises only
  ``ProtocolError``, stays broken once it has, returns the same frames and outcome as when fed
  the whole stream at once, never returns a body above ``max_frame_size``, and holds O(limit +
  chunk) bytes between reads.
- ``roundtrip``: ``encode_frame`` (with or without zstd) then the decoder gives the same frame,
  or ``FrameTooLarge`` above the limit; with a byte flipped, only ``ProtocolError`` or a frame
  within the limit.
- ``router``: ``ROUTER.route`` with ``answer_inline`` / ``answer`` / ``unpack_and_process`` on
  any type number and body always returns an answer tuple the client can decode, never
  ``INTERNAL`` and never an error log line for what the client sent.
- ``unpack``: ``package.unpack`` on any bytes for every ``PACKAGE`` type raises only
  ``InvalidArgument``; what it accepts packs again, stably.

Short inputs reach the large-frame code paths because the decoder's copy thresholds are scaled
down for some inputs (the logic does not depend on the numbers); they are restored afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import logging
import traceback
from collections.abc import Callable, Coroutine, Iterator, Sequence
from typing import Any, Final

import actions
import config
import package
import protocol
from context import App, Context, set_current_app
from package import PACKAGE, ErrorAnswer, ErrorCode, InvalidArgument, RPCError
from protocol import HEADER_SIZE, Compression, Frame, FrameDecoder, FrameTooLarge, ProtocolError
from pyasync.router import ROUTER, Answer, Route, error_answer
from server_config import DatabaseSettings

__all__ = [
    "TARGETS",
    "Finding",
    "close",
    "decoder_target",
    "one_input",
    "roundtrip_target",
    "router_target",
    "seeds",
    "unpack_target",
]

# Frame size limits an input can pick: the default and small ones that short inputs can reach.
LIMITS: Final = (protocol.DEFAULT_MAX_FRAME_SIZE, 64, 1000, 70_000)  # bytes
# (_GATHER_MIN, _SLICE_COPY_LIMIT) of protocol.py: as shipped, and scaled down.
REAL_THRESHOLDS: Final = (
    getattr(protocol, "_GATHER_MIN", 64 * 1024),
    getattr(protocol, "_SLICE_COPY_LIMIT", 4096),
)
SCALED_THRESHOLDS: Final = (24, 8)  # bytes
# Chunks per decoder input; the rest of the stream goes in one last chunk. Splits byte by byte
# cost a feed each (tests/unit covers them); more chunks would only slow the fuzzer down.
MAX_CHUNKS: Final = 64
ROUTER_TIMEOUT: Final = 5.0  # seconds; an action on garbage that takes longer is a hang
# Error codes a server may answer client garbage with; INTERNAL says the server itself failed.
SERVER_FAULT_CODES: Final = frozenset({ErrorCode.INTERNAL})


class Finding(AssertionError):
    """Raised when an input breaks a property; ``signature`` groups findings of one cause."""

    def __init__(self, signature: str, detail: str) -> None:
        super().__init__(f"{signature}: {detail}")
        self.signature = signature
        self.detail = detail


def _unexpected(target: str, exc: BaseException) -> Finding:
    """A ``Finding`` for an exception a target must never raise, named by where it came from."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno}" if frames else ""
    detail = "".join(traceback.format_exception(exc)).rstrip()
    return Finding(f"{target}/raised {type(exc).__name__}{where}", detail)


class Reader:
    """Takes typed values off the front of a fuzz input; past its end, values are zero."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.position = 0

    def uint(self, size: int) -> int:
        """The next ``size`` bytes as a big-endian unsigned integer."""
        chunk = self.data[self.position : self.position + size]
        self.position += size
        return int.from_bytes(chunk.ljust(size, b"\0"), "big")

    def byte(self) -> int:
        return self.uint(1)

    def rest(self) -> bytes:
        """Everything not taken yet."""
        rest = self.data[self.position :]
        self.position = len(self.data)
        return rest


@contextlib.contextmanager
def _thresholds(scaled: bool) -> Iterator[None]:
    gather, slice_copy = SCALED_THRESHOLDS if scaled else REAL_THRESHOLDS
    saved = (getattr(protocol, "_GATHER_MIN", None), getattr(protocol, "_SLICE_COPY_LIMIT", None))
    setattr(protocol, "_GATHER_MIN", gather)  # noqa: B010  # Final to mypy, a global at run time
    setattr(protocol, "_SLICE_COPY_LIMIT", slice_copy)  # noqa: B010
    try:
        yield
    finally:
        for name, value in zip(("_GATHER_MIN", "_SLICE_COPY_LIMIT"), saved, strict=True):
            if value is not None:
                setattr(protocol, name, value)


# ---- decoder ------------------------------------------------------------------------------

Outcome = tuple[list[Frame], tuple[str, str] | None, int]  # frames, (error type, text), pending
Chunk = bytes | bytearray | memoryview  # what FrameDecoder.feed takes
CHUNK_TYPES: Final[tuple[Callable[[bytes], Chunk], ...]] = (bytes, bytearray, memoryview, bytes)


def _retained(decoder: FrameDecoder) -> int | None:
    """Bytes the decoder keeps alive, from its private state; None if that state moved."""
    buffer = getattr(decoder, "_buffer", None)
    pieces = getattr(decoder, "_pieces", None)
    if not isinstance(buffer, bytes | bytearray) or not isinstance(pieces, list):
        return None
    total = len(buffer)
    for piece in pieces:
        if isinstance(piece, memoryview):
            with memoryview(piece.obj) as owner:  # the whole buffer the view keeps alive
                total += owner.nbytes
        else:
            total += len(piece)
    return total


def _decode(decoder: FrameDecoder, chunks: Sequence[Chunk], drain_every: int) -> Outcome:
    """Feed ``chunks``, draining after every ``drain_every``-th one and at the end."""
    name = _decoder_name(drain_every)
    limit = decoder.max_frame_size
    frames: list[Frame] = []
    burst = largest_burst = 0
    try:
        for index, chunk in enumerate(chunks, 1):
            decoder.feed(chunk)
            burst += len(chunk)
            largest_burst = max(largest_burst, burst)
            if index % drain_every and index != len(chunks):
                continue
            while (frame := decoder.next_frame()) is not None:
                if len(frame.body) > limit:
                    raise Finding(f"{name}/body-above-limit", f"{len(frame.body)} > {limit}")
                frames.append(frame)
            burst = 0
            if decoder.buffered >= HEADER_SIZE + limit:
                raise Finding(
                    f"{name}/pending-above-limit", f"{decoder.buffered} bytes pending, {limit=}"
                )
            retained = _retained(decoder)
            bound = 2 * (HEADER_SIZE + limit) + 2 * largest_burst
            if retained is not None and retained > bound:
                raise Finding(f"{name}/retains-too-much", f"{retained} bytes > {bound}, {limit=}")
    except ProtocolError as exc:
        error = (type(exc).__name__, str(exc))
        try:
            decoder.next_frame()
        except ProtocolError as again:
            if (type(again).__name__, str(again)) != error:
                raise Finding(f"{name}/error-changed", f"{error} then {again!r}") from None
        else:
            raise Finding(f"{name}/recovered", f"next_frame() after {exc!r} returned") from None
        return frames, error, 0
    return frames, None, decoder.buffered


def decoder_target(data: bytes) -> None:
    """Arbitrary bytes in arbitrary chunks; see the module docstring for the properties.

    Input: a control byte (limit, scaled thresholds, drain policy, chunk type), a cut-plan
    length and that many chunk sizes, then the stream.
    """
    reader = Reader(data)
    control = reader.byte()
    limit = LIMITS[control & 0b11]
    scaled = bool(control & 0b100)
    drain_every = 1 + (control >> 3 & 0b11)  # 1: as the server and client do
    chunk_type = CHUNK_TYPES[control >> 5 & 0b11]
    sizes = [1 + reader.byte() for _ in range(reader.byte() % 8)]
    stream = reader.rest()
    chunks: list[Chunk] = []
    start = 0
    while start < len(stream):
        size = sizes[len(chunks) % len(sizes)] if sizes else len(stream)
        if len(chunks) == MAX_CHUNKS - 1:
            size = len(stream)
        chunks.append(chunk_type(stream[start : start + size]))
        start += size
    with _thresholds(scaled):
        try:
            whole = _decode(FrameDecoder(limit), [stream], 1)
            split = _decode(FrameDecoder(limit), chunks or [b""], drain_every)
        except Finding:
            raise
        except Exception as exc:
            raise _unexpected(_decoder_name(drain_every), exc) from None
    if split != whole:
        raise Finding(
            f"{_decoder_name(drain_every)}/split-differs",
            f"whole stream: {_summary(whole)}; in {len(chunks)} chunks, drained after every "
            f"{drain_every}: {_summary(split)}",
        )


def _decoder_name(drain_every: int) -> str:
    """``decoder`` when drained after every feed, as the server and client do, else
    ``decoder-lazy`` (several feeds between drains, which the decoder's contract allows)."""
    return "decoder" if drain_every == 1 else "decoder-lazy"


def _summary(outcome: Outcome) -> str:
    frames, error, pending = outcome
    shown = [(f.kind, f.request_id, len(f.body), f.timeout_ms) for f in frames[:4]]
    return f"{len(frames)} frames {shown}, error {error}, {pending} pending"


# ---- encode, then decode ---------------------------------------------------------------------


def roundtrip_target(data: bytes) -> None:
    """``encode_frame`` then ``FrameDecoder``, optionally with one byte flipped on the way.

    Input: a control byte (limit, scaled thresholds, compression, flip), type, request id,
    timeout, the flip's position and mask, then the body.
    """
    reader = Reader(data)
    control = reader.byte()
    limit = LIMITS[control & 0b11]
    scaled = bool(control & 0b100)
    compression = Compression(threshold=(0, 1, 16, 1024)[control >> 3 & 0b11], level=1)
    flip = bool(control & 0b10_0000)
    kind, request_id, timeout_ms = reader.uint(2), reader.uint(4), reader.uint(4)
    position, mask = reader.uint(2), reader.byte() or 1
    body = reader.rest()
    try:
        encoded = protocol.encode_frame(
            kind, request_id, body, timeout_ms=timeout_ms, compression=compression
        )
        header, payload = protocol.encode_frame_parts(
            kind, request_id, body, timeout_ms=timeout_ms, compression=compression
        )
    except Exception as exc:
        raise _unexpected("roundtrip/encode", exc) from None
    if header + payload != encoded:
        raise Finding(
            "roundtrip/parts-differ", "encode_frame != header + body of encode_frame_parts"
        )
    if flip:
        at = position % len(encoded)
        encoded = encoded[:at] + bytes([encoded[at] ^ mask]) + encoded[at + 1 :]
    cut = position % (len(encoded) + 1)
    with _thresholds(scaled):
        try:
            frames, error, pending = _decode(FrameDecoder(limit), [encoded[:cut], encoded[cut:]], 1)
        except Finding:
            raise
        except Exception as exc:
            raise _unexpected("roundtrip/decode", exc) from None
    if flip:
        return  # any frame within the limit, or a ProtocolError: both checked by _decode
    expected = Frame(kind, request_id, body, timeout_ms)
    if len(body) > limit:
        if error is None or error[0] != FrameTooLarge.__name__:
            raise Finding("roundtrip/too-large-accepted", f"{len(body)} > {limit}: {error}")
    elif (frames, error, pending) != ([expected], None, 0):
        raise Finding(
            "roundtrip/differs",
            f"sent {(kind, request_id, len(body), timeout_ms)}, "
            f"got {_summary((frames, error, pending))}",
        )


# ---- router ---------------------------------------------------------------------------------

_REQUESTS: Final = [kind for kind in PACKAGE if package.is_request(kind)]
_ALL_KINDS: Final = list(PACKAGE)


class _LogCatcher(logging.Handler):
    """Keeps the records at WARNING and above, or with a traceback, of the ``pyasync`` loggers."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING or record.exc_info:
            self.records.append(record)


@contextlib.contextmanager
def _catching_logs() -> Iterator[_LogCatcher]:
    """Catch the ``pyasync`` log records of one input; the logging set-up is left as it was."""
    logger = logging.getLogger("pyasync")
    catcher, level = _LogCatcher(), logger.level
    logger.addHandler(catcher)
    logger.setLevel(logging.DEBUG)
    try:
        yield catcher
    finally:
        logger.removeHandler(catcher)
        logger.setLevel(level)


class _RouterBench:
    """What the router target needs, made once: an App without a database and an event loop.

    The App is current only inside ``context``, so that a test process running this target
    keeps its own ``current_app()`` unset.
    """

    def __init__(self) -> None:
        self.app = App(config.Settings(port=0), DatabaseSettings(db_backend="NONE"))
        self.context = contextvars.copy_context()
        self.context.run(set_current_app, self.app)  # database.connect(): UNAVAILABLE
        self.ctx = Context(app=self.app, connection_id=1, peer=("127.0.0.1", 1))
        self.loop = asyncio.new_event_loop()

    def run(self, coroutine: Coroutine[Any, Any, Answer]) -> Answer:
        """Run one of the router's coroutines to its answer, bounded by ``ROUTER_TIMEOUT``."""

        async def bounded() -> Answer:
            async with asyncio.timeout(ROUTER_TIMEOUT):
                return await coroutine

        return self.loop.run_until_complete(self.loop.create_task(bounded(), context=self.context))

    def inline(self, route: Route, frame: Frame) -> Answer:
        """``ROUTER.answer_inline`` as the server calls it, in the App's context."""
        return self.context.run(ROUTER.answer_inline, route, frame, self.ctx)


_bench: _RouterBench | None = None


def _router_bench() -> _RouterBench:
    global _bench
    if _bench is None:
        _bench = _RouterBench()
    return _bench


def close() -> None:
    """Close the event loop the router target made, if it made one."""
    global _bench
    if _bench is not None:
        _bench.loop.close()
        _bench = None


def _check_answer(answer: object, expected: PACKAGE | None, what: str) -> None:
    """An answer is (PACKAGE, bytes): ``expected`` or ANSWER_ERROR, decodable, not INTERNAL."""
    if not (
        isinstance(answer, tuple)
        and len(answer) == 2
        and isinstance(answer[0], PACKAGE)
        and isinstance(answer[1], bytes)
    ):
        raise Finding(f"router/{what}-not-an-answer", repr(answer)[:200])
    kind, body = answer
    if kind not in (expected, PACKAGE.ANSWER_ERROR):
        raise Finding(f"router/{what}-wrong-type", f"{kind.name}, expected {expected}")
    try:
        decoded = package.unpack(kind, body)
    except InvalidArgument as exc:
        raise Finding(f"router/{what}-undecodable-answer", f"{kind.name}: {exc}") from None
    if isinstance(decoded, ErrorAnswer) and decoded.code in SERVER_FAULT_CODES:
        raise Finding(f"router/{what}-{ErrorCode(decoded.code).name}", decoded.message)


def _route_and_answer(bench: _RouterBench, frame: Frame) -> None:
    """The checks of ``router_target`` on one frame; exceptions are the caller's to judge."""
    routed: Answer | None = None
    try:
        route = ROUTER.route(frame.kind)
    except RPCError as exc:
        routed = error_answer(exc)
    if routed is not None:
        _check_answer(routed, None, "route")
        processed = bench.run(actions.unpack_and_process(frame, bench.ctx))
        if processed != routed:
            raise Finding("router/routing-differs", f"{processed!r:.200} != {routed!r:.200}")
        return
    inline: Answer | None = None
    if route.inline:
        inline = bench.inline(route, frame)
        _check_answer(inline, route.answer, "answer_inline")
    answered = bench.run(ROUTER.answer(route, frame, bench.ctx))
    _check_answer(answered, route.answer, "answer")
    if inline is not None and inline != answered:
        raise Finding("router/inline-differs", f"{inline!r:.200} != {answered!r:.200}")
    processed = bench.run(actions.unpack_and_process(frame, bench.ctx))
    _check_answer(processed, route.answer, "unpack_and_process")


def router_target(data: bytes) -> None:
    """Any type number and body through the router's entry points.

    Input: a control byte (how the type is chosen), the type, the request id, then the body.
    """
    bench = _router_bench()
    reader = Reader(data)
    control = reader.byte()
    number = reader.uint(2)
    if control & 0b11 == 0:
        number = _REQUESTS[number % len(_REQUESTS)]
    elif control & 0b11 == 1:
        number = _ALL_KINDS[number % len(_ALL_KINDS)]
    frame = Frame(number, reader.uint(4), reader.rest(), 0)
    with _catching_logs() as logs:
        try:
            _route_and_answer(bench, frame)
        except Finding:
            raise
        except asyncio.CancelledError:
            raise Finding("router/cancelled", "CancelledError though nothing cancelled") from None
        except TimeoutError:
            raise Finding("router/hang", f"type {number} took over {ROUTER_TIMEOUT} s") from None
        except Exception as exc:
            raise _unexpected("router", exc) from None
    for record in logs.records:
        if record.levelno >= logging.ERROR or record.exc_info:
            raise Finding(
                f"router/logged-{record.levelname}", f"{record.name}: {record.getMessage()}"
            )


# ---- unpack ---------------------------------------------------------------------------------


def unpack_target(data: bytes) -> None:
    """Arbitrary bytes as the body of each package type.

    Input: a control byte (the type; its top bit passes a memoryview), then the body.
    """
    reader = Reader(data)
    control = reader.byte()
    kind = _ALL_KINDS[(control & 0x7F) % len(_ALL_KINDS)]
    payload = reader.rest()
    try:
        value = package.unpack(kind, memoryview(payload) if control & 0x80 else payload)
    except InvalidArgument:
        return
    except Exception as exc:
        raise _unexpected(f"unpack/{kind.name}", exc) from None
    if type(value) is not package.body_type(kind):
        raise Finding(f"unpack/{kind.name}-wrong-class", type(value).__name__)
    try:
        packed = package.pack(kind, value)
        again = package.pack(kind, package.unpack(kind, packed))
    except Exception as exc:
        raise _unexpected(f"unpack/{kind.name}-repack", exc) from None
    if again != packed:
        raise Finding(f"unpack/{kind.name}-unstable", f"{packed.hex()} then {again.hex()}")


# ---- dispatch and seeds ---------------------------------------------------------------------

TARGETS: Final[tuple[Callable[[bytes], None], ...]] = (
    decoder_target,
    roundtrip_target,
    router_target,
    unpack_target,
)


def one_input(data: bytes) -> None:
    """Run the target the first byte picks on the rest.

    Raises:
        Finding: a property broke; its ``signature`` names which.
    """
    if data:
        TARGETS[data[0] % len(TARGETS)](data[1:])


def _sample_bodies() -> dict[PACKAGE, list[bytes]]:
    """Valid packed bodies for every type (empty bodies where the schema allows)."""
    p = package
    samples: dict[PACKAGE, list[package.Body]] = {
        PACKAGE.ANSWER_ERROR: [p.ErrorAnswer(code=3, message="bad", hint="fix")],
        PACKAGE.REQUEST_ECHO: [p.EchoRequest(text="hi?"), p.EchoRequest(data=b"\x00\xff")],
        PACKAGE.ANSWER_ECHO: [p.EchoAnswer(text="hi")],
        PACKAGE.REQUEST_CHANGE_QUESTION_MARK: [p.ChangeQuestionMarkRequest(text="How are you?")],
        PACKAGE.ANSWER_CHANGE_QUESTION_MARK: [p.ChangeQuestionMarkAnswer(text="!")],
        PACKAGE.ANSWER_SERVER_INFO: [
            p.ServerInfoAnswer(
                version="0.1.0",
                uptime_s=1.5,
                open_connections=1,
                requests_served=2,
                config={"port": 0, "host": "127.0.0.1", "tls": False},
                database={"ok": True},
            )
        ],
        PACKAGE.REQUEST_KV_PUT: [p.KvPutRequest(key="k", value=b"v", expected_version=0)],
        PACKAGE.ANSWER_KV_PUT: [p.KvPutAnswer(version=1)],
        PACKAGE.REQUEST_KV_GET: [p.KvGetRequest(key="k")],
        PACKAGE.ANSWER_KV_GET: [p.KvGetAnswer(value=b"v", version=2)],
        PACKAGE.REQUEST_KV_DELETE: [p.KvDeleteRequest(key="k", expected_version=1)],
        PACKAGE.ANSWER_KV_DELETE: [p.KvDeleteAnswer(deleted=True)],
        PACKAGE.REQUEST_KV_LIST: [p.KvListRequest(prefix="a", limit=10, cursor="ab")],
        PACKAGE.ANSWER_KV_LIST: [
            p.KvListAnswer(items=[p.KvItem(key="k", version=1, size=3)], next_cursor="k")
        ],
        PACKAGE.ANSWER_DB_INFO: [
            p.DbInfoAnswer(
                backend="sqlite",
                server_version="3",
                pool_size=1,
                pool_in_use=0,
                pool_idle=1,
                reachable=True,
            )
        ],
    }
    packed: dict[PACKAGE, list[bytes]] = {}
    for kind in PACKAGE:  # types added later get an empty map
        bodies = [p.pack(kind, value) for value in samples.get(kind, [])]
        packed[kind] = bodies or [b"\x80"]
    return packed


def seeds() -> Iterator[bytes]:
    """Valid inputs for every target, built with ``encode_frame`` and ``package.pack``."""
    bodies = _sample_bodies()
    big = package.pack(PACKAGE.REQUEST_ECHO, package.EchoRequest(text="ab?" * 300))
    frames = [
        protocol.encode_frame(kind, number, body, timeout_ms=5000 if number % 2 else 0)
        for number, (kind, samples) in enumerate(bodies.items(), 1)
        for body in samples
    ]
    compressed = protocol.encode_frame(
        PACKAGE.REQUEST_ECHO, 9, big, compression=Compression(threshold=16)
    )
    assert compressed[3] & protocol.FLAG_COMPRESSED, "the seed must exercise decompression"
    streams = [
        frames[0], b"".join(frames[:6]), compressed, frames[1] + compressed + frames[2],
        protocol.encode_frame(PACKAGE.REQUEST_ECHO, 3, big), frames[1][:-1], b"XY" + frames[0][2:],
    ]  # fmt: skip
    for stream in streams:
        for control in (0b000, 0b101, 0b110, 0b1101, 0b11110):
            for plan in (b"\x00", b"\x01\x00", b"\x03\x06\x10\x2f", b"\x02\xff\x11"):
                yield bytes([0, control]) + plan + stream
    for kind, samples in bodies.items():
        for body in samples:
            header = kind.to_bytes(2, "big") + (7).to_bytes(4, "big") + (1000).to_bytes(4, "big")
            for control in (0b000, 0b1100, 0b10_1001):
                yield bytes([1, control]) + header + b"\x00\x05\x01" + body
            yield bytes([2, 0b10]) + kind.to_bytes(2, "big") + (7).to_bytes(4, "big") + body
            yield bytes([3, _ALL_KINDS.index(kind)]) + body
    yield bytes([1, 0b1000]) + b"\x00\x04" + b"\x00" * 11 + big
    yield bytes([2, 0b10]) + b"\x03\xe7" + b"\x00\x00\x00\x08" + b"\x80"  # unknown type 999


def seed_name(data: bytes) -> str:
    """A stable file name for a seed or finding: its target and a content hash."""
    target = TARGETS[data[0] % len(TARGETS)].__name__.removesuffix("_target") if data else "empty"
    return f"{target}-{hashlib.sha1(data).hexdigest()[:16]}"
