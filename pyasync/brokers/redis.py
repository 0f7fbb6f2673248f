"""The Redis broker (``redis://host:port[/db]``): history in streams, one Lua script per publish.

Why it is built this way:

* A topic's history is a Redis Stream, ``pyasync:topic:<topic>``, whose entry ids are the
  offsets (``<offset>-0``) with the publish time in a field; its newest offset is a counter,
  ``pyasync:offset:<topic>``, that outlives the history (a few bytes per topic, the way the memory
  backend keeps ``head`` after trimming), so a topic whose history aged out goes on from its
  last offset instead of starting again at 1.
* A publish is one Lua script: it takes the next offset, appends the entry (``MAXLEN`` =
  ``history_size``), drops entries older than ``history_ttl``, sets the key to expire after
  ``history_ttl`` without publishes, and PUBLISHes the message. Redis runs a script alone, so
  offsets have no holes and no duplicates whatever the number of publishing processes, and the
  history holds a message before any live subscriber can see it.
* Live messages travel over Pub/Sub on ``pyasync:live:<db>:<topic>``: one connection for all
  patterns, each pattern PSUBSCRIBEd as a glob and filtered exactly with ``topic_matches``
  (a glob's ``*`` crosses dots). A reader task owns that connection; when it drops, the task
  connects again with back-off, subscribes every glob again and only then calls
  ``on_reconnect``, so the broker's replay from history meets live messages without a gap.
* Age limits are enforced where they are read as well: an entry's time is known, entries older
  than the TTL are always the oldest ones, and the offsets in a stream are contiguous, so
  ``history()`` finds the first kept one by a binary search inside its (read-only) script.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from broker import BrokerSettings, Stored, topic_matches
from package import Unavailable

__all__ = ["RedisBackend"]

log = logging.getLogger("pyasync.broker.redis")

KEY_PREFIX = "pyasync:topic:"  # a topic's history: KEY_PREFIX + topic
COUNTER_PREFIX = "pyasync:offset:"  # a topic's newest offset: COUNTER_PREFIX + topic
# A topic's live messages: "pyasync:live:<db>:" + topic. Pub/Sub ignores the database number,
# so the channel names it: servers on another database must not see offsets of this one.
CHANNEL_PREFIX = "pyasync:live:{db}:"
CONTROL_CHANNEL = "pyasync:control:{db}"  # silent: keeps the Pub/Sub connection open

CONNECT_TIMEOUT = 2.0  # seconds for one connection attempt
COMMAND_TIMEOUT = 5.0  # seconds for one command's answer
PING_INTERVAL = 5.0  # seconds of Pub/Sub silence before a PING; two silent ones: lost
MAX_BACKOFF = 2.0  # seconds between reconnection attempts, at most
SCAN_COUNT = 1000  # keys per SCAN step
POOL_SIZE = 32  # connections: one for Pub/Sub, the rest for commands
POOL_WAIT = 30.0  # seconds a command may wait for a free connection (bursts queue up)
GLOB_SPECIAL = re.compile(r"([\\*?\[\]])")

# The first entry kept at ``cutoff`` (ms): entries age from the oldest, and the ids between the
# first and the last are contiguous offsets, so a binary search finds it.
FIRST_KEPT = """
local function offset_of(id) return tonumber(string.match(id, '^(%d+)')) end
local function first_kept(key, cutoff)
  local first = redis.call('XRANGE', key, '-', '+', 'COUNT', 1)[1]
  if first == nil then return nil end
  if tonumber(first[2][2]) >= cutoff then return offset_of(first[1]) end
  local last = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)[1]
  if tonumber(last[2][2]) < cutoff then return nil end
  local low, high = offset_of(first[1]) + 1, offset_of(last[1])
  while low < high do
    local middle = math.floor((low + high) / 2)
    local entry = redis.call('XRANGE', key, middle .. '-0', middle .. '-0')[1]
    if entry == nil or tonumber(entry[2][2]) >= cutoff then high = middle else low = middle + 1 end
  end
  return low
end
local function now_ms()
  local now = redis.call('TIME')
  return tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
