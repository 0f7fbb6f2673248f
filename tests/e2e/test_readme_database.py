"""The README's database example, applied to a copy of the project, works on SQLite."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from tests.helpers import (
    ROOT,
    Completed,
    ServerProcess,
    clean_env,
    run_client_program,
    start_server_process,
)

MARKER = re.compile(
    r"<!-- walkthrough: (?P<place>database[^>]*?) -->\s*```python\n(?P<code>.*?)```", re.S
)
ENUM_MEMBER = re.compile(r"^    [A-Z_]+ = \d+\n", re.M)
BODIES_MARKER = "# ---- your bodies go here, above the check"


def readme_blocks() -> dict[str, str]:
    blocks = {m["place"]: m["code"] for m in MARKER.finditer((ROOT / "README.md").read_text())}
    expected = {"database package.py enum", "database package.py bodies", "database"}
    assert set(blocks) == expected, f"README database markers: {sorted(blocks)}"
    return blocks


def apply_example(project: Path) -> None:
    """Put the README's blocks where it says: the PACKAGE enum, the bodies, ``actions.py``."""
    blocks = readme_blocks()
    package_py = (project / "package.py").read_text()
    enum_start = package_py.index("class PACKAGE(")
    enum_end = package_py.index("\nclass ", enum_start + 1)
    last_member = list(ENUM_MEMBER.finditer(package_py, enum_start, enum_end))[-1].end()
    package_py = (
        package_py[:last_member] + blocks["database package.py enum"] + package_py[last_member:]
    )
    marker_end = package_py.index("\n", package_py.index(BODIES_MARKER)) + 1
    package_py = (
        package_py[:marker_end]
        + "\n\n"
        + blocks["database package.py bodies"]
        + package_py[marker_end:]
    )
    (project / "package.py").write_text(package_py)
    actions_py = (project / "actions.py").read_text()
    (project / "actions.py").write_text(actions_py + "\n\n" + blocks["database"])


def call(server: ServerProcess, project: Path, name: str, body: dict[str, Any]) -> Completed:
    return run_client_program(
        "--port", str(server.port), "call", name, json.dumps(body),
        cwd=project, program=project / "client.py",
    )  # fmt: skip


def test_the_database_example_joins_and_scores_on_sqlite(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    for source in ROOT.glob("*.py"):
        shutil.copy(source, project)
    shutil.copytree(ROOT / "pyasync", project / "pyasync")
    apply_example(project)
    sqlite_file = str(tmp_path / "players.sqlite3")
    env = clean_env(DB_BACKEND="sqlite", DB_URL="", SQLITE_PATH=sqlite_file)
    server = start_server_process(project, env=env, program=project / "server.py")
    try:
        joined = call(server, project, "JOIN", {"player": "ada"})
        assert joined.returncode == 0, joined.stderr
        assert json.loads(joined.stdout) == {}
        for points, total in ((5, 5), (3, 8)):
            scored = call(server, project, "SCORE", {"player": "ada", "points": points})
            assert scored.returncode == 0, scored.stderr
            assert json.loads(scored.stdout) == {"total": total}
        again = call(server, project, "JOIN", {"player": "ada"})
        assert again.returncode == 1
        assert "ALREADY_EXISTS: 'ada' has joined already" in again.stderr
        stranger = call(server, project, "SCORE", {"player": "bob", "points": 1})
        assert stranger.returncode == 1 and "NOT_FOUND: 'bob' has not joined" in stranger.stderr
    finally:
        assert server.stop() == 0
    assert "Traceback" not in server.log
