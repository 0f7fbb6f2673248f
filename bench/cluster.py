"""Scale-out figures on one machine: cross-node publish -> delivery latency, and failover time.

    python bench/cluster.py                          # both parts, NATS and Redis: about a minute
    python bench/cluster.py --runs 3 --broker-pids nats=PID,redis=PID   # the README's figures
    python bench/cluster.py --part latency --brokers nats
    python bench/cluster.py --part failover --quick  # a short run, to try the harness

(a) Latency: two server processes, nodes A and B, share a broker. The C load generator
(``bench/loadgen.c``, ``--mode pubsub``) connects its publisher to A and its subscribers to B
(``--publish-port``), publishes ``--rate`` messages per second with the send time in each
message, and times every delivery. Beside it, the same run with the publisher on B too (a message
goes through the broker either way), and the publisher at saturation (``--window`` messages
not yet delivered everywhere): how many messages per second one publishing connection gets
through the broker from one node to the other. With ``--broker-pids`` the broker's CPU use is
reported too.

(b) Failover: three nodes share a broker and one PostgreSQL database (``PYASYNC_PG_URL``).
``--clients`` clients, each given the three endpoints in a rotated order (so a third of them
start on each node), subscribe to one topic and send ``KV_GET`` and ``ECHO`` in a loop, while a
publisher on the other nodes publishes a numbered stream; mid-stream the first node is killed
with SIGKILL. Printed: the time from the kill until each client that was on the killed node
has an answer from another node (p50, max), messages lost and delivered twice to subscribers,
requests left unanswered; then the killed node is started again and a new client is served by
it. ``tests/e2e/test_cluster_failover.py`` runs the same scenario and asserts on it.

Nothing is pinned: the nodes, the broker, the database and the clients share the machine's
CPUs, so the figures move with whatever else runs. The brokers are reached at PYASYNC_NATS_URL and
PYASYNC_REDIS_URL (local defaults); each run uses streams, topics and a table of its own and
removes them at the end. The last line of output is every figure as one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for folder in (ROOT, BENCH):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from run import build_loadgen, cpu_seconds, free_port, machine, wait_for_port  # noqa: E402

from client import Client, Subscription  # noqa: E402
from database import Pool  # noqa: E402
from package import (  # noqa: E402
    PACKAGE,
    EchoRequest,
    GapEvent,
    KvGetAnswer,
    KvGetRequest,
    KvPutRequest,
    MessageEvent,
    RPCError,
)
from pyasync.client_protocol import ConnectionClosed  # noqa: E402
from server_config import DatabaseSettings  # noqa: E402

PYTHON = sys.executable
BROKER_URLS = {
    "nats": os.environ.get("PYASYNC_NATS_URL", "nats://127.0.0.1:4222"),
    "redis": os.environ.get("PYASYNC_REDIS_URL", "redis://127.0.0.1:6379"),
}
PG_URL = os.environ.get("PYASYNC_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
KEY, VALUE = "failover-key", b"the same on every node"
# The settings of the processes under test that these runs set themselves.
SETTINGS_KEYS = ("HOST", "PORT", "LOG_LEVEL", "USE_UVLOOP", "WORKERS", "NODE_ID", "ALLOW_OPEN")


# ---- nodes --------------------------------------------------------------------------------------


def node_env(**settings: str) -> dict[str, str]:
    """This environment without TLS, token or listening settings of its own, plus ``settings``."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("TLS_", "ENABLE_TLS", "AUTH_")) and key not in SETTINGS_KEYS
    }
    return {**env, "LOG_LEVEL": "INFO", "WORKERS": "1", **settings}


@dataclasses.dataclass
class Node:
    """One ``server.py`` process of a cluster, on a port of its own, logging to a file."""

    name: str  # its NODE_ID
    port: int
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start it (again, on the same port) and wait until it accepts connections."""
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [PYTHON, str(ROOT / "server.py"), "--env-file", os.devnull, "--port",
                 str(self.port)],
                cwd=self.log_path.parent, env={**self.env, "NODE_ID": self.name},
                stdout=subprocess.DEVNULL, stderr=log,
            )  # fmt: skip
        try:
            wait_for_port(self.port, self.process)
        except RuntimeError as exc:
            self.kill()
            raise RuntimeError(f"{self.name}: {exc}\n{self.log}") from None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL, by pid, if it still runs; reap it."""
        if self.is_running:
            assert self.process is not None
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> int | None:
        """SIGTERM (SIGKILL after 15 s); its exit code, or None if it was not running."""
        if not self.is_running:
            return None
        assert self.process is not None
        self.process.terminate()
        try:
            return self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@contextlib.asynccontextmanager
