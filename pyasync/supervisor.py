"""Worker processes on one listening socket: started, restarted, replaced one by one, drained.

``python server.py --workers N`` runs this supervisor instead of a server. It binds the one
listening socket itself and starts N copies of ``server.py`` that inherit it (``pass_fds`` and
the internal ``--listen-fd`` flag), each with its own event loop, all accepting from the same
kernel queue. The supervisor never accepts a connection; it only owns the processes.

Why one inherited socket rather than ``SO_REUSEPORT`` (one socket per worker): with
``SO_REUSEPORT`` the kernel hashes each new connection to one worker's own queue, and a worker
that closes its listener drops the connections waiting in that queue (unless the
``net.ipv4.tcp_migrate_req`` sysctl is set; it is 0 by default), so every restart refuses or
resets connections. With one shared socket there is one queue: a draining worker stops
accepting and the others keep taking from the queue, and while the supervisor holds the socket
nothing is refused even if every worker is being replaced (clients wait in the backlog). The
price is that the kernel does not balance: whichever worker is free first accepts.

What the supervisor does:

* starts the workers one at a time, each after the previous said it is ready (so their
  start-ups, SQLite's switch to WAL among them, do not race each other);
* restarts a worker that dies, after a back-off that doubles per quick death up to
  ``BACKOFF_MAX``, logging one line with the exit code or signal;
* on SIGHUP replaces the workers one at a time: starts the new one, waits until it is ready,
  then sends SIGTERM to one old worker and waits for it to exit, then the next. An old worker
  closes its copy of the socket and lets its connections finish (``Server.retire``);
* on SIGTERM or SIGINT sends SIGTERM to every worker, waits ``SHUTDOWN_TIMEOUT`` +
  ``KILL_GRACE`` seconds, kills the ones still running and exits 0; a second signal is passed
  on, so the workers stop waiting for running requests.

A worker talks back over a socket pair (``--control-fd``): it writes ``ready`` once it accepts
connections, and it sees the pair close if the supervisor dies, then shuts down instead of
serving on as an orphan. Workers run in process groups of their own, so a Ctrl-C in a terminal
reaches only the supervisor, which passes one SIGTERM on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from config import ConfigError, Settings

__all__ = [
    "BACKOFF_MAX",
    "KILL_GRACE",
    "Supervisor",
    "bind",
    "check_broker",
    "worker_count",
]

log = logging.getLogger("pyasync.supervisor")

BACKLOG = 1024  # connections the kernel queues before a worker accepts them (as server.py)
KILL_GRACE = 5.0  # seconds past SHUTDOWN_TIMEOUT before a worker still running is killed
START_TIMEOUT = 60.0  # seconds a new worker may take to accept connections (hooks, database)
BACKOFF_FIRST = 0.1  # seconds before restarting a worker that died
BACKOFF_MAX = 5.0  # seconds: the back-off doubles per quick death up to this
STABLE_AFTER = 10.0  # seconds: a worker that lived this long starts the back-off afresh


def worker_count(workers: str) -> int:
    """The number of processes the WORKERS setting asks for (``auto``: one per usable CPU)."""
    if workers != "auto":
        return int(workers)
    counter = getattr(os, "process_cpu_count", None)  # Python 3.13+: honours the CPU affinity
    if counter is not None:
        return int(counter() or 1)
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def check_broker(settings: Settings, count: int) -> None:
    """Refuse several workers on the in-process broker.

    Raises:
        ConfigError: ``count`` > 1 with ``BROKER_URL=memory://``: a subscriber on one worker
            would silently miss every message published on another.
    """
    if count > 1 and settings.broker_url.lower().startswith("memory:"):
        raise ConfigError(
            f"WORKERS={settings.workers} needs a broker the workers share: set BROKER_URL to "
            "nats://HOST:4222 or redis://HOST:6379 (with memory:// a subscriber on one worker "
            "misses what is published on another)"
        )


def bind(host: str, port: int) -> socket.socket:
    """One listening TCP socket on the first address ``host`` resolves to, for workers to share.

    Raises:
        OSError: the name does not resolve or the address cannot be bound.
    """
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, address = infos[0]
    return socket.create_server(address[:2], family=family, backlog=BACKLOG)


@dataclass(eq=False)
class Worker:
    """One worker process: ``w<number>`` in the logs, in ``slot`` of the supervisor's N."""

    number: int
    slot: int
    generation: int  # the reload that started it; a later reload replaces it
    process: asyncio.subprocess.Process
    reader: asyncio.StreamReader  # the control pair: "ready", then end of stream at exit
    writer: asyncio.StreamWriter  # held open: its close tells the worker we are gone
    started_at: float
    exited: asyncio.Future[int]
    is_retiring: bool = False  # sent SIGTERM on purpose: its exit is expected

    @property
    def name(self) -> str:
        return f"w{self.number} (pid {self.process.pid})"


