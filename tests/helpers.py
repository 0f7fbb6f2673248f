"""Test helpers shared by every layer; conftest files build their fixtures from these.

Run everything (as CI does) with ``python -m pytest``. The heavy database tests (concurrency,
load, the fault proxy) carry the ``slow`` marker: ``python -m pytest -m "not slow"`` skips them
for a quicker local run.

Databases for ``tests/db`` come from ``PYASYNC_PG_URL`` (default
``postgresql://postgres@127.0.0.1:5432/test``) and ``PYASYNC_MYSQL_URL`` (default
``mysql://root@127.0.0.1:3306/test``). An unreachable one skips its tests with a one-line
reason, unless ``PYASYNC_REQUIRE_DB=1``: then they fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import signal
import ssl
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

import config
import database
from protocol import Frame, FrameDecoder
from server import Server, serve
from server_config import DatabaseSettings

__all__ = [
    "BACKENDS",
    "NO_DATABASE",
    "ROOT",
    "FaultyProxy",
    "RawConnection",
    "ServerProcess",
    "clean_env",
    "drop_table",
    "proxied",
    "require_reachable",
    "run_client_program",
    "run_server_program",
    "running_server",
    "settings_for",
    "start_server_process",
    "wait_until",
]

ROOT = Path(__file__).resolve().parent.parent  # the repository: the project's modules live here


async def wait_until(condition: Callable[[], object], timeout: float = 5.0) -> None:
    """Poll ``condition()`` until it is true.

    Raises:
        AssertionError: it stayed false for ``timeout`` seconds.
    """
    try:
        async with asyncio.timeout(timeout):
            while not condition():  # noqa: ASYNC110 - polls state that has no event to wait on
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"condition still false after {timeout:g} s") from None


# ---- an in-process server ---------------------------------------------------------------------

NO_DATABASE = DatabaseSettings(db_backend="NONE")  # tests/db covers the database actions


@contextlib.asynccontextmanager
async def running_server(
    *,
    db_settings: DatabaseSettings = NO_DATABASE,
    ssl_context: ssl.SSLContext | None = None,
    **overrides: Any,
) -> AsyncIterator[Server]:
    """``async with running_server(max_in_flight=2) as server:`` on 127.0.0.1, a free port.

    ``overrides`` are ``config.Settings`` fields; the server is shut down at the block's end.
    """
    settings = config.Settings(**{"host": "127.0.0.1", "port": 0, **overrides})
    async with serve(settings, db_settings=db_settings, ssl_context=ssl_context) as server:
        yield server


class RawConnection:
    """A plain socket speaking frames by hand, for what the Client would never send."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.decoder = FrameDecoder()

    @classmethod
    async def open(cls, port: int) -> RawConnection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read_frame(self, timeout: float = 5.0) -> Frame | None:
        """The next frame, or None once the server closed the connection."""
        async with asyncio.timeout(timeout):
            while (frame := self.decoder.next_frame()) is None:
                data = await self.reader.read(65536)
                if not data:
                    return None
                self.decoder.feed(data)
            return frame

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


# ---- databases (tests/db) -----------------------------------------------------------------------

URLS = {
    "postgres": os.environ.get("PYASYNC_PG_URL", "postgresql://postgres@127.0.0.1:5432/test"),
    "mariadb": os.environ.get("PYASYNC_MYSQL_URL", "mysql://root@127.0.0.1:3306/test"),
}
BACKENDS = ["sqlite", "mariadb", "postgres"]


def settings_for(backend: str, tmp_path: Path, **overrides: Any) -> DatabaseSettings:
    """Database settings for ``backend`` with a table of the test's own."""
    table = f"test_kv_{uuid.uuid4().hex[:12]}"
    if backend == "sqlite":
        base = DatabaseSettings(
            db_backend="SQLITE", sqlite_path=str(tmp_path / "test.sqlite3"), kv_table=table
        )
    else:
        base = DatabaseSettings(db_url=URLS[backend], kv_table=table)
    return dataclasses.replace(base, **overrides)


async def require_reachable(settings: DatabaseSettings) -> None:
    """Skip (or fail under PYASYNC_REQUIRE_DB=1) when the database cannot be reached."""
    pool = database.Pool(dataclasses.replace(settings, db_connect_timeout=3.0))
    try:
        async with pool.acquire() as db:
            await db.fetchval("SELECT 1")
    except Exception as exc:
        reason = f"{settings.describe()} unreachable: {exc}"
        if os.environ.get("PYASYNC_REQUIRE_DB") == "1":
            pytest.fail(f"PYASYNC_REQUIRE_DB=1 but {reason}")
        pytest.skip(reason)
    finally:
        await pool.close()


async def drop_table(settings: DatabaseSettings) -> None:
    pool = database.Pool(settings)
    try:
        async with pool.acquire() as db:
            await db.execute(f"DROP TABLE IF EXISTS {settings.kv_table}")
    finally:
        await pool.close()


