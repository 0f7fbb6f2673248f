"""The fuzz targets of ``bench/fuzz_server.py`` at CI size: seeds, then hypothesis inputs.

The long, coverage-guided run is ``python bench/fuzz_server.py``; these keep its targets
working and catch the cheap findings on every test run. Decoder inputs here are drained after
every feed, as the server and client do (see ``test_a_large_frame_fed_in_several_reads_...``).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from package import PACKAGE
from protocol import Frame, FrameDecoder, encode_frame

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import fuzz_targets

EXAMPLES = 300  # per target; the fuzzer runs millions
DRAIN_BITS = 0b11 << 3  # of the decoder target's control byte: feeds between drains, minus one

fuzz_settings = settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@pytest.fixture(scope="module", autouse=True)
def close_targets() -> Iterator[None]:
    yield
    fuzz_targets.close()


def drained_each_feed(data: bytes) -> bytes:
    """A fuzz input with a decoder target's drain policy set to after every feed."""
    target = fuzz_targets.TARGETS[data[0] % len(fuzz_targets.TARGETS)] if data else None
    if target is not fuzz_targets.decoder_target or len(data) < 2:
        return data
    return data[:1] + bytes([data[1] & ~DRAIN_BITS]) + data[2:]


@pytest.mark.parametrize("data", list(fuzz_targets.seeds()), ids=fuzz_targets.seed_name)
def test_seed(data: bytes) -> None:
    fuzz_targets.one_input(drained_each_feed(data))


@fuzz_settings
@given(st.binary(max_size=2048))
def test_decoder(data: bytes) -> None:
    fuzz_targets.decoder_target(drained_each_feed(b"\0" + data)[1:])


@fuzz_settings
@given(st.binary(max_size=2048))
def test_roundtrip(data: bytes) -> None:
    fuzz_targets.roundtrip_target(data)


@fuzz_settings
@given(st.binary(max_size=512))
def test_router(data: bytes) -> None:
    fuzz_targets.router_target(data)


@fuzz_settings
@given(st.binary(max_size=512))
def test_unpack(data: bytes) -> None:
    fuzz_targets.unpack_target(data)


def lazy_gather_input() -> bytes:
    """The decoder target's input for the finding below, at scaled-down thresholds."""
    first = encode_frame(PACKAGE.REQUEST_ECHO, 1, bytes(30))  # gathered: 30 >= 24 bytes
    second = encode_frame(PACKAGE.REQUEST_PING, 2, b"\x80")
    control = 0b01100  # default limit, scaled-down thresholds, drained after every second feed
    sizes = [10, 15, len(first) + len(second) - 30, 5]  # the last two feeds before one drain
    return bytes([0, control, len(sizes), *(size - 1 for size in sizes)]) + first + second


def test_a_finding_names_its_cause(monkeypatch: pytest.MonkeyPatch) -> None:
    bad_magic = b"\0\0\0" + b"XY" + encode_frame(PACKAGE.REQUEST_PING, 1, b"\x80")[2:]
    fuzz_targets.one_input(bad_magic)  # a ProtocolError is the expected outcome, not a finding
    fuzz_targets.one_input(lazy_gather_input())  # once lost a frame (fixed): no finding now

    def broken(self: FrameDecoder) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(FrameDecoder, "next_frame", broken)
    with pytest.raises(fuzz_targets.Finding) as raised:
        fuzz_targets.one_input(lazy_gather_input())
    assert raised.value.signature.startswith("decoder") and "RuntimeError" in raised.value.signature


def test_a_large_frame_fed_in_several_reads_before_draining_decodes() -> None:
    body = bytes(range(256)) * 300  # 76 800 bytes: gathered in pieces (64 KiB and up)
    stream = encode_frame(PACKAGE.REQUEST_ECHO, 1, body) + encode_frame(
        PACKAGE.REQUEST_PING, 2, b"\x80"
    )
    decoder = FrameDecoder()
    decoder.feed(stream[:1000])
    assert decoder.next_frame() is None  # the body is being gathered
    decoder.feed(stream[1000:-5])  # the rest of the body and most of the next frame
    decoder.feed(stream[-5:])  # a second read before the caller drained the first
    frames = [decoder.next_frame(), decoder.next_frame()]
    assert frames == [
        Frame(PACKAGE.REQUEST_ECHO, 1, body, 0),
        Frame(PACKAGE.REQUEST_PING, 2, b"\x80", 0),
    ]
