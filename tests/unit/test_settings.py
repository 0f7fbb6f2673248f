"""Settings: precedence, validation with one-line errors, secrets, and error descriptions."""

from __future__ import annotations

import dataclasses
import importlib
import os
import ssl
from pathlib import Path
from typing import Any

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


# ---- settings built in code meet the same checks as settings loaded --------------------------


DatabaseSettings = server_config.DatabaseSettings


@pytest.mark.parametrize(
    ("cls", "values", "message"),
    [
        (Settings, {"port": 99999}, "PORT must be from 0 to 65535, got 99999"),
        (Settings, {"port": -1}, "PORT must be from 0 to 65535, got -1"),
        (Settings, {"max_frame_size": 10}, "MAX_FRAME_SIZE must be from 1024 to"),
        (Settings, {"compression_level": 99}, "COMPRESSION_LEVEL must be from -7 to 22"),
        (Settings, {"max_in_flight": 0}, "MAX_IN_FLIGHT must be at least 1, got 0"),
        (Settings, {"log_level": "loud"}, "LOG_LEVEL must be one of DEBUG, INFO, WARNING"),
        (Settings, {"port": "80"}, "PORT must be a whole number, got '80'"),
        (Settings, {"port": True}, "PORT must be a whole number, got True"),
        (Settings, {"use_uvloop": "no"}, "USE_UVLOOP must be true or false, got 'no'"),
        (Settings, {"host": None}, "HOST must be text, got None"),
        (Settings, {"request_timeout": float("nan")}, "REQUEST_TIMEOUT must be a finite"),
        (
            DatabaseSettings,
            {"db_backend": "oracle"},
            "DB_BACKEND must be one of SQLITE, MARIADB, POSTGRES, NONE, got 'oracle'",
        ),
        (DatabaseSettings, {"db_port": 70000}, "DB_PORT must be from 0 to 65535, got 70000"),
        (DatabaseSettings, {"db_pool_max_size": 0}, "DB_POOL_MAX_SIZE must be at least 1, got 0"),
    ],
)
def test_settings_built_in_code_are_validated_like_loaded_ones(
    cls: type[object], values: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        cls(**values)
    assert message in str(raised.value) and "\n" not in str(raised.value)
    assert f"(from {cls.__name__}({next(iter(values))}=...))" in str(raised.value)


def test_code_and_environment_share_one_check_and_one_message() -> None:
    with pytest.raises(ConfigError) as from_environment:
        config.load(env_file=None, environ={"PORT": "99999"})
    with pytest.raises(ConfigError) as from_code:
        Settings(port=99999)
    assert str(from_environment.value) == (
        "PORT must be from 0 to 65535, got '99999' (from environment)"
    )
    assert (
        str(from_code.value) == "PORT must be from 0 to 65535, got 99999 (from Settings(port=...))"
    )
    with pytest.raises(ConfigError, match="<hidden>"):
        Settings(tls_key_password=b"hunter2")  # type: ignore[arg-type]
    replaced = dataclasses.replace(Settings(), port=1)
    with pytest.raises(ConfigError, match="PORT must be from 0 to 65535"):
        dataclasses.replace(replaced, port=65536)


def test_values_built_in_code_are_normalised() -> None:
    settings = Settings(request_timeout=5, max_request_timeout=60)
    assert settings.request_timeout == 5.0 and type(settings.request_timeout) is float
    assert settings.summary()["max_request_timeout"] == 60.0


@pytest.mark.parametrize("spelling", ["postgres", "Postgres", " POSTGRES "])
def test_backend_names_match_in_any_case_wherever_they_come_from(
    spelling: str, tmp_path: Path
) -> None:
    # The help spells the choices in lowercase; each way in must yield the canonical name that
    # database.py compares with, or a lowercase "postgres" would quietly run SQLite.
    env_file = tmp_path / "db.env"
    env_file.write_text(f"DB_BACKEND={spelling}\n")
    backend: Any = spelling  # not one of the Literal's spellings, on purpose
    loaded = [
        DatabaseSettings(db_backend=backend),
        dataclasses.replace(DatabaseSettings(), db_backend=backend),
        server_config.load(env_file=None, environ={"DB_BACKEND": spelling}),
        server_config.load(env_file=env_file, environ={}),
        server_config.load(env_file=None, environ={}, overrides={"db_backend": spelling}),
    ]
    assert [settings.db_backend for settings in loaded] == ["POSTGRES"] * len(loaded)
    assert loaded[0].address["port"] == 5432 and loaded[0].describe().startswith("postgres ")


@pytest.mark.parametrize("spelling", ["debug", "Debug", "DEBUG"])
def test_log_level_matches_in_any_case_wherever_it_comes_from(spelling: str) -> None:
    level: Any = spelling
    loaded = [
        Settings(log_level=level),
        config.load(env_file=None, environ={"LOG_LEVEL": spelling}),
        config.load(env_file=None, environ={}, overrides={"log_level": spelling}),
    ]
    assert [settings.log_level for settings in loaded] == ["DEBUG"] * len(loaded)


def test_a_default_spelled_in_lowercase_is_normalised_too() -> None:
    @dataclasses.dataclass(frozen=True, slots=True)
    class Choice:
        backend: server_config.DatabaseBackend = config.setting("postgres", "lowercase default")

        def __post_init__(self) -> None:
            config.validate(self)

    assert Choice().backend == "POSTGRES"
    with pytest.raises(ConfigError, match="BACKEND must be one of"):
        Choice(backend="oracle")  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["nan", "inf", "-inf"])
