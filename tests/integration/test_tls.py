"""TLS with certificates made in the test (trustme): handshakes, mismatches, client certs."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any

import pytest
import trustme

import config
from client import Client, ConnectionClosed
from context import Context
from package import PACKAGE, EchoAnswer, EchoRequest
from pyasync.client_protocol import TLSMismatch
from pyasync.router import ROUTER, make_route
from pyasync.tls import build_server_ssl_context
from tests.helpers import RawConnection, running_server, wait_until
from utils import resolve_client_ssl_context


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_files(ca: trustme.CA, tmp_path: Path) -> dict[str, Any]:
    """Settings for a TLS server whose certificate names 127.0.0.1 and localhost."""
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    return {
        "tls_cert_file": str(tmp_path / "cert.pem"),
        "tls_key_file": str(tmp_path / "key.pem"),
        "ca": str(tmp_path / "ca.pem"),
    }


async def test_requests_over_tls_see_the_session(
    tls_files: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def tls_version(request: EchoRequest, ctx: Context) -> EchoAnswer:
        assert ctx.tls is not None
        return EchoAnswer(text=ctx.tls.version)

    monkeypatch.setitem(
        ROUTER.routes, PACKAGE.REQUEST_ECHO, make_route(PACKAGE.REQUEST_ECHO, tls_version)
    )
    ca_file = tls_files.pop("ca")
    async with running_server(enable_tls=True, **tls_files) as server:
        context = resolve_client_ssl_context(cafile=ca_file)
        async with Client("127.0.0.1", server.port, ssl=context) as client:
            answer = await client.request(PACKAGE.REQUEST_ECHO, EchoRequest(text="x"))
            assert isinstance(answer, EchoAnswer) and answer.text in ("TLSv1.2", "TLSv1.3")
            assert await client.ping() > 0


async def test_plain_client_against_tls_server_fails_cleanly(tls_files: dict[str, Any]) -> None:
    tls_files.pop("ca")
    async with running_server(enable_tls=True, **tls_files) as server:
        async with Client("127.0.0.1", server.port, connect_timeout=2) as client:
            with pytest.raises(ConnectionClosed, match="TLS"):
                await client.request(PACKAGE.REQUEST_PING, timeout=5)


async def test_tls_client_against_plain_server_fails(ca: trustme.CA) -> None:
    async with running_server() as plain:
        context = ssl.create_default_context()
        ca.configure_trust(context)
        with pytest.raises(ssl.SSLError):
            await Client("127.0.0.1", plain.port, ssl=context, connect_timeout=5).connect()


async def test_wrong_ca_fails_the_certificate_check(tls_files: dict[str, Any]) -> None:
    tls_files.pop("ca")
    async with running_server(enable_tls=True, **tls_files) as server:
        stranger = ssl.create_default_context()
        trustme.CA().configure_trust(stranger)
        with pytest.raises(ssl.SSLCertVerificationError):
            await Client("127.0.0.1", server.port, ssl=stranger, connect_timeout=5).connect()


async def test_silent_tcp_client_is_dropped_after_the_handshake_timeout(
    tls_files: dict[str, Any],
) -> None:
    tls_files.pop("ca")
    async with running_server(enable_tls=True, tls_handshake_timeout=0.3, **tls_files) as server:
        raw = await RawConnection.open(server.port)
        async with asyncio.timeout(5):
            assert await raw.reader.read(100) == b""
        await raw.close()


def test_missing_certificate_stops_startup_with_one_line(tmp_path: Path) -> None:
    settings = config.Settings(
        enable_tls=True,
        tls_cert_file=str(tmp_path / "missing.pem"),
        tls_key_file=str(tmp_path / "missing-key.pem"),
    )
    with pytest.raises(config.ConfigError) as raised:
        build_server_ssl_context(settings)
    message = str(raised.value)
    assert "TLS_CERT_FILE" in message and "missing.pem" in message and "\n" not in message


async def test_client_certificates_when_required(
    ca: trustme.CA, tls_files: dict[str, Any], tmp_path: Path
) -> None:
    ca_file = tls_files.pop("ca")
    client_cert = ca.issue_cert("client@example.test")
    client_cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "client.pem"))
    async with running_server(enable_tls=True, tls_client_ca_file=ca_file, **tls_files) as server:
        with_cert = resolve_client_ssl_context(
            cafile=ca_file, certfile=str(tmp_path / "client.pem")
        )
        async with Client("127.0.0.1", server.port, ssl=with_cert) as client:
            assert await client.ping() > 0
        without = resolve_client_ssl_context(cafile=ca_file)
        with pytest.raises(TLSMismatch, match="requires a client certificate"):
            async with Client("127.0.0.1", server.port, ssl=without, connect_timeout=5) as client:
                await client.request(PACKAGE.REQUEST_PING, timeout=5)
        await wait_until(lambda: server.app.stats.tls_handshake_failures == 1)
