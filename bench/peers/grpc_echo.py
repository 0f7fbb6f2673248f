"""gRPC (grpc.aio) unary echo peer and load client; payloads are raw bytes, no generated code.

Usage:
  python bench/peers/grpc_echo.py serve --port P
  python bench/peers/grpc_echo.py load --port P --connections N --inflight K --size BYTES
                                       --warmup SEC --duration SEC
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import signal
import time

import grpc

HOST = "127.0.0.1"
METHOD = "/bench.Echo/Echo"
MAX_MESSAGE = 64 * 1024 * 1024
OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
]
PERCENTILES = (("50", 0.50), ("90", 0.90), ("99", 0.99), ("999", 0.999))


async def echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    return request


async def serve(port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    server = grpc.aio.server(options=OPTIONS)
    # No (de)serializers: the handler gets and returns the raw message bytes.
    method: grpc.RpcMethodHandler[bytes, bytes] = grpc.unary_unary_rpc_method_handler(
        echo, request_deserializer=None, response_serializer=None
    )
    handlers = {"Echo": method}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Echo", handlers),))
    server.add_insecure_port(f"{HOST}:{port}")
    await server.start()
    print("ready", flush=True)
    await stop.wait()
    await server.stop(grace=1.0)


class Recorder:
    """Per-call latencies (µs) and errors, kept only inside the measurement window."""

    def __init__(self) -> None:
        self.counting = False
        self.running = True
        self.latencies_us: list[float] = []
        self.errors = 0


async def caller(
    call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes], payload: bytes, rec: Recorder
) -> None:
    while rec.running:
        start = time.perf_counter_ns()
        try:
            ok = len(await call(payload)) == len(payload)
        except grpc.aio.AioRpcError:
            ok = False
        if rec.counting:
            if ok:
                rec.latencies_us.append((time.perf_counter_ns() - start) / 1000)
            else:
                rec.errors += 1


def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (0 when empty)."""
    if not ordered:
        return 0.0
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


async def load(args: argparse.Namespace) -> None:
    # A local subchannel pool per channel, so N channels really are N TCP connections.
    options = [*OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
    target = f"{HOST}:{args.port}"
    channels = [grpc.aio.insecure_channel(target, options) for _ in range(args.connections)]
    await asyncio.gather(*(ch.channel_ready() for ch in channels))
    payload = b"x" * args.size
    rec = Recorder()
    calls: list[grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]] = [
        ch.unary_unary(METHOD, request_serializer=None, response_deserializer=None)
        for ch in channels
    ]
    callers = [caller(c, payload, rec) for c in calls for _ in range(args.inflight)]
    tasks = [asyncio.create_task(c) for c in callers]

    await asyncio.sleep(args.warmup)
    rec.counting = True
    started = time.perf_counter()
    await asyncio.sleep(args.duration)
    rec.counting = False
    elapsed = time.perf_counter() - started
    rec.running = False
    await asyncio.gather(*tasks)
    await asyncio.gather(*(ch.close() for ch in channels))

    lat = sorted(rec.latencies_us)
    requests = len(lat)
    result = {
        "proto": "grpc",
        "connections": args.connections,
        "inflight": args.inflight,
        "size": args.size,
        "tls": False,
        "duration_s": round(elapsed, 3),
        "requests": requests,
        "rps": round(requests / elapsed, 1),
        "mb_per_s": round(requests * args.size / elapsed / 1e6, 3),
        "errors": rec.errors,
        **{f"p{name}_us": round(percentile(lat, q), 1) for name, q in PERCENTILES},
        "max_us": round(lat[-1] if lat else 0.0, 1),
    }
    print(json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve_cmd = sub.add_parser("serve", help="run the echo server")
    serve_cmd.add_argument("--port", type=int, required=True)
    load_cmd = sub.add_parser("load", help="drive the server, print one JSON line")
    load_cmd.add_argument("--port", type=int, required=True)
    load_cmd.add_argument("--connections", type=int, default=1)
    load_cmd.add_argument("--inflight", type=int, default=1, help="concurrent calls per connection")
    load_cmd.add_argument("--size", type=int, default=32, help="payload bytes")
    load_cmd.add_argument("--warmup", type=float, default=2.0, help="seconds")
    load_cmd.add_argument("--duration", type=float, default=8.0, help="seconds")
    args = parser.parse_args()
    # Plain asyncio loop: grpc.aio does not support uvloop.
    asyncio.run(serve(args.port) if args.command == "serve" else load(args))


if __name__ == "__main__":
    main()
