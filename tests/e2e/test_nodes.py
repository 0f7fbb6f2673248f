"""Servers on separate hosts that share PostgreSQL and NATS form one cluster.

Each host is a network namespace of its own, joined to the test's (root) namespace by a veth
pair on a private /24 of 10.231.0.0/16 that no interface here uses yet: 10.231.X.1 outside,
10.231.X.2 inside. ``python server.py --host 10.231.X.2`` runs inside, and the test's client
reaches it from outside, as a client on another machine would. NATS and PostgreSQL listen on
127.0.0.1 of the root namespace only, so the test forwards to them from each veth's outer
address. Namespaces, links and processes are removed in ``finally`` blocks, by name and pid.

Needs root and ``ip``: skipped with a reason otherwise, failed instead under
``PYASYNC_REQUIRE_DB=1``, like an unreachable database. So are unreachable NATS or PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from broker import BrokerSettings, open_backend
from client import Client
from package import PACKAGE, KvGetAnswer, KvGetRequest, KvPutAnswer, KvPutRequest, MessageEvent
from server_config import DatabaseSettings
from tests.helpers import (
    LISTENING,
    ROOT,
    URLS,
    FaultyProxy,
    ServerProcess,
    clean_env,
    drop_table,
    require_reachable,
)

NATS = ("127.0.0.1", 4222)
RUN = uuid.uuid4().hex[:6]  # names of this run: namespaces, links, topics, table, NATS streams


def unavailable(reason: str) -> None:
    """Skip the test, or fail it where CI requires every service (PYASYNC_REQUIRE_DB=1)."""
    if os.environ.get("PYASYNC_REQUIRE_DB") == "1":
        pytest.fail(f"PYASYNC_REQUIRE_DB=1 but {reason}")
    pytest.skip(reason)


def ip(*args: str) -> None:
    """Run ``ip ARGS``. Raises ``subprocess.CalledProcessError`` with its stderr on failure."""
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=10)


@dataclasses.dataclass(frozen=True)
class Host:
    """A network namespace joined to the root namespace by one veth pair."""

    namespace: str
    outer: str  # the veth end in the root namespace
    gateway: str  # its address: the test's forwarders listen here
    address: str  # the inner end's address: the server listens here


def free_subnets(count: int) -> list[int]:
    """``count`` third octets X such that no interface here has an address in 10.231.X.0/24."""
    shown = subprocess.run(
        ["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, timeout=10
    ).stdout
    used = {
        ipaddress.ip_interface(word).network.network_address.packed[2]
        for word in shown.split()
        if word.startswith("10.231.") and "/" in word
    }
    return random.sample(sorted(set(range(1, 255)) - used), count)


def make_host(number: int, octet: int) -> Host:
    """Namespace ``pyasync-RUN-number`` with 10.231.octet.2, reached from 10.231.octet.1."""
    host = Host(
        f"pyasync-{RUN}-{number}", f"pya{RUN}{number}o", f"10.231.{octet}.1", f"10.231.{octet}.2"
    )
    inner = f"pya{RUN}{number}i"
    ip("netns", "add", host.namespace)
    ip("link", "add", host.outer, "type", "veth", "peer", "name", inner)
    ip("link", "set", inner, "netns", host.namespace)
    ip("addr", "add", f"{host.gateway}/24", "dev", host.outer)
    ip("link", "set", host.outer, "up")
    ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", inner)
    ip("-n", host.namespace, "link", "set", inner, "up")
    ip("-n", host.namespace, "link", "set", "lo", "up")
    return host


def remove_host(number: int) -> None:
    """Delete the link (both ends go) and the namespace of host ``number``, if they exist."""
    for args in (
        ("link", "del", f"pya{RUN}{number}o"),
        ("netns", "del", f"pyasync-{RUN}-{number}"),
    ):
        with contextlib.suppress(subprocess.CalledProcessError):
            ip(*args)


@contextlib.contextmanager
def two_hosts() -> Iterator[list[Host]]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        unavailable("network namespaces need root and the ip command")
    try:
        try:
            hosts = [make_host(number, octet) for number, octet in enumerate(free_subnets(2))]
        except subprocess.CalledProcessError as exc:
            unavailable(f"cannot make a network namespace: {exc.stderr.strip()}")
        yield hosts
    finally:
        for number in range(2):
            remove_host(number)


class Forwarder(FaultyProxy):
    """The helpers' TCP proxy, listening on a given address (a veth's outer end)."""

    async def listen_on(self, host: str) -> Forwarder:
        self.listener = await asyncio.start_server(self._accept, host, 0)
        self.port = self.listener.sockets[0].getsockname()[1]
        return self


@contextlib.asynccontextmanager
async def forwarders(hosts: list[Host], target: tuple[str, int]) -> AsyncIterator[list[int]]:
    """One forwarder to ``target`` per host, on its gateway; yields their ports."""
    opened = [Forwarder(*target) for _ in hosts]
    try:
        for forwarder, host in zip(opened, hosts, strict=True):
            await forwarder.listen_on(host.gateway)
        yield [forwarder.port for forwarder in opened]
    finally:
        for forwarder in opened:
            await forwarder.close()


def start_inside(host: Host, cwd: Path, env: dict[str, str]) -> ServerProcess:
    """``ip netns exec NS python server.py --host ADDRESS --port 0``, once it listens."""
    process = subprocess.Popen(
        ["ip", "netns", "exec", host.namespace, sys.executable, str(ROOT / "server.py"),
         "--host", host.address, "--port", "0"],
        cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip  # ip netns exec execs python: the pid is the server's
    lines: list[str] = []
    listening = threading.Event()

    def pump() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            lines.append(line)
            if LISTENING.search(line):
                listening.set()
        listening.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    server = ServerProcess(process, 0, reader, lines)
    if not listening.wait(30) or not (match := LISTENING.search(server.log)):
        server.stop(signal.SIGKILL)
        raise AssertionError(f"server in {host.namespace} did not start:\n{server.log}")
    server.port = int(match.group(2))
    return server


async def require_services() -> None:
    """Skip (or fail) when NATS or PostgreSQL is unreachable or NATS has no backend here."""
    try:
        open_backend(BrokerSettings(url="nats://127.0.0.1:4222"), lambda: None)
    except (ValueError, ImportError) as exc:
        pytest.skip(f"this checkout has no nats:// broker backend: {exc}")
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(*NATS), 3)
        writer.close()
        await writer.wait_closed()
    except (OSError, TimeoutError) as exc:
        unavailable(f"NATS at {NATS[0]}:{NATS[1]} unreachable: {exc}")
    await require_reachable(DatabaseSettings(db_url=URLS["postgres"]))


async def remove_nats_streams(namespace: str) -> None:
    import nats
    from nats.js.errors import NotFoundError

    connection = await nats.connect(f"nats://{NATS[0]}:{NATS[1]}", connect_timeout=3)
    try:
        for stream in (namespace.upper(), f"{namespace.upper()}_HEADS"):
            with contextlib.suppress(NotFoundError):
                await connection.jetstream().delete_stream(stream)
    finally:
        await connection.close()


def node_env(nats_url: str, pg_port: int, gateway: str, table: str, **extra: str) -> dict[str, str]:
    """A node's settings: the broker and the database through its host's gateway."""
    pg = urlsplit(URLS["postgres"])
    credentials = pg.netloc.rpartition("@")[0]
    db_url = pg._replace(netloc=f"{credentials}@{gateway}:{pg_port}").geturl()
    return clean_env(
        BROKER_URL=nats_url, DB_URL=db_url, KV_TABLE=table, LOG_LEVEL="INFO",
        ALLOW_OPEN="true",  # the test's own private hosts: no authentication needed
        **extra,
    )  # fmt: skip


@pytest.mark.timeout(120)
async def test_two_hosts_share_messages_and_keys(tmp_path: Path) -> None:
    await require_services()
    namespace, table, topic = f"nodes{RUN}", f"nodes_kv_{RUN}", f"cluster.{RUN}"
    pg = urlsplit(URLS["postgres"])
    servers: list[ServerProcess] = []
    with two_hosts() as hosts:
        async with (
            forwarders(hosts, NATS) as nats_ports,
            forwarders(hosts, (pg.hostname or "127.0.0.1", pg.port or 5432)) as pg_ports,
        ):
            try:
                for number, host in enumerate(hosts):
                    url = f"nats://{host.gateway}:{nats_ports[number]}/{namespace}"
                    extra = {"NODE_ID": "node-a"} if number == 0 else {}
                    env = node_env(url, pg_ports[number], host.gateway, table, **extra)
                    servers.append(await asyncio.to_thread(start_inside, host, tmp_path, env))
                await check_cluster(hosts, servers, topic)
                for server in servers:
                    assert await asyncio.to_thread(server.stop) == 0
            finally:
                for server in servers:
                    if server.process.poll() is None:
                        await asyncio.to_thread(server.stop, signal.SIGKILL)
                await drop_table(DatabaseSettings(db_url=URLS["postgres"], kv_table=table))
                await remove_nats_streams(namespace)
    assert all("Traceback" not in server.log for server in servers)


async def check_cluster(hosts: list[Host], servers: list[ServerProcess], topic: str) -> None:
    """Node ids, a message from A to B's subscriber, a key put on A and read on B."""
    a = await Client(hosts[0].address, servers[0].port).connect()
    b = await Client(hosts[1].address, servers[1].port).connect()
    try:
        assert (await a.server_info()).node_id == "node-a"
        assert (await b.server_info()).node_id == f"{socket.gethostname()}:{servers[1].port}"
        async with b.subscribe(topic) as events:
            offset = await a.publish(topic, b"hello from A")
            async with asyncio.timeout(10):
                event = await anext(events)
        assert isinstance(event, MessageEvent)
        assert (event.topic, event.offset, event.data) == (topic, offset, b"hello from A")
        put = await a.request(PACKAGE.REQUEST_KV_PUT, KvPutRequest(key="k", value=b"from A"))
        assert isinstance(put, KvPutAnswer)
        got = await b.request(PACKAGE.REQUEST_KV_GET, KvGetRequest(key="k"))
        assert isinstance(got, KvGetAnswer) and (got.value, got.version) == (b"from A", put.version)
    finally:
        await a.close()
        await b.close()
