"""Key-value requests with integers past 64 bits are refused alike on every backend."""

from __future__ import annotations

import msgspec
import pytest

from client import Client
from package import (
    PACKAGE,
    Conflict,
    ErrorAnswer,
    ErrorCode,
    KvDeleteAnswer,
    KvDeleteRequest,
    KvPutAnswer,
    KvPutRequest,
    unpack,
)

MAX_VERSION = 2**63 - 1
OUT_OF_RANGE = [2**63, 2**64 - 1, -1, -(2**63)]
KINDS: dict[str, tuple[PACKAGE, dict[str, object]]] = {
    "put": (PACKAGE.REQUEST_KV_PUT, {"key": "k", "value": b"v"}),
    "delete": (PACKAGE.REQUEST_KV_DELETE, {"key": "k"}),
}


@pytest.mark.parametrize("kind", KINDS.keys())
async def test_an_expected_version_past_64_bits_is_invalid_and_named(
    kv_client: Client, kind: str
) -> None:
    """Sent as raw MessagePack, so nothing on the client side narrows the number first."""
    request_kind, fields = KINDS[kind]
    for expected in OUT_OF_RANGE:
        payload = msgspec.msgpack.encode({**fields, "expected_version": expected})
        frame = await kv_client.request_raw(request_kind, payload, timeout=10)
        assert frame.kind == PACKAGE.ANSWER_ERROR, (kind, expected)
        error = unpack(PACKAGE.ANSWER_ERROR, frame.body)
        assert isinstance(error, ErrorAnswer)
        assert error.code == ErrorCode.INVALID_ARGUMENT, (kind, expected, error)
        assert "expected_version" in error.message, error.message


async def test_the_largest_version_is_a_valid_question(kv_client: Client) -> None:
    created = await kv_client.request(PACKAGE.REQUEST_KV_PUT, KvPutRequest(key="k", value=b"v"))
    assert created == KvPutAnswer(version=1)
    with pytest.raises(Conflict, match="not at version 9223372036854775807"):
        await kv_client.request(
            PACKAGE.REQUEST_KV_PUT, KvPutRequest(key="k", value=b"w", expected_version=MAX_VERSION)
        )
    with pytest.raises(Conflict):
        await kv_client.request(
            PACKAGE.REQUEST_KV_DELETE, KvDeleteRequest(key="k", expected_version=MAX_VERSION)
        )
    missing = KvDeleteRequest(key="missing", expected_version=MAX_VERSION)
    assert await kv_client.request(PACKAGE.REQUEST_KV_DELETE, missing) == KvDeleteAnswer(
        deleted=False
    )