async def cluster(folder: Path, count: int, **settings: str) -> AsyncIterator[list[Node]]:
    """``count`` nodes sharing the broker and database of ``settings``, started one after the
    other (the first creates the tables); every node still running is killed at the end."""
    env = node_env(**settings)
    nodes = [
        Node(f"node-{index}", free_port(), env, folder / f"node-{index}.log")
        for index in range(count)
    ]
    try:
        for node in nodes:
            await asyncio.to_thread(node.start)
        yield nodes
    finally:
        for node in nodes:
            await asyncio.to_thread(node.kill)


def broker_url(broker: str, run: str) -> str:
    """The broker's URL for one run: with NATS, streams of the run's own (the URL's path)."""
    url = BROKER_URLS[broker]
    return f"{url.rstrip('/')}/{run}" if broker == "nats" else url


async def remove_broker_state(url: str, prefix: str) -> None:
    """Delete what a run left in the broker: its NATS streams, or its topics' Redis keys."""
    parts = urlsplit(url)
    if parts.scheme == "nats":
        import nats
        from nats.js.errors import NotFoundError

        namespace = parts.path.strip("/").upper()
        connection = await nats.connect(f"nats://{parts.netloc}", connect_timeout=3)
        try:
            for stream in (namespace, f"{namespace}_HEADS"):
                with contextlib.suppress(NotFoundError):
                    await connection.jetstream().delete_stream(stream)
        finally:
            await connection.close()
    else:
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(url)
        try:
            keys = [key async for key in client.scan_iter(match=f"pyasync:*:{prefix}.*")]
            if keys:
                await client.delete(*keys)
        finally:
            await client.aclose()


async def drop_table(db_url: str, table: str) -> None:
    pool = Pool(DatabaseSettings(db_url=db_url, kv_table=table))
    try:
        async with pool.acquire() as db:
            await db.execute(f"DROP TABLE IF EXISTS {table}")
    finally:
        await pool.close()


# ---- (a) latency across nodes -------------------------------------------------------------------


def pubsub_run(
    binary: Path, publish_to: Node, subscribe_at: Node, topic: str, args: argparse.Namespace,
    *, rate: float, window: int, broker_pid: int | None,
) -> dict[str, Any]:  # fmt: skip
    """One load generator run; adds the CPU use of both nodes (and the broker, if its pid is
    known) over the measured window."""
    command = [
        str(binary), "--port", str(subscribe_at.port), "--proto", "pyasync", "--mode", "pubsub",
        "--subscribers", str(args.subscribers), "--window", str(window), "--rate", f"{rate:g}",
        "--topic", topic, "--warmup", str(args.warmup), "--duration", str(args.duration),
    ]  # fmt: skip
    pids = {"b": subscribe_at.pid}
    if publish_to is not subscribe_at:
        command += ["--publish-port", str(publish_to.port)]
        pids["a"] = publish_to.pid
    if broker_pid:
        pids["broker"] = broker_pid
    load = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    time.sleep(args.warmup + 0.2)
    started = {name: cpu_seconds(pid) for name, pid in pids.items()}
    began = time.monotonic()
    out, _ = load.communicate(timeout=300)
    elapsed = time.monotonic() - began
    if load.returncode != 0:
        raise RuntimeError(f"load generator failed ({load.returncode}): {' '.join(command)}")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    for name, pid in pids.items():
        result[f"cpu_{name}_percent"] = 100 * (cpu_seconds(pid) - started[name]) / elapsed
    return result