def test_a_timeout_must_be_a_finite_number(text: str) -> None:
    with pytest.raises(ConfigError, match="REQUEST_TIMEOUT must be a finite number"):
        config.load(env_file=None, environ={"REQUEST_TIMEOUT": text})


# ---- the settings file -------------------------------------------------------------------------


def test_a_named_settings_file_must_exist(tmp_path: Path) -> None:
    missing = tmp_path / "missing.env"
    for loader in (config.load, server_config.load):
        with pytest.raises(ConfigError) as raised:
            loader(env_file=missing, environ={})
        assert str(raised.value) == f"settings file {str(missing)!r} does not exist"
    with pytest.raises(ConfigError, match="is not a file"):
        config.load(env_file=tmp_path, environ={})


def test_the_default_settings_file_may_be_absent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert config.load(environ={}) == Settings()
    assert server_config.load(environ={}) == server_config.DatabaseSettings()
    assert config.load(env_file=config.DEFAULT_ENV_FILE, environ={}) == Settings()


@pytest.mark.parametrize("program", ["server", "client"])
def test_programs_exit_78_with_one_line_for_a_missing_settings_file(
    program: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    missing = tmp_path / "missing.env"
    module = importlib.import_module(program)

    def run(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"{program}.py ran without its settings file")

    monkeypatch.setattr(module, "handle_run_main", run)
    argv = ["--env-file", str(missing)] + (["ping"] if program == "client" else [])
    with pytest.raises(SystemExit) as exited:
        module.main(argv)
    assert exited.value.code == 78
    assert capsys.readouterr().err == f"error: settings file {str(missing)!r} does not exist\n"


def test_an_unknown_broker_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError, match="BROKER_URL must be"):
        Settings(broker_url="kafka://127.0.0.1:9092")
    assert Settings(broker_url="NATS://127.0.0.1:4222").broker_url == "NATS://127.0.0.1:4222"


def test_the_null_device_as_env_file_reads_nothing() -> None:
    assert config.load(env_file=os.devnull, environ={}) == Settings()


def test_a_settings_file_line_that_does_not_parse_stops_the_start(tmp_path: Path) -> None:
    env_file = tmp_path / "bad.env"
    env_file.write_text("PORT=2000\nthis is not a setting\nHOST=0.0.0.0\n")
    with pytest.raises(ConfigError, match=r"line 2: cannot parse 'this is not a setting'") as info:
        config.load(env_file=env_file, environ={})
    assert "\n" not in str(info.value)


def test_a_misspelt_setting_in_the_file_is_named_with_its_likely_meaning(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("db_backend=postgres\nDB_BACKNED=mariadb\nPORT=2000\nMY_APP_COLOUR=red\n")
    lines = config.misspelt_settings(env_file, Settings, server_config.DatabaseSettings)
    assert [line.split(": ", 1)[1] for line in lines] == [
        "db_backend is no setting and is ignored; did you mean DB_BACKEND?",
        "DB_BACKNED is no setting and is ignored; did you mean DB_BACKEND?",
    ]  # MY_APP_COLOUR may be the project's own: not named
