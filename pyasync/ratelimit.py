"""RATE_LIMIT for one connection: a token bucket, and what a request over it is answered.

Kept apart from the connection so that its arithmetic is read and tested on its own, with the
clock passed in. The connection asks ``admit()`` per request; while it refuses, the connection
stops reading until ``resume()``.
"""

from __future__ import annotations

from package import ResourceExhausted
from pyasync.router import Answer, error_answer

__all__ = ["THROTTLE_PAUSE", "TokenBucket"]

# A connection over RATE_LIMIT is not read for at least this long: short pauses would let a
# flood cost a wake-up (and a read full of refusals) every few frames.
THROTTLE_PAUSE = 0.05  # seconds


class TokenBucket:
    """``rate`` requests per second on average, ``burst`` at once.

    Over the limit, an *episode* begins: every request is refused with one answer made once
    (a flood costs little per frame) until ``resume()``, however many tokens come back in
    between, and after ``burst`` refusals the connection should take no more frames.
    """

    __slots__ = ("burst", "rate", "refusal", "refused", "stamp", "tokens")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)  # requests it may send now
        self.stamp = now  # when ``tokens`` was last brought up to date
        self.refusal: Answer | None = None  # the answer of this episode, while one runs
        self.refused = 0  # requests refused in this episode

    @property
    def is_throttled(self) -> bool:
        """An episode runs: refuse, and do not read."""
        return self.refusal is not None

    @property
    def has_refused_enough(self) -> bool:
        """This episode has refused ``burst`` requests: take no more frames until it ends."""
        return self.refused >= self.burst

    def refill(self, now: float) -> None:
        """Add the tokens earned since the last refill, up to ``burst``."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def admit(self) -> bool:
        """Take a token for one request; False when it must be refused (``refuse()``)."""
        if self.refusal is None and self.tokens >= 1:
            self.tokens -= 1
            return True
        return False

    def refuse(self) -> tuple[Answer, float | None]:
        """The answer for a refused request, and, when this refusal starts an episode, how long
        the episode lasts (the caller calls ``resume()`` then); None within an episode."""
        self.refused += 1
        if self.refusal is not None:
            return self.refusal, None
        pause = max((1 - self.tokens) / self.rate, THROTTLE_PAUSE)
        self.refusal = error_answer(
            ResourceExhausted(
                f"more than RATE_LIMIT={self.rate:g} requests/s on this connection",
                hint=f"retry in {round(pause * 1000)} ms",
            )
        )
        return self.refusal, pause

    def resume(self) -> None:
        """End the episode: requests are admitted again as tokens allow."""
        self.refusal = None
        self.refused = 0
