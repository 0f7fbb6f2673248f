"""python-socketio as the publish/subscribe peer of bench/run.py's shape (f).

A ``socketio.AsyncServer`` with two events: ``subscribe`` (topic) puts the client in the
topic's room and is acknowledged with ``true``; ``publish`` (topic, data) emits ``message``
(data) to that room. Broadcasting is in-process by default, or through Redis with
``--redis URL`` (``socketio.AsyncRedisManager``, on a channel of this process's own). The
WebSocket transport only (``transports=["websocket"]``), as the deployment notes of
python-socketio advise for servers that scale out; the event loop is uvloop; the ping timeout is
300 s (see ``make_server``).

Two of python-socketio's documented asyncio deployments, which measured alike here:

- ``--deploy uvicorn`` (default; the docs' "easiest deployment strategy" for an asyncio
  server): ``async_mode="asgi"``, ``socketio.ASGIApp`` served by uvicorn with httptools and the
  ``websockets-sansio`` protocol implementation (``--ws`` to pick another);
- ``--deploy aiohttp``: ``async_mode="aiohttp"``, the server attached to an aiohttp
  ``web.Application``.

    python bench/peers/socketio_server.py --port P [--deploy uvicorn|aiohttp] [--redis URL]

``bench/loadgen.c --mode pubsub --proto socketio`` drives it. Prints ``ready PORT`` once
listening (the port it got, for ``--port 0``); exits on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
from collections.abc import Iterator
from typing import Any

import socketio
import uvloop


def make_server(async_mode: str, redis_url: str) -> socketio.AsyncServer:
    manager = None
    if redis_url:
        manager = socketio.AsyncRedisManager(redis_url, channel=f"bench-f-{os.getpid()}")
    # A saturated server reads a client's pong only after the events that client sent before it;
    # with the benchmark's backlog that can take longer than the default 20 s, and the client
    # would be dropped as gone (the publisher first). A long timeout keeps the measurement about
    # throughput.
    sio = socketio.AsyncServer(
        async_mode=async_mode, client_manager=manager, transports=["websocket"], ping_timeout=300
    )

    async def subscribe(sid: str, topic: str) -> bool:
        await sio.enter_room(sid, topic)
        return True  # the acknowledgement

    async def publish(sid: str, topic: str, data: Any) -> None:
        await sio.emit("message", data, room=topic)

    sio.on("subscribe", subscribe)
    sio.on("publish", publish)
    return sio


async def wait_for_signal() -> None:
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set_result, None)
    await stop


async def serve_aiohttp(args: argparse.Namespace) -> None:
    from aiohttp import web

    sio = make_server("aiohttp", args.redis)
    app = web.Application()
    sio.attach(app)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", args.port, backlog=4096)
    await site.start()
    print("ready", runner.addresses[0][1], flush=True)
    try:
        await wait_for_signal()
    finally:
        await runner.cleanup()


async def serve_uvicorn(args: argparse.Namespace) -> None:
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # Handled below instead: uvicorn would raise the signal again once stopped, and the
            # process would end killed by it rather than with status 0 as the other peers do.
            yield

    app = socketio.ASGIApp(make_server("asgi", args.redis))
    # uvicorn's own WebSocket keepalive has the same trap as Engine.IO's pings (make_server):
    # while the application lags, uvicorn stops reading, the pong waits unread, and after 20 s
    # the connection is closed. The same 300 s as Engine.IO's timeout.
    config = uvicorn.Config(
        app, host="127.0.0.1", port=args.port, http="httptools", ws=args.ws, lifespan="off",
        log_level="warning", access_log=False, backlog=4096, ws_ping_timeout=300,
    )  # fmt: skip
    server = Server(config)
    serving = asyncio.create_task(server.serve())
    for _ in range(200):  # 10 s at most
        if server.started or serving.done():
            break
        await asyncio.sleep(0.05)
    if server.started:
        print("ready", server.servers[0].sockets[0].getsockname()[1], flush=True)
        stop = asyncio.create_task(wait_for_signal())
        await asyncio.wait([serving, stop], return_when=asyncio.FIRST_COMPLETED)
        server.should_exit = True
        stop.cancel()
    await serving


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--deploy", choices=["uvicorn", "aiohttp"], default="uvicorn")
    parser.add_argument("--redis", default="", help="broadcast through this Redis URL")
    parser.add_argument(
        "--ws", default="websockets-sansio", help="uvicorn's WebSocket implementation"
    )
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(serve_aiohttp(args) if args.deploy == "aiohttp" else serve_uvicorn(args))


if __name__ == "__main__":
    main()
