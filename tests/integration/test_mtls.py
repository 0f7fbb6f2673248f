"""Client certificates end to end: ``client.py`` as a program against a server in the test.

Every TLS mismatch a person can make ends the CLI with one line that says which, and exit
code 76; the server logs each failed handshake with the peer and counts it. Certificates come
from ``make_certificates`` (what ``server.py --make-cert`` writes), real handshakes throughout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import config
from client import Client
from context import Context
from package import PACKAGE, EchoAnswer, EchoRequest, PingRequest, pack
from protocol import FrameDecoder, encode_frame
from pyasync.client_protocol import TLSMismatch
from pyasync.router import ROUTER, make_route
from pyasync.tls import CertificateFiles, make_certificates
from server import Server
from tests.helpers import Completed, running_server, wait_until
from tests.helpers import run_client_program as run_client_program_sync

PRINCIPAL = "spiffe://example.test/alice"
HANDSHAKE_FAILED = re.compile(r"TLS handshake from 127\.0\.0\.1:\d+ failed: (.*)")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertificateFiles:
    """The server's CA, its certificate for localhost, and a client certificate for PRINCIPAL."""
    return make_certificates(tmp_path_factory.mktemp("certs"), PRINCIPAL)


@pytest.fixture(scope="module")
def stranger(tmp_path_factory: pytest.TempPathFactory) -> CertificateFiles:
    """The same set from a CA the server does not know."""
    return make_certificates(tmp_path_factory.mktemp("stranger"), "mallory")


