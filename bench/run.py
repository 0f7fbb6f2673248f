"""Benchmark pyasync-server beside the asyncio floor and its peers, in one run.

    python bench/run.py                  # everything: about 45 minutes
    python bench/run.py --quick          # one short run per row, to try the harness
    python bench/run.py --shapes e --merge   # run one shape again, keep the others' rows
    python bench/run.py --shapes f --servers pyasync-memory,floor-pubsub-batch --quick

Each server runs pinned to CPU 0 and its load generator to CPU 1 (``taskset``); a row is the
median of ``--runs`` runs of ``--duration`` seconds measured after ``--warmup`` seconds, with the
server's CPU use over the measured window. Writes ``results.md``, ``results.json`` and
``results.png`` to ``--out`` (docs/performance) and, with ``--readme``, the table into README.md.
The load generator is ``bench/loadgen.c``, built here with the machine's C compiler.

Shape (f) is publish/subscribe: one publisher and PUBSUB_SUBSCRIBERS subscriber connections,
all in the load generator (``--mode pubsub``) so that it knows when every subscriber has a
message. Deliveries per second are measured at saturation (the publisher keeps PUBSUB_WINDOW
messages not yet delivered everywhere), then latency from publish to each delivery at
PUBSUB_RATE messages per second, each against a fresh server. The brokers of the nats:// and
redis:// rows are reached at PYASYNC_NATS_URL and PYASYNC_REDIS_URL (local defaults); they are not
pinned. A row whose server does not start (a broker missing, say) is reported and skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PYTHON = sys.executable
SERVER_CPU, CLIENT_CPU = "0", "1"
README_BEGIN, README_END = "<!-- bench:begin -->", "<!-- bench:end -->"
# pyasync-server tells glibc to keep large buffers for reuse (utils.reuse_large_buffers); every
# server here gets the same through the environment, so the comparison is of code, not malloc.
SAME_ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(128 << 20)}
IDLE_CONNECTIONS = 5_000
HELD_CONNECTIONS = 10_000
PUBSUB_SUBSCRIBERS = 1_000
PUBSUB_WINDOW = 64  # messages published and not yet delivered to every subscriber, at most
# Messages per second for the latency run. Light: a message costs a write to each of the 1,000
# sockets, and at 50/s the batching floor took 30% of a core and pyasync-server 65% on a 2-core VM.
PUBSUB_RATE = 10.0
PUBSUB_LATENCY_SECONDS = 3.0  # at least, so that p99 stands on some 30,000 deliveries
PUBSUB_SIZE = 32  # bytes of data per message
NATS_URL = os.environ.get("PYASYNC_NATS_URL", "nats://127.0.0.1:4222")
REDIS_URL = os.environ.get("PYASYNC_REDIS_URL", "redis://127.0.0.1:6379")


@dataclass
class Server:
    """How to start one server under test."""

    name: str
    command: list[str]
    proto: str  # the load generator's wire format: pyasync, floor, line, grpc, socketio
    env: dict[str, str] = field(default_factory=dict)
    tls: bool = False
    cpus: str = SERVER_CPU  # taskset's list: "0", or "0,1" for a server of several processes


@dataclass
class Row:
    shape: str
    server: str
    client: str
    runs: list[dict[str, Any]]

    def median(self, key: str) -> float:
        return float(statistics.median(run[key] for run in self.runs))


def pyasync(name: str, *, uvloop: bool = True, tls: bool = False, **env: str) -> Server:
    settings = {
        "USE_UVLOOP": str(uvloop).lower(), "LOG_LEVEL": "WARNING", "COMPRESSION_THRESHOLD": "0",
        "IDLE_TIMEOUT": "0", "MAX_CONNECTIONS": "20000", "DB_BACKEND": "none",
        "MAX_CONNECTIONS_PER_IP": "0", "RATE_LIMIT": "0", **env,
    }  # fmt: skip
    if tls:
        settings.update(ENABLE_TLS="true", TLS_CERT_FILE="{cert}", TLS_KEY_FILE="{key}")
    return Server(name, [PYTHON, "server.py", "--env-file", os.devnull, "--port", "{port}"],
                  "pyasync", settings, tls)  # fmt: skip


def floor(name: str, mode: str, loop: str, tls: bool = False) -> Server:
    command = [PYTHON, "bench/floor.py", "--port", "{port}", "--mode", mode, "--loop", loop]
    if tls:
        command += ["--cert", "{cert}", "--key", "{key}"]
    return Server(name, command, "floor", tls=tls)


EASYNETWORK = Server(
    "easynetwork 1.2, JSON, uvloop", [PYTHON, "bench/peers/easynetwork_echo.py", "--port", "{port}",
                              "--uvloop"], "line")  # fmt: skip
GRPC = Server("grpc.aio unary", [PYTHON, "bench/peers/grpc_echo.py", "serve", "--port", "{port}"],
              "grpc")  # fmt: skip

SERVERS = {
    "pyasync-uvloop": pyasync("pyasync-server, uvloop"),
    "pyasync-asyncio": pyasync("pyasync-server, asyncio loop", uvloop=False),
    "pyasync-tls": pyasync("pyasync-server, uvloop, TLS", tls=True),
    # Two worker processes need both CPUs, which they share with the load generator (CPU 1):
    # compare with one worker on the same two CPUs. The CPU column counts the supervisor only.
    "pyasync-1worker-2cpus": replace(pyasync("pyasync-server, 1 worker, CPUs 0-1"), cpus="0,1"),
    "pyasync-2workers-2cpus": replace(
        pyasync(
            "pyasync-server, 2 workers, CPUs 0-1", WORKERS="2", BROKER_URL="redis://127.0.0.1:6379"
        ),
        cpus="0,1",
    ),  # fmt: skip
    "floor-uvloop": floor("floor: asyncio.Protocol, uvloop", "protocol", "uvloop"),
    "floor-asyncio": floor("floor: asyncio.Protocol, asyncio loop", "protocol", "asyncio"),
    "floor-tasks": floor("floor: Protocol + task per request, uvloop", "tasks", "uvloop"),
    "floor-tls": floor("floor: asyncio.Protocol, uvloop, TLS", "protocol", "uvloop", tls=True),
    "streams-uvloop": floor("floor: asyncio Streams, uvloop", "streams", "uvloop"),
    "easynetwork": EASYNETWORK,
    "grpc": GRPC,
}
SHAPES: dict[str, tuple[str, int, int, int, list[str]]] = {  # connections, in flight, bytes
    "a": ("64 connections x 1, 32 B", 64, 1, 32, list(SERVERS)),
    "b": ("1 connection x 64 pipelined, 32 B", 1, 64, 32, list(SERVERS)),
    "c": ("1 MiB echo, 1 connection x 1", 1, 1, 1 << 20,
          ["pyasync-uvloop", "pyasync-asyncio", "pyasync-tls", "floor-uvloop", "floor-tls",
           "streams-uvloop", "grpc"]),
}  # fmt: skip


def pyasync_broker(name: str, url: str) -> Server:
    # History holds far more than the window, so a subscriber caught up from it never misses.
    return pyasync(f"pyasync-server, {name}, uvloop", BROKER_URL=url, HISTORY_SIZE="100000")


def floor_pubsub(name: str, mode: str) -> Server:
    return Server(name, [PYTHON, "bench/floor_pubsub.py", "--port", "{port}", "--mode", mode],
                  "floor")  # fmt: skip


def socketio_peer(name: str, deploy: str, redis: str = "") -> Server:
    command = [PYTHON, "bench/peers/socketio_server.py", "--port", "{port}", "--deploy", deploy]
    return Server(name, command + (["--redis", redis] if redis else []), "socketio")


PUBSUB_SERVERS = {
    "pyasync-memory": pyasync_broker("memory://", "memory://"),
    "pyasync-nats": pyasync_broker("nats://", NATS_URL),
    "pyasync-redis": pyasync_broker("redis://", REDIS_URL),
    "floor-pubsub-write": floor_pubsub("floor: a write per message and subscriber", "write"),
    "floor-pubsub-batch": floor_pubsub("floor: a write per subscriber per loop pass", "batch"),
    "socketio": socketio_peer("python-socketio 5, uvicorn, in-process rooms", "uvicorn"),
    "socketio-redis": socketio_peer("python-socketio 5, uvicorn, AsyncRedisManager", "uvicorn",
                                    REDIS_URL),
    "socketio-aiohttp": socketio_peer("python-socketio 5, aiohttp, in-process rooms", "aiohttp"),
}  # fmt: skip
PUBSUB_TITLE = (f"publish/subscribe: 1 publisher, {PUBSUB_SUBSCRIBERS:,} subscribers, "
                f"{PUBSUB_SIZE} B messages")  # fmt: skip
PUBSUB_ROWS = ["pyasync-memory", "pyasync-nats", "pyasync-redis", "floor-pubsub-write",
               "floor-pubsub-batch", "socketio", "socketio-redis"]  # fmt: skip
SHAPE_KEYS = "abcdef"


# ---- processes ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def wait_for_port(port: int, process: subprocess.Popen[bytes], seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"server did not listen on port {port} within {seconds:g} s")


@contextlib.contextmanager
def running(server: Server, files: dict[str, str]) -> Iterator[tuple[int, int]]:
    """Start ``server`` on CPU 0; yield (pid, port); stop it with SIGTERM."""
    port = free_port()
    values = {**files, "port": str(port)}
    command = ["taskset", "-c", server.cpus] + [part.format(**values) for part in server.command]
    env = {**os.environ, **SAME_ALLOCATOR,
           **{key: value.format(**values) for key, value in server.env.items()}}  # fmt: skip
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    try:
        wait_for_port(port, process)
        time.sleep(0.3)  # let the connection just made for probing be closed
        yield process.pid, port
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def load(command: Sequence[str], server_pid: int, warmup: float) -> dict[str, Any]:
    """Run a load generator on CPU 1; add the server's CPU % over the measured window."""
    client = subprocess.Popen(
        ["taskset", "-c", CLIENT_CPU, *command], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    time.sleep(warmup + 0.2)
    cpu_start, wall_start = cpu_seconds(server_pid), time.monotonic()
    out, _ = client.communicate(timeout=600)
    cpu_end, wall_end = cpu_seconds(server_pid), time.monotonic()
    if client.returncode != 0:
        raise RuntimeError(f"load generator failed ({client.returncode}): {' '.join(command)}")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    result["server_cpu_percent"] = 100 * (cpu_end - cpu_start) / (wall_end - wall_start)
    return result


def loadgen_command(
    binary: Path, server: Server, port: int, shape: tuple[int, int, int], args: argparse.Namespace
) -> list[str]:
    connections, in_flight, size = shape
    timing = ["--warmup", str(args.warmup), "--duration", str(args.duration)]
    sizes = ["--connections", str(connections), "--inflight", str(in_flight), "--size", str(size)]
    if server.proto == "grpc":
        return [PYTHON, "bench/peers/grpc_echo.py", "load", "--port", str(port), *sizes, *timing]
    tls = ["--tls", "--tls-insecure"] if server.tls else []
    return [str(binary), "--port", str(port), "--proto", server.proto, *sizes, *timing, *tls]


# ---- the shapes ---------------------------------------------------------------------------------


def run_rate_shapes(binary: Path, files: dict[str, str], args: argparse.Namespace) -> list[Row]:
    rows = []
    for shape_key in args.shapes:
        if shape_key not in SHAPES:
            continue
        title, connections, in_flight, size, names = SHAPES[shape_key]
        for name in names:
            if args.servers and name not in args.servers:
                continue
            server = SERVERS[name]
            client = "grpc.aio client (Python)" if server.proto == "grpc" else "loadgen (C)"
            runs = []
            for _ in range(args.runs):
                with running(server, files) as (pid, port):
                    command = loadgen_command(
                        binary, server, port, (connections, in_flight, size), args
                    )
                    runs.append(load(command, pid, args.warmup))
            row = Row(shape_key, server.name, client, runs)
            rows.append(row)
            print(
                f"({shape_key}) {server.name:45} {row.median('rps'):>10,.0f} req/s "
                f"{row.median('mb_per_s'):>8,.0f} MB/s  p99 {row.median('p99_us'):>7,.0f} us  "
                f"server CPU {row.median('server_cpu_percent'):3.0f}%",
                flush=True,
            )
    return rows


def hold_connections(port: int, count: int) -> list[socket.socket]:
    sockets = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port))
        sockets.append(sock)
    return sockets


