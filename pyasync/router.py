"""The router: which action serves each request type, and the path one request takes to it.

``actions.py`` fills the default router with its decorators; ``server.py`` looks up a frame's
route once and either answers it inline (a plain-function action) or awaits ``answer()`` in a
task of its own. Bodies go through ``package.unpack``/``package.pack``, the one codec.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from context import App, Context
from package import (
    PACKAGE,
    Body,
    DeadlineExceeded,
    Internal,
    RPCError,
    Unimplemented,
    UnknownPackageType,
    answer_kind_for,
    body_error,
    body_type,
    decoder_for,
    encode_body,
    is_request,
    pack,
    pack_payload,
    unpack,
)
from protocol import Frame, Payload

__all__ = [
    "ROUTER",
    "Action",
    "Answer",
    "AppHook",
    "ConnectionHook",
    "Hooks",
    "Interceptor",
    "Route",
    "Router",
    "error_answer",
    "make_route",
]

log = logging.getLogger("pyasync.router")

Action: TypeAlias = Callable[[Any, Context], Awaitable[Body]] | Callable[[Any, Context], Body]
AppHook: TypeAlias = Callable[[App], Awaitable[None]]
ConnectionHook: TypeAlias = Callable[[Context], Awaitable[None]]
Answer: TypeAlias = tuple[PACKAGE, Payload]  # (answer type, packed body), ready for a frame


class Interceptor:
    """A step every routed request passes: before its action runs and after it is answered.

    Authentication, metrics and access logs subclass this and register with
    ``Router.add_interceptor`` (``@interceptor`` in ``actions.py``). Steps run in the order they
    were added and ``after`` in the reverse order, as gRPC's interceptors do. Both methods are
    plain functions so that an inline action stays inline: keep them to microseconds.
    """

    def before(self, kind: PACKAGE, request: Body, ctx: Context) -> None:
        """Called with the decoded request; raise an ``RPCError`` to answer with it instead.

        Raising stops the request: later steps and the action do not run.
        """

    def after(self, kind: PACKAGE, answer: PACKAGE, ctx: Context, elapsed_s: float) -> None:
        """Called once the answer type is known (``ANSWER_ERROR`` for any failure)."""


@dataclass(frozen=True, slots=True)
class Route:
    """What serving one request type needs, built once when its action is registered."""

    kind: PACKAGE
    answer: PACKAGE
    function: Action
    inline: bool  # a plain function: answered as its frame is decoded, without a task
    decode: Callable[[Payload | memoryview], Body]  # package's decoder of ``kind``
    scopes: frozenset[str] = frozenset()  # what a principal needs to call it (with auth on)
    answer_type: type[Body] = Body  # the body class of ``answer``


@dataclass(slots=True)
class Hooks:
    """Functions the server runs around its life and each connection's, in registration order."""

    startup: list[AppHook] = field(default_factory=list)
    shutdown: list[AppHook] = field(default_factory=list)
    connect: list[ConnectionHook] = field(default_factory=list)
    disconnect: list[ConnectionHook] = field(default_factory=list)


