"""Database fixtures: the same suite on SQLite, MariaDB and PostgreSQL.

Each test gets its own table, dropped afterwards, so runs can repeat; ``tests/helpers.py`` says
where the databases are looked for.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from client import Client
from server_config import DatabaseSettings
from tests.helpers import BACKENDS, drop_table, require_reachable, running_server, settings_for


@pytest.fixture(params=BACKENDS)
async def db_settings(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[DatabaseSettings]:
    settings = settings_for(request.param, tmp_path)
    await require_reachable(settings)
    yield settings
    await drop_table(settings)


@pytest.fixture
async def kv_client(db_settings: DatabaseSettings) -> AsyncIterator[Client]:
    async with running_server(db_settings=db_settings) as server:
        async with Client("127.0.0.1", server.port, timeout=10) as client:
            yield client