async def latency(
    broker: str, binary: Path, args: argparse.Namespace, broker_pid: int | None
) -> dict[str, Any]:
    """(a) for one broker: cross-node and same-node latency at ``--rate``, then saturation;
    each the median of ``--runs`` runs (every run kept under "runs")."""
    run = f"cluster{uuid.uuid4().hex[:8]}"
    url = broker_url(broker, run)
    settings = {"BROKER_URL": url, "DB_BACKEND": "none", "COMPRESSION_THRESHOLD": "0",
                "RATE_LIMIT": "0", "LOG_LEVEL": "WARNING"}  # fmt: skip
    figures: dict[str, Any] = {"broker": broker}
    with tempfile.TemporaryDirectory() as scratch:
        try:
            async with cluster(Path(scratch), 2, **settings) as (a, b):
                for key, publisher, rate, window in (
                    ("cross", a, args.rate, 10_000),
                    ("same", b, args.rate, 10_000),
                    ("saturation", a, 0.0, args.window),
                ):
                    runs = [
                        await asyncio.to_thread(
                            pubsub_run,
                            binary,
                            publisher,
                            b,
                            f"{run}.{key}{index}",
                            args,
                            rate=rate,
                            window=window,
                            broker_pid=broker_pid,
                        )  # fmt: skip
                        for index in range(args.runs)
                    ]
                    figures[key] = {**median_of(runs), "runs": runs}
                    print(describe_pubsub(broker, key, figures[key]), flush=True)
        finally:
            await remove_broker_state(url, run)
    return figures


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each numeric figure's median over the runs (errors and lost: their sum)."""
    merged: dict[str, Any] = {}
    for key, value in runs[0].items():
        values = [run[key] for run in runs]
        if key in ("errors", "lost"):
            merged[key] = sum(values)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            merged[key] = statistics.median(values)
        else:
            merged[key] = value
    return merged


def describe_pubsub(broker: str, key: str, result: dict[str, Any]) -> str:
    where = {"cross": "A -> B", "same": "B -> B", "saturation": "A -> B, saturated"}[key]
    cpu = "CPU " + " ".join(
        f"{name} {result[key]:.0f}%"
        for name, key in (("A", "cpu_a_percent"), ("B", "cpu_b_percent"),
                          ("broker", "cpu_broker_percent"))
        if key in result
    )  # fmt: skip
    return (
        f"(a) {broker:5} {where:18} {result['messages_per_s']:8,.0f} msg/s "
        f"{result['deliveries_per_s']:9,.0f} deliveries/s  p50 {result['p50_us']:7,.0f} us  "
        f"p99 {result['p99_us']:7,.0f} us  max {result['max_us']:7,.0f} us  "
        f"errors {result['errors']} lost {result['lost']}  {cpu}"
    )


# ---- (b) failover -------------------------------------------------------------------------------


@dataclasses.dataclass
class ClientRecord:
    """What one client of the failover scenario saw."""

    client: Client
    first_node: int  # index of the node it started on
    offsets: list[int] = dataclasses.field(default_factory=list)  # in the order received
    wrong_data: int = 0  # a message whose data is not its sequence number
    gaps: int = 0
    requests: int = 0
    unanswered: int = 0
    errors: list[str] = dataclasses.field(default_factory=list)
    on_victim_at_kill: bool = False
    served_again: float | None = None  # first answer after the kill, from a surviving node


@dataclasses.dataclass
class FailoverResult:
    """The figures of one failover run."""

    broker: str
    clients: int
    moved: int  # clients that were on the killed node when it was killed
    recovery_s: list[float]  # per moved client: kill -> an answer from another node
    all_served_s: float | None  # kill -> the last of all clients served again; None: some never
    published: int
    publish_failed: int
    lost: int  # (subscriber, message) pairs published and never delivered
    duplicates: int  # (subscriber, message) pairs delivered more than once
    out_of_order: int
    gaps: int
    wrong_data: int
    requests: int
    unanswered: int
    errors: list[str]
    restart_s: float  # restart launched -> a new client on it served
    restarted_node_id: str
    replayed_after_restart: int  # messages a subscriber on the restarted node got from 0
    tracebacks: list[str]  # nodes whose log shows one
    killed: str = ""

    @property
    def recovery_p50_s(self) -> float:
        return statistics.median(self.recovery_s) if self.recovery_s else float("inf")

    @property
    def recovery_max_s(self) -> float:
        return max(self.recovery_s) if len(self.recovery_s) == self.moved else float("inf")

    def summary(self) -> str:
        return (
            f"(b) {self.broker:5} failover: {self.moved} of {self.clients} clients on the killed "
            f"node; served again after p50 {self.recovery_p50_s * 1000:,.0f} ms, max "
            f"{self.recovery_max_s * 1000:,.0f} ms (all {self.clients}: "
            f"{(self.all_served_s or float('inf')) * 1000:,.0f} ms); messages {self.published} "
            f"published, lost {self.lost}, duplicates {self.duplicates}, gaps {self.gaps}; "
            f"requests {self.requests}, unanswered {self.unanswered}; restarted node served "
            f"{self.restart_s:.2f} s after its start, replayed {self.replayed_after_restart}"
        )

    def figures(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "recovery_p50_s": self.recovery_p50_s,
                "recovery_max_s": self.recovery_max_s}  # fmt: skip