class Router:
    """The action table, the hooks and the interceptors of a server."""

    def __init__(self) -> None:
        self.routes: dict[int, Route] = {}  # request type number -> route
        self.hooks = Hooks()
        self.interceptors: list[Interceptor] = []

    def add(
        self,
        kind: PACKAGE,
        function: Action,
        *,
        scopes: Iterable[str] = (),
        replace: bool = False,
    ) -> None:
        """Make ``function`` the action of request type ``kind``.

        A coroutine function (or an object whose ``__call__`` is one) runs as a task of its
        own, under the request's timeout and ``MAX_IN_FLIGHT``; a plain function runs inline.

        Raises:
            TypeError: ``kind`` is not a request type, or has an action and not ``replace``.
        """
        if not is_request(kind):
            raise TypeError(f"{kind.name} is not a request type; actions serve REQUEST_*")
        if kind in self.routes and not replace:
            name = getattr(self.routes[kind].function, "__name__", "another action")
            raise TypeError(f"{kind.name} already has action {name}")
        self.routes[kind] = make_route(kind, function, scopes)

    def with_interceptors(self, *steps: Interceptor) -> Router:
        """A router sharing this one's actions and hooks, with ``steps`` run after its own
        interceptors: a server's own steps (authentication) stay out of the shared router."""
        router = Router()
        router.routes, router.hooks = self.routes, self.hooks
        router.interceptors = [*self.interceptors, *steps]
        return router

    def add_interceptor(self, step: Interceptor) -> None:
        """Run ``step`` around every request, after the steps added before it."""
        self.interceptors.append(step)

    def check(self) -> None:
        """Prove every request type has an action; the server calls this before it listens.

        Raises:
            TypeError: names each ``REQUEST_*`` without an action.
        """
        missing = [kind.name for kind in PACKAGE if is_request(kind) and kind not in self.routes]
        if missing:
            raise TypeError("no action for " + ", ".join(missing) + " (add one with @action)")

    def route(self, number: int) -> Route:
        """The route of request type ``number``.

        Raises:
            UnknownPackageType: ``number`` is no request type of this server.
            Unimplemented: it is, but has no action.
        """
        route = self.routes.get(number)
        if route is not None:
            return route
        try:
            kind = PACKAGE(number)
        except ValueError:
            raise UnknownPackageType(f"package type {number} is unknown to this server") from None
        if not is_request(kind):
            raise UnknownPackageType(f"{kind.name} ({number}) is not a request type")
        raise Unimplemented(f"{kind.name} has no action on this server")

    def answer_inline(self, route: Route, frame: Frame, ctx: Context) -> Answer:
        """Run a plain-function action now and return its answer; never raises ``Exception``."""
        try:
            request = route.decode(frame.body)
        except Exception as exc:  # the body, not the action: the client's fault
            error = body_error(route.kind, frame.body, exc)
            return self.failure(error, route.kind, frame.request_id, ctx)
        try:
            if not self.interceptors:
                answer = route.function(request, ctx)
                if type(answer) is route.answer_type:  # the common case, checked first
                    return route.answer, encode_body(answer)
                return _answer_of(route, answer)
        except Exception as exc:
            return self.failure(exc, route.kind, frame.request_id, ctx)
        started = time.perf_counter()
        passed: list[Interceptor] = []
        try:
            self._before(passed, route.kind, request, ctx)
            result = _call_inline(route, request, ctx)
        except Exception as exc:
            result = self.failure(exc, route.kind, frame.request_id, ctx)
        _after(passed, route.kind, result[0], ctx, started)
        return result

    async def answer(self, route: Route, frame: Frame, ctx: Context) -> Answer:
        """Run the action of ``route`` and return its answer, never raising an RPC failure.

        The frame is let go once decoded, so that the caller holding no other reference to it
        keeps a large body once (the request), not twice, while the action runs.

        Raises:
            asyncio.CancelledError: the request was cancelled (timeout, disconnect, shutdown).
        """
        request_id = frame.request_id
        started = time.perf_counter() if self.interceptors else 0.0
        passed: list[Interceptor] = []
        try:
            request = unpack(route.kind, frame.body)
            del frame
            if self.interceptors:
                self._before(passed, route.kind, request, ctx)
            answer = route.function(request, ctx)
            if inspect.isawaitable(answer):
                answer = await answer
            result = route.answer, pack_payload(route.answer, answer)
        except Exception as exc:
            result = self.failure(exc, route.kind, request_id, ctx)
        if passed:
            _after(passed, route.kind, result[0], ctx, started)
        return result

    async def unpack_and_process(self, frame: Frame, ctx: Context) -> Answer:
        """Route one request frame, run its action and return the answer, whatever it raises.

        Raises:
            asyncio.CancelledError: the request was cancelled (timeout, disconnect, shutdown).
        """
        try:
            route = self.route(frame.kind)
        except RPCError as exc:
            return error_answer(exc)
        return await self.answer(route, frame, ctx)

    def _before(
        self, passed: list[Interceptor], kind: PACKAGE, request: Body, ctx: Context
    ) -> None:
        """Run the ``before`` steps in order, noting in ``passed`` those whose ``after`` is due."""
        for step in self.interceptors:
            step.before(kind, request, ctx)
            passed.append(step)

    @staticmethod
    def failure(exc: Exception, kind: int, request_id: int, ctx: Context) -> Answer:
        """The error answer for an exception an action (or routing) raised.

        An ``RPCError`` is the client's answer as it is; anything else is the server's fault:
        logged with its traceback and answered ``INTERNAL`` without details.
        """
        if isinstance(exc, RPCError):
            return error_answer(exc)
        if isinstance(exc, TimeoutError):
            return error_answer(DeadlineExceeded("an operation inside the action timed out"))
        log.error(
            "c%d request %d (type %d) failed",
            ctx.connection_id, request_id, kind, exc_info=exc,
        )  # fmt: skip
        return error_answer(
            Internal(f"the server failed on request {request_id}; its log has details")
        )


def make_route(kind: PACKAGE, function: Action, scopes: Iterable[str] = ()) -> Route:
    """The route serving request type ``kind`` with ``function`` (see ``Router.add``)."""
    is_async = inspect.iscoroutinefunction(function) or inspect.iscoroutinefunction(
        getattr(function, "__call__", None)  # noqa: B004  # an async __call__ counts
    )
    answer = answer_kind_for(kind)
    return Route(
        kind, answer, function, not is_async, decoder_for(kind), frozenset(scopes),
        body_type(answer),
    )  # fmt: skip


def error_answer(error: RPCError) -> Answer:
    """The ``ANSWER_ERROR`` package for ``error``."""
    return PACKAGE.ANSWER_ERROR, pack(PACKAGE.ANSWER_ERROR, error.to_answer())


def _after(
    steps: list[Interceptor], kind: PACKAGE, answer: PACKAGE, ctx: Context, started: float
) -> None:
    elapsed = time.perf_counter() - started
    for step in reversed(steps):
        try:
            step.after(kind, answer, ctx, elapsed)
        except Exception:
            log.exception("c%d interceptor %s failed after %s", ctx.connection_id,
                          type(step).__name__, kind.name)  # fmt: skip


def _call_inline(route: Route, request: Body, ctx: Context) -> Answer:
    return _answer_of(route, route.function(request, ctx))


def _answer_of(route: Route, answer: object) -> Answer:
    """The answer of an inline action: its body packed (``TypeError`` for a wrong class)."""
    if inspect.isawaitable(answer):
        _close(answer)
        raise TypeError(f"{route.kind.name}'s plain-function action returned an awaitable")
    return route.answer, pack(route.answer, answer)  # type: ignore[arg-type]


def _close(awaitable: object) -> None:
    close = getattr(awaitable, "close", None)  # a coroutine never started: no effect happened
    if close is not None:
        close()


ROUTER = Router()  # the server's router unless it is given another; actions.py fills it