end
"""

# KEYS: stream, counter. ARGV: data, history_size, history_ttl (ms), channel. Returns the offset.
PUBLISH = (
    FIRST_KEPT
    + """
local offset = (tonumber(redis.call('GET', KEYS[2])) or 0) + 1
local now = now_ms()
redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[2], offset .. '-0', 't', now, 'd', ARGV[1])
redis.call('SET', KEYS[2], offset)
local kept = first_kept(KEYS[1], now - tonumber(ARGV[3]))
if kept ~= nil then redis.call('XTRIM', KEYS[1], 'MINID', kept .. '-0') end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PUBLISH', ARGV[4], offset .. ' ' .. ARGV[1])
return offset
"""
)

# KEYS: stream, counter. ARGV: after, limit, history_ttl (ms).
# Returns {head, id, data, id, data, ...}.
HISTORY = (
    FIRST_KEPT
    + """
local head = tonumber(redis.call('GET', KEYS[2])) or 0
local after, limit = tonumber(ARGV[1]), tonumber(ARGV[2])
local result = {head}
if limit <= 0 or after >= head then return result end
local kept = first_kept(KEYS[1], now_ms() - tonumber(ARGV[3]))
if kept == nil then return result end
local start = math.max(kept, after + 1)
for _, entry in ipairs(redis.call('XRANGE', KEYS[1], start .. '-0', '+', 'COUNT', limit)) do
  result[#result + 1] = entry[1]
  result[#result + 1] = entry[2][4]
end
return result
"""
)


def glob_for(prefix: str, pattern: str) -> str:
    """The glob of keys or channels that covers ``pattern`` (wider: ``*`` crosses dots)."""
    tokens = pattern.split(".")
    wanted = ".".join("*" if t in ("*", ">") else GLOB_SPECIAL.sub(r"\\\1", t) for t in tokens)
    return GLOB_SPECIAL.sub(r"\\\1", prefix) + wanted


class RedisBackend:
    """Topics on a Redis server; see the module's docstring for the design.

    Args:
        settings: URL, history size and age.
        on_reconnect: called once Pub/Sub is back and every pattern is subscribed again.
    """

    def __init__(self, settings: BrokerSettings, on_reconnect: Callable[[], None]) -> None:
        self.settings = settings
        self.on_reconnect = on_reconnect
        parts = urlsplit(settings.url)
        self.address = f"{parts.hostname or '127.0.0.1'}:{parts.port or 6379}"
        self.ttl_ms = max(1, round(settings.history_ttl * 1000))
        # No retries inside the driver: a retried publish could run twice; we report instead.
        # A blocking pool: a burst of publishes waits for a connection rather than failing.
        self.pool = aioredis.BlockingConnectionPool.from_url(
            settings.url,
            max_connections=POOL_SIZE,
            timeout=POOL_WAIT,
            socket_connect_timeout=CONNECT_TIMEOUT,
            socket_timeout=COMMAND_TIMEOUT,
            retry=Retry(NoBackoff(), 0),
        )
        self.redis = aioredis.Redis(connection_pool=self.pool)
        db = self.pool.connection_kwargs.get("db", 0)
        self.channel_prefix = CHANNEL_PREFIX.format(db=db)
        self.control_channel = CONTROL_CHANNEL.format(db=db)
        self.publish_script = self.redis.register_script(PUBLISH)
        self.history_script = self.redis.register_script(HISTORY)
        self.listeners: dict[str, Callable[[Stored], None]] = {}
        self.globs: dict[str, set[str]] = {}  # glob -> the patterns it serves
        self.confirmations: dict[str, list[asyncio.Future[None]]] = {}  # glob -> waiting listens
        self.resubscribing: set[str] = set()  # globs to confirm before on_reconnect
        self.pubsub: PubSub | None = None
        self.is_connected = False
        self.last_error = "not connected yet"
        self.attempted: asyncio.Event | None = None
        self.reader: asyncio.Task[None] | None = None

    # ---- connection --------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect; if Redis cannot be reached, log it once and keep trying in the background."""
        self.attempted = asyncio.Event()
        self.reader = asyncio.get_running_loop().create_task(self._read_forever())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CONNECT_TIMEOUT + COMMAND_TIMEOUT):
                await self.attempted.wait()
        if not self.is_connected:
            log.warning(
                "Redis broker at %s not reachable at start-up (%s); retrying in the background",
                self.address,
                self.last_error,
            )

    async def close(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
            await asyncio.wait({self.reader})
        self.listeners.clear()
        self.globs.clear()
        await self._drop_pubsub()
        await self.redis.aclose()
        await self.pool.aclose()

    @contextlib.contextmanager
    def _translate(self) -> Iterator[None]:
        """The driver's failures as ``Unavailable`` (one line)."""
        try:
            yield
        except (RedisError, OSError) as exc:  # OSError: asyncio's TimeoutError too
            raise Unavailable(f"Redis broker at {self.address}: {_describe(exc)}") from exc

    # ---- publishing and history --------------------------------------------------------------

    async def publish(self, topic: str, data: bytes) -> int:
        """Store ``data`` as the topic's next offset, send it live, and return the offset.

        Raises:
            Unavailable: Redis cannot be reached or did not answer in time.
        """
        keys = [KEY_PREFIX + topic, COUNTER_PREFIX + topic]
        args: list[bytes | str | int] = [
            data,
            self.settings.history_size,
            self.ttl_ms,
            self.channel_prefix + topic,
        ]
        with self._translate():
            offset = await self.publish_script(keys=keys, args=args)
        return int(offset)

    async def history(self, topic: str, after: int, limit: int) -> tuple[list[Stored], int]:
        """Up to ``limit`` kept messages after offset ``after``, and the newest offset.

        Raises:
            Unavailable: Redis cannot be reached or did not answer in time.
        """
        keys = [KEY_PREFIX + topic, COUNTER_PREFIX + topic]
        with self._translate():
            reply = await self.history_script(keys=keys, args=[after, limit, self.ttl_ms])
        head, rest = int(reply[0]), reply[1:]
        messages = [
            Stored(topic, int(entry_id.split(b"-", 1)[0]), data)
            for entry_id, data in zip(rest[::2], rest[1::2], strict=True)
        ]
        return messages, head

    async def topics(self, pattern: str) -> list[str]:
        """The topics matching ``pattern`` that have messages kept.

        Raises:
            Unavailable: Redis cannot be reached or did not answer in time.
        """
        found: list[str] = []
        match = glob_for(KEY_PREFIX, pattern)
        with self._translate():
            async for key in self.redis.scan_iter(match=match, count=SCAN_COUNT, _type="stream"):
                topic = key.decode()[len(KEY_PREFIX) :]
                if topic_matches(pattern, topic):
                    found.append(topic)
        return sorted(found)

    # ---- live messages -----------------------------------------------------------------------

    async def listen(self, pattern: str, deliver: Callable[[Stored], None]) -> None:
        """Deliver every message published from now on to a topic matching ``pattern``.

        Returns once Redis confirmed the subscription.

        Raises:
            Unavailable: Redis cannot be reached or did not confirm in time.
        """
        if not self.is_connected or self.pubsub is None:
            raise Unavailable(f"Redis broker at {self.address} unreachable: {self.last_error}")
        glob = glob_for(self.channel_prefix, pattern)
        self.listeners[pattern] = deliver
        users = self.globs.setdefault(glob, set())
        users.add(pattern)
        if len(users) > 1 and glob not in self.confirmations and glob not in self.resubscribing:
            return  # subscribed and confirmed already
        confirmed = asyncio.get_running_loop().create_future()
        self.confirmations.setdefault(glob, []).append(confirmed)
        try:
            with self._translate():
                if len(users) == 1:
                    await self.pubsub.psubscribe(glob)
                async with asyncio.timeout(COMMAND_TIMEOUT):
                    await confirmed
        except BaseException:
            await self.unlisten(pattern)
            raise

    async def unlisten(self, pattern: str) -> None:
        """Stop ``listen(pattern)``; if Redis is away, it is not subscribed again on return."""
        if self.listeners.pop(pattern, None) is None:
            return
        glob = glob_for(self.channel_prefix, pattern)
        users = self.globs.get(glob, set())
        users.discard(pattern)
        if users:
            return
        self.globs.pop(glob, None)
        if self.pubsub is not None and self.is_connected:
            with contextlib.suppress(RedisError, OSError):
                await self.pubsub.punsubscribe(glob)

    async def _read_forever(self) -> None:
        """Own the Pub/Sub connection: subscribe, dispatch, and connect again when it drops."""
        delay = 0.05
        while True:
            try:
                await self._subscribe_all()
                delay = 0.05
                await self._read()
            except (RedisError, OSError) as exc:
                self._lost(exc)
            except Exception as exc:  # a bug must not end live delivery for good
                log.exception("Redis broker at %s: Pub/Sub reader failed", self.address)
                self._lost(exc)
            await self._drop_pubsub()
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_BACKOFF)

    async def _subscribe_all(self) -> None:
        """A new Pub/Sub connection with every glob; on_reconnect follows their confirmations."""
        was_down = self.attempted is not None and self.attempted.is_set()
        self.pubsub = self.redis.pubsub()
        await self.pubsub.subscribe(self.control_channel)
        globs = list(self.globs)
        if globs:
            await self.pubsub.psubscribe(*globs)
        self.resubscribing = set(globs) if was_down else set()
        self.is_connected = True
        if self.attempted is not None:
            if was_down:
                log.info("Redis broker at %s: reconnected", self.address)
            self.attempted.set()
        if was_down and not globs:
            self.on_reconnect()

    async def _read(self) -> None:
        """Dispatch Pub/Sub messages until the connection fails (raises) or stays silent."""
        assert self.pubsub is not None
        pinged = False
        while True:
            message = await self.pubsub.get_message(timeout=PING_INTERVAL)
            if message is None:
                if pinged:
                    raise ConnectionError(f"no answer to PING within {PING_INTERVAL:g} s")
                await self.pubsub.ping()
                pinged = True
                continue
            pinged = False
            self._handle(message)

    def _handle(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "pmessage":
            self._dispatch(message["pattern"].decode(), message["channel"], message["data"])
        elif kind == "psubscribe":
            glob = message["channel"].decode()
            for confirmed in self.confirmations.pop(glob, []):
                if not confirmed.done():
                    confirmed.set_result(None)
            if glob in self.resubscribing:
                self.resubscribing.discard(glob)
                if not self.resubscribing:
                    self.on_reconnect()

    def _dispatch(self, glob: str, channel: bytes, payload: bytes) -> None:
        topic = channel.decode()[len(self.channel_prefix) :]
        head, _, data = payload.partition(b" ")
        message = Stored(topic, int(head), data)
        for pattern in list(self.globs.get(glob, ())):
            deliver = self.listeners.get(pattern)
            if deliver is not None and topic_matches(pattern, topic):
                try:
                    deliver(message)
                except Exception:
                    log.exception("delivering a message of %s failed", topic)

    def _lost(self, exc: BaseException) -> None:
        self.last_error = _describe(exc)
        if self.is_connected:
            log.warning("Redis broker at %s: connection lost (%s); reconnecting", self.address,
                        self.last_error)  # fmt: skip
        else:
            log.debug("Redis broker at %s: %s", self.address, self.last_error)
        self.is_connected = False
        if self.attempted is not None:
            self.attempted.set()
        for waiting in self.confirmations.values():
            for confirmed in waiting:
                if not confirmed.done():
                    confirmed.set_exception(Unavailable(f"Redis broker at {self.address}: "
                                                        f"{self.last_error}"))  # fmt: skip
                    confirmed.exception()  # retrieved: the listen() awaiting it re-raises
        self.confirmations.clear()

    async def _drop_pubsub(self) -> None:
        pubsub, self.pubsub = self.pubsub, None
        self.is_connected = False
        if pubsub is not None:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()  # type: ignore[no-untyped-call]  # redis-py leaves it bare


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
