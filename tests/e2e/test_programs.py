"""``python server.py`` and ``python client.py`` as a user runs them."""

from __future__ import annotations

import json
import signal
import socket
from pathlib import Path

import pytest

from package import PACKAGE, KvPutRequest, pack
from protocol import FrameDecoder, encode_frame
from tests.helpers import (
    ServerProcess,
    clean_env,
    run_client_program,
    run_server_program,
    start_server_process,
)


def client(server: ServerProcess, *args: str, cwd: Path) -> tuple[int, str, str]:
    result = run_client_program("--port", str(server.port), *args, cwd=cwd)
    return result.returncode, result.stdout, result.stderr


def test_client_commands(server_process: ServerProcess, tmp_path: Path) -> None:
    code, out, err = client(server_process, "ping", cwd=tmp_path)
    assert code == 0 and out.startswith("pong from 127.0.0.1:") and out.rstrip().endswith("ms")
    assert client(server_process, "echo", "hello world", cwd=tmp_path)[1] == "hello world\n"
    code, out, _ = client(server_process, "info", cwd=tmp_path)
    info = json.loads(out)
    assert code == 0 and info["requests_served"] == 2 and info["version"]
    code, out, _ = client(
        server_process, "call", "CHANGE_QUESTION_MARK", '{"text": "How are you?"}', cwd=tmp_path
    )
    assert code == 0 and json.loads(out) == {"text": "How are you!"}
    code, out, _ = client(server_process, "call", "REQUEST_ECHO", '{"data": "AP8="}', cwd=tmp_path)
    assert code == 0 and json.loads(out) == {"data": "AP8="}


def test_client_errors_are_one_line(server_process: ServerProcess, tmp_path: Path) -> None:
    code, _, err = client(server_process, "call", "ECHO", '{"text": 5}', cwd=tmp_path)
    assert code == 1 and err.count("\n") == 1
    assert err.startswith("error: INVALID_ARGUMENT: invalid JSON body for REQUEST_ECHO")
    code, _, err = client(server_process, "call", "NOPE", cwd=tmp_path)
    assert code != 0 and err.count("\n") == 1 and "known: PING, ECHO" in err


def test_bench_prints_rate_and_percentiles(tmp_path: Path) -> None:
    # A closed loop of 2 in flight passes RATE_LIMIT's 20,000/s per connection on a fast machine:
    # the bench measures the server, not its rate limit (bench/run.py turns it off too).
    server = start_server_process(tmp_path, env=clean_env(RATE_LIMIT="0"))
    try:
        code, out, err = client(
            server, "bench", "-c", "2", "-k", "2", "-d", "1", "--warmup", "0.2", cwd=tmp_path
        )
    finally:
        server.stop(signal.SIGKILL)
    assert code == 0, err
    assert "req/s" in out and "p50" in out and "p99" in out


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_shuts_down_cleanly(
    server_process: ServerProcess, tmp_path: Path, signum: signal.Signals
) -> None:
    assert client(server_process, "ping", cwd=tmp_path)[0] == 0
    assert server_process.stop(signum) == 0
    assert f"{signum.name} received: shutting down" in server_process.log
    assert "stopped after serving 1 requests" in server_process.log
    assert "Traceback" not in server_process.log


