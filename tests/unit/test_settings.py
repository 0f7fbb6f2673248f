"""Settings: precedence, validation with one-line errors, secrets, and error descriptions."""

from __future__ import annotations

import dataclasses
import ssl
from pathlib import Path

import pytest

import config
import package
import server_config
from config import ConfigError, Settings, load_settings
from tests.helpers import ROOT
from utils import describe_error


def test_defaults() -> None:
    settings = config.load(env_file=None, environ={})
    assert settings == Settings()
    assert (settings.host, settings.port, settings.max_frame_size) == ("127.0.0.1", 1145, 1 << 24)


def test_precedence_defaults_dotenv_environment_flags(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("PORT=2000\nHOST=0.0.0.0\nLOG_LEVEL=debug\nUSE_UVLOOP=no\n")
    from_file = config.load(env_file=env_file, environ={})
    assert (from_file.port, from_file.host, from_file.log_level) == (2000, "0.0.0.0", "DEBUG")
    assert from_file.use_uvloop is False
    from_env = config.load(env_file=env_file, environ={"PORT": "3000"})
    assert (from_env.port, from_env.host) == (3000, "0.0.0.0")
    from_flags = config.load(env_file=env_file, environ={"PORT": "3000"}, overrides={"port": 4})
    assert from_flags.port == 4


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"PORT": "abc"}, "PORT must be a whole number, got 'abc' (from environment)"),
        ({"PORT": "70000"}, "PORT must be from 0 to 65535, got '70000' (from environment)"),
        ({"COMPRESSION_LEVEL": "99"}, "COMPRESSION_LEVEL must be from -7 to 22"),
        ({"USE_UVLOOP": "maybe"}, "USE_UVLOOP must be true or false"),
        ({"LOG_LEVEL": "loud"}, "LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR"),
        ({"ENABLE_TLS": "true"}, "ENABLE_TLS=true needs TLS_CERT_FILE and TLS_KEY_FILE"),
        ({"REQUEST_TIMEOUT": "500"}, "MAX_REQUEST_TIMEOUT (300.0) must not be below"),
    ],
)
def test_bad_values_stop_with_one_line(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        config.load(env_file=None, environ=environ)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_secrets_stay_out_of_repr_summary_and_errors() -> None:
    settings = Settings(tls_key_password="hunter2")
    assert "hunter2" not in repr(settings)
    assert "tls_key_password" not in settings.summary()
    with pytest.raises(ConfigError) as raised:
        config.load(env_file=None, environ={"TLS_KEY_PASSWORD": "hunter2", "ENABLE_TLS": "1"})
    assert "hunter2" not in str(raised.value)


@pytest.mark.parametrize("settings_class", [Settings, server_config.DatabaseSettings])
def test_env_example_and_readme_list_every_setting(settings_class: type) -> None:
    example = (ROOT / ".env.example").read_text()
    readme = (ROOT / "README.md").read_text()
    for field in dataclasses.fields(settings_class):
        assert f"\n{field.name.upper()}=" in example
        assert f"\n| `{field.name.upper()}` |" in readme
    loaded: object = load_settings(settings_class, env_file=ROOT / ".env.example", environ={})
    assert loaded == settings_class()  # the example shows the defaults


def test_database_backend_setting() -> None:
    assert server_config.load(env_file=None, environ={}).db_backend == "SQLITE"
    assert server_config.load(env_file=None, environ={"DB_BACKEND": "postgres"}).db_backend == (
        "POSTGRES"
    )
    with pytest.raises(ConfigError, match="DB_BACKEND must be one of"):
        server_config.load(env_file=None, environ={"DB_BACKEND": "oracle"})


@pytest.mark.parametrize(
    ("error", "fragment", "code"),
    [
        (
            ConnectionRefusedError(111, "cannot connect to h:1: refused"),
            "is the server running",
            69,
        ),
        (TimeoutError("connecting took too long"), "timed out", 75),
        (ssl.SSLCertVerificationError("x"), "TLS certificate check failed", 76),
        (ssl.SSLError(1, "wrong version"), "TLS handshake failed", 76),
        (KeyboardInterrupt(), "interrupted", 130),
        (ConfigError("PORT must be a whole number"), "PORT must be", 78),
        (package.NotFound("no such key"), "NOT_FOUND: no such key", 1),
    ],
)
def test_errors_for_people_are_one_line_with_exit_codes(
    error: BaseException, fragment: str, code: int
) -> None:
    message, exit_code = describe_error(error)
    assert fragment in message and "\n" not in message
    assert exit_code == code
