"""The floor: the least a Python asyncio echo server can do, to measure pyasync-server against.

Frames are an 8-byte header (body length u32, request id u32, big-endian) and the body; the
answer echoes both. ``protocol`` mode is a bare ``asyncio.Protocol`` that answers each frame as
it is decoded; ``tasks`` is the same with one task per request (what a naive async server
pays); ``streams`` uses asyncio Streams (``readexactly`` per header and body).

    python bench/floor.py --port 9000 [--mode protocol|tasks|streams] [--loop uvloop|asyncio]
                          [--cert FILE --key FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import ssl
import struct

HEADER = struct.Struct("!II")


class EchoProtocol(asyncio.Protocol):
    """Decode every complete frame of the buffer, write each answer as soon as it is found."""

    def __init__(self, use_tasks: bool) -> None:
        self.buffer = bytearray()
        self.use_tasks = use_tasks
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        offset = 0
        while len(buffer) - offset >= HEADER.size:
            length, _ = HEADER.unpack_from(buffer, offset)
            end = offset + HEADER.size + length
            if len(buffer) < end:
                break
            frame = buffer[offset:end]  # one copy: header and body, echoed as they are
            if self.use_tasks:
                asyncio.get_running_loop().create_task(self.answer_later(frame))
            else:
                self.answer(frame)
            offset = end
        del buffer[:offset]

    def answer(self, frame: bytearray) -> None:
        assert self.transport is not None
        self.transport.write(frame)

    async def answer_later(self, frame: bytearray) -> None:
        self.answer(frame)


async def echo_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            header = await reader.readexactly(HEADER.size)
            length, _ = HEADER.unpack(header)
            body = await reader.readexactly(length)
            writer.write(header)
            writer.write(body)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    context = None
    if args.cert:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.cert, args.key)
    server: asyncio.AbstractServer
    if args.mode == "streams":
        server = await asyncio.start_server(
            echo_stream, "127.0.0.1", args.port, ssl=context, backlog=4096
        )
    else:
        use_tasks = args.mode == "tasks"
        server = await loop.create_server(
            lambda: EchoProtocol(use_tasks), "127.0.0.1", args.port, ssl=context, backlog=4096
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
    parser.add_argument("--mode", choices=["protocol", "tasks", "streams"], default="protocol")
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    parser.add_argument("--cert", help="serve TLS with this certificate (PEM)")
    parser.add_argument("--key", help="private key of --cert (PEM)")
    args = parser.parse_args()
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(serve(args))
    else:
        asyncio.run(serve(args))


if __name__ == "__main__":
    main()
