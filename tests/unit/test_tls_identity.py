"""Client certificates as identity, and TLS failures in words: no sockets.

How a verified certificate names its principal, the files ``make_certificates`` writes, and the
one line (exit 76) each TLS failure gets.
"""

from __future__ import annotations

import ssl
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from config import ConfigError
from context import TLSInfo
from pyasync.client_protocol import TLSMismatch
from pyasync.tls import (
    describe_handshake_failure,
    describe_tls_rejection,
    make_certificates,
    principal_from_certificate,
)
from utils import EXIT_PROTOCOL, describe_error, resolve_client_ssl_context


def peer_certificate(*names: tuple[str, str], common_name: str | None = "cn") -> dict[str, Any]:
    """A certificate as ``getpeercert()`` gives it, with these subject alternative names."""
    cert: dict[str, Any] = {"subject": ((("organizationName", "Example"),),)}
    if common_name is not None:
        cert["subject"] += ((("commonName", common_name),),)
    if names:
        cert["subjectAltName"] = names
    return cert


@pytest.mark.parametrize(
    ("certificate", "principal"),
    [
        (peer_certificate(("DNS", "a.test"), ("URI", "spiffe://t/x"), ("email", "e@t")),
         "spiffe://t/x"),
        (peer_certificate(("email", "e@t"), ("DNS", "a.test"), ("DNS", "b.test")), "a.test"),
        (peer_certificate(("IP Address", "10.0.0.1"), ("email", "e@t")), "e@t"),
        (peer_certificate(("IP Address", "10.0.0.1")), "cn"),
        (peer_certificate(), "cn"),
        (peer_certificate(common_name=None), None),
        ({}, None),
        (None, None),
    ],
)  # fmt: skip
def test_principal_is_the_first_uri_then_dns_then_email_then_common_name(
    certificate: dict[str, Any] | None, principal: str | None
) -> None:
    assert principal_from_certificate(certificate) == principal


def test_tls_info_takes_its_principal_from_the_certificate() -> None:
    cert = peer_certificate(("DNS", "worker-7"))
    assert TLSInfo("TLSv1.3", "X", cert).principal == "worker-7"
    assert TLSInfo("TLSv1.3", "X", None).principal is None
    assert TLSInfo("TLSv1.3", "X", cert, principal="given").principal == "given"


@pytest.mark.parametrize(
    ("name", "san_type"),
    [
        ("client", x509.DNSName),
        ("alice@example.test", x509.RFC822Name),
        ("spiffe://example.test/ns/default/sa/worker", x509.UniformResourceIdentifier),
    ],
)
def test_make_certificates_names_the_client_as_principal(
    tmp_path: Path, name: str, san_type: type[x509.GeneralName]
) -> None:
    files = make_certificates(tmp_path / "certs", name)
    for private in (files.ca_key, files.key, files.client_key):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    client = x509.load_pem_x509_certificate(files.client_cert.read_bytes())
    assert client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == name
    alternative = client.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert alternative.get_values_for_type(san_type) == [name]  # type: ignore[arg-type]
    usage = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    server = x509.load_pem_x509_certificate(files.cert.read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert {str(ip) for ip in names.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    ca = x509.load_pem_x509_certificate(files.ca.read_bytes())
    server.verify_directly_issued_by(ca)
    client.verify_directly_issued_by(ca)


def test_make_certificates_resets_the_mode_of_an_existing_key_file(tmp_path: Path) -> None:
    (tmp_path / "client-key.pem").write_text("old")
    (tmp_path / "client-key.pem").chmod(0o644)
    files = make_certificates(tmp_path)
    assert stat.S_IMODE(files.client_key.stat().st_mode) == 0o600


@pytest.mark.parametrize("name", ["", "two words", "naïve", "tab\there"])
def test_a_client_name_that_cannot_be_a_principal_is_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError, match="client name must be ASCII"):
        make_certificates(tmp_path, name)
    assert not list(tmp_path.iterdir())  # nothing half-written


def ssl_error(reason: str) -> ssl.SSLError:
    error = ssl.SSLError(1, f"[SSL: {reason}] ...")
    error.reason = reason
    return error


@pytest.mark.parametrize(
    ("error", "fragments"),
    [
        (ssl_error("WRONG_VERSION_NUMBER"), ["does not speak TLS", "drop --tls"]),
        (ssl_error("TLSV13_ALERT_CERTIFICATE_REQUIRED"),
         ["requires a client certificate", "certificate required", "--cert and --key"]),
        (ssl_error("TLSV1_ALERT_UNKNOWN_CA"),
         ["rejected the client certificate", "unknown ca", "TLS_CLIENT_CA_FILE"]),
        (ssl_error("SSLV3_ALERT_BAD_CERTIFICATE"), ["rejected the client certificate"]),
        (ssl.SSLEOFError(8, "EOF occurred"), ["closed the connection during it", "--cert"]),
        (TLSMismatch("the server at h:1 rejected the client certificate"), ["rejected"]),
    ],
)  # fmt: skip
def test_tls_failures_say_which_with_exit_76(error: BaseException, fragments: list[str]) -> None:
    message, code = describe_error(error)
    assert code == EXIT_PROTOCOL and "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_a_bare_close_after_the_handshake_says_missing_or_rejected() -> None:
    missing = describe_tls_rejection(None, presents_certificate=False)
    rejected = describe_tls_rejection(ConnectionResetError(), presents_certificate=True)
    unknown = describe_tls_rejection(None, presents_certificate=None)
    assert "requires a client certificate" in missing and "--cert" in missing
    assert "rejected the client certificate" in rejected and "TLS_CLIENT_CA_FILE" in rejected
    assert "requires a client certificate signed by a CA it trusts" in unknown
    assert describe_tls_rejection(ssl_error("DECRYPTION_FAILED"), presents_certificate=True) == ""


@pytest.mark.parametrize(
    ("error", "start"),
    [
        (ssl_error("PEER_DID_NOT_RETURN_A_CERTIFICATE"), "client sent no certificate"),
        (ssl_error("HTTP_REQUEST"), "not TLS"),
        (ssl_error("TLSV1_ALERT_UNKNOWN_CA"), "the client refused the server's certificate"),
        (ConnectionAbortedError("SSL handshake is taking longer"), "no handshake within 2 s"),
        (ConnectionResetError(), "the client closed the connection during the handshake"),
    ],
)
def test_handshake_failures_in_the_server_log(error: BaseException, start: str) -> None:
    assert describe_handshake_failure(error, 2.0).startswith(start)


def test_client_contexts_refuse_files_they_cannot_use(tmp_path: Path) -> None:
    files = make_certificates(tmp_path)
    assert resolve_client_ssl_context() is None
    context = resolve_client_ssl_context(
        cafile=str(files.ca), certfile=str(files.client_cert), keyfile=str(files.client_key)
    )
    assert context is not None and context.verify_mode == ssl.CERT_REQUIRED
    with pytest.raises(ConfigError, match="client key .* cannot be read"):
        resolve_client_ssl_context(certfile=str(files.client_cert), keyfile="nope.pem")
    with pytest.raises(ConfigError, match="not a matching PEM certificate and unencrypted key"):
        resolve_client_ssl_context(certfile=str(files.client_cert))  # the key is elsewhere
