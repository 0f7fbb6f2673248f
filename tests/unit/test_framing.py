"""Frame encoder and incremental decoder: golden bytes from docs/PROTOCOL.md and properties."""

from __future__ import annotations

import os
import random
import tracemalloc

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

import package
from package import PACKAGE, EchoAnswer, EchoRequest, ErrorAnswer, PingRequest
from protocol import (
    FLAG_COMPRESSED,
    HEADER,
    MAGIC,
    BadFrame,
    Compression,
    Frame,
    FrameDecoder,
    FrameTooLarge,
    ProtocolError,
    encode_frame,
)

# Hand-written from the table in docs/PROTOCOL.md, not produced by our encoder.
GOLDEN_ECHO_REQUEST = bytes.fromhex("5059 01 00 0004 00000007 00001388 00000009 81a474657874a26869")
GOLDEN_ECHO_ANSWER = bytes.fromhex("5059 01 00 0005 00000007 00000000 00000009 81a474657874a26869")
GOLDEN_PING = bytes.fromhex("5059 01 00 0002 00000001 00000000 00000001 80")
GOLDEN_ERROR = (
    bytes.fromhex(
        "5059 01 00 0001 00000008 00000000 0000003b82 a4 636f6465 64 a7 6d657373616765 d92a"
    )
    + b"package type 999 is unknown to this server"
)


def decode_all(data: bytes, chunks: list[int] | None = None, **kwargs: int) -> list[Frame]:
    """Feed ``data`` cut at ``chunks`` boundaries; return every frame decoded."""
    decoder = FrameDecoder(**kwargs)
    frames: list[Frame] = []
    cuts = sorted(set(chunks or [])) + [len(data)]
    start = 0
    for cut in cuts:
        decoder.feed(data[start:cut])
        start = cut
        while (frame := decoder.next_frame()) is not None:
            frames.append(frame)
    assert decoder.buffered == 0
    return frames


def test_golden_echo_request_decodes() -> None:
    [frame] = decode_all(GOLDEN_ECHO_REQUEST)
    assert (frame.kind, frame.request_id, frame.timeout_ms) == (PACKAGE.REQUEST_ECHO, 7, 5000)
    assert package.unpack(PACKAGE.REQUEST_ECHO, frame.body) == EchoRequest(text="hi")


def test_golden_answers_decode() -> None:
    answer, error = decode_all(GOLDEN_ECHO_ANSWER + GOLDEN_ERROR)
    assert package.unpack(PACKAGE(answer.kind), answer.body) == EchoAnswer(text="hi")
    assert error.request_id == 8
    assert package.unpack(PACKAGE.ANSWER_ERROR, error.body) == ErrorAnswer(
        code=100, message="package type 999 is unknown to this server"
    )


def test_encoder_writes_the_documented_bytes() -> None:
    echo = package.pack(PACKAGE.REQUEST_ECHO, EchoRequest(text="hi"))
    assert encode_frame(PACKAGE.REQUEST_ECHO, 7, echo, timeout_ms=5000) == GOLDEN_ECHO_REQUEST
    ping = package.pack(PACKAGE.REQUEST_PING, PingRequest())
    assert encode_frame(PACKAGE.REQUEST_PING, 1, ping) == GOLDEN_PING


frames_strategy = st.lists(
    st.tuples(
        st.integers(1, 0xFFFF),
        st.integers(0, 0xFFFF_FFFF),
        st.integers(0, 0xFFFF_FFFF),
        st.one_of(st.binary(max_size=300), st.builds(lambda n: b"ab" * n, st.integers(0, 5000))),
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=150, deadline=None)
@given(frames_strategy, st.lists(st.integers(0, 20_000), max_size=8), st.booleans())
def test_any_split_decodes_the_same_frames(
    specs: list[tuple[int, int, int, bytes]], cuts: list[int], compress: bool
) -> None:
    compression = Compression(threshold=64) if compress else None
    stream = b"".join(
        encode_frame(kind, rid, body, timeout_ms=tmo, compression=compression)
        for kind, rid, tmo, body in specs
    )
    expected = [Frame(kind, rid, body, tmo) for kind, rid, tmo, body in specs]
    assert decode_all(stream, [c for c in cuts if c < len(stream)]) == expected


def test_one_byte_at_a_time() -> None:
    stream = GOLDEN_ECHO_REQUEST + GOLDEN_PING + GOLDEN_ERROR
    frames = decode_all(stream, list(range(len(stream))))
    assert [(frame.kind, frame.request_id) for frame in frames] == [
        (PACKAGE.REQUEST_ECHO, 7),
        (PACKAGE.REQUEST_PING, 1),
        (PACKAGE.ANSWER_ERROR, 8),
    ]
    assert frames == decode_all(stream)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.lists(st.integers(0, 200), max_size=5))
def test_garbage_raises_only_protocol_error(garbage: bytes, cuts: list[int]) -> None:
    decoder = FrameDecoder(max_frame_size=1024)
    start = 0
    try:
        for cut in [*sorted(c for c in cuts if c < len(garbage)), len(garbage)]:
            decoder.feed(garbage[start:cut])
            start = cut
            while decoder.next_frame() is not None:
                pass
    except ProtocolError as first:
        with pytest.raises(ProtocolError):  # a broken stream stays broken
            decoder.next_frame()
        assert str(first)