@pytest.fixture
def principal_echo(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """ECHO answers with the principal of the connection's client certificate."""

    async def echo_principal(request: EchoRequest, ctx: Context) -> EchoAnswer:
        assert ctx.tls is not None
        return EchoAnswer(text=ctx.tls.principal or "(none)")

    route = make_route(PACKAGE.REQUEST_ECHO, echo_principal)
    monkeypatch.setitem(ROUTER.routes, PACKAGE.REQUEST_ECHO, route)
    yield


def mtls_settings(certs: CertificateFiles) -> dict[str, Any]:
    return {
        "enable_tls": True,
        "tls_cert_file": str(certs.cert),
        "tls_key_file": str(certs.key),
        "tls_client_ca_file": str(certs.ca),
    }


def client_flags(certs: CertificateFiles) -> list[str]:
    return ["--cafile", str(certs.ca), "--cert", str(certs.client_cert),
            "--key", str(certs.client_key)]  # fmt: skip


async def run_client(server: Server, *args: str, cwd: Path) -> Completed:
    """``python client.py --port PORT ARGS`` in a thread, while the server runs in this loop."""
    return await asyncio.to_thread(
        run_client_program_sync, "--port", str(server.port), *args, cwd=cwd
    )


def one_line(result: Completed) -> str:
    """The single stderr line of a failed run, checked to be the only one, exit code 76."""
    assert result.returncode == 76, result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    return result.stderr


async def test_the_principal_of_a_client_certificate_reaches_actions(
    certs: CertificateFiles, principal_echo: None, tmp_path: Path
) -> None:
    async with running_server(**mtls_settings(certs)) as server:
        result = await run_client(server, *client_flags(certs), "echo", "x", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert result.stdout == f"{PRINCIPAL}\n"
        assert server.app.stats.tls_handshake_failures == 0


async def test_each_tls_mismatch_is_one_line_and_exit_76(
    certs: CertificateFiles,
    stranger: CertificateFiles,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="pyasync.server")
    async with running_server(**mtls_settings(certs)) as server:
        plain = one_line(await run_client(server, "ping", cwd=tmp_path))
        assert "without answering" in plain and "expects TLS" in plain and "--tls" in plain

        missing = one_line(await run_client(server, "--cafile", str(certs.ca), "ping",
                                            cwd=tmp_path))  # fmt: skip
        assert "requires a client certificate" in missing and "--cert and --key" in missing

        foreign = ["--cert", str(stranger.client_cert), "--key", str(stranger.client_key)]
        rejected = one_line(await run_client(server, "--cafile", str(certs.ca), *foreign, "ping",
                                             cwd=tmp_path))  # fmt: skip
        assert "rejected the client certificate" in rejected
        assert "TLS_CLIENT_CA_FILE" in rejected

        untrusted = one_line(await run_client(server, "--cafile", str(stranger.ca),
                                              *client_flags(certs)[2:], "ping",
                                              cwd=tmp_path))  # fmt: skip
        assert "TLS certificate check failed" in untrusted and "not trusted" in untrusted
        assert "--cafile" in untrusted

        await wait_until(lambda: server.app.stats.tls_handshake_failures == 4)
    reasons = [m.group(1) for r in caplog.records if (m := HANDSHAKE_FAILED.search(r.message))]
    assert all(r.levelno == logging.INFO for r in caplog.records if "handshake" in r.message)
    assert len(reasons) == 4, reasons
    assert reasons[0].startswith("not TLS")
    assert reasons[1].startswith("client sent no certificate")
    assert reasons[2].startswith("client certificate rejected")
    assert reasons[3] == "the client closed the connection during the handshake"


async def test_tls_client_against_a_plain_server_is_one_line(
    certs: CertificateFiles, tmp_path: Path
) -> None:
    async with running_server() as server:
        result = one_line(await run_client(server, *client_flags(certs), "ping", cwd=tmp_path))
        assert "TLS handshake failed" in result and "does not speak TLS" in result
        assert "drop --tls" in result


async def test_silent_client_is_logged_and_counted_after_the_handshake_timeout(
    certs: CertificateFiles, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pyasync.server")
    settings = mtls_settings(certs) | {"tls_handshake_timeout": 0.2}
    async with running_server(**settings) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        async with asyncio.timeout(5):
            assert await reader.read(100) == b""
        writer.close()
        await wait_until(lambda: server.app.stats.tls_handshake_failures == 1)
    assert "failed: no handshake within 0.2 s (TLS_HANDSHAKE_TIMEOUT)" in caplog.text


async def test_client_from_settings_presents_its_certificate(
    certs: CertificateFiles, principal_echo: None
) -> None:
    async with running_server(**mtls_settings(certs)) as server:
        # One set of settings for both sides, as a shared .env gives them.
        shared = mtls_settings(certs) | {"port": server.port, "tls_ca_file": str(certs.ca)}
        client_settings = config.Settings(
            **shared,
            tls_client_cert_file=str(certs.client_cert),
            tls_client_key_file=str(certs.client_key),
        )
        async with Client.from_settings(client_settings) as client:
            assert await client.echo("x") == PRINCIPAL
        async with Client.from_settings(config.Settings(**shared), connect_timeout=5) as client:
            with pytest.raises(TLSMismatch, match="requires a client certificate"):
                await client.ping()


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--cert", "missing.pem"], "client certificate 'missing.pem' cannot be read"),
        (["--cafile", "missing-ca.pem"], "CA file 'missing-ca.pem' cannot be read"),
        (["--cert", "{client_cert}", "--key", "{key}"], "are not a matching PEM certificate"),
        (["--cert", "{ca}", "--key", "{ca}"], "are not a matching PEM certificate"),
        (["--cafile", "{ca_key}"], "holds no PEM certificate"),
    ],
)
def test_bad_tls_files_are_one_line_and_exit_78(
    certs: CertificateFiles, tmp_path: Path, flags: list[str], fragment: str
) -> None:
    paths = {"client_cert": certs.client_cert, "key": certs.key, "ca": certs.ca,
             "ca_key": certs.ca_key}  # fmt: skip
    args = [flag.format(**paths) for flag in flags]
    result = run_client_program_sync("--port", "1", *args, "ping", cwd=tmp_path)
    assert result.returncode == 78, result.stderr
    assert result.stderr.count("\n") == 1 and fragment in result.stderr, result.stderr


async def send_with_the_end_of_the_handshake(
    port: int, context: ssl.SSLContext, payload: bytes, answers: int
) -> int:
    """Handshake over memory BIOs and write ``payload`` in the same segment as the client's
    last handshake flight, so the server reads both at once; return the frames answered."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    decoder, frames = FrameDecoder(), 0
    try:
        async with asyncio.timeout(10):
            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    writer.write(outgoing.read())
                    incoming.write(await reader.read(65536))
            tls.write(payload)  # queued behind the client's Finished, still unsent
            writer.write(outgoing.read())
            while frames < answers:
                data = await reader.read(65536)
                assert data, "the server closed the connection"
                incoming.write(data)
                with contextlib.suppress(ssl.SSLWantReadError):  # all read, or a session ticket
                    while plain := tls.read(1 << 20):  # one record a call; several may have come
                        decoder.feed(plain)
                while decoder.next_frame() is not None:
                    frames += 1
    finally:
        writer.close()
    return frames


async def test_requests_that_come_with_the_end_of_the_handshake_are_answered(
    certs: CertificateFiles,
) -> None:
    ping = pack(PACKAGE.REQUEST_PING, PingRequest())
    payload = b"".join(encode_frame(PACKAGE.REQUEST_PING, i, ping) for i in range(1, 101))
    context = ssl.create_default_context(cafile=str(certs.ca))
    context.load_cert_chain(certs.client_cert, certs.client_key)
    async with running_server(**mtls_settings(certs)) as server:
        assert await send_with_the_end_of_the_handshake(server.port, context, payload, 100) == 100
        await wait_until(lambda: server.app.stats.requests_served == 100)


async def test_shutdown_drops_a_handshake_under_way_without_counting_it(
    certs: CertificateFiles,
) -> None:
    async with running_server(**mtls_settings(certs)) as server:  # handshakes may take 10 s
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        await wait_until(lambda: bool(server._handshakes))
    async with asyncio.timeout(2):
        assert await reader.read(100) == b""
    writer.close()
    assert server.app.stats.tls_handshake_failures == 0