class FaultyProxy:
    """A TCP proxy on 127.0.0.1 between the server and a database that tests can break.

    ``refuse()`` drops new connections at once (database down), ``cut()`` resets every open
    one, ``stall()`` stops forwarding bytes (database hangs); ``heal()`` undoes all three.
    ``forwarded`` counts the bytes passed on, both ways.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.is_refusing = False
        self.is_stalled = asyncio.Event()
        self.is_stalled.set()  # set means "flowing"
        self.forwarded = 0
        self.writers: set[asyncio.StreamWriter] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.listener: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> FaultyProxy:
        self.listener = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self.listener.sockets[0].getsockname()[1]
        return self

    def refuse(self) -> None:
        self.is_refusing = True
        self.cut()

    def cut(self) -> None:
        for writer in list(self.writers):
            writer.transport.abort()

    def stall(self) -> None:
        self.is_stalled.clear()

    def heal(self) -> None:
        self.is_refusing = False
        self.is_stalled.set()

    async def close(self) -> None:
        self.cut()
        if self.listener is not None:
            self.listener.close()
            await self.listener.wait_closed()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.is_refusing:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.writers |= {writer, up_writer}
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            pipe = asyncio.get_running_loop().create_task(self._pipe(source, sink))
            self.tasks.add(pipe)
            pipe.add_done_callback(self.tasks.discard)

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                await self.is_stalled.wait()
                sink.write(data)
                self.forwarded += len(data)
                await sink.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self.writers.discard(sink)
            sink.transport.abort()


@contextlib.asynccontextmanager
async def proxied(
    settings: DatabaseSettings,
) -> AsyncIterator[tuple[FaultyProxy, DatabaseSettings]]:
    """A proxy in front of a MariaDB/PostgreSQL server, and settings that go through it."""
    address = settings.address
    proxy = await FaultyProxy(address["host"], address["port"]).start()
    through = dataclasses.replace(settings, db_url="", db_host="127.0.0.1", db_port=proxy.port,
                                  db_user=address["user"], db_password=address["password"],
                                  db_name=address["database"])  # fmt: skip
    try:
        yield proxy, through
    finally:
        await proxy.close()


# ---- server.py and client.py as programs (tests/e2e) -------------------------------------------

Completed = subprocess.CompletedProcess[str]
LISTENING = re.compile(r"listening on (\S+):(\d+)")


@dataclasses.dataclass
class ServerProcess:
    """A running ``server.py``; ``stderr_lines`` fills as it logs."""

    process: subprocess.Popen[str]
    port: int
    reader: threading.Thread
    stderr_lines: list[str] = dataclasses.field(default_factory=list)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 15) -> int:
        """Send ``signum`` unless it exited already; wait; return the exit code."""
        try:
            if self.process.poll() is None:
                self.process.send_signal(signum)
            try:
                return self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
                raise
        finally:
            self.reader.join(5)
            if self.process.stderr is not None:
                self.process.stderr.close()

    @property
    def log(self) -> str:
        return "".join(self.stderr_lines)


def clean_env(**overrides: str) -> dict[str, str]:
    """The environment without our settings variables, plus ``overrides``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TLS_", "ENABLE_TLS"))}
    for name in ("HOST", "PORT", "LOG_LEVEL", "USE_UVLOOP"):
        env.pop(name, None)
    env.update(overrides)
    return env


def start_server_process(
    cwd: Path, *args: str, env: dict[str, str] | None = None, program: Path | None = None
) -> ServerProcess:
    """Start ``server.py --port 0`` and wait for its "listening on" line (15 s at most)."""
    process = subprocess.Popen(
        [sys.executable, str(program or ROOT / "server.py"), "--port", "0", *args],
        cwd=cwd,
        env=env or clean_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    ready = threading.Event()
    found: list[int] = []

    def pump() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            lines.append(line)
            if not found and (match := LISTENING.search(line)):
                found.append(int(match.group(2)))
                ready.set()
        ready.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    server = ServerProcess(process, 0, reader, lines)
    if not ready.wait(15) or not found:
        server.stop(signal.SIGKILL)
        raise AssertionError("server did not start:\n" + "".join(lines))
    server.port = found[0]
    return server


def run_server_program(cwd: Path, *args: str, env: dict[str, str] | None = None) -> Completed:
    """Run ``server.py`` to completion (for commands and start-up failures)."""
    return subprocess.run(
        [sys.executable, str(ROOT / "server.py"), *args],
        cwd=cwd,
        env=env or clean_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )


def run_client_program(
    *args: str, cwd: Path, env: dict[str, str] | None = None, program: Path | None = None
) -> Completed:
    """Run ``client.py`` to completion."""
    return subprocess.run(
        [sys.executable, str(program or ROOT / "client.py"), *args],
        cwd=cwd,
        env=env or clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
