"""easynetwork TCP echo peer: each JSON document (one per line) is decoded and sent back.

JSONSerializer re-encodes compactly, so canonical documents such as `"xxxxxxxx"` echo byte for byte.

Usage: python bench/peers/easynetwork_echo.py --port P [--uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import AsyncGenerator, Callable
from typing import Any

from easynetwork.protocol import StreamProtocol
from easynetwork.serializers import JSONSerializer
from easynetwork.servers import AsyncTCPNetworkServer
from easynetwork.servers.handlers import AsyncStreamClient, AsyncStreamRequestHandler

HOST = "127.0.0.1"
MAX_DOCUMENT = 64 * 1024 * 1024  # easynetwork defaults to 64 KiB per line; allow large payloads


class EchoHandler(AsyncStreamRequestHandler[Any, Any]):
    async def handle(self, client: AsyncStreamClient[Any]) -> AsyncGenerator[None, Any]:
        # As in the easynetwork tutorial: one request per generator; the server starts a new one.
        request = yield
        await client.send_packet(request)


async def serve(port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    protocol: StreamProtocol[Any, Any] = StreamProtocol(JSONSerializer(limit=MAX_DOCUMENT))
    server = AsyncTCPNetworkServer(HOST, port, protocol, EchoHandler(), log_client_connection=False)
    async with server, asyncio.TaskGroup() as tasks:
        is_up = asyncio.Event()
        tasks.create_task(server.serve_forever(is_up_event=is_up))
        await is_up.wait()
        print("ready", flush=True)
        await stop.wait()
        await server.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop instead of asyncio")
    args = parser.parse_args()

    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if args.uvloop:
        import uvloop

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(serve(args.port))


if __name__ == "__main__":
    main()
