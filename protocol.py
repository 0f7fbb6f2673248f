"""Frame format of pyasync-server: a sans-IO decoder and encoder shared by server and client.

Nothing here touches a socket or an event loop: bytes go in, frames come out. The byte-level
specification lives in ``docs/PROTOCOL.md``; this module is its reference implementation.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final, NamedTuple, NoReturn, TypeAlias

import zstandard

__all__ = [
    "DEFAULT_COMPRESSION_LEVEL",
    "DEFAULT_COMPRESSION_THRESHOLD",
    "DEFAULT_MAX_FRAME_SIZE",
    "FLAG_COMPRESSED",
    "HEADER",
    "HEADER_SIZE",
    "MAGIC",
    "MAX_REQUEST_ID",
    "Payload",
    "MAX_TIMEOUT_MS",
    "PROTOCOL_VERSION",
    "CONNECTION_REQUEST_ID",
    "BadFrame",
    "Compression",
    "Frame",
    "FrameDecoder",
    "FrameTooLarge",
    "ProtocolError",
    "encode_frame",
    "encode_frame_parts",
]

MAGIC: Final = b"PY"
PROTOCOL_VERSION: Final = 1

# magic, version, flags, package type, request id, timeout in ms, body length; network byte order.
HEADER: Final = struct.Struct("!2sBBHIII")
HEADER_SIZE: Final = HEADER.size  # 18 bytes

FLAG_COMPRESSED: Final = 0x01  # the body is one zstd frame
KNOWN_FLAGS: Final = FLAG_COMPRESSED

# A body to send: bytes, or the bytearray a large body was encoded into (no copy to bytes).
Payload: TypeAlias = bytes | bytearray
MAX_REQUEST_ID: Final = 0xFFFF_FFFF
# Frames with this request id are about the connection itself (a refusal, a broken stream) or
# pushed by the server unasked; requests are numbered from 1.
CONNECTION_REQUEST_ID: Final = 0
MAX_TIMEOUT_MS: Final = 0xFFFF_FFFF

# 16 MiB: large enough for any single RPC body we mean to carry, small enough that a hostile
# peer cannot make a server hold more than this per connection. Checked on the header, before
# the body is buffered, and again on the decompressed size.
DEFAULT_MAX_FRAME_SIZE: Final = 16 * 1024 * 1024  # bytes
ZSTD_FRAME_MAGIC: Final = b"\x28\xb5\x2f\xfd"  # how every zstd frame starts (RFC 8878)

# Chosen from bench/compression.py (2-core x86-64, libzstd 1.5.7), MessagePack API records:
# at level 1, compressing pays only on links slower than 78 MB/s for 1 KiB bodies, 165 MB/s for
# 4 KiB and 220-270 MB/s from 16 KiB up (ratio ~3); over loopback it never pays, and random
# bytes never shrink. From 16 KiB it pays on links up to ~2 Gbit/s. Level 3 gains under 5% in
# size and is slower from 64 KiB on; level -1 is a bit faster but sends ~5% more bytes.
DEFAULT_COMPRESSION_THRESHOLD: Final = 16 * 1024  # bytes
DEFAULT_COMPRESSION_LEVEL: Final = 1


# Below this body size a bytearray slice (two copies) beats creating a memoryview (one copy).
_SLICE_COPY_LIMIT: Final = 4096  # bytes
# A body at least this large that spans reads is gathered as a list of the chunks received and
# joined once when complete, instead of being appended to the buffer and then sliced out.
_GATHER_MIN: Final = 64 * 1024  # bytes


class ProtocolError(Exception):
    """Raised when the byte stream is broken; the connection cannot be used any more."""


class BadFrame(ProtocolError):
    """Raised when a header has a wrong magic, version or flags, or a body does not decompress."""


class FrameTooLarge(ProtocolError):
    """Raised when a body, declared or decompressed, is larger than the frame size limit."""


class Frame(NamedTuple):
    """One decoded frame; ``body`` is already decompressed (a tuple: cheap to make per request).

    Attributes:
        kind: package type number (``package.PACKAGE``); the framer does not interpret it.
        request_id: chosen by the client, echoed by the answer; 0 marks a server push.
        body: the (decompressed) body bytes.
        timeout_ms: the deadline a client asks for this request, 0 for the server's default.
    """

    kind: int
    request_id: int
    body: bytes
    timeout_ms: int = 0


@dataclass(frozen=True, slots=True)
class Compression:
    """When and how bodies are compressed; a body that does not shrink is sent plain."""

    threshold: int = (
        DEFAULT_COMPRESSION_THRESHOLD  # bytes; bodies at or above it are compressed; 0: off
    )
    level: int = DEFAULT_COMPRESSION_LEVEL

    def __post_init__(self) -> None:
        if not -(1 << 17) <= self.level <= zstandard.MAX_COMPRESSION_LEVEL:
            raise ValueError(f"zstd level must be at most {zstandard.MAX_COMPRESSION_LEVEL}")
        if self.threshold < 0:
            raise ValueError("compression threshold must not be negative")


_compressors: dict[int, zstandard.ZstdCompressor] = {}


def _compressor(level: int) -> zstandard.ZstdCompressor:
    # A ZstdCompressor keeps its context between calls; building one costs more than
    # compressing a small body, so keep one per level.
    compressor = _compressors.get(level)
    if compressor is None:
        compressor = _compressors[level] = zstandard.ZstdCompressor(
            level=level, write_content_size=True
        )
    return compressor


def encode_frame(
    kind: int,
    request_id: int,
    body: Payload,
    *,
    timeout_ms: int = 0,
    compression: Compression | None = None,
) -> bytes:
    """Build the bytes of one frame.

    Args:
        kind: package type number.
        request_id: 1..2**32-1 for requests and their answers, 0 for server pushes.
        body: the body to send; compressed when ``compression`` says so and it shrinks.
        timeout_ms: deadline the server should enforce, 0 for its default.
        compression: the compression policy, or None to never compress.

    Returns:
        Header and body, ready for ``transport.write``.
    """
    size = len(body)
    if compression is None or not 0 < compression.threshold <= size:  # the common case
        return HEADER.pack(MAGIC, PROTOCOL_VERSION, 0, kind, request_id, timeout_ms, size) + body
    header, body = encode_frame_parts(
        kind, request_id, body, timeout_ms=timeout_ms, compression=compression
    )
    return header + body


def encode_frame_parts(
    kind: int,
    request_id: int,
    body: Payload,
    *,
    timeout_ms: int = 0,
    compression: Compression | None = None,
) -> tuple[bytes, Payload]:
    """``encode_frame`` as (header, body), for ``transport.writelines`` without a copy."""
    flags = 0
    if compression is not None and 0 < compression.threshold <= len(body):
        packed = _compressor(compression.level).compress(body)
        if len(packed) < len(body):
            body, flags = packed, FLAG_COMPRESSED
    header = HEADER.pack(MAGIC, PROTOCOL_VERSION, flags, kind, request_id, timeout_ms, len(body))
    return header, body


_new_frame = tuple.__new__  # Frame(...) without the Python-level __new__ of a NamedTuple


class FrameDecoder:
    """Incremental decoder: feed it any split of the stream, take complete frames out.

    A chunk that arrives with nothing pending is parsed where it is, without a copy (the
    common case: a read holds whole frames); a frame split across reads is gathered in a
    ``bytearray``, whose consumed bytes are dropped in bulk, never rescanned. Once it has
    raised ``ProtocolError`` the stream is unusable and the decoder stays broken.
    """

    __slots__ = (
        "_broken", "_buffer", "_decompressor", "_gathered", "_header", "_offset", "_pieces",
        "max_frame_size",
    )  # fmt: skip

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        self.max_frame_size = max_frame_size
        self._buffer: bytes | bytearray = b""
        self._offset = 0  # start of the first unconsumed byte in _buffer
        self._broken: ProtocolError | None = None
        # Made on the first compressed frame: a zstd context costs ~8 KiB of memory, more than
        # the rest of an idle connection, and most connections never need one.
        self._decompressor: zstandard.ZstdDecompressor | None = None
        self._pieces: list[bytes | memoryview] = []  # a large body being gathered
        self._gathered = 0  # bytes in _pieces
        self._header: tuple[int, int, int, int, int] = (0, 0, 0, 0, 0)  # of the gathered frame

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append received bytes; call ``next_frame`` until it returns None."""
        if self._pieces:
            need = self._header[4] - self._gathered  # bytes of the gathered body still missing
            if need > 0:
                chunk = data if type(data) is bytes else bytes(data)
                if len(chunk) <= need:
                    self._pieces.append(chunk)
                    self._gathered += len(chunk)
                    return
                view = memoryview(chunk)
                self._pieces.append(view[:need])
                self._gathered += need
                data = bytes(view[need:])
            # The gathered frame is complete: what follows waits in the buffer, in order.
        buffer, offset = self._buffer, self._offset
        if offset >= len(buffer):  # nothing pending: parse this chunk where it is
            self._buffer = data if type(data) is bytes else bytes(data)
            self._offset = 0
        elif type(buffer) is bytes:  # a frame continues: gather from here on
            self._buffer = bytearray(memoryview(buffer)[offset:])
            self._buffer += data
            self._offset = 0
        else:
            assert isinstance(buffer, bytearray)
            if offset >= len(buffer) // 2:
                del buffer[:offset]
                self._offset = 0
            buffer += data

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames (a started frame if nonzero)."""
        pending = len(self._buffer) - self._offset
        if self._pieces:
            return HEADER_SIZE + self._gathered + pending
        return pending

    def next_frame(self) -> Frame | None:
        """Return the next complete frame, or None when more bytes are needed.

        Raises:
            BadFrame: wrong magic, unsupported version, unknown flags, or a corrupt body.
            FrameTooLarge: the declared or decompressed body exceeds ``max_frame_size``.
        """
        if self._broken is not None:
            raise self._broken
        if self._pieces:
            return self._take_gathered()
        buffer, start = self._buffer, self._offset
        available = len(buffer)
        if available - start < HEADER_SIZE:
            return None
        magic, version, flags, kind, request_id, timeout_ms, length = HEADER.unpack_from(
            buffer, start
        )
        if magic != MAGIC or version != PROTOCOL_VERSION or flags & ~KNOWN_FLAGS:
            self._fail(BadFrame(_describe_bad_header(magic, version, flags)))
        if length > self.max_frame_size:
            self._fail(FrameTooLarge(f"frame body of {length} bytes exceeds {self.max_frame_size}"))
        end = start + HEADER_SIZE + length
        if available < end:
            if length >= _GATHER_MIN:  # gather the rest as chunks, join once at the end
                self._pieces.append(memoryview(buffer)[start + HEADER_SIZE :])
                self._gathered = len(buffer) - start - HEADER_SIZE
                self._header = (flags, kind, request_id, timeout_ms, length)
                self._buffer, self._offset = b"", 0
            return None
        if type(buffer) is bytes:
            body = buffer[start + HEADER_SIZE : end]  # bytes slice: the one copy
        elif length < _SLICE_COPY_LIMIT:
            body = bytes(buffer[start + HEADER_SIZE : end])
        else:  # one copy instead of two; the view is released before the buffer may resize
            with memoryview(buffer) as view:
                body = bytes(view[start + HEADER_SIZE : end])
        self._offset = end
        if flags & FLAG_COMPRESSED:
            body = self._decompress(body)
        return _new_frame(Frame, (kind, request_id, body, timeout_ms))

    def _take_gathered(self) -> Frame | None:
        flags, kind, request_id, timeout_ms, length = self._header
        pieces = self._pieces
        if self._gathered < length:
            return None
        body = b"".join(pieces)  # the one copy of the body (feed() kept what follows apart)
        for piece in pieces:
            if isinstance(piece, memoryview):
                piece.release()
        pieces.clear()
        self._gathered = 0
        if flags & FLAG_COMPRESSED:
            body = self._decompress(body)
        return _new_frame(Frame, (kind, request_id, body, timeout_ms))

    def _decompress(self, body: bytes) -> bytes:
        # The declared content size bounds the allocation: zstd refuses to write past it, so
        # a small frame that claims a small size cannot expand into a large one (a "bomb").
        if body[:4] != ZSTD_FRAME_MAGIC:  # a skippable frame, say: not what the spec allows
            self._fail(BadFrame("compressed body is not a zstd frame (it must start 28 b5 2f fd)"))
        try:
            size = zstandard.frame_content_size(body)
        except zstandard.ZstdError as exc:
            self._fail(BadFrame(f"compressed body is not a zstd frame: {exc}"))
        if size < 0:  # -1: the frame does not declare its size (zstandard's own constant differs)
            self._fail(BadFrame("compressed body must declare its content size"))
        if size > self.max_frame_size:
            self._fail(
                FrameTooLarge(f"decompressed body of {size} bytes exceeds {self.max_frame_size}")
            )
        try:
            if self._decompressor is None:
                self._decompressor = zstandard.ZstdDecompressor()
            # Exactly one frame: bytes after it (another frame, padding) break the stream.
            return self._decompressor.decompress(body, allow_extra_data=False)
        except zstandard.ZstdError as exc:
            self._fail(BadFrame(f"compressed body is corrupt: {exc}"))

    def _fail(self, error: ProtocolError) -> NoReturn:
        self._broken = error
        raise error


def _describe_bad_header(magic: bytes, version: int, flags: int) -> str:
    if magic != MAGIC:
        return f"bad magic {magic!r}, expected {MAGIC!r} (is the peer speaking this protocol?)"
    if version != PROTOCOL_VERSION:
        return f"unsupported protocol version {version}, this side speaks {PROTOCOL_VERSION}"
    return f"unknown flags 0x{flags & ~KNOWN_FLAGS:02x}"