@dataclasses.dataclass
class FailoverPlan:
    """The scenario's sizes."""

    clients: int = 30
    messages: int = 600
    publish_rate: float = 200.0  # messages per second
    kill_after: int = 200  # messages published before the kill
    request_pause: float = 0.01  # seconds between one client's requests
    request_timeout: float = 10.0
    patience: float = 60.0  # seconds: publishing stops then, even if behind (a loaded machine)


async def failover(
    folder: Path, broker: str, plan: FailoverPlan, *, db_url: str = PG_URL
) -> FailoverResult:
    """(b) for one broker: three nodes, one killed mid-stream, then restarted."""
    run = f"failover{uuid.uuid4().hex[:8]}"
    url, table, topic = broker_url(broker, run), f"{run}_kv", f"{run}.stream"
    settings = {"BROKER_URL": url, "DB_URL": db_url, "KV_TABLE": table, "DB_POOL_MAX_SIZE": "4",
                "HISTORY_SIZE": str(max(1000, plan.messages))}  # fmt: skip
    try:
        async with cluster(folder, 3, **settings) as nodes:
            result = await _failover(nodes, broker, plan, topic)
            for node in nodes:
                await asyncio.to_thread(node.stop)
            result.tracebacks = [node.name for node in nodes if "Traceback" in node.log]
            return result
    finally:
        with contextlib.suppress(Exception):  # unreachable: nothing was created
            await remove_broker_state(url, run)
        with contextlib.suppress(Exception):
            await drop_table(db_url, table)


async def _failover(
    nodes: list[Node], broker: str, plan: FailoverPlan, topic: str
) -> FailoverResult:
    """The scenario on running nodes: the first one is the victim."""
    victim = nodes[0]
    endpoints = [f"127.0.0.1:{node.port}" for node in nodes]
    async with Client(endpoints=endpoints[1:], timeout=plan.request_timeout) as publisher:
        await publisher.request(PACKAGE.REQUEST_KV_PUT, KvPutRequest(key=KEY, value=VALUE))
        records = []
        for index in range(plan.clients):
            first = index % len(nodes)
            rotated = endpoints[first:] + endpoints[:first]
            records.append(ClientRecord(Client(endpoints=rotated, timeout=plan.request_timeout),
                                        first))  # fmt: skip
        async with contextlib.AsyncExitStack() as stack:
            for record in records:
                await stack.enter_async_context(record.client)
                assert record.client.port == nodes[record.first_node].port
            subscriptions = [
                await stack.enter_async_context(record.client.subscribe(topic, since=0))
                for record in records
            ]
            stop = asyncio.Event()
            kill: dict[str, float] = {}
            readers = [
                asyncio.create_task(read(record, events, plan.messages))
                for record, events in zip(records, subscriptions, strict=True)
            ]
            requesters = [
                asyncio.create_task(keep_asking(record, plan, stop, kill, victim.port))
                for record in records
            ]
            published, failed = await publish_stream(publisher, topic, plan, victim, kill)
            with contextlib.suppress(TimeoutError):  # the figures say what did not arrive
                async with asyncio.timeout(30):
                    await asyncio.gather(*readers)
            for reader in readers:
                reader.cancel()
            # Every client served again after the kill, or the bound reached.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(30):
                    while any(r.served_again is None for r in records):  # noqa: ASYNC110
                        await asyncio.sleep(0.05)
            stop.set()
            await asyncio.gather(*requesters, *readers, return_exceptions=True)
        restarted = await restart_and_serve(victim, topic, len(published))
    return tally(broker, records, published, failed, kill["at"], victim.name, restarted)


