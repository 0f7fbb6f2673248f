"""Package types, bodies, error codes and action routing, without a network."""

from __future__ import annotations

import types
import typing
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import actions
import config
import package
from context import App, Context
from package import (
    PACKAGE,
    Body,
    EchoAnswer,
    EchoRequest,
    ErrorAnswer,
    ErrorCode,
    InvalidArgument,
    PingRequest,
    RPCError,
    ServerInfoAnswer,
    UnknownRemoteError,
    answer_kind_for,
    body_type,
    is_request,
    unpack,
)
from protocol import Frame
from pyasync.router import ROUTER, Interceptor, Router, make_route

REQUESTS = [kind for kind in PACKAGE if is_request(kind)]


def test_every_request_has_its_answer_and_every_type_a_body() -> None:
    assert REQUESTS
    for kind in REQUESTS:
        answer = answer_kind_for(kind)
        assert answer.name == kind.name.replace("REQUEST_", "ANSWER_", 1)
    for kind in PACKAGE:
        assert issubclass(body_type(kind), Body)
    assert package._check_packages() == {kind: answer_kind_for(kind) for kind in REQUESTS}


def test_a_second_body_for_one_type_is_refused() -> None:
    with pytest.raises(TypeError, match="REQUEST_ECHO already has body EchoRequest"):

        @package.body(PACKAGE.REQUEST_ECHO)
        class Another(Body, frozen=True, kw_only=True):
            pass


def test_every_request_has_an_action() -> None:
    actions.check_actions()
    assert set(REQUESTS) <= set(ROUTER.routes)


def test_actions_only_serve_new_request_types() -> None:
    async def handler(request: Any, ctx: Context) -> Body:
        raise AssertionError

    with pytest.raises(TypeError, match="not a request type"):
        actions.action(PACKAGE.ANSWER_ECHO)(handler)
    with pytest.raises(TypeError, match="already has action"):
        actions.action(PACKAGE.REQUEST_ECHO)(handler)


WIRE_INT = st.integers(-(2**63), 2**63 - 1)  # MessagePack carries 64-bit integers


def wire_values(tp: Any) -> st.SearchStrategy[Any]:
    """Values of type ``tp`` that MessagePack can carry, nested structs included."""
    scalars = st.one_of(st.none(), st.booleans(), WIRE_INT, st.text())
    if tp is int or tp == package.Int64:
        return WIRE_INT
    if tp == dict[str, Any]:  # free-form maps: draw plain scalar values
        return st.dictionaries(st.text(), scalars)
    if typing.get_origin(tp) is dict:
        return st.dictionaries(st.text(), wire_values(typing.get_args(tp)[1]), max_size=3)
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        fields = {f.name: wire_values(f.type) for f in msgspec.structs.fields(tp)}
        return st.builds(tp, **fields)
    if typing.get_origin(tp) is list:
        return st.lists(wire_values(typing.get_args(tp)[0]), max_size=3)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return st.one_of([wire_values(arg) for arg in typing.get_args(tp)])
    return st.from_type(tp)


def any_body(kind: PACKAGE) -> st.SearchStrategy[Body]:
    """Bodies of ``kind`` with any field values MessagePack can carry."""
    return wire_values(body_type(kind))


@settings(max_examples=20, deadline=None)
@given(
    st.sampled_from(list(PACKAGE)).flatmap(lambda kind: st.tuples(st.just(kind), any_body(kind)))
)
def test_every_body_round_trips(case: tuple[PACKAGE, Body]) -> None:
    kind, value = case
    packed = package.pack(kind, value)
    decoded = package.unpack(kind, packed)
    assert type(decoded) is type(value)
    assert package.pack(kind, decoded) == packed  # bytewise: NaN != NaN as a value


