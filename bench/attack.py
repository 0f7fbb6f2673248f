"""Is another client still served while one address attacks? Prints the victim's latency.

    python bench/attack.py [--seconds 5] [--rate 200]

Starts ``server.py`` (default limits: MAX_CONNECTIONS_PER_IP, RATE_LIMIT) pinned to CPU 0 and,
from CPU 1, measures a victim on 127.0.0.2 sending PINGs at a fixed rate, first alone, then while
an attacker opens 1,000 connections from 127.0.0.1 (MAX_CONNECTIONS_PER_IP lets 256 in) and
floods one more, from 127.0.0.3, with pipelined PINGs. Reports the victim's p50/p99 both ways
and what the attacker was refused.

Victim and attacker share CPU 1, as two client machines would not: the attacker runs in the idle
scheduling class there, so the victim's wake-ups are not queued behind it (on an otherwise idle
CPU it still gets all the time the victim leaves), and it starts before the victim measures.
Other programs on a shared machine take CPU time too, and a round trip that waited for a CPU
(the server's or the victim's) measures them, not the server. Where the kernel keeps scheduler
statistics (``/proc/PID/schedstat``) the bench says how long each side waited so, and what p99
is left without those waits: when the two p99 differ a lot, the run was disturbed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from package import PACKAGE, ErrorAnswer, ErrorCode, unpack  # noqa: E402
from protocol import FrameDecoder, encode_frame  # noqa: E402

LISTENING = re.compile(r"listening on (\S+):(\d+)")


def cpu_wait(pid: int | str) -> float:
    """Seconds ``pid`` has spent runnable but waiting for a CPU; 0 without scheduler stats."""
    return _schedstat(pid, 1)


def cpu_time(pid: int | str) -> float:
    """Seconds ``pid`` has run on a CPU; 0 without scheduler stats."""
    return _schedstat(pid, 0)


def _schedstat(pid: int | str, field: int) -> float:
    try:
        with open(f"/proc/{pid}/schedstat") as stats:
            return int(stats.read().split()[field]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


@dataclass
class Pings:
    """The victim's round trips, and how long each side waited for a CPU during each one."""

    rtts: list[float] = field(default_factory=list)  # seconds
    server_waits: list[float] = field(default_factory=list)  # seconds
    server_cpu: float = 0.0  # seconds the server ran meanwhile
    seconds: float = 0.0  # how long the victim sent
    victim_waits: list[float] = field(default_factory=list)  # seconds

    def p(self, share: float, *, less_waits: bool = False) -> float:
        """The ``share`` percentile in ms, of the round trips or of what is left of them."""
        rtts = self.rtts
        if less_waits:
            waits = zip(self.rtts, self.server_waits, self.victim_waits, strict=True)
            rtts = [rtt - min(rtt, server + victim) for rtt, server, victim in waits]
        return percentile(rtts, share)

    def waited(self) -> str:
        return (
            f"server {sum(self.server_waits) * 1000:.1f} ms, "
            f"victim {sum(self.victim_waits) * 1000:.1f} ms"
        )

    def server_load(self) -> str:
        return f"{self.server_cpu / self.seconds:.1%}" if self.seconds else "?"


async def victim(port: int, seconds: float, rate: float, server_pid: int) -> Pings:
    """Round trips of PINGs sent from 127.0.0.2 at ``rate`` per second."""
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.2", 0))
    decoder = FrameDecoder()
    pings = Pings()
    began_at, server_ran = loop.time(), cpu_time(server_pid)
    stop = began_at + seconds
    request_id = 0
    while loop.time() < stop:
        request_id += 1
        server_waited, victim_waited = cpu_wait(server_pid), cpu_wait("self")
        began = time.perf_counter()
        writer.write(encode_frame(PACKAGE.REQUEST_PING, request_id, b"\x80"))
        while decoder.next_frame() is None:
            decoder.feed(await reader.read(65536))
        pings.rtts.append(time.perf_counter() - began)
        pings.server_waits.append(cpu_wait(server_pid) - server_waited)
        pings.victim_waits.append(cpu_wait("self") - victim_waited)
        await asyncio.sleep(1 / rate)
    writer.close()
    pings.server_cpu, pings.seconds = cpu_time(server_pid) - server_ran, loop.time() - began_at
    return pings