async def read(record: ClientRecord, events: Subscription, last: int) -> None:
    """Take a subscriber's events until it has the stream's last message."""
    async for event in events:
        if isinstance(event, GapEvent):
            record.gaps += 1
            continue
        assert isinstance(event, MessageEvent)
        record.offsets.append(event.offset)
        if event.data != b"%d" % event.offset:
            record.wrong_data += 1
        if event.offset >= last:
            return


async def keep_asking(
    record: ClientRecord, plan: FailoverPlan, stop: asyncio.Event, kill: dict[str, float],
    victim_port: int,
) -> None:  # fmt: skip
    """KV_GET and ECHO in turn until ``stop``; note the first answer from a surviving node
    after the kill."""
    client = record.client
    turn = 0
    while not stop.is_set():
        turn += 1
        port = client.port
        try:
            if turn % 2:
                got = await client.request(PACKAGE.REQUEST_KV_GET, KvGetRequest(key=KEY))
                assert isinstance(got, KvGetAnswer) and got.value == VALUE, got
            else:
                assert await client.echo(f"{turn}") == f"{turn}"
        except (RPCError, ConnectionClosed) as exc:
            record.unanswered += 1
            record.errors.append(f"{type(exc).__name__}: {exc}")
        else:
            record.requests += 1
            answered = time.monotonic()
            killed = kill.get("at")
            if killed is not None and record.served_again is None and answered >= killed:
                if client.port != victim_port:  # answered over a connection to another node
                    record.served_again = answered
            elif killed is None:
                record.on_victim_at_kill = port == victim_port
        await asyncio.sleep(plan.request_pause)