def test_invalid_bodies_name_the_problem() -> None:
    with pytest.raises(package.InvalidArgument, match=r"Expected `str \| null`, got `int`"):
        package.unpack(PACKAGE.REQUEST_ECHO, msgspec.msgpack.encode({"text": 5}))
    with pytest.raises(package.InvalidArgument, match="invalid REQUEST_CHANGE_QUESTION_MARK"):
        package.unpack(PACKAGE.REQUEST_CHANGE_QUESTION_MARK, b"\x80")
    with pytest.raises(TypeError, match="REQUEST_ECHO carries EchoRequest, not EchoAnswer"):
        package.pack(PACKAGE.REQUEST_ECHO, EchoAnswer(text="x"))


def test_each_error_code_has_one_class_and_travels_back() -> None:
    for code in ErrorCode:
        cls = RPCError._by_code[code]
        error = cls("went wrong", hint="do this")
        rebuilt = package.error_from_answer(error.to_answer())
        assert type(rebuilt) is cls and rebuilt.message == "went wrong"
        assert str(rebuilt) == f"{code.name}: went wrong (do this)"
    unknown = package.error_from_answer(ErrorAnswer(code=4242, message="new"))
    assert isinstance(unknown, UnknownRemoteError) and str(unknown) == "error 4242: new"


# ---- unpack_and_process without a network -----------------------------------------------------


@pytest.fixture
def ctx() -> Context:
    return Context(app=App(config.Settings()), connection_id=1)


def request_frame(kind: int, value: Body | bytes) -> Frame:
    body = value if isinstance(value, bytes) else package.pack(PACKAGE(kind), value)
    return Frame(kind, 1, body)


async def error_of(frame: Frame, ctx: Context) -> ErrorAnswer:
    kind, body = await actions.unpack_and_process(frame, ctx)
    assert kind == PACKAGE.ANSWER_ERROR
    answer = package.unpack(PACKAGE.ANSWER_ERROR, body)
    assert isinstance(answer, ErrorAnswer)
    return answer


async def test_routing_answers_with_the_paired_type(ctx: Context) -> None:
    kind, body = await actions.unpack_and_process(
        request_frame(PACKAGE.REQUEST_ECHO, EchoRequest(text="a")), ctx
    )
    assert kind == PACKAGE.ANSWER_ECHO
    assert package.unpack(kind, body) == EchoAnswer(text="a")
    kind, body = await actions.unpack_and_process(
        request_frame(PACKAGE.REQUEST_SERVER_INFO, b"\x80"), ctx
    )
    info = package.unpack(PACKAGE.ANSWER_SERVER_INFO, body)
    assert isinstance(info, ServerInfoAnswer) and info.config["port"] == 1145


async def test_routing_errors(ctx: Context, monkeypatch: pytest.MonkeyPatch) -> None:
    unknown = await error_of(Frame(999, 1, b"\x80"), ctx)
    assert unknown.code == ErrorCode.UNKNOWN_PACKAGE_TYPE
    answer_type = await error_of(Frame(PACKAGE.ANSWER_PING, 1, b"\x80"), ctx)
    assert answer_type.code == ErrorCode.UNKNOWN_PACKAGE_TYPE
    invalid = await error_of(Frame(PACKAGE.REQUEST_ECHO, 1, b"\xc1"), ctx)
    assert invalid.code == ErrorCode.INVALID_ARGUMENT

    async def times_out(request: EchoRequest, ctx: Context) -> EchoAnswer:
        raise TimeoutError

    monkeypatch.setitem(
        ROUTER.routes, PACKAGE.REQUEST_ECHO, make_route(PACKAGE.REQUEST_ECHO, times_out)
    )
    timeout = await error_of(request_frame(PACKAGE.REQUEST_ECHO, EchoRequest(text="x")), ctx)
    assert timeout.code == ErrorCode.DEADLINE_EXCEEDED

    async def wrong_answer(request: EchoRequest, ctx: Context) -> Body:
        return ErrorAnswer(code=1, message="not an echo")

    monkeypatch.setitem(
        ROUTER.routes, PACKAGE.REQUEST_ECHO, make_route(PACKAGE.REQUEST_ECHO, wrong_answer)
    )
    internal = await error_of(request_frame(PACKAGE.REQUEST_ECHO, EchoRequest(text="x")), ctx)
    assert internal.code == ErrorCode.INTERNAL and "log has details" in internal.message


