"""Package types of pyasync-server: the PACKAGE enum, one typed body per type, and error codes.

To add a feature, add a ``REQUEST_X``/``ANSWER_X`` pair to ``PACKAGE`` (new numbers, never
reused) and a body class for each with ``@body(...)``; then one action in ``actions.py``.
Bodies are msgspec Structs carried as MessagePack maps, validated when decoded.
"""

from __future__ import annotations

import enum
import types
import typing
from collections.abc import Callable
from typing import Annotated, Any, ClassVar, Final, TypeVar

import msgspec

from protocol import Payload

__all__ = [
    "HelloRequest",
    "HelloAnswer",
    "UnsubscribeRequest",
    "UnsubscribeAnswer",
    "SubscribeRequest",
    "SubscribeAnswer",
    "PublishRequest",
    "PublishAnswer",
    "MessageEvent",
    "GapEvent",
    "__version__",
    "PACKAGE",
    "Aborted",
    "AlreadyExists",
    "Body",
    "BrokenStream",
    "Cancelled",
    "ChangeQuestionMarkAnswer",
    "ChangeQuestionMarkRequest",
    "Conflict",
    "DataLoss",
    "DeadlineExceeded",
    "DbInfoAnswer",
    "DbInfoRequest",
    "KvDeleteAnswer",
    "KvDeleteRequest",
    "KvGetAnswer",
    "KvGetRequest",
    "KvItem",
    "KvListAnswer",
    "KvListRequest",
    "KvPutAnswer",
    "KvPutRequest",
    "EchoAnswer",
    "EchoRequest",
    "ErrorAnswer",
    "ErrorCode",
    "IDEMPOTENT",
    "Int64",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "PingAnswer",
    "PingRequest",
    "RPCError",
    "ResourceExhausted",
    "ServerInfoAnswer",
    "ServerInfoRequest",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
    "UnknownPackageType",
    "UnknownRemoteError",
    "answer_kind_for",
    "body",
    "body_type",
    "encode_body",
    "error_from_answer",
    "is_request",
    "body_error",
    "decoder_for",
    "pack",
    "pack_payload",
    "unpack",
]

__version__ = "0.1.0"  # of the server and this package set


@enum.unique
class PACKAGE(enum.IntEnum):
    """Package type numbers on the wire (uint16). Never renumber or reuse a retired number.

    Every ``REQUEST_X`` has an ``ANSWER_X``; ``ANSWER_ERROR`` answers any request that failed.
    Names starting with ``EVENT_`` are reserved for packages the server pushes unasked.
    """

    ANSWER_ERROR = 1

    REQUEST_PING = 2
    ANSWER_PING = 3
    REQUEST_ECHO = 4
    ANSWER_ECHO = 5
    REQUEST_CHANGE_QUESTION_MARK = 6
    ANSWER_CHANGE_QUESTION_MARK = 7
    REQUEST_SERVER_INFO = 8
    ANSWER_SERVER_INFO = 9
    REQUEST_KV_PUT = 10
    ANSWER_KV_PUT = 11
    REQUEST_KV_GET = 12
    ANSWER_KV_GET = 13
    REQUEST_KV_DELETE = 14
    ANSWER_KV_DELETE = 15
    REQUEST_KV_LIST = 16
    ANSWER_KV_LIST = 17
    REQUEST_DB_INFO = 18
    ANSWER_DB_INFO = 19
    REQUEST_SUBSCRIBE = 20
    ANSWER_SUBSCRIBE = 21
    REQUEST_UNSUBSCRIBE = 22
    ANSWER_UNSUBSCRIBE = 23
    REQUEST_PUBLISH = 24
    ANSWER_PUBLISH = 25
    REQUEST_HELLO = 26
    ANSWER_HELLO = 27

    EVENT_MESSAGE = 40
    EVENT_GAP = 41


class ErrorCode(enum.IntEnum):
    """Closed set of error codes carried by ``ANSWER_ERROR``; 1-16 are gRPC's status codes."""

    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16
    UNKNOWN_PACKAGE_TYPE = 100  # the type number is unknown, or not a request
    PROTOCOL_ERROR = 101  # the byte stream is broken; the server closes the connection
    CONFLICT = 102  # a compare-and-set found another version


