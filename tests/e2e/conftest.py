"""End-to-end fixtures: ``python server.py`` as a subprocess."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import ServerProcess, start_server_process


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator[ServerProcess]:
    """A plain-TCP server started from an empty folder (no stray .env is read)."""
    server = start_server_process(tmp_path)
    try:
        yield server
    finally:
        server.stop(signal.SIGKILL)
