"""TLS for the server: its SSLContext from the settings, and a self-signed certificate helper."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path

from config import ConfigError, Settings

__all__ = ["build_server_ssl_context", "make_self_signed_cert", "openssl_command"]


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
            "make a test pair with: python server.py --make-cert certs"
        ) from None


def openssl_command(directory: Path, common_name: str = "localhost") -> list[str]:
    """The openssl command that writes a self-signed ``cert.pem``/``key.pem`` pair (README)."""
    return [
        "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-days", "365", "-subj", f"/CN={common_name}",
        "-addext", f"subjectAltName=DNS:{common_name},IP:127.0.0.1,IP:::1",
        "-keyout", str(directory / "key.pem"), "-out", str(directory / "cert.pem"),
    ]  # fmt: skip


def make_self_signed_cert(directory: Path, common_name: str = "localhost") -> tuple[Path, Path]:
    """Write a self-signed certificate and key for local testing; returns (cert, key) paths.

    Raises:
        ConfigError: openssl is not installed or failed.
    """
    if shutil.which("openssl") is None:
        raise ConfigError("openssl is not installed; install it or bring your own cert and key")
    directory.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        openssl_command(directory, common_name), capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        last_line = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConfigError(f"openssl failed: {last_line}")
    (directory / "key.pem").chmod(0o600)
    return directory / "cert.pem", directory / "key.pem"
