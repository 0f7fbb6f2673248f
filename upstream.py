"""Calls from an action to another pyasync server: ``async with upstream("billing") as billing:``.

Upstreams are named in the ``UPSTREAMS`` setting (``billing=10.0.0.5:1145,10.0.0.6:1145``). Each
name has one client shared by every request of this server (a connection carries any number of
concurrent requests), connected on first use, failing over between its endpoints, and replacing a
broken connection instead of handing it out again. A call made while serving a request gets what
is left of that request's deadline, so the upstream stops working when the caller's client has
stopped waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from client import Client
from config import Settings, parse_upstreams
from context import REQUEST_DEADLINE, current_app
from package import PACKAGE, Body, DeadlineExceeded, NotFound, Unavailable

__all__ = ["Upstream", "Upstreams", "upstream"]


class Upstream:
    """A borrowed upstream client whose calls fit in the current request's deadline."""

    def __init__(self, client: Client) -> None:
        self.client = client

    async def request(self, kind: PACKAGE, body: Body | None = None) -> Body:
        """Send one request upstream; see ``Client.request``.

        Raises:
            DeadlineExceeded: the incoming request's deadline has passed (or passes meanwhile).
        """
        timeout = self.client.timeout
        deadline = REQUEST_DEADLINE.get()
        if deadline is not None:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise DeadlineExceeded("no time left of the request's deadline for an upstream")
            timeout = left if timeout is None else min(timeout, left)
        return await self.client.request(kind, body, timeout=timeout)


class Upstreams:
    """The named upstreams of one server; ``close()`` at shutdown."""

    def __init__(self, settings: Settings) -> None:
        self.endpoints = parse_upstreams(settings.upstreams)
        self.settings = settings
        self.clients: dict[str, Client] = {}
        self._lock = asyncio.Lock()

    async def client(self, name: str) -> Client:
        """The connected client of upstream ``name``.

        Raises:
            NotFound: no upstream of that name is configured.
            Unavailable: no endpoint of it answers (refused, unreachable, TLS).
        """
        client = self.clients.get(name)
        if client is not None:
            return client
        if name not in self.endpoints:
            raise NotFound(f"no upstream named {name!r}", hint="declare it in UPSTREAMS")
        async with self._lock:
            if name not in self.clients:
                client = Client(
                    endpoints=self.endpoints[name],
                    connect_timeout=self.settings.connect_timeout,
                    timeout=self.settings.request_timeout,
                    max_frame_size=self.settings.max_frame_size,
                )
                try:
                    await client.connect()
                except (OSError, TimeoutError) as exc:
                    raise Unavailable(f"upstream {name!r} unreachable: {exc}") from None
                self.clients[name] = client
        return self.clients[name]

    async def close(self) -> None:
        await asyncio.gather(*(client.close() for client in self.clients.values()))
        self.clients.clear()


@contextlib.asynccontextmanager
async def upstream(name: str) -> AsyncIterator[Upstream]:
    """Borrow the client of upstream ``name`` for the block (from an action or a hook).

    Raises:
        NotFound: no upstream of that name is configured.
        Unavailable: none of its endpoints answers.
    """
    upstreams = current_app().upstreams
    if upstreams is None:
        raise NotFound(f"no upstream named {name!r}", hint="declare it in UPSTREAMS")
    yield Upstream(await upstreams.client(name))
