"""TLS: the server's context and handshakes, certificates for testing, and TLS failures in words.

The server runs each handshake itself (``TLSHandshake``) so that a failed one is logged and
counted with the peer's address; a client certificate it verified names a principal
(``principal_from_certificate``). ``make_certificates`` writes a CA with a server and a client
certificate for local use. ``describe_tls_error`` and ``describe_handshake_failure`` turn TLS
failures into one line for the client's user and the server's log.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import ssl
import weakref
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from config import ConfigError, Settings

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

__all__ = [
    "CertificateFiles",
    "TLSHandshake",
    "build_server_ssl_context",
    "describe_handshake_failure",
    "describe_tls_error",
    "describe_tls_rejection",
    "make_certificates",
    "make_self_signed_cert",
    "note_client_certificate",
    "presents_client_certificate",
    "principal_from_certificate",
]


# ---- the server's context ---------------------------------------------------------------------


def build_server_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The server's TLS context, or None when ``ENABLE_TLS`` is off.

    Raises:
        ConfigError: a certificate, key or CA file is missing, unreadable or not valid PEM.
    """
    if not settings.enable_tls:
        return None
    for variable, path in (
        ("TLS_CERT_FILE", settings.tls_cert_file),
        ("TLS_KEY_FILE", settings.tls_key_file),
        ("TLS_CLIENT_CA_FILE", settings.tls_client_ca_file),
    ):
        if path:
            _check_readable(variable, path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(
            settings.tls_cert_file, settings.tls_key_file, settings.tls_key_password or None
        )
    except ssl.SSLError as exc:
        raise ConfigError(
            f"TLS_CERT_FILE {settings.tls_cert_file!r} and TLS_KEY_FILE "
            f"{settings.tls_key_file!r} are not a matching PEM certificate and key "
            f"({exc.reason or exc}); check the files or TLS_KEY_PASSWORD"
        ) from None
    if settings.tls_client_ca_file:
        try:
            context.load_verify_locations(settings.tls_client_ca_file)
        except ssl.SSLError as exc:
            raise ConfigError(
                f"TLS_CLIENT_CA_FILE {settings.tls_client_ca_file!r} is not a PEM CA bundle "
                f"({exc.reason or exc})"
            ) from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _check_readable(variable: str, path: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ConfigError(
            f"{variable} {path!r} cannot be read: {exc.strerror or exc}; "
            "make test certificates with: python server.py --make-cert certs"
        ) from None


# ---- handshakes on the server -------------------------------------------------------------------


class TLSHandshake(asyncio.Protocol):
    """One accepted TCP connection while its TLS handshake runs; then the connection's own.

    The listener hands out these instead of passing ``ssl=`` to ``create_server``: asyncio (and
    uvloop) drop a failed server-side handshake without a word outside debug mode, so the
    handshake runs here with ``loop.start_tls`` and its failure reaches ``on_failure`` with the
    peer's address. Once it succeeds, the TLS transport moves to ``make_protocol()``; bytes, end
    of stream or loss that came in meanwhile follow it in order.

    Args:
        context: the server's ``SSLContext``.
        timeout: seconds the handshake may take (``TLS_HANDSHAKE_TIMEOUT``).
        make_protocol: builds the protocol that serves the connection once it is encrypted.
        on_failure: called with this handshake and the exception when the handshake fails.
        pending: the handshakes under way; this one is in it until it ends.
    """

    def __init__(
        self,
        context: ssl.SSLContext,
        timeout: float,
        make_protocol: Callable[[], asyncio.Protocol],
        on_failure: Callable[[TLSHandshake, BaseException], None],
        pending: set[TLSHandshake],
    ) -> None:
        self.context = context
        self.timeout = timeout
        self.make_protocol = make_protocol
        self.on_failure = on_failure
        self.pending = pending
        self.peer: Any = None
        self.raw: asyncio.BaseTransport | None = None
        self.upgrade: Coroutine[Any, Any, asyncio.BaseTransport | None] | None = None
        self.protocol: asyncio.Protocol | None = None  # set once handed over
        self.early = bytearray()  # application data that came with the end of the handshake
        self.is_eof = False
        self.lost: tuple[Exception | None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.raw = transport
        self.peer = transport.get_extra_info("peername")
        self.pending.add(self)
        self.upgrade = asyncio.get_running_loop().start_tls(
            transport,  # type: ignore[arg-type]  # uvloop's transport is not a subclass
            self,
            self.context,
            server_side=True,
            ssl_handshake_timeout=self.timeout,
        )
        # Run start_tls up to its first wait now, not in a task: a task's first step comes after
        # the loop's next read, and uvloop starts reading as soon as this method returns, so the
        # client's hello would reach this protocol instead of the TLS layer and be lost.
        self._advance()

    def _advance(self, _: object = None) -> None:
        """Run ``start_tls`` on to its next wait, as a task's step would, or to its end."""
        assert self.upgrade is not None
        try:
            waiting = self.upgrade.send(None)
        except StopIteration as done:
            self.pending.discard(self)
            if done.value is not None:  # None: the connection ended as the handshake did
                self._hand_over(done.value)
        except Exception as exc:  # ssl.SSLError, a reset, the timeout; start_tls closed it
            self.pending.discard(self)
            self.on_failure(self, exc)
        else:
            if isinstance(waiting, asyncio.Future):
                waiting.add_done_callback(self._advance)
            else:  # a bare yield: go on at the next loop pass
                asyncio.get_running_loop().call_soon(self._advance)

    def _hand_over(self, tls: asyncio.BaseTransport) -> None:
        protocol = self.protocol = self.make_protocol()
        tls.set_protocol(protocol)
        protocol.connection_made(tls)
        if self.early and not tls.is_closing():
            protocol.data_received(bytes(self.early))
        self.early = bytearray()
        if self.lost is not None:
            protocol.connection_lost(self.lost[0])
        elif self.is_eof:
            protocol.eof_received()

    def abort(self) -> None:
        """Drop the connection while its handshake runs (server shutdown)."""
        if self.raw is not None and self.protocol is None:
            self.raw.abort()  # type: ignore[attr-defined]  # a transport, typed as its base

    # While the handshake ends and until ``_hand_over``, the TLS layer calls these.

    def data_received(self, data: bytes) -> None:
        if self.protocol is not None:
            self.protocol.data_received(data)
        else:
            self.early += data

    def eof_received(self) -> bool | None:
        if self.protocol is not None:
            return self.protocol.eof_received()
        self.is_eof = True
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.protocol is not None:
            self.protocol.connection_lost(exc)
        else:
            self.lost = (exc,)


# ---- a client certificate as a principal -----------------------------------------------------


def principal_from_certificate(certificate: Mapping[str, Any] | None) -> str | None:
    """The principal a verified client certificate names, or None without one.

    Taken from the subject alternative names: the first URI, else the first DNS name, else the
    first email address; a certificate without any of those gives its subject's (first) common
    name.

    Args:
        certificate: the peer certificate as ``SSLObject.getpeercert()`` returns it (it is only
            filled in once the certificate was verified).
    """
    if not certificate:
        return None
    alternative_names = certificate.get("subjectAltName", ())
    for wanted in ("URI", "DNS", "email"):
        for kind, value in alternative_names:
            if kind == wanted and value:
                return str(value)
    for relative_name in certificate.get("subject", ()):
        for key, value in relative_name:
            if key == "commonName" and value:
                return str(value)
    return None


# ---- TLS failures in words ------------------------------------------------------------------

# OpenSSL's reasons (``ssl.SSLError.reason``) for bytes that are not TLS at all.
NOT_TLS_REASONS: Final = frozenset({
    "WRONG_VERSION_NUMBER", "UNKNOWN_PROTOCOL", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG",
    "HTTP_REQUEST", "HTTPS_PROXY_REQUEST", "UNEXPECTED_RECORD", "RECORD_LENGTH_MISMATCH",
})  # fmt: skip
# Alerts a peer sends when it wanted a certificate and got none.
CERTIFICATE_REQUIRED_REASONS: Final = frozenset({
    "TLSV13_ALERT_CERTIFICATE_REQUIRED", "PEER_DID_NOT_RETURN_A_CERTIFICATE",
})  # fmt: skip
# Alerts a peer sends when it refused the certificate it was shown.
CERTIFICATE_REJECTED_REASONS: Final = frozenset({
    "TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_BAD_CERTIFICATE", "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE", "SSLV3_ALERT_CERTIFICATE_EXPIRED",
    "SSLV3_ALERT_CERTIFICATE_REVOKED", "TLSV1_ALERT_ACCESS_DENIED", "TLSV1_ALERT_DECRYPT_ERROR",
})  # fmt: skip
X509_V_ERR_HOSTNAME_MISMATCH: Final = 62  # from OpenSSL's x509_vfy.h

CERT_HINT: Final = "pass --cert and --key (or TLS_CLIENT_CERT_FILE and TLS_CLIENT_KEY_FILE)"
CA_HINT: Final = "it must be signed by a CA in the server's TLS_CLIENT_CA_FILE"

# SSL contexts made by ``utils.resolve_client_ssl_context``, and whether each presents a
# client certificate: after a TLS 1.3 handshake a server that refuses the client often just
# closes the connection, so whether one was sent is what tells "missing" from "rejected".
_CLIENT_CERTIFICATE: weakref.WeakKeyDictionary[ssl.SSLContext, bool] = weakref.WeakKeyDictionary()


def note_client_certificate(context: ssl.SSLContext, presents: bool) -> None:
    """Remember whether ``context`` presents a client certificate (``describe_tls_rejection``)."""
    _CLIENT_CERTIFICATE[context] = presents


def presents_client_certificate(context: Any) -> bool | None:
    """Whether ``context`` presents a client certificate; None when that is not known."""
    try:
        return _CLIENT_CERTIFICATE.get(context)
    except TypeError:  # not an SSLContext
        return None


def _reason(exc: BaseException) -> str:
    return str(getattr(exc, "reason", None) or "")


def _alert(reason: str) -> str:
    """``TLSV1_ALERT_UNKNOWN_CA`` -> ``unknown ca``."""
    return reason.partition("_ALERT_")[2].replace("_", " ").lower() or reason


def describe_tls_error(exc: ssl.SSLError) -> str:
    """One line for a person on a failed TLS handshake or session, as the client sees it.

    Says which it is: the server's certificate is not trusted, the server does not speak TLS,
    it requires a client certificate, or it rejected the one sent.
    """
    if isinstance(exc, ssl.SSLCertVerificationError):
        message = getattr(exc, "verify_message", None) or _reason(exc) or str(exc)
        if getattr(exc, "verify_code", None) == X509_V_ERR_HOSTNAME_MISMATCH:
            return (
                f"TLS certificate check failed: the server's certificate does not name the "
                f"host connected to ({message}); connect by a name it holds"
            )
        return (
            f"TLS certificate check failed: the server's certificate is not trusted ({message}); "
            "pass the CA that signed it with --cafile (or TLS_CA_FILE)"
        )
    reason = _reason(exc)
    if reason in NOT_TLS_REASONS:
        return (
            f"TLS handshake failed ({reason}): the server does not speak TLS; "
            "drop --tls and --cafile for a plain server"
        )
    rejection = describe_tls_rejection(exc, presents_certificate=None)
    if rejection:
        return f"TLS handshake failed: {rejection}"
    if isinstance(exc, ssl.SSLEOFError):
        return (
            "TLS handshake failed: the server closed the connection during it; it may not speak "
            f"TLS, or want a client certificate ({CERT_HINT})"
        )
    return (
        f"TLS handshake failed ({reason or exc}); does the server use TLS? "
        "Drop --tls for a plain server"
    )


def describe_tls_rejection(exc: BaseException | None, *, presents_certificate: bool | None) -> str:
    """Why a server ended a TLS session before answering, or "" when ``exc`` does not say.

    Args:
        exc: what ended it: an ``ssl.SSLError`` for an alert the server sent, or None (or a
            reset) when it just closed the connection, as a Python server does.
        presents_certificate: whether this side sent a client certificate; None if unknown.
            Without an alert this alone tells a missing certificate from a rejected one.
    """
    reason = _reason(exc) if exc is not None else ""
    if reason in CERTIFICATE_REQUIRED_REASONS:
        return f"the server requires a client certificate (alert: {_alert(reason)}); {CERT_HINT}"
    if reason in CERTIFICATE_REJECTED_REASONS:
        return f"the server rejected the client certificate (alert: {_alert(reason)}); {CA_HINT}"
    if isinstance(exc, ssl.SSLError):
        return ""
    if presents_certificate is True:
        return (
            "the server closed the connection right after the TLS handshake: it rejected the "
            f"client certificate; {CA_HINT}"
        )
    if presents_certificate is False:
        return (
            "the server closed the connection right after the TLS handshake: it requires a "
            f"client certificate; {CERT_HINT}"
        )
    return (
        "the server closed the connection right after the TLS handshake: it requires a client "
        f"certificate signed by a CA it trusts ({CERT_HINT})"
    )


def describe_handshake_failure(exc: BaseException, timeout: float) -> str:
    """Why a client's TLS handshake failed, for the server's log line.

    Args:
        exc: what ``loop.start_tls`` raised.
        timeout: the ``TLS_HANDSHAKE_TIMEOUT`` in force, in seconds.
    """
    reason = _reason(exc)
    if isinstance(exc, ssl.SSLCertVerificationError):
        message = getattr(exc, "verify_message", None) or reason
        return f"client certificate rejected: {message}"
    if reason in CERTIFICATE_REQUIRED_REASONS:
        return f"client sent no certificate, and TLS_CLIENT_CA_FILE requires one ({reason})"
    if reason in NOT_TLS_REASONS:
        return f"not TLS: the client speaks plain TCP or another protocol ({reason})"
    if reason in CERTIFICATE_REJECTED_REASONS:
        return f"the client refused the server's certificate (alert: {_alert(reason)})"
    if isinstance(exc, ssl.SSLError):
        return f"{reason or exc}"
    if isinstance(exc, ConnectionAbortedError | TimeoutError):
        return f"no handshake within {timeout:g} s (TLS_HANDSHAKE_TIMEOUT)"
    if isinstance(exc, ConnectionResetError | BrokenPipeError):
        return "the client closed the connection during the handshake"
    return str(exc) or type(exc).__name__


# ---- certificates for testing ----------------------------------------------------------------

CERTIFICATE_DAYS: Final = 365  # validity of the certificates ``make_certificates`` writes


@dataclass(frozen=True, slots=True)
class CertificateFiles:
    """The files ``make_certificates`` wrote: a CA, a server pair and a client pair."""

    ca: Path
    ca_key: Path
    cert: Path
    key: Path
    client_cert: Path
    client_key: Path


def make_certificates(directory: Path, client_name: str = "client") -> CertificateFiles:
    """Write a test CA and a server and a client certificate it signed, into ``directory``.

    The server certificate names localhost, 127.0.0.1 and ::1. The client certificate names
    ``client_name`` as its subject's common name and as a subject alternative name (a URI if
    it has ``://``, an email address if it has ``@``, a DNS name otherwise), which is the
    principal the server sees. Files with private keys are readable by their owner only.
    Existing files of the same names are replaced.

    Raises:
        ConfigError: ``client_name`` cannot name a principal, or ``directory`` is not writable.
    """
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    client_identity = _general_name(client_name)
    files = CertificateFiles(
        ca=directory / "ca.pem", ca_key=directory / "ca-key.pem",
        cert=directory / "cert.pem", key=directory / "key.pem",
        client_cert=directory / "client.pem", client_key=directory / "client-key.pem",
    )  # fmt: skip
    ca_key = _new_key()
    ca_cert = _certificate(
        "pyasync-server test CA", ca_key, [], issuer=None, usage=None, is_ca=True
    )
    localhost: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    server_key, client_key = _new_key(), _new_key()
    server_cert = _certificate(
        "localhost", server_key, localhost, issuer=(ca_cert, ca_key),
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
    )  # fmt: skip
    client_cert = _certificate(
        client_name, client_key, [client_identity], issuer=(ca_cert, ca_key),
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
    )  # fmt: skip
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for path, cert in ((files.ca, ca_cert), (files.cert, server_cert),
                           (files.client_cert, client_cert)):  # fmt: skip
            _write(path, _cert_pem(cert), private=False)
        for path, key in ((files.ca_key, ca_key), (files.key, server_key),
                          (files.client_key, client_key)):  # fmt: skip
            _write(path, _key_pem(key), private=True)
    except OSError as exc:
        raise ConfigError(
            f"cannot write certificates into {str(directory)!r}: {exc.strerror or exc}"
        ) from None
    return files


def make_self_signed_cert(directory: Path, common_name: str = "localhost") -> tuple[Path, Path]:
    """Write a self-signed ``cert.pem``/``key.pem`` for ``common_name``, 127.0.0.1 and ::1.

    Returns:
        The paths of the certificate and of its key (readable by its owner only).

    Raises:
        ConfigError: ``directory`` is not writable.
    """
    from cryptography import x509

    key = _new_key()
    names: list[x509.GeneralName] = [
        x509.DNSName(common_name),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    cert = _certificate(common_name, key, names, issuer=None, usage=None)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        _write(directory / "cert.pem", _cert_pem(cert), private=False)
        _write(directory / "key.pem", _key_pem(key), private=True)
    except OSError as exc:
        raise ConfigError(
            f"cannot write certificates into {str(directory)!r}: {exc.strerror or exc}"
        ) from None
    return directory / "cert.pem", directory / "key.pem"


def _general_name(name: str) -> x509.GeneralName:
    """``name`` as a subject alternative name: URI, email address or DNS name.

    Raises:
        ConfigError: it is empty, not ASCII, or holds spaces or control characters.
    """
    from cryptography import x509

    if not name or not name.isascii() or not name.isprintable() or " " in name:
        raise ConfigError(
            f"a client name must be ASCII without spaces (a name, user@domain or a URI), "
            f"got {name!r}"
        )
    if "://" in name:
        return x509.UniformResourceIdentifier(name)
    if "@" in name:
        return x509.RFC822Name(name)
    return x509.DNSName(name)


def _new_key() -> ec.EllipticCurvePrivateKey:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _certificate(
    common_name: str,
    key: ec.EllipticCurvePrivateKey,
    alternative_names: list[x509.GeneralName],
    *,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    usage: x509.ObjectIdentifier | None,
    is_ca: bool = False,
) -> x509.Certificate:
    """A certificate for ``key``, signed by ``issuer`` (itself when None)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    issuer_cert, issuer_key = issuer if issuer is not None else (None, key)
    now = datetime.datetime.now(datetime.UTC)
    public_key = key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_cert.subject if issuer_cert is not None else subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))  # tolerate a clock a little behind
        .not_valid_after(now + datetime.timedelta(days=CERTIFICATE_DAYS))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=0 if is_ca else None), True)
        .add_extension(_key_usage(is_ca), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    )
    if alternative_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(alternative_names), False)
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _key_usage(is_ca: bool) -> x509.KeyUsage:
    from cryptography import x509

    return x509.KeyUsage(
        digital_signature=not is_ca, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=is_ca, crl_sign=is_ca,
        encipher_only=False, decipher_only=False,
    )  # fmt: skip


def _cert_pem(cert: x509.Certificate) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, *, private: bool) -> None:
    """Write ``data`` to ``path``; a private file is created (or reset) to mode 0600 first."""
    mode = 0o600 if private else 0o644
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(descriptor, "wb") as file:
        if private:
            os.fchmod(file.fileno(), 0o600)  # an existing file kept its old mode on open
        file.write(data)