def test_nothing_listening_is_one_line_and_exit_69(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = run_client_program("--port", str(port), "ping", cwd=tmp_path)
    assert result.returncode == 69
    assert result.stderr.count("\n") == 1 and "is the server running?" in result.stderr
    assert "refused" in result.stderr


def test_bad_configuration_stops_the_server_with_one_line(tmp_path: Path) -> None:
    result = run_server_program(tmp_path, env=clean_env(PORT="abc"))
    assert result.returncode == 78
    assert result.stderr == "error: PORT must be a whole number, got 'abc' (from environment)\n"
    missing = clean_env(
        ENABLE_TLS="true", TLS_CERT_FILE=str(tmp_path / "nope.pem"), TLS_KEY_FILE="key.pem"
    )
    result = run_server_program(tmp_path, env=missing)
    assert result.returncode == 78 and result.stderr.count("\n") == 1
    assert "TLS_CERT_FILE" in result.stderr and "cannot be read" in result.stderr


def test_dotenv_is_read_and_environment_wins(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("COMPRESSION_LEVEL=99\nLOG_LEVEL=WARNING\n")
    result = run_server_program(tmp_path)
    assert result.returncode == 78 and "COMPRESSION_LEVEL" in result.stderr
    assert "(from .env)" in result.stderr
    env = clean_env(COMPRESSION_LEVEL="3", LOG_LEVEL="INFO")
    server = start_server_process(tmp_path, env=env)
    try:
        answer = run_client_program("--port", str(server.port), "info", cwd=tmp_path, env=env)
        info = json.loads(answer.stdout)
        assert info["config"]["compression_level"] == 3
        assert info["config"]["log_level"] == "INFO"
    finally:
        assert server.stop() == 0


def test_tls_end_to_end_with_make_cert(tmp_path: Path) -> None:
    made = run_server_program(tmp_path, "--make-cert", "certs")
    assert made.returncode == 0, made.stderr
    cert, key = tmp_path / "certs" / "cert.pem", tmp_path / "certs" / "key.pem"
    ca = tmp_path / "certs" / "ca.pem"
    assert cert.is_file() and key.is_file() and ca.is_file()
    env = clean_env(ENABLE_TLS="true", TLS_CERT_FILE=str(cert), TLS_KEY_FILE=str(key))
    server = start_server_process(tmp_path, env=env)
    try:
        port = str(server.port)
        ok = run_client_program("--port", port, "--cafile", str(ca), "ping", cwd=tmp_path)
        assert ok.returncode == 0 and ok.stdout.startswith("pong")
        plain = run_client_program("--port", port, "ping", cwd=tmp_path)
        assert plain.returncode != 0 and plain.stderr.count("\n") == 1
        assert "TLS" in plain.stderr
        unverified = run_client_program("--port", port, "--tls", "ping", cwd=tmp_path)
        assert unverified.returncode == 76 and "certificate" in unverified.stderr
    finally:
        assert server.stop() == 0
    assert "Traceback" not in server.log


def test_kv_commands_on_the_default_sqlite_database(
    server_process: ServerProcess, tmp_path: Path
) -> None:
    assert (
        client(server_process, "kv", "put", "greeting", "hello", cwd=tmp_path)[1] == "version 1\n"
    )
    code, out, err = client(server_process, "kv", "get", "greeting", cwd=tmp_path)
    assert (code, out, err) == (0, "hello\n", "version 1\n")
    code, _, err = client(
        server_process, "kv", "put", "greeting", "x", "--expect", "0", cwd=tmp_path
    )
    assert code == 1 and err.startswith("error: CONFLICT")
    code, out, _ = client(server_process, "kv", "list", "greet", cwd=tmp_path)
    assert out == "greeting\tversion 1\t5 bytes\n"
    assert client(server_process, "kv", "delete", "greeting", cwd=tmp_path)[1] == "deleted\n"
    code, _, err = client(server_process, "kv", "get", "greeting", cwd=tmp_path)
    assert code == 1 and "NOT_FOUND" in err
    assert (tmp_path / "pyasync.sqlite3").is_file()  # SQLITE_PATH, relative to the server's cwd


def test_an_id_is_free_again_once_its_answer_arrived(server_process: ServerProcess) -> None:
    """The spec lets a client reuse an id as soon as its answer arrived. On uvloop a task's
    answer used to reach a fast client before the server had let go of its id (1 in 10)."""
    put = pack(PACKAGE.REQUEST_KV_PUT, KvPutRequest(key="k", value=b"v"))  # an action in a task
    request = encode_frame(PACKAGE.REQUEST_KV_PUT, 7, put)
    decoder = FrameDecoder()
    with socket.create_connection(("127.0.0.1", server_process.port), timeout=5) as sock:
        for _ in range(300):
            sock.sendall(request)
            while (frame := decoder.next_frame()) is None:
                data = sock.recv(65536)
                assert data, "the server closed the connection: " + server_process.log[-300:]
                decoder.feed(data)
            assert (frame.kind, frame.request_id) == (PACKAGE.ANSWER_KV_PUT, 7)
    assert "still in flight" not in server_process.log


def test_a_misspelt_setting_is_named_at_start_and_a_broken_line_stops_it(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("db_backend=postgres\n")
    server = start_server_process(tmp_path)
    try:
        assert "db_backend is no setting and is ignored; did you mean DB_BACKEND?" in server.log
    finally:
        assert server.stop() == 0
    (tmp_path / ".env").write_text('PORT=2000\nDB_BACKEND="postgres\n')
    result = run_server_program(tmp_path)
    assert result.returncode == 78
    assert result.stderr == (
        "error: settings file '.env' line 2: cannot parse 'DB_BACKEND=\"postgres'; "
        "write NAME=value\n"
    )


def test_a_signal_right_after_listening_is_a_graceful_shutdown(tmp_path: Path) -> None:
    for _ in range(5):  # the signal once came before the handlers were in place: killed, -15
        server = start_server_process(tmp_path)
        assert server.stop(signal.SIGTERM) == 0
        assert "SIGTERM received: shutting down" in server.log
