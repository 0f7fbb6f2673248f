"""``server.py --make-cert`` then mutual TLS with the settings it prints, both as programs."""

from __future__ import annotations

import re
import shlex
import stat
from pathlib import Path

from tests.helpers import clean_env, run_client_program, run_server_program, start_server_process


def printed_settings(output: str) -> tuple[dict[str, str], list[str]]:
    """The server's variables and the client's flags from ``--make-cert``'s output."""
    lines = {line.partition(": ")[0]: line.partition(": ")[2] for line in output.splitlines()}
    server = shlex.split(lines["server"])
    client = shlex.split(lines["client"])
    assert server[-2:] == ["python", "server.py"] and client[:2] == ["python", "client.py"]
    variables = dict(word.split("=", 1) for word in server[:-2])
    return variables, client[2:-1]  # without "python client.py" and the closing "ping"


def test_make_cert_prints_settings_that_work_on_both_sides(tmp_path: Path) -> None:
    made = run_server_program(tmp_path, "--make-cert", "certs", "--client-name", "worker-7")
    assert made.returncode == 0, made.stderr
    assert len(made.stdout.splitlines()) <= 5
    for key in ("ca-key.pem", "key.pem", "client-key.pem"):
        assert stat.S_IMODE((tmp_path / "certs" / key).stat().st_mode) == 0o600
    variables, flags = printed_settings(made.stdout)
    assert variables["TLS_CLIENT_CA_FILE"] == str(Path("certs") / "ca.pem")
    server = start_server_process(tmp_path, env=clean_env(**variables))
    try:
        port = ["--port", str(server.port)]
        ok = run_client_program(*port, *flags, "ping", cwd=tmp_path)
        assert ok.returncode == 0 and ok.stdout.startswith("pong"), ok.stderr
        missing = run_client_program(*port, *flags[:2], "ping", cwd=tmp_path)
        assert missing.returncode == 76 and "requires a client certificate" in missing.stderr
        plain = run_client_program(*port, "ping", cwd=tmp_path)
        assert plain.returncode == 76 and "expects TLS" in plain.stderr
    finally:
        assert server.stop() == 0
    failures = re.findall(r"INFO pyasync.server: TLS handshake from 127\.0\.0\.1:\d+ failed: (.*)",
                          server.log)  # fmt: skip
    assert len(failures) == 2, server.log
    assert failures[0].startswith("client sent no certificate")
    assert failures[1].startswith("not TLS")
    assert "Traceback" not in server.log
