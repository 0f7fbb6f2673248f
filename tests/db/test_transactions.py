"""``db.transaction()`` from ``connect()``, as actions use it, on SQLite, MariaDB and PostgreSQL."""

from __future__ import annotations

import pytest

from database import connect
from server_config import DatabaseSettings
from tests.helpers import running_server


class Abort(Exception):
    """Raised inside a transaction to abandon it."""


async def test_an_exception_rolls_the_transaction_back(db_settings: DatabaseSettings) -> None:
    table = db_settings.kv_table  # created by the server at start-up
    insert = f"INSERT INTO {table} (k, v, version) VALUES ($1, $2, 1)"
    count = f"SELECT count(*) FROM {table} WHERE k = $1"
    async with running_server(db_settings=db_settings):
        with pytest.raises(Abort):
            async with connect() as db, db.transaction():
                await db.execute(insert, "rolled back", b"x")
                assert await db.fetchval(count, "rolled back") == 1  # seen inside
                raise Abort
        async with connect() as db:
            async with db.transaction():
                await db.execute(insert, "committed", b"x")
            assert await db.fetchval(count, "rolled back") == 0
            assert await db.fetchval(count, "committed") == 1
