"""The CLI's load generator: ``python client.py bench`` keeps echo requests going and reports.

It drives the server through the ordinary ``Client``; the C load generator in ``bench/`` goes
further when the Python client is the limit.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from package import PACKAGE, EchoRequest, InvalidArgument

if TYPE_CHECKING:
    from client import Client

__all__ = ["run_bench"]


async def run_bench(args: argparse.Namespace, new_client: Callable[[], Client]) -> int:
    """Keep connections x in-flight ECHO requests going; print requests/s and latencies."""
    if min(args.connections, args.in_flight) < 1 or args.duration <= 0:
        raise InvalidArgument("bench needs --connections, --in-flight and --duration above 0")
    clients = [new_client() for _ in range(args.connections)]
    await asyncio.gather(*(client.connect() for client in clients))
    request = EchoRequest(data=bytes(args.payload))
    latencies: list[float] = []
    completed = 0
    loop = asyncio.get_running_loop()
    measure_from = loop.time() + args.warmup
    stop_at = measure_from + args.duration

    async def worker(client: Client) -> None:
        nonlocal completed
        # loop.time() has millisecond resolution on uvloop; latencies need perf_counter.
        while loop.time() < stop_at:
            started = time.perf_counter()
            await client.request(PACKAGE.REQUEST_ECHO, request)
            if loop.time() >= measure_from:
                latencies.append(time.perf_counter() - started)
                completed += 1

    async def progress() -> None:
        while (now := loop.time()) < stop_at:
            await asyncio.sleep(1)
            if now >= measure_from:
                rate = completed / max(loop.time() - measure_from, 1e-9)
                print(f"\r  {loop.time() - measure_from:5.1f} s  {rate:10,.0f} req/s",
                      end="", file=sys.stderr, flush=True)  # fmt: skip

    workers = [worker(client) for client in clients for _ in range(args.in_flight)]
    reporter = asyncio.create_task(progress())
    try:
        await asyncio.gather(*workers)
    finally:
        reporter.cancel()
        await asyncio.gather(*(client.close() for client in clients))
    print(file=sys.stderr)
    latencies.sort()

    def percentile(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(len(latencies) * p))] * 1000

    shape = f"{args.connections} connections x {args.in_flight} in flight"
    print(f"{shape}, {args.payload}-byte echo, {args.duration:g} s after {args.warmup:g} s warm-up")
    if not latencies:
        print("no request completed")
        return 1
    print(f"requests: {completed:,}  rate: {completed / args.duration:,.0f} req/s")
    print(f"latency ms: p50 {percentile(0.50):.3f}  p99 {percentile(0.99):.3f}  "
          f"max {latencies[-1] * 1000:.3f}")  # fmt: skip
    return 0
