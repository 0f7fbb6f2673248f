"""The benchmark's tools work: the C load generator against the server, the floor and KV_GET.

These check that bench/run.py's parts run and agree on the wire formats; the speed figures
themselves come from ``python bench/run.py``, never from a test.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import ROOT, clean_env, start_server_process

BRIEF = ["--warmup", "0.2", "--duration", "0.5"]


@pytest.fixture(scope="module")
def loadgen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler (cc) to build bench/loadgen.c")
    binary = tmp_path_factory.mktemp("loadgen") / "loadgen"
    source = ROOT / "bench" / "loadgen.c"
    subprocess.run(
        [compiler, "-O2", "-o", str(binary), str(source), "-lssl", "-lcrypto"],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    return binary


def run_loadgen(binary: Path, port: int, *args: str) -> dict[str, Any]:
    done = subprocess.run(
        [str(binary), "--port", str(port), *args, *BRIEF],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_loadgen_echoes_small_and_large_bodies_through_the_server(
    loadgen: Path, tmp_path: Path
) -> None:
    server = start_server_process(
        tmp_path, env=clean_env(COMPRESSION_THRESHOLD="0", DB_BACKEND="none", RATE_LIMIT="0")
    )
    try:
        small = run_loadgen(loadgen, server.port, "--proto", "pyasync", "--connections", "4",
                            "--inflight", "8", "--size", "32")  # fmt: skip
        large = run_loadgen(loadgen, server.port, "--proto", "pyasync", "--size", str(1 << 20))
    finally:
        assert server.stop() == 0
    assert small["requests"] > 100 and small["errors"] == 0
    assert 0 < small["p50_us"] <= small["p99_us"] <= small["max_us"]
    assert large["requests"] > 0 and large["errors"] == 0 and large["mb_per_s"] > 0


def test_loadgen_drives_the_floor_server(loadgen: Path, tmp_path: Path) -> None:
    floor = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "floor.py"), "--port", "0", "--loop", "asyncio"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert floor.stdout is not None
        ready = floor.stdout.readline().split()
        assert ready[0] == "ready", ready
        result = run_loadgen(loadgen, int(ready[1]), "--proto", "floor", "--connections", "2",
                             "--inflight", "4")  # fmt: skip
    finally:
        floor.terminate()
        assert floor.wait(15) == 0
        assert floor.stdout is not None
        floor.stdout.close()
    assert result["requests"] > 100 and result["errors"] == 0


def test_loadgen_reads_keys_through_the_server(loadgen: Path, tmp_path: Path) -> None:
    database = str(tmp_path / "bench.sqlite3")
    subprocess.run(
        [sys.executable, str(ROOT / "bench" / "kv_get.py"), "fill", "--backend", "sqlite",
         "--sqlite-path", database],
        check=True, timeout=60,
    )  # fmt: skip
    env = clean_env(DB_BACKEND="sqlite", SQLITE_PATH=database, KV_TABLE="bench_kv", RATE_LIMIT="0")
    server = start_server_process(tmp_path, env=env)
    try:
        result = run_loadgen(loadgen, server.port, "--proto", "pyasync", "--keys", "10000",
                             "--connections", "2", "--inflight", "4", "--size", "0")  # fmt: skip
    finally:
        assert server.stop() == 0
    assert result["requests"] > 50 and result["errors"] == 0  # every key exists: no NOT_FOUND


@pytest.mark.parametrize("proto", ["pyasync", "floor", "socketio"])
def test_loadgen_pubsub_mode_delivers_every_message_to_every_subscriber(
    loadgen: Path, tmp_path: Path, proto: str
) -> None:
    pubsub = ["--proto", proto, "--mode", "pubsub", "--subscribers", "50"]
    if proto == "pyasync":
        env = clean_env(COMPRESSION_THRESHOLD="0", DB_BACKEND="none", BROKER_URL="memory://")
        server = start_server_process(tmp_path, env=env)
        try:
            busy = run_loadgen(loadgen, server.port, *pubsub, "--window", "16")
            light = run_loadgen(loadgen, server.port, *pubsub, "--rate", "40")
        finally:
            assert server.stop() == 0
    else:
        if proto == "socketio":
            pytest.importorskip("socketio")
        program = {"floor": "floor_pubsub.py", "socketio": "peers/socketio_server.py"}[proto]
        peer = subprocess.Popen(
            [sys.executable, str(ROOT / "bench" / program), "--port", "0"],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert peer.stdout is not None
            ready = peer.stdout.readline().split()
            assert ready[:1] == ["ready"], ready
            busy = run_loadgen(loadgen, int(ready[1]), *pubsub, "--window", "16")
            light = run_loadgen(loadgen, int(ready[1]), *pubsub, "--rate", "40")
        finally:
            peer.terminate()
            assert peer.wait(15) == 0
            assert peer.stdout is not None
            peer.stdout.close()
    for result in (busy, light):  # offsets in sequence, nothing missing once the publisher stops
        assert result["deliveries"] > 0 and result["errors"] == 0 and result["lost"] == 0
    assert busy["messages"] > 0 and 0 < busy["p50_us"] <= busy["p99_us"] <= busy["max_us"]
    assert light["published"] <= 40  # 0.7 s at 40 messages/s: about 28, never a flood