def still_open(sockets: list[socket.socket]) -> int:
    """Connections the server has not closed (a closed one reads as end of stream)."""
    alive = 0
    for sock in sockets:
        sock.setblocking(False)
        try:
            alive += sock.recv(1) != b""
        except BlockingIOError:
            alive += 1
        except OSError:
            pass
    return alive


def run_idle_shape(files: dict[str, str], args: argparse.Namespace) -> list[Row]:
    """(d): RSS per idle connection over IDLE_CONNECTIONS, then HELD_CONNECTIONS held."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    idle = IDLE_CONNECTIONS if not args.quick else 500
    held = HELD_CONNECTIONS if not args.quick else 1000
    rows = []
    for name in ["pyasync-uvloop", "pyasync-asyncio", "floor-uvloop", "floor-asyncio",
                 "easynetwork", "grpc"]:  # fmt: skip
        server = SERVERS[name]
        with running(server, files) as (pid, port):
            before = rss_bytes(pid)
            sockets = hold_connections(port, idle)
            time.sleep(2.0)
            per_connection = (rss_bytes(pid) - before) / idle
            sockets += hold_connections(port, held - idle)
            time.sleep(2.0)
            alive = still_open(sockets)
            for sock in sockets:
                sock.close()
        run = {"rss_per_connection_bytes": per_connection, "held": alive, "asked": held}
        rows.append(Row("d", server.name, "Python sockets", [run]))
        print(f"(d) {server.name:45} {per_connection / 1024:6.1f} KiB per idle connection, "
              f"{alive:,} of {held:,} held", flush=True)  # fmt: skip
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return rows


def run_database_shape(binary: Path, files: dict[str, str], args: argparse.Namespace) -> list[Row]:
    """(e): KV_GET through the server versus the driver alone, both on CPU 0."""
    rows = []
    sqlite_path = files["sqlite"]
    urls = {
        "postgres": os.environ.get("PYASYNC_PG_URL", "postgresql://postgres@127.0.0.1:5432/test"),
        "mariadb": os.environ.get("PYASYNC_MYSQL_URL", "mysql://root@127.0.0.1:3306/test"),
    }
    timing = ["--warmup", str(args.warmup), "--duration", str(args.duration)]
    for backend in args.backends:
        where = ["--backend", backend, "--sqlite-path", sqlite_path]
        subprocess.run([PYTHON, "bench/kv_get.py", "fill", *where], cwd=ROOT, check=True)
        direct_runs = []
        for _ in range(args.runs):
            command = ["taskset", "-c", SERVER_CPU, PYTHON, "bench/kv_get.py", "direct", *where]
            out = subprocess.run(command + timing, cwd=ROOT, check=True, capture_output=True,
                                 text=True).stdout  # fmt: skip
            direct_runs.append(json.loads(out.strip().splitlines()[-1]))
        server = pyasync(
            f"pyasync-server KV_GET, {backend}", DB_BACKEND=backend, DB_URL=urls.get(backend, ""),
            SQLITE_PATH=sqlite_path, KV_TABLE="bench_kv", DB_POOL_MIN_SIZE="10",
            DB_POOL_MAX_SIZE="10",
        )  # fmt: skip
        server_runs = []
        for _ in range(args.runs):
            with running(server, files) as (pid, port):
                command = [str(binary), "--port", str(port), "--proto", "pyasync",
                           "--keys", "10000", "--connections", "8", "--inflight", "8",
                           "--size", "0", *timing]  # fmt: skip
                server_runs.append(load(command, pid, args.warmup))
        direct = Row("e", f"{backend} driver alone, 64 concurrent, pool 10", "Python (uvloop)",
                     direct_runs)  # fmt: skip
        through = Row("e", server.name, "loadgen (C), 8 x 8", server_runs)
        rows += [direct, through]
        ratio = through.median("rps") / direct.median("rps")
        print(f"(e) {backend:9} driver {direct.median('rps'):8,.0f}/s  server "
              f"{through.median('rps'):8,.0f}/s  ratio {ratio:.2f}", flush=True)  # fmt: skip
    return rows


def pubsub_load(
    binary: Path, server: Server, files: dict[str, str], args: argparse.Namespace, rate: float
) -> dict[str, Any]:
    """One load generator run of shape (f) against a fresh server; rate 0 is saturation."""
    duration = args.duration if rate == 0 else max(args.duration, PUBSUB_LATENCY_SECONDS)
    with running(server, files) as (pid, port):
        command = [
            "taskset", "-c", CLIENT_CPU, str(binary), "--port", str(port),
            "--proto", server.proto, "--mode", "pubsub",
            "--subscribers", str(PUBSUB_SUBSCRIBERS), "--window", str(PUBSUB_WINDOW),
            "--size", str(PUBSUB_SIZE), "--rate", f"{rate:g}", "--cpu-pid", str(pid),
            "--warmup", str(args.warmup), "--duration", str(duration),
        ]  # fmt: skip
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed ({done.returncode}): {done.stderr.strip()}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def run_pubsub_shape(binary: Path, files: dict[str, str], args: argparse.Namespace) -> list[Row]:
    """(f): deliveries/s at saturation, then latency at PUBSUB_RATE, per server."""
    rows = []
    names = [name for name in PUBSUB_SERVERS if name in args.servers] or PUBSUB_ROWS
    if args.servers and not set(args.servers) & set(PUBSUB_SERVERS):
        names = []  # rows of other shapes were asked for
    for name in names:
        server = PUBSUB_SERVERS[name]
        runs = []
        try:
            for _ in range(args.runs):
                busy = pubsub_load(binary, server, files, args, 0.0)
                light = pubsub_load(binary, server, files, args, PUBSUB_RATE)
                cpu = busy["server_cpu_percent"] or 0.0
                runs.append({
                    "deliveries_per_s": busy["deliveries_per_s"],
                    "messages_per_s": busy["messages_per_s"],
                    "server_cpu_percent": cpu,
                    "client_cpu_percent": busy["client_cpu_percent"],
                    "deliveries_per_cpu_s": busy["deliveries_per_s"] * 100 / cpu if cpu else 0.0,
                    "latency_rate": light["messages_per_s"],
                    "p50_us": light["p50_us"],
                    "p99_us": light["p99_us"],
                    "errors": busy["errors"] + light["errors"],
                    "lost": busy["lost"] + light["lost"],
                    "saturation": busy,
                    "latency": light,
                })  # fmt: skip
        except RuntimeError as exc:  # a broker not there, or not supported by this server
            print(f"(f) {server.name:45} skipped: {exc}", flush=True)
            continue
        row = Row("f", server.name, "loadgen (C)", runs)
        rows.append(row)
        print(
            f"(f) {server.name:45} {row.median('deliveries_per_s'):>10,.0f} deliveries/s "
            f"server CPU {row.median('server_cpu_percent'):3.0f}%  at {PUBSUB_RATE:g}/s: p50 "
            f"{row.median('p50_us'):>8,.0f} us p99 {row.median('p99_us'):>8,.0f} us  "
            f"errors {row.median('errors'):.0f} lost {row.median('lost'):.0f}",
            flush=True,
        )
    return rows


# ---- output -------------------------------------------------------------------------------------


def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (f"{os.cpu_count()} x {cpu}, Linux {platform.release()}, "
            f"Python {platform.python_version()}")  # fmt: skip


def table(rows: list[Row], args: argparse.Namespace) -> str:
    lines = [
        f"Machine: {machine()}. Server on CPU {SERVER_CPU}, load generator on CPU {CLIENT_CPU}; "
        f"median of {args.runs} runs of {args.duration:g} s after {args.warmup:g} s warm-up; "
        "pyasync-server with compression off. Ratios compare rows of this run only.",
        "",
    ]
    for key, (title, *_rest) in SHAPES.items():
        shape_rows = [row for row in rows if row.shape == key]
        if not shape_rows:
            continue
        lines += [f"**({key}) {title}**", "",
                  "| server | client | req/s | MB/s | p50 µs | p99 µs | server CPU |",
                  "|---|---|--:|--:|--:|--:|--:|"]  # fmt: skip
        for row in shape_rows:
            lines.append(
                f"| {row.server} | {row.client} | {row.median('rps'):,.0f} | "
                f"{row.median('mb_per_s'):,.1f} | {row.median('p50_us'):,.0f} | "
                f"{row.median('p99_us'):,.0f} | {row.median('server_cpu_percent'):.0f}% |"
            )
        lines.append("")
    idle = [row for row in rows if row.shape == "d"]
    if idle:
        lines += [f"**(d) idle connections: RSS over {IDLE_CONNECTIONS:,}, then "
                  f"{HELD_CONNECTIONS:,} held**", "",
                  "| server | KiB per idle connection | held |", "|---|--:|--:|"]  # fmt: skip
        for row in idle:
            run = row.runs[0]
            lines.append(f"| {row.server} | {run['rss_per_connection_bytes'] / 1024:.1f} | "
                         f"{run['held']:,} of {run['asked']:,} |")  # fmt: skip
        lines.append("")
    database = [row for row in rows if row.shape == "e"]
    if database:
        lines += ["**(e) database: KV_GET on a 10,000-row table, 64 concurrent, pool 10**", "",
                  "| what | client | lookups/s | ratio to the driver alone |",
                  "|---|---|--:|--:|"]  # fmt: skip
        for direct, through in zip(database[::2], database[1::2], strict=True):
            ratio = through.median("rps") / direct.median("rps")
            lines.append(f"| {direct.server} | {direct.client} | {direct.median('rps'):,.0f} | |")
            lines.append(f"| {through.server} | {through.client} | "
                         f"{through.median('rps'):,.0f} | {ratio:.2f} |")  # fmt: skip
        lines.append("")
    pubsub = [row for row in rows if row.shape == "f"]
    if pubsub:
        lines += [
            f"**(f) {PUBSUB_TITLE}**",
            "",
            f"Deliveries/s at saturation: the publisher keeps {PUBSUB_WINDOW} messages not yet "
            "delivered to every subscriber. Per server CPU-second: deliveries/s divided by the "
            "server's CPU use, less sensitive to a busy machine. Latency: at "
            f"{PUBSUB_RATE:g} messages/s (the rate reached is shown), from the publisher's write "
            "to each subscriber's read. Errors: offsets out of sequence; lost: messages some "
            "subscriber never received. Brokers (NATS, Redis) are not pinned and their CPU is not "
            "counted.",
            "",
            "| server | client | deliveries/s | per server CPU-s | server CPU | client CPU | "
            "msg/s of latency run | p50 µs | p99 µs | errors | lost |",
            "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
        ]  # fmt: skip
        for row in pubsub:
            lines.append(
                f"| {row.server} | {row.client} | {row.median('deliveries_per_s'):,.0f} | "
                f"{row.median('deliveries_per_cpu_s'):,.0f} | "
                f"{row.median('server_cpu_percent'):.0f}% | "
                f"{row.median('client_cpu_percent'):.0f}% | {row.median('latency_rate'):,.1f} | "
                f"{row.median('p50_us'):,.0f} | {row.median('p99_us'):,.0f} | "
                f"{row.median('errors'):,.0f} | {row.median('lost'):,.0f} |"
            )
        lines.append("")
    return "\n".join(lines)


def chart(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    charted = [*SHAPES, "f"]
    shapes = [key for key in charted if any(row.shape == key for row in rows)]
    if not shapes:
        return
    figure, axes = plt.subplots(len(shapes), 1, figsize=(10, 3.2 * len(shapes)), squeeze=False)
    for axis, key in zip(axes[:, 0], shapes, strict=True):
        shape_rows = [row for row in rows if row.shape == key]
        metric, unit = {"c": ("mb_per_s", "MB/s"),
                        "f": ("deliveries_per_s", "deliveries/s, log scale")}.get(
                            key, ("rps", "requests/s"))  # fmt: skip
        values = [row.median(metric) for row in shape_rows]
        colors = ["tab:blue" if row.server.startswith("pyasync") else
                  "tab:gray" if row.server.startswith("floor") else "tab:orange"
                  for row in shape_rows]  # fmt: skip
        axis.barh([row.server for row in shape_rows], values, color=colors)
        axis.invert_yaxis()
        axis.set_title(f"({key}) {PUBSUB_TITLE if key == 'f' else SHAPES[key][0]}", fontsize=10)
        axis.set_xlabel(unit)
        if key == "f":  # the rows span three orders of magnitude
            axis.set_xscale("log")
        axis.tick_params(labelsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def update_readme(markdown: str, chart_path: Path) -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    if README_BEGIN not in text:
        raise RuntimeError(f"README.md has no {README_BEGIN} marker")
    before, rest = text.split(README_BEGIN, 1)
    after = rest.split(README_END, 1)[1]
    image = f"![requests per second]({chart_path.relative_to(ROOT).as_posix()})"
    readme.write_text(f"{before}{README_BEGIN}\n{markdown}\n{image}\n{README_END}{after}")


# ---- main ---------------------------------------------------------------------------------------


def build_loadgen(directory: Path) -> Path:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        sys.exit("bench: no C compiler (cc) found; install gcc to build bench/loadgen.c")
    binary = directory / "loadgen"
    subprocess.run([compiler, "-O2", "-o", str(binary), str(BENCH / "loadgen.c"), "-lssl",
                    "-lcrypto"], check=True)  # fmt: skip
    return binary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=SHAPE_KEYS, help="which of a b c d e f (default all)")
    parser.add_argument("--backends", default="sqlite,mariadb,postgres")
    parser.add_argument(
        "--servers",
        default="",
        help=f"rows of shapes a-c to run, comma-separated: {', '.join(SERVERS)}; of shape f: "
        f"{', '.join(PUBSUB_SERVERS)}",
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--quick", action="store_true", help="1 run of 1 s after 0.5 s")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "performance")
    parser.add_argument("--readme", action="store_true", help="write the table into README.md")
    parser.add_argument(
        "--merge", action="store_true", help="keep --out's rows of the shapes not run now"
    )
    args = parser.parse_args()
    args.backends = [b for b in args.backends.split(",") if b]
    args.servers = [s for s in args.servers.split(",") if s]
    unknown = sorted(set(args.servers) - set(SERVERS) - set(PUBSUB_SERVERS))
    if unknown:
        parser.error(f"--servers: unknown {', '.join(unknown)}")
    if args.quick:
        args.runs, args.warmup, args.duration = 1, 0.5, 1.0
    if len(os.sched_getaffinity(0)) < 2 or shutil.which("taskset") is None:
        sys.exit("bench: needs 2 CPUs and taskset (util-linux) to pin server and client apart")
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        binary = build_loadgen(folder)
        sys.path.insert(0, str(ROOT))
        from pyasync.tls import make_self_signed_cert

        cert, key = make_self_signed_cert(folder / "tls")
        files = {"cert": str(cert), "key": str(key), "sqlite": str(folder / "bench.sqlite3")}
        kept: list[Row] = []
        if args.merge and (args.out / "results.json").exists():
            raw = json.loads((args.out / "results.json").read_text())["rows"]
            kept = [Row(**row) for row in raw if row["shape"] not in args.shapes]
        rows = run_rate_shapes(binary, files, args)
        write_outputs(kept + rows, args)  # after each part: a failure later loses only that
        if "d" in args.shapes:
            rows += run_idle_shape(files, args)
            write_outputs(kept + rows, args)
        if "e" in args.shapes:
            rows += run_database_shape(binary, files, args)
            write_outputs(kept + rows, args)
        if "f" in args.shapes:
            rows += run_pubsub_shape(binary, files, args)
            write_outputs(kept + rows, args)
    print(f"\nwrote {args.out / 'results.md'}, results.json and results.png")


def write_outputs(rows: list[Row], args: argparse.Namespace) -> None:
    rows = sorted(rows, key=lambda row: SHAPE_KEYS.index(row.shape))
    args.out.mkdir(parents=True, exist_ok=True)
    markdown = table(rows, args)
    (args.out / "results.md").write_text(markdown + "\n")
    raw = {"machine": machine(), "runs": args.runs, "warmup_s": args.warmup,
           "duration_s": args.duration,
           "rows": [row.__dict__ for row in rows]}  # fmt: skip
    (args.out / "results.json").write_text(json.dumps(raw, indent=1) + "\n")
    chart(rows, args.out / "results.png")
    if args.readme:
        update_readme(markdown, args.out / "results.png")


if __name__ == "__main__":
    main()