async def attack(port: int, seconds: float) -> dict[str, int]:
    """1,000 connections from 127.0.0.1, and a flood of PINGs on one of them."""
    failed = 0
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    began = time.perf_counter()
    for _ in range(1000):
        try:
            held.append(await asyncio.open_connection("127.0.0.1", port))
        except OSError:
            failed += 1
    connecting = time.perf_counter() - began
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.3", 0))
    burst = b"".join(encode_frame(PACKAGE.REQUEST_PING, i, b"\x80") for i in range(1, 1001))
    decoder = FrameDecoder()
    answers = throttled = 0
    stop = asyncio.get_running_loop().time() + seconds

    async def drain() -> None:
        nonlocal answers, throttled
        while data := await reader.read(1 << 16):
            decoder.feed(data)
            while (frame := decoder.next_frame()) is not None:
                answers += 1
                throttled += frame.kind == PACKAGE.ANSWER_ERROR

    draining = asyncio.create_task(drain())
    with contextlib.suppress(TimeoutError):  # the server stops reading a throttled connection
        async with asyncio.timeout_at(stop):
            while True:
                writer.write(burst)
                await writer.drain()
    draining.cancel()
    refused = await count_refused([each for each, _ in held])
    for each in (*(each for _, each in held), writer):
        each.close()
    return {
        "connections": len(held) + failed, "connections_ms": round(connecting * 1000),
        "connections_refused": refused,
        "connect_errors": failed, "flood_answers": answers, "flood_throttled": throttled,
    }  # fmt: skip


async def count_refused(readers: list[asyncio.StreamReader]) -> int:
    """How many of these connections the server refused: RESOURCE_EXHAUSTED on request id 0."""
    reads = [asyncio.ensure_future(reader.read(1 << 12)) for reader in readers]
    done, pending = await asyncio.wait(reads, timeout=1)  # a held connection gets nothing
    for read in pending:
        read.cancel()
    refused = 0
    for read in done:
        decoder = FrameDecoder()
        decoder.feed(b"" if read.exception() else read.result())
        frame = decoder.next_frame()
        if frame is not None and frame.kind == PACKAGE.ANSWER_ERROR:
            error = unpack(PACKAGE.ANSWER_ERROR, frame.body)
            refused += isinstance(error, ErrorAnswer) and error.code == ErrorCode.RESOURCE_EXHAUSTED
    return refused


def percentile(samples: list[float], share: float) -> float:
    """The ``share`` percentile of ``samples`` (seconds), in ms."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * share))] * 1000


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rate", type=float, default=200.0, help="victim PINGs per second")
    parser.add_argument("--attack", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.attack:  # the attacker runs in a process of its own, so the victim's loop is free
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, {1})
        with contextlib.suppress(OSError, AttributeError):  # Linux: the victim's wake-ups first
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        print("ready", flush=True)  # started: the attack begins on the next line of input
        sys.stdin.readline()
        print(await attack(args.attack, args.seconds))
        return
    env = {**os.environ, "LOG_LEVEL": "INFO", "DB_BACKEND": "none"}
    server = await asyncio.create_subprocess_exec(
        "taskset", "-c", "0", sys.executable, "server.py", "--port", "0", "--env-file",
        os.devnull, cwd=ROOT, env=env, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert server.stderr is not None
        port = 0
        while line := (await server.stderr.readline()).decode():
            if match := LISTENING.search(line):
                port = int(match.group(2))
                break
        if not port:
            sys.exit("bench: the server did not start")
        # The server logs every connection at INFO: read its log, or a full pipe stops it.
        logging = asyncio.create_task(server.stderr.read())
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, {1})
        alone = await victim(port, args.seconds, args.rate, server.pid)
        # The attacker's interpreter starts before the victim measures: its start-up is no attack.
        attacker = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--attack", str(port), "--seconds", str(args.seconds),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert attacker.stdin is not None and attacker.stdout is not None
        await attacker.stdout.readline()
        attacker.stdin.write(b"go\n")
        attacked = await victim(port, args.seconds, args.rate, server.pid)
        outcome = (await attacker.communicate())[0].decode().strip()
        report(alone, attacked)
        print(f"attacker: {outcome}")
    finally:
        server.terminate()
        await server.wait()
    await logging


def report(alone: Pings, attacked: Pings) -> None:
    """Print the victim's latency alone and attacked, and how long it waited for CPUs."""
    for name, pings in (("victim alone:    ", alone), ("victim, attacked:", attacked)):
        print(f"{name}  p50 {pings.p(0.5):.3f} ms  p99 {pings.p(0.99):.3f} ms  "
              f"({len(pings.rtts)} pings)")  # fmt: skip
    ratio = attacked.p(0.99) / alone.p(0.99)
    print(f"p99 ratio: {ratio:.2f} (target <= 2)  mean attacked "
          f"{statistics.mean(attacked.rtts) * 1000:.3f} ms")  # fmt: skip
    if alone.server_cpu:
        print(f"server CPU use: {alone.server_load()} alone, {attacked.server_load()} attacked")
    if sum(alone.server_waits) or sum(attacked.server_waits):
        print(f"waiting for a CPU while other programs ran: alone {alone.waited()}; "
              f"attacked {attacked.waited()}")  # fmt: skip
        alone_p99, attacked_p99 = alone.p(0.99, less_waits=True), attacked.p(0.99, less_waits=True)
        print(f"p99 without those waits: {alone_p99:.3f} ms alone, {attacked_p99:.3f} ms "
              f"attacked, ratio {attacked_p99 / alone_p99:.2f}")  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
