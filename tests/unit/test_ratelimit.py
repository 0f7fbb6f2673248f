"""RATE_LIMIT's token bucket, with the clock in the test's hands."""

from __future__ import annotations

import pytest

from package import PACKAGE, ErrorAnswer, ErrorCode, unpack
from pyasync.ratelimit import THROTTLE_PAUSE, TokenBucket


def test_a_burst_is_admitted_then_refused_until_tokens_come_back() -> None:
    bucket = TokenBucket(rate=100, burst=3, now=0.0)
    assert [bucket.admit() for _ in range(4)] == [True, True, True, False]
    bucket.refill(now=0.015)  # 1.5 tokens earned
    assert bucket.admit() and not bucket.admit()


def test_tokens_never_exceed_the_burst() -> None:
    bucket = TokenBucket(rate=1000, burst=2, now=0.0)
    bucket.refill(now=60.0)
    assert [bucket.admit() for _ in range(3)] == [True, True, False]


def test_an_episode_refuses_with_one_answer_until_it_is_resumed() -> None:
    bucket = TokenBucket(rate=10, burst=2, now=0.0)
    assert bucket.admit() and bucket.admit() and not bucket.admit()
    first, pause = bucket.refuse()
    assert pause == pytest.approx(0.1)  # one token at 10/s
    assert bucket.is_throttled
    error = unpack(PACKAGE.ANSWER_ERROR, first[1])
    assert isinstance(error, ErrorAnswer) and error.code == ErrorCode.RESOURCE_EXHAUSTED
    assert "RATE_LIMIT=10" in error.message and error.hint == "retry in 100 ms"
    bucket.refill(now=1.0)  # tokens are back, but the episode runs until resume()
    assert not bucket.admit()
    again, no_new_pause = bucket.refuse()
    assert again is first and no_new_pause is None  # made once: a flood costs little
    assert bucket.has_refused_enough  # burst (2) refusals: take no more frames
    bucket.resume()
    assert (bucket.is_throttled, bucket.has_refused_enough, bucket.admit()) == (False, False, True)


def test_a_pause_lasts_at_least_the_minimum() -> None:
    bucket = TokenBucket(rate=100_000, burst=1, now=0.0)
    bucket.admit()
    assert bucket.refuse()[1] == THROTTLE_PAUSE  # 10 µs would cost a wake-up per few frames