# ---- errors ---------------------------------------------------------------------------------


class RPCError(Exception):
    """One request failed; travels as ``ANSWER_ERROR`` and the connection lives on.

    Subclasses fix ``code``; an action raises one with a message a person can act on.
    The client raises the same class again from the received code.
    """

    code: ClassVar[ErrorCode] = ErrorCode.UNKNOWN
    _by_code: ClassVar[dict[int, type[RPCError]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "code" in cls.__dict__:
            if cls.code in RPCError._by_code:
                raise TypeError(f"{cls.code.name} already maps to {RPCError._by_code[cls.code]}")
            RPCError._by_code[cls.code] = cls

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        text = f"{self.code.name}: {self.message}"
        return f"{text} ({self.hint})" if self.hint else text

    def to_answer(self) -> ErrorAnswer:
        """The ``ANSWER_ERROR`` body for this error."""
        return ErrorAnswer(code=int(self.code), message=self.message, hint=self.hint)


class UnknownRemoteError(RPCError):
    """Raised by the client for an error code this side does not know."""

    def __init__(self, code: int, message: str, *, hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.remote_code = code

    def __str__(self) -> str:
        return f"error {self.remote_code}: {self.message}"


class Cancelled(RPCError):
    """Raised when the operation was cancelled, typically by the caller."""

    code = ErrorCode.CANCELLED


class Unknown(RPCError):
    """Raised when the failure fits no other code."""

    code = ErrorCode.UNKNOWN


class InvalidArgument(RPCError):
    """Raised when the request body is malformed or a field is out of its documented range."""

    code = ErrorCode.INVALID_ARGUMENT


class DeadlineExceeded(RPCError):
    """Raised when the request did not finish within its timeout."""

    code = ErrorCode.DEADLINE_EXCEEDED


class NotFound(RPCError):
    """Raised when the requested entity does not exist."""

    code = ErrorCode.NOT_FOUND


class AlreadyExists(RPCError):
    """Raised when the entity a request tried to create exists already."""

    code = ErrorCode.ALREADY_EXISTS


class PermissionDenied(RPCError):
    """Raised when the caller may not do this."""

    code = ErrorCode.PERMISSION_DENIED


class ResourceExhausted(RPCError):
    """Raised when a limit (connections, requests in flight, quota) is reached."""

    code = ErrorCode.RESOURCE_EXHAUSTED


class FailedPrecondition(RPCError):
    """Raised when the system is not in the state the request needs."""

    code = ErrorCode.FAILED_PRECONDITION


class Aborted(RPCError):
    """Raised when the operation was aborted by a concurrency conflict; retry higher up."""

    code = ErrorCode.ABORTED


class OutOfRange(RPCError):
    """Raised when a value is past the valid range, e.g. reading past the end."""

    code = ErrorCode.OUT_OF_RANGE


class Unimplemented(RPCError):
    """Raised when the request type exists but this server has no action for it."""

    code = ErrorCode.UNIMPLEMENTED


class Internal(RPCError):
    """Raised when the server failed unexpectedly; its log has the details."""

    code = ErrorCode.INTERNAL


class Unavailable(RPCError):
    """Raised when a service the action needs is unreachable for now; retrying may work."""

    code = ErrorCode.UNAVAILABLE


class DataLoss(RPCError):
    """Raised when data was lost or corrupted."""

    code = ErrorCode.DATA_LOSS


class Unauthenticated(RPCError):
    """Raised when the caller is not authenticated."""

    code = ErrorCode.UNAUTHENTICATED


class UnknownPackageType(RPCError):
    """Raised when the package type number is unknown or is not a request."""

    code = ErrorCode.UNKNOWN_PACKAGE_TYPE


class BrokenStream(RPCError):
    """Raised when the peer found this side's byte stream broken; it closes the connection.

    The local twin is ``protocol.ProtocolError``, raised by this side's own decoder.
    """

    code = ErrorCode.PROTOCOL_ERROR


class Conflict(RPCError):
    """Raised when a compare-and-set found another version than the one expected."""

    code = ErrorCode.CONFLICT


def error_from_answer(answer: ErrorAnswer) -> RPCError:
    """Rebuild the exception an ``ANSWER_ERROR`` stands for (``UnknownRemoteError`` if new)."""
    cls = RPCError._by_code.get(answer.code)
    if cls is None:
        return UnknownRemoteError(answer.code, answer.message, hint=answer.hint)
    return cls(answer.message, hint=answer.hint)


# Integers on the wire are signed 64-bit: every database stores that, and MessagePack's uint64
# values above it would otherwise reach an action (and a database) as a Python int. Use Int64 for
# your own integer fields; a value outside is INVALID_ARGUMENT naming the field.
INT64_MIN: Final = -(2**63)
INT64_MAX: Final = 2**63 - 1
Int64 = Annotated[int, msgspec.Meta(ge=INT64_MIN, le=INT64_MAX)]


class Body(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Base of every body: an immutable MessagePack map; fields at their default are omitted."""


BodyT = TypeVar("BodyT", bound=type[Body])

_BODY_TYPES: dict[PACKAGE, type[Body]] = {}


def body(kind: PACKAGE) -> Callable[[BodyT], BodyT]:
    """Class decorator: declare the body schema of one package type."""

    def register(cls: BodyT) -> BodyT:
        if kind in _BODY_TYPES:
            raise TypeError(f"{kind.name} already has body {_BODY_TYPES[kind].__name__}")
        _BODY_TYPES[kind] = cls
        return cls

    return register


# ---- pairing and codecs -------------------------------------------------------------------

REQUEST_PREFIX: Final = "REQUEST_"
ANSWER_PREFIX: Final = "ANSWER_"
EVENT_PREFIX: Final = "EVENT_"


def is_request(kind: PACKAGE) -> bool:
    """True for ``REQUEST_*`` types, the only ones a client may send."""
    return kind.name.startswith(REQUEST_PREFIX)


def answer_kind_for(request: PACKAGE) -> PACKAGE:
    """The ``ANSWER_X`` that answers ``REQUEST_X``."""
    return _ANSWER_FOR[request]


def body_type(kind: PACKAGE) -> type[Body]:
    """The body schema declared for ``kind``."""
    return _BODY_TYPES[kind]


def pack(kind: PACKAGE, value: Body) -> bytes:
    """Encode a body of type ``kind`` to MessagePack.

    Raises:
        TypeError: ``value`` is not the body class declared for ``kind``.
    """
    _check_class(kind, value)
    return _ENCODE(value)


def pack_payload(kind: PACKAGE, value: Body) -> Payload:
    """``pack`` for a body about to be sent: a large one comes as a ``bytearray`` of about its
    size, which costs one body of memory where growing ``bytes`` would cost one and a half.

    Raises:
        TypeError: ``value`` is not the body class declared for ``kind``.
    """
    _check_class(kind, value)
    size = sum(len(getattr(value, name) or b"") for name in _TEXT_FIELDS[kind])
    if size < LARGE_BODY:
        return _ENCODE(value)
    # msgspec grows its buffer to 1.5 times what it needs while it copies a large field.
    buffer = bytearray(size + LARGE_BODY_SLACK)
    _ENCODER.encode_into(value, buffer)
    return buffer


def _check_class(kind: PACKAGE, value: Body) -> None:
    expected = _BODY_TYPES[kind]
    if type(value) is not expected:
        raise TypeError(f"{kind.name} carries {expected.__name__}, not {type(value).__name__}")


def unpack(kind: PACKAGE, payload: Payload | memoryview) -> Body:
    """Decode and validate a body of type ``kind``.

    Raises:
        InvalidArgument: the payload is not valid MessagePack for that type's schema.
    """
    try:
        return _DECODERS[kind].decode(payload)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise body_error(kind, payload, exc) from None


def decoder_for(kind: PACKAGE) -> Callable[[Payload | memoryview], Body]:
    """``unpack`` for one type, as msgspec's own method (no Python frame per call); what it
    raises goes through ``body_error``."""
    return _DECODERS[kind].decode


def body_error(kind: PACKAGE, payload: Payload | memoryview, exc: Exception) -> Exception:
    """What a decoder's exception means: ``InvalidArgument`` for a body the client got wrong,
    naming what is wrong; any other exception as it is."""
    if isinstance(exc, msgspec.DecodeError):
        return InvalidArgument(f"invalid {kind.name} body: {exc}")
    if isinstance(exc, UnicodeDecodeError):
        field = _field_with_bad_utf8(payload)
        where = f" at `$.{field}`" if field else ""
        return InvalidArgument(f"invalid {kind.name} body: a str is not valid UTF-8{where}")
    if isinstance(exc, RecursionError):
        return InvalidArgument(f"invalid {kind.name} body: nested too deeply")
    return exc


def _field_with_bad_utf8(payload: Payload | memoryview) -> str | None:
    """The top-level field whose value holds invalid UTF-8, for the error message."""
    try:
        fields = msgspec.msgpack.decode(payload, type=dict[str, msgspec.Raw])
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None
    for name, raw in fields.items():
        try:
            msgspec.msgpack.decode(raw)
        except UnicodeDecodeError:
            return name
        except (msgspec.DecodeError, RecursionError):
            continue
    return None


# ---- built-in bodies -----------------------------------------------------------------------


@body(PACKAGE.ANSWER_ERROR)
class ErrorAnswer(Body, frozen=True, kw_only=True):
    """Why a request failed: ``code`` from ``ErrorCode``, a one-line ``message``, a ``hint``."""

    code: Int64
    message: str
    hint: str = ""


@body(PACKAGE.REQUEST_PING)
class PingRequest(Body, frozen=True, kw_only=True):
    pass


@body(PACKAGE.ANSWER_PING)
class PingAnswer(Body, frozen=True, kw_only=True):
    pass


@body(PACKAGE.REQUEST_ECHO)
class EchoRequest(Body, frozen=True, kw_only=True):
    """Exactly one of ``text`` or ``data`` is set; the answer mirrors it."""

    text: str | None = None
    data: bytes | None = None


@body(PACKAGE.ANSWER_ECHO)
class EchoAnswer(Body, frozen=True, kw_only=True):
    text: str | None = None
    data: bytes | None = None


@body(PACKAGE.REQUEST_CHANGE_QUESTION_MARK)
class ChangeQuestionMarkRequest(Body, frozen=True, kw_only=True):
    text: str


@body(PACKAGE.ANSWER_CHANGE_QUESTION_MARK)
class ChangeQuestionMarkAnswer(Body, frozen=True, kw_only=True):
    text: str


@body(PACKAGE.REQUEST_SERVER_INFO)
class ServerInfoRequest(Body, frozen=True, kw_only=True):
    pass


@body(PACKAGE.ANSWER_SERVER_INFO)
class ServerInfoAnswer(Body, frozen=True, kw_only=True):
    version: str
    uptime_s: float
    open_connections: Int64
    requests_served: Int64
    config: dict[str, Any]
    database: dict[str, Any] | None = None  # DB_INFO's fields; None without a database
    node_id: str = ""  # NODE_ID: which server (and worker) answered, unique in a cluster


@body(PACKAGE.REQUEST_KV_PUT)
class KvPutRequest(Body, frozen=True, kw_only=True):
    """Store ``value`` under ``key``; with ``expected_version`` only if the key is at that
    version (0: only if the key does not exist), else the answer is CONFLICT."""

    key: str
    value: bytes
    expected_version: Int64 | None = None


@body(PACKAGE.ANSWER_KV_PUT)
class KvPutAnswer(Body, frozen=True, kw_only=True):
    version: Int64


@body(PACKAGE.REQUEST_KV_GET)
class KvGetRequest(Body, frozen=True, kw_only=True):
    key: str


@body(PACKAGE.ANSWER_KV_GET)
class KvGetAnswer(Body, frozen=True, kw_only=True):
    value: bytes
    version: Int64


@body(PACKAGE.REQUEST_KV_DELETE)
class KvDeleteRequest(Body, frozen=True, kw_only=True):
    key: str
    expected_version: Int64 | None = None


@body(PACKAGE.ANSWER_KV_DELETE)
class KvDeleteAnswer(Body, frozen=True, kw_only=True):
    deleted: bool


@body(PACKAGE.REQUEST_KV_LIST)
class KvListRequest(Body, frozen=True, kw_only=True):
    """Keys starting with ``prefix`` in byte order, ``limit`` at a time, after ``cursor``."""

    prefix: str = ""
    limit: Int64 = 100
    cursor: str = ""


class KvItem(msgspec.Struct, frozen=True, kw_only=True):
    key: str
    version: Int64
    size: Int64  # bytes of the value


@body(PACKAGE.ANSWER_KV_LIST)
class KvListAnswer(Body, frozen=True, kw_only=True):
    items: list[KvItem]
    next_cursor: str = ""  # pass as ``cursor`` for the next page; empty after the last


@body(PACKAGE.REQUEST_DB_INFO)
class DbInfoRequest(Body, frozen=True, kw_only=True):
    pass


@body(PACKAGE.ANSWER_DB_INFO)
class DbInfoAnswer(Body, frozen=True, kw_only=True):
    backend: str
    server_version: str
    pool_size: Int64
    pool_in_use: Int64
    pool_idle: Int64
    reachable: bool


@body(PACKAGE.REQUEST_SUBSCRIBE)
class SubscribeRequest(Body, frozen=True, kw_only=True):
    """Receive the messages of ``topic`` (or of every topic a ``*``/``>`` pattern matches).

    ``since``: also every kept message after this offset (0: all kept history), then live ones;
    None: live ones only. ``positions``: for a wildcard, per topic, the last offset the client
    has (resumes each topic there; ``since`` applies to the topics not listed).
    """

    topic: str
    since: Int64 | None = None
    positions: dict[str, Int64] = {}


@body(PACKAGE.ANSWER_SUBSCRIBE)
class SubscribeAnswer(Body, frozen=True, kw_only=True):
    """``position``: the topic's newest offset now (0 for a wildcard). ``complete``: False when
    kept history no longer reaches back to ``since`` (or ``since`` is ahead of the topic, as
    after a restart of an in-memory broker): resynchronise from your own records."""

    subscription: Int64
    position: Int64
    complete: bool = True
    positions: dict[str, Int64] = {}  # where it starts, per topic known now


@body(PACKAGE.REQUEST_UNSUBSCRIBE)
class UnsubscribeRequest(Body, frozen=True, kw_only=True):
    subscription: Int64


@body(PACKAGE.ANSWER_UNSUBSCRIBE)
class UnsubscribeAnswer(Body, frozen=True, kw_only=True):
    pass


@body(PACKAGE.REQUEST_PUBLISH)
class PublishRequest(Body, frozen=True, kw_only=True):
    topic: str
    data: bytes


@body(PACKAGE.ANSWER_PUBLISH)
class PublishAnswer(Body, frozen=True, kw_only=True):
    """Sent once the broker has stored the message: ``offset`` is its place in its topic."""

    offset: Int64


@body(PACKAGE.REQUEST_HELLO)
class HelloRequest(Body, frozen=True, kw_only=True):
    """The first request of a connection: who the client is and, where the server requires
    it, the token that authenticates it. Before it only HELLO and PING are served."""

    token: str = ""
    client_name: str = ""
    client_version: str = ""


@body(PACKAGE.ANSWER_HELLO)
class HelloAnswer(Body, frozen=True, kw_only=True):
    """Who the server takes the client for, and what it may do (``*``: everything)."""

    principal: str
    scopes: list[str]
    server_version: str


@body(PACKAGE.EVENT_MESSAGE)
class MessageEvent(Body, frozen=True, kw_only=True):
    """A message pushed to a subscription (request id 0); offsets of a topic count from 1."""

    subscription: Int64
    topic: str
    offset: Int64
    data: bytes


@body(PACKAGE.EVENT_GAP)
class GapEvent(Body, frozen=True, kw_only=True):
    """Messages ``first_missing`` to ``last_missing`` of ``topic`` will not be delivered to this
    subscription: they left history before it could be sent them."""

    subscription: Int64
    topic: str
    first_missing: Int64
    last_missing: Int64


# ---- your bodies go here, above the check ---------------------------------------------


def _check_packages() -> dict[PACKAGE, PACKAGE]:
    """Refuse, at import, unpaired requests or answers and types without a body schema."""
    problems: list[str] = []
    answers: dict[PACKAGE, PACKAGE] = {}
    for kind in PACKAGE:
        if not 0 < kind.value <= 0xFFFF:
            problems.append(f"{kind.name} = {kind.value} does not fit the uint16 type field")
        if kind not in _BODY_TYPES:
            problems.append(f"{kind.name} has no body class (decorate one with @body)")
        name = kind.name
        if name.startswith(REQUEST_PREFIX):
            answer_name = ANSWER_PREFIX + name.removeprefix(REQUEST_PREFIX)
            if answer_name not in PACKAGE.__members__:
                problems.append(f"{name} has no {answer_name}")
            else:
                answers[kind] = PACKAGE[answer_name]
        elif name.startswith(ANSWER_PREFIX):
            request_name = REQUEST_PREFIX + name.removeprefix(ANSWER_PREFIX)
            if kind is not PACKAGE.ANSWER_ERROR and request_name not in PACKAGE.__members__:
                problems.append(f"{name} answers no {request_name}")
        elif not name.startswith(EVENT_PREFIX):
            problems.append(f"{name} must start with REQUEST_, ANSWER_ or EVENT_")
    if problems:
        raise TypeError("PACKAGE is inconsistent: " + "; ".join(problems))
    return answers


# Requests that may be sent again when the connection is lost before their answer: doing one
# twice has the effect of doing it once (a subscription dies with its connection, so SUBSCRIBE
# is among them; a blind KV_PUT or a PUBLISH is not). Add your own idempotent types here.
IDEMPOTENT: Final[set[PACKAGE]] = {
    PACKAGE.REQUEST_PING, PACKAGE.REQUEST_ECHO, PACKAGE.REQUEST_CHANGE_QUESTION_MARK,
    PACKAGE.REQUEST_SERVER_INFO, PACKAGE.REQUEST_KV_GET, PACKAGE.REQUEST_KV_LIST,
    PACKAGE.REQUEST_KV_DELETE, PACKAGE.REQUEST_DB_INFO, PACKAGE.REQUEST_SUBSCRIBE,
    PACKAGE.REQUEST_HELLO,
}  # fmt: skip


# ---- the check: runs at import, after every body above ---------------------------------

_ANSWER_FOR: Final = _check_packages()

# Bodies with bytes or str fields this large are encoded into a buffer sized for them.
LARGE_BODY: Final = 1024 * 1024
LARGE_BODY_SLACK: Final = 64 * 1024  # room for the other fields of such a body


def _is_text(annotation: Any) -> bool:
    """``bytes`` or ``str``, maybe optional or annotated with constraints."""
    if annotation in (bytes, str):
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, typing.Annotated):
        return any(_is_text(arg) for arg in typing.get_args(annotation))
    return False


_TEXT_FIELDS: Final = {  # per type, the fields that can make a body large
    kind: tuple(f.name for f in msgspec.structs.fields(cls) if _is_text(f.type))
    for kind, cls in _BODY_TYPES.items()
}
_ENCODER: Final = msgspec.msgpack.Encoder()
_ENCODE: Final = _ENCODER.encode
# Encode a body already known to be of its type's class (``pack`` without the check), for code
# that checked ``type(value)`` itself on a path run per request: msgspec's own method, called
# without a Python frame in between.
encode_body: Final[Callable[[Body], bytes]] = _ENCODER.encode
_DECODERS: Final = {kind: msgspec.msgpack.Decoder(cls) for kind, cls in _BODY_TYPES.items()}
