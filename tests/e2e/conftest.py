"""End-to-end fixtures: ``python server.py`` as a subprocess, and a runner for ``client.py``."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
Completed = subprocess.CompletedProcess[str]
LISTENING = re.compile(r"listening on (\S+):(\d+)")


@dataclass
class ServerProcess:
    """A running ``server.py``; ``stderr_lines`` fills as it logs."""

    process: subprocess.Popen[str]
    port: int
    reader: threading.Thread
    stderr_lines: list[str] = field(default_factory=list)

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


def start_server(
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


def run_server(cwd: Path, *args: str, env: dict[str, str] | None = None) -> Completed:
    """Run ``server.py`` to completion (for commands and start-up failures)."""
    return subprocess.run(
        [sys.executable, str(ROOT / "server.py"), *args],
        cwd=cwd,
        env=env or clean_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )


def run_client(
    *args: str, cwd: Path, env: dict[str, str] | None = None, program: Path | None = None
) -> Completed:
    return subprocess.run(
        [sys.executable, str(program or ROOT / "client.py"), *args],
        cwd=cwd,
        env=env or clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator[ServerProcess]:
    """A plain-TCP server started from an empty folder (no stray .env is read)."""
    server = start_server(tmp_path)
    try:
        yield server
    finally:
        server.stop(signal.SIGKILL)