def test_declared_oversize_is_rejected_from_the_header_alone() -> None:
    decoder = FrameDecoder(max_frame_size=1024)
    decoder.feed(HEADER.pack(MAGIC, 1, 0, 4, 1, 0, 1025))
    with pytest.raises(FrameTooLarge):
        decoder.next_frame()
    assert decoder.buffered == HEADER.size


def test_zstd_bomb_is_rejected_without_inflating() -> None:
    bomb = zstandard.ZstdCompressor(level=3).compress(bytes(64 * 1024 * 1024))
    assert len(bomb) < 64 * 1024
    frame = HEADER.pack(MAGIC, 1, FLAG_COMPRESSED, 4, 1, 0, len(bomb)) + bomb
    decoder = FrameDecoder(max_frame_size=1024 * 1024)
    decoder.feed(frame)
    tracemalloc.start()
    try:
        with pytest.raises(FrameTooLarge):
            decoder.next_frame()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 1024 * 1024


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (HEADER.pack(b"XY", 1, 0, 4, 1, 0, 0), "bad magic"),
        (HEADER.pack(MAGIC, 2, 0, 4, 1, 0, 0), "unsupported protocol version 2"),
        (HEADER.pack(MAGIC, 1, 0x80, 4, 1, 0, 0), "unknown flags"),
        (HEADER.pack(MAGIC, 1, FLAG_COMPRESSED, 4, 1, 0, 4) + b"abcd", "not a zstd frame"),
    ],
)
def test_bad_headers_are_protocol_errors(raw: bytes, message: str) -> None:
    decoder = FrameDecoder()
    decoder.feed(raw)
    with pytest.raises(BadFrame, match=message):
        decoder.next_frame()


def test_compressed_body_without_declared_size_is_rejected() -> None:
    stream = zstandard.ZstdCompressor().compressobj()
    body = stream.compress(b"x" * 1000) + stream.flush()
    decoder = FrameDecoder()
    decoder.feed(HEADER.pack(MAGIC, 1, FLAG_COMPRESSED, 4, 1, 0, len(body)) + body)
    with pytest.raises(BadFrame, match="declare its content size"):
        decoder.next_frame()


ZSTD_TEXT = zstandard.ZstdCompressor(write_content_size=True).compress(b"\x81\xa4text\xa2hi")
SKIPPABLE_FRAME = bytes.fromhex("502a4d18 04000000") + b"skip"  # magic 0x184D2A50, 4 bytes


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (ZSTD_TEXT + b"xyz", "unused data"),
        (ZSTD_TEXT + bytes(8), "unused data"),
        (ZSTD_TEXT + ZSTD_TEXT, "unused data"),  # two frames, not one
        (SKIPPABLE_FRAME + ZSTD_TEXT, "not a zstd frame"),
    ],
    ids=["trailing bytes", "trailing zeros", "second frame", "skippable frame first"],
)
def test_a_compressed_body_is_exactly_one_zstd_frame(body: bytes, message: str) -> None:
    decoder = FrameDecoder()
    decoder.feed(HEADER.pack(MAGIC, 1, FLAG_COMPRESSED, 4, 1, 0, len(body)) + body)
    with pytest.raises(BadFrame, match=message):
        decoder.next_frame()
    with pytest.raises(BadFrame):  # and the stream stays broken
        decoder.next_frame()
    assert decode_all(HEADER.pack(MAGIC, 1, FLAG_COMPRESSED, 4, 1, 0, len(ZSTD_TEXT)) + ZSTD_TEXT)


def test_compression_threshold_and_incompressible_bodies() -> None:
    policy = Compression(threshold=1024)
    small = encode_frame(4, 1, b"a" * 1023, compression=policy)
    large = encode_frame(4, 1, b"a" * 1024, compression=policy)
    noise = encode_frame(4, 1, bytes(range(256)) * 4 + b"\x01", compression=policy)
    assert small[3] == 0 and len(small) == HEADER.size + 1023
    assert large[3] == FLAG_COMPRESSED and len(large) < HEADER.size + 100
    assert decode_all(large)[0].body == b"a" * 1024
    incompressible = encode_frame(4, 1, os.urandom(4096), compression=policy)
    assert incompressible[3] == 0
    assert noise[3] == FLAG_COMPRESSED and len(noise) < HEADER.size + 1025  # repeats: shrinks
    assert decode_all(noise)[0].body == bytes(range(256)) * 4 + b"\x01"
    off = encode_frame(4, 1, b"a" * 100_000, compression=Compression(threshold=0))
    assert off[3] == 0 and len(off) == HEADER.size + 100_000


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 300_000), min_size=1, max_size=40), st.integers(0, 2**32 - 1))
def test_large_bodies_split_anywhere_decode_intact(cuts: list[int], seed: int) -> None:
    """Bodies over the gathering size, split at random, with small frames around them."""
    large = bytes(random.Random(seed).randbytes(200_000))
    specs = [(4, 1, b"small"), (4, 2, large), (4, 3, b""), (4, 4, large[::-1]), (4, 5, b"end")]
    stream = b"".join(encode_frame(kind, rid, body) for kind, rid, body in specs)
    decoder, frames, position = FrameDecoder(), [], 0
    for cut in [*cuts, len(stream)]:
        decoder.feed(bytearray(stream[position : position + cut]))  # any buffer type
        position += cut
        while (frame := decoder.next_frame()) is not None:
            frames.append(frame)
    assert [(f.kind, f.request_id, f.body) for f in frames] == specs
    assert decoder.buffered == 0