class Supervisor:
    """Runs ``count`` workers on ``listener`` until SIGTERM/SIGINT; SIGHUP replaces them.

    Args:
        settings: the validated settings (``SHUTDOWN_TIMEOUT`` bounds each worker's drain).
        listener: the bound, listening socket the workers inherit; closed on exit.
        command: the program and arguments that run one worker, without the internal flags.
        count: the number of workers.
    """

    def __init__(
        self, settings: Settings, listener: socket.socket, command: Sequence[str], count: int
    ) -> None:
        self.settings = settings
        self.listener = listener
        self.command = list(command)
        self.count = count
        self.slots: list[Worker | None] = [None] * count
        self.live: set[Worker] = set()  # every worker process not yet reaped
        self.failures = [0] * count  # quick deaths in a row, per slot
        self.generation = 0  # raised by each SIGHUP
        self.numbers = 0  # the last worker number given
        self.is_stopping = False
        self.stopping = asyncio.Event()
        self.is_reloading = False
        self.reload_again = False
        self.tasks: set[asyncio.Task[None]] = set()  # every task below; all end once stopping
        # Held while a slot changes hands (start, restart, one step of a reload), so that a
        # reload and a restart never both fill one slot.
        self.slot_lock = asyncio.Lock()

    async def run(self) -> int:
        """Start the workers, supervise them until a stop signal, drain them; return 0."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop, signum)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        host, port = self.listener.getsockname()[:2]
        scheme = "TLS" if self.settings.enable_tls else "TCP"
        log.info("listening on %s:%d (%s, %d workers)", host, port, scheme, self.count)
        try:
            self._spawn_task(self._start_all())
            await self.stopping.wait()
            await self._stop_all()
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(signum)
            self.listener.close()
        log.info("stopped")
        return 0

    def stop(self, signum: int = signal.SIGTERM) -> None:
        """First signal: drain every worker. Again: pass it on, so they stop waiting."""
        name = signal.Signals(signum).name
        if self.is_stopping:
            log.warning("%s again: workers stop waiting for running requests", name)
            for worker in self.live:
                _send(worker, signal.SIGTERM)
            return
        log.info("%s received: stopping %d workers", name, len(self.live))
        self.is_stopping = True
        self.stopping.set()

    def reload(self) -> None:
        """SIGHUP: replace every worker, one at a time (once more if asked during a reload)."""
        if self.is_stopping:
            return
        if self.is_reloading:
            self.reload_again = True
            log.info("SIGHUP received during a reload: another one follows")
            return
        log.info("SIGHUP received: replacing %d workers one at a time", self.count)
        self._spawn_task(self._reload())

    # ---- one worker ------------------------------------------------------------------------

    async def _spawn(self, slot: int) -> Worker:
        """Start one worker process for ``slot`` and watch for its exit."""
        self.numbers += 1
        number = self.numbers
        ours, theirs = socket.socketpair()
        try:
            process = await asyncio.create_subprocess_exec(
                *self.command,
                "--listen-fd", str(self.listener.fileno()),
                "--control-fd", str(theirs.fileno()),
                "--worker", str(number),
                pass_fds=(self.listener.fileno(), theirs.fileno()),
                stdin=asyncio.subprocess.DEVNULL,
                process_group=0,  # a terminal's Ctrl-C reaches the supervisor alone
            )  # fmt: skip
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        reader, writer = await asyncio.open_connection(sock=ours)
        loop = asyncio.get_running_loop()
        worker = Worker(
            number, slot, self.generation, process, reader, writer, loop.time(),
            exited=loop.create_future(),
        )  # fmt: skip
        self.live.add(worker)
        self._spawn_task(self._watch(worker))
        log.info("%s started", worker.name)
        if self.is_stopping:  # a stop came while it was being started
            self._spawn_task(self._retire(worker))
        return worker

    async def _wait_ready(self, worker: Worker) -> bool:
        """True once ``worker`` accepts connections; False if it exited or took too long."""
        try:
            async with asyncio.timeout(START_TIMEOUT):
                line = await worker.reader.readline()
        except TimeoutError:
            log.error("%s not ready after %g s", worker.name, START_TIMEOUT)
            return False
        except ConnectionError:
            return False
        return line == b"ready\n"

    async def _watch(self, worker: Worker) -> None:
        """Reap ``worker`` with one log line; restart its slot if it died on its own."""
        code = await worker.process.wait()
        self.live.discard(worker)
        worker.writer.close()
        worker.exited.set_result(code)
        lived = asyncio.get_running_loop().time() - worker.started_at
        if worker.is_retiring or self.is_stopping:
            log.info("%s %s", worker.name, _describe_exit(code))
        elif self.slots[worker.slot] is not worker:
            log.warning("%s %s before it was ready", worker.name, _describe_exit(code))
        else:
            if lived >= STABLE_AFTER:
                self.failures[worker.slot] = 0
            delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** self.failures[worker.slot])
            self.failures[worker.slot] += 1
            log.warning(
                "%s %s after %.1f s; restarting in %g s",
                worker.name, _describe_exit(code), lived, delay,
            )  # fmt: skip
            self._spawn_task(self._restart(worker, delay))

    async def _restart(self, dead: Worker, delay: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self.stopping.wait()
        async with self.slot_lock:
            if self.is_stopping or self.slots[dead.slot] is not dead:
                return  # stopping, or a reload filled the slot meanwhile
            replacement = await self._spawn(dead.slot)
            self.slots[dead.slot] = replacement
        await self._wait_ready(replacement)

    async def _retire(self, worker: Worker) -> None:
        """SIGTERM ``worker`` (once), wait for its drain, kill it after the deadline."""
        if not worker.is_retiring:
            worker.is_retiring = True
            _send(worker, signal.SIGTERM)
        limit = self.settings.shutdown_timeout + KILL_GRACE
        try:
            async with asyncio.timeout(limit):
                await asyncio.shield(worker.exited)
        except TimeoutError:
            log.warning("%s still running %g s after SIGTERM: killing it", worker.name, limit)
            _send(worker, signal.SIGKILL)
            await asyncio.shield(worker.exited)

    # ---- all workers -----------------------------------------------------------------------

    async def _start_all(self) -> None:
        """Start the workers one after the other, each once the previous one is ready."""
        for slot in range(self.count):
            async with self.slot_lock:
                if self.is_stopping:
                    return
                if self.slots[slot] is None:  # else a reload filled it first
                    worker = self.slots[slot] = await self._spawn(slot)
                    await self._wait_ready(worker)

    async def _reload(self) -> None:
        self.is_reloading = True
        try:
            while True:
                self.reload_again = False
                self.generation += 1
                if not await self._replace_all(self.generation) or not self.reload_again:
                    return
        finally:
            self.is_reloading = False

    async def _replace_all(self, generation: int) -> bool:
        """Replace each worker older than ``generation``; False if stopped or one failed."""
        for slot in range(self.count):
            async with self.slot_lock:
                if not await self._replace(slot, generation):
                    return False
        log.info("reload done: %d workers replaced", self.count)
        return True

    async def _replace(self, slot: int, generation: int) -> bool:
        """Start the new worker of ``slot``, once ready retire the old one; False on failure."""
        old = self.slots[slot]
        if self.is_stopping:
            return False
        if old is not None and old.generation >= generation:
            return True  # restarted since the reload began: already new
        new = await self._spawn(slot)
        if not await self._wait_ready(new):
            if not self.is_stopping:
                log.error("reload stopped: %s did not start; the others serve on", new.name)
                await self._retire(new)
            return False
        self.slots[slot] = new
        if old is not None and old in self.live:
            await self._retire(old)
        return True

    async def _stop_all(self) -> None:
        """Drain every worker, including any being started, and wait for every task."""
        self.listener.close()  # the workers hold their own copies until they drain
        while self.tasks:
            for worker in list(self.live):
                if not worker.is_retiring:
                    self._spawn_task(self._retire(worker))
            await asyncio.wait(self.tasks, return_when=asyncio.FIRST_COMPLETED)

    def _spawn_task(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("supervisor task failed", exc_info=task.exception())


def _send(worker: Worker, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # exited meanwhile
        if worker.process.returncode is None:
            worker.process.send_signal(signum)


def _describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
        return f"was killed by signal {-code}"
    return f"exited with code {code}"