async def publish_stream(
    publisher: Client, topic: str, plan: FailoverPlan, victim: Node, kill: dict[str, float]
) -> tuple[list[int], int]:
    """Publish messages 1..N (data: the number) at the plan's rate, for ``patience`` seconds at
    most; SIGKILL ``victim`` after ``kill_after`` of them (or at the end, if fewer went out).
    Returns the offsets stored and the publishes that failed."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    offsets: list[int] = []
    failed = 0
    for number in range(1, plan.messages + 1):
        if loop.time() > began + plan.patience:
            break
        await asyncio.sleep(max(0.0, began + number / plan.publish_rate - loop.time()))
        try:
            offsets.append(await publisher.publish(topic, b"%d" % number))
        except (RPCError, ConnectionClosed):
            failed += 1
        if number == plan.kill_after:
            kill_now(victim, kill)
    if "at" not in kill:
        kill_now(victim, kill)
    await asyncio.to_thread(victim.kill)  # reaps it
    return offsets, failed


def kill_now(victim: Node, kill: dict[str, float]) -> None:
    """SIGKILL ``victim`` by its pid; note when."""
    kill["at"] = time.monotonic()
    os.kill(victim.pid, signal.SIGKILL)


async def restart_and_serve(victim: Node, topic: str, published: int) -> tuple[float, str, int]:
    """Start the killed node again on its port; a new client connects to it and is served, and
    replays the stream from history. Returns (seconds to the first answer, its node id, messages
    replayed)."""
    began = time.monotonic()
    await asyncio.to_thread(victim.start)
    async with Client("127.0.0.1", victim.port, timeout=10) as client:
        info = await client.server_info()
        got = await client.request(PACKAGE.REQUEST_KV_GET, KvGetRequest(key=KEY))
        served = time.monotonic() - began
        assert isinstance(got, KvGetAnswer) and got.value == VALUE
        await client.request(PACKAGE.REQUEST_ECHO, EchoRequest(text="back"))
        replayed = 0
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10), client.subscribe(topic, since=0) as events:
                async for event in events:
                    replayed += isinstance(event, MessageEvent)
                    if replayed == published:
                        break
    return served, info.node_id, replayed


def tally(
    broker: str, records: list[ClientRecord], published: list[int], failed: int, killed: float,
    victim: str, restarted: tuple[float, str, int],
) -> FailoverResult:  # fmt: skip
    expected = set(published)
    lost = duplicates = out_of_order = 0
    for record in records:
        received = record.offsets
        lost += len(expected - set(received))
        duplicates += len(received) - len(set(received))
        out_of_order += sum(1 for x, y in zip(received, received[1:], strict=False) if y <= x)
    moved = [record for record in records if record.on_victim_at_kill]
    recovery = [r.served_again - killed for r in moved if r.served_again is not None]
    served = [r.served_again for r in records]
    errors = [error for record in records for error in record.errors]
    return FailoverResult(
        broker=broker, clients=len(records), moved=len(moved), recovery_s=sorted(recovery),
        all_served_s=None if None in served else max(s for s in served if s) - killed,
        published=len(published), publish_failed=failed, lost=lost, duplicates=duplicates,
        out_of_order=out_of_order, gaps=sum(r.gaps for r in records),
        wrong_data=sum(r.wrong_data for r in records),
        requests=sum(r.requests for r in records),
        unanswered=sum(r.unanswered for r in records), errors=errors[:10],
        restart_s=restarted[0], restarted_node_id=restarted[1],
        replayed_after_restart=restarted[2], tracebacks=[], killed=victim,
    )  # fmt: skip


# ---- main ---------------------------------------------------------------------------------------


def broker_pids(text: str) -> dict[str, int]:
    """``nats=PID,redis=PID`` as a mapping."""
    pids = {}
    for part in filter(None, text.split(",")):
        name, _, pid = part.partition("=")
        pids[name.strip()] = int(pid)
    return pids


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    """Run the parts asked for; every figure, by part and broker."""
    figures: dict[str, Any] = {"machine": machine(), "latency": [], "failover": []}
    if args.part in ("latency", "both"):
        with tempfile.TemporaryDirectory() as scratch:
            binary = build_loadgen(Path(scratch))
            for broker in args.brokers:
                pid = args.broker_pids.get(broker)
                figures["latency"].append(await latency(broker, binary, args, pid))
    if args.part in ("failover", "both"):
        plan = FailoverPlan(clients=args.clients, messages=args.messages,
                            publish_rate=args.publish_rate,
                            kill_after=args.messages // 3)  # fmt: skip
        for broker in args.brokers:
            for _ in range(args.runs):
                with tempfile.TemporaryDirectory() as scratch:
                    result = await failover(Path(scratch), broker, plan)
                print(result.summary(), flush=True)
                figures["failover"].append(result.figures())
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["latency", "failover", "both"], default="both")
    parser.add_argument("--brokers", default="nats,redis", help="nats, redis or both")
    parser.add_argument("--rate", type=float, default=1000.0, help="(a) messages/s (1000)")
    parser.add_argument("--subscribers", type=int, default=10, help="(a) on node B (10)")
    parser.add_argument("--window", type=int, default=64, help="(a) saturation window (64)")
    parser.add_argument("--warmup", type=float, default=1.0, help="(a) seconds (1)")
    parser.add_argument("--duration", type=float, default=5.0, help="(a) seconds (5)")
    parser.add_argument(
        "--broker-pids", type=broker_pids, default={}, metavar="nats=PID,redis=PID",
        help="(a) also report the broker's CPU use",
    )  # fmt: skip
    parser.add_argument("--clients", type=int, default=30, help="(b) clients (30)")
    parser.add_argument("--messages", type=int, default=600, help="(b) stream length (600)")
    parser.add_argument("--publish-rate", type=float, default=200.0, help="(b) msg/s (200)")
    parser.add_argument("--runs", type=int, default=1, help="(a) median of, (b) runs of (1)")
    parser.add_argument("--quick", action="store_true", help="short runs, to try the harness")
    args = parser.parse_args()
    args.brokers = [b for b in args.brokers.split(",") if b]
    unknown = sorted(set(args.brokers) - set(BROKER_URLS))
    if unknown:
        parser.error(f"--brokers: unknown {', '.join(unknown)}")
    if args.quick:
        args.warmup, args.duration = 0.3, 1.0
        args.clients, args.messages = min(args.clients, 6), min(args.messages, 150)
    figures = asyncio.run(main_async(args))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
