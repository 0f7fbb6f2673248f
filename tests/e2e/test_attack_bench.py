"""bench/attack.py runs against the server's default limits.

The latency figures themselves come from ``python bench/attack.py``, never from a test.
"""

from __future__ import annotations

import ast
import subprocess
import sys

from tests.helpers import ROOT, clean_env


def test_attack_bench_is_refused_and_throttled_by_the_default_limits() -> None:
    """The attacker's connections beyond MAX_CONNECTIONS_PER_IP are refused and its flood is
    throttled, while the victim on another address has every PING answered."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "attack.py"), "--seconds", "1", "--rate", "100"],
        capture_output=True, text=True, timeout=60, env=clean_env(),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    for phase in ("victim alone:", "victim, attacked:"):
        (line,) = (line for line in lines if line.startswith(phase))
        assert int(line.rsplit("(", 1)[1].split()[0]) > 10  # pings, each answered
    (line,) = (line for line in lines if line.startswith("attacker: "))
    attacker = ast.literal_eval(line.removeprefix("attacker: "))
    assert attacker["connections"] == 1000 and attacker["connect_errors"] == 0
    assert attacker["connections_refused"] == 1000 - 256  # MAX_CONNECTIONS_PER_IP
    assert 0 < attacker["flood_throttled"] < attacker["flood_answers"]
