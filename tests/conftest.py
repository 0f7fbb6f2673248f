"""Shared test set-up: markers from folders, and a guard against unhandled event-loop errors.

Helpers live in ``tests/helpers.py`` (which also says how to skip the slow tests locally).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import ROOT

LAYERS = ("unit", "integration", "db", "e2e")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test with the layer its folder names (tests/unit -> ``unit``)."""
    for item in items:
        parts = Path(str(item.fspath)).relative_to(ROOT / "tests").parts
        if parts and parts[0] in LAYERS:
            item.add_marker(getattr(pytest.mark, parts[0]))


@pytest.fixture(autouse=True)
async def loop_guard(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """Fail an async test whose event loop reported an unhandled exception (debug mode on)."""
    if request.node.get_closest_marker("asyncio") is None:
        yield
        return
    loop = asyncio.get_running_loop()
    loop.set_debug(True)
    loop.slow_callback_duration = 1.0  # debug mode's 0.1 s is noise on a shared CI core
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    yield
    await asyncio.sleep(0)  # let callbacks scheduled by the test's last await run
    loop.set_exception_handler(None)
    assert not errors, f"unhandled event-loop errors: {errors}"
