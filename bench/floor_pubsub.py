"""The publish/subscribe floor: the least a Python asyncio server can do to fan messages out.

One topic, no history, no flow control: what pyasync-server's broker does beyond this is the
price of its guarantees. Frames are an 8-byte header (body length u32, kind u32, big-endian) and
the body:

- SUBSCRIBE (1, empty body): the connection receives every message published from now on; the
  answer (kind 1) carries the topic's newest offset (u64).
- PUBLISH (2, the data): the answer (kind 2) carries the message's offset (u64); every subscriber
  is sent MESSAGE (3): the offset (u64), then the data.

``write`` mode writes each message to each subscriber as it is published: one
``transport.write`` per message per subscriber. ``batch`` mode queues them and writes all the
messages pending for a subscriber in one ``transport.write`` per event-loop pass. Each message's
frame is built once and shared by every subscriber (the wire format names no subscription).

    python bench/floor_pubsub.py --port 9000 [--mode write|batch] [--loop uvloop|asyncio]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import struct

HEADER = struct.Struct("!II")
OFFSET = struct.Struct("!Q")
SUBSCRIBE, PUBLISH, MESSAGE = 1, 2, 3
MAX_BODY = 1 << 20  # bytes; a longer frame closes the connection


class Topic:
    """The subscribers of the one topic, and the fan-out."""

    def __init__(self, batch: bool) -> None:
        self.batch = batch
        self.head = 0  # newest offset
        self.subscribers: set[PubSubProtocol] = set()
        self.dirty: list[PubSubProtocol] = []  # batch: subscribers with messages pending
        self.is_flush_scheduled = False

    def publish(self, data: bytes) -> int:
        self.head += 1
        frame = HEADER.pack(OFFSET.size + len(data), MESSAGE) + OFFSET.pack(self.head) + data
        if not self.batch:
            for subscriber in self.subscribers:
                subscriber.write(frame)
            return self.head
        dirty = self.dirty
        for subscriber in self.subscribers:
            if not subscriber.pending:
                dirty.append(subscriber)
            subscriber.pending.append(frame)
        if not self.is_flush_scheduled:
            self.is_flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)
        return self.head

    def flush(self) -> None:
        """Write each subscriber's pending messages in one write (batch mode, once a pass)."""
        self.is_flush_scheduled = False
        dirty, self.dirty = self.dirty, []
        for subscriber in dirty:
            pending = subscriber.pending
            subscriber.write(pending[0] if len(pending) == 1 else b"".join(pending))
            pending.clear()


class PubSubProtocol(asyncio.Protocol):
    """One connection: a subscriber, a publisher, or both."""

    def __init__(self, topic: Topic) -> None:
        self.topic = topic
        self.buffer = bytearray()
        self.pending: list[bytes] = []
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.topic.subscribers.discard(self)
        self.transport = None

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        offset = 0
        answers: list[bytes] = []
        while len(buffer) - offset >= HEADER.size:
            length, kind = HEADER.unpack_from(buffer, offset)
            if length > MAX_BODY or kind not in (SUBSCRIBE, PUBLISH):
                assert self.transport is not None
                self.transport.close()
                return
            end = offset + HEADER.size + length
            if len(buffer) < end:
                break
            if kind == PUBLISH:
                head = self.topic.publish(bytes(buffer[offset + HEADER.size : end]))
            else:
                self.topic.subscribers.add(self)
                head = self.topic.head
            answers.append(HEADER.pack(OFFSET.size, kind) + OFFSET.pack(head))
            offset = end
        del buffer[:offset]
        if answers:
            self.write(b"".join(answers))


async def serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    topic = Topic(batch=args.mode == "batch")
    server = await loop.create_server(
        lambda: PubSubProtocol(topic), "127.0.0.1", args.port, backlog=4096
    )
    stop = loop.create_future()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set_result, None)
    print("ready", server.sockets[0].getsockname()[1], flush=True)  # the port, for --port 0
    async with server:
        await stop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--mode", choices=["write", "batch"], default="batch")
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    args = parser.parse_args()
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(serve(args))
    else:
        asyncio.run(serve(args))


if __name__ == "__main__":
    main()