def test_plain_actions_run_inline_and_coroutines_never_do(
    ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    echo = request_frame(PACKAGE.REQUEST_ECHO, EchoRequest(text="now"))
    assert ROUTER.route(PACKAGE.REQUEST_ECHO).inline
    assert not ROUTER.route(PACKAGE.REQUEST_KV_GET).inline
    answered = ROUTER.answer_inline(ROUTER.route(PACKAGE.REQUEST_ECHO), echo, ctx)
    assert package.unpack(*answered) == EchoAnswer(text="now")
    with pytest.raises(package.UnknownPackageType):
        ROUTER.route(999)

    calls: list[str] = []

    class AsyncCallable:  # not a coroutine function, yet calling it makes a coroutine
        async def __call__(self, request: EchoRequest, ctx: Context) -> EchoAnswer:
            calls.append("ran")
            return EchoAnswer(text="later")

    assert not make_route(PACKAGE.REQUEST_ECHO, AsyncCallable()).inline  # runs in a task


async def test_interceptors_see_every_request_in_order_and_may_refuse(ctx: Context) -> None:
    router = Router()
    router.add(PACKAGE.REQUEST_ECHO, lambda request, ctx: EchoAnswer(text=request.text))
    events: list[str] = []

    class Step(Interceptor):
        def __init__(self, name: str, refuse: bool = False) -> None:
            self.name, self.refuse = name, refuse

        def before(self, kind: PACKAGE, request: Body, ctx: Context) -> None:
            events.append(f"{self.name} before {kind.name}")
            if self.refuse:
                raise package.PermissionDenied("not you")

        def after(self, kind: PACKAGE, answer: PACKAGE, ctx: Context, elapsed_s: float) -> None:
            assert elapsed_s >= 0
            events.append(f"{self.name} after {answer.name}")

    router.add_interceptor(Step("a"))
    router.add_interceptor(Step("b"))
    echo = request_frame(PACKAGE.REQUEST_ECHO, EchoRequest(text="x"))
    kind, _ = await router.unpack_and_process(echo, ctx)
    assert kind == PACKAGE.ANSWER_ECHO
    assert events == [
        "a before REQUEST_ECHO", "b before REQUEST_ECHO", "b after ANSWER_ECHO",
        "a after ANSWER_ECHO",
    ]  # fmt: skip
    events.clear()
    router.interceptors.insert(1, Step("stop", refuse=True))
    kind, body = router.answer_inline(router.route(PACKAGE.REQUEST_ECHO), echo, ctx)
    error = package.unpack(PACKAGE.ANSWER_ERROR, body)
    assert isinstance(error, ErrorAnswer) and error.code == ErrorCode.PERMISSION_DENIED
    assert events == ["a before REQUEST_ECHO", "stop before REQUEST_ECHO", "a after ANSWER_ERROR"]


def test_unknown_keys_are_skipped_unread_but_must_be_complete() -> None:
    """As PROTOCOL.md says: an unknown key's text is not checked, its value must be whole."""
    assert unpack(PACKAGE.REQUEST_PING, bytes.fromhex("81 a2fffe 01")) == PingRequest()
    assert unpack(PACKAGE.REQUEST_PING, bytes.fromhex("81 a178 a2fffe")) == PingRequest()
    with pytest.raises(InvalidArgument, match="truncated"):
        unpack(PACKAGE.REQUEST_PING, bytes.fromhex("81 a178 92 01"))
    # The keys of a map[str, int] field are text the server reads: checked.
    positions = bytes.fromhex("82 a5 746f706963 a3 612e2a a9 706f736974696f6e73 81 a2fffe 01")
    with pytest.raises(InvalidArgument, match="UTF-8"):
        unpack(PACKAGE.REQUEST_SUBSCRIBE, positions)
