"""The README's "Add an action" walkthrough, applied to a copy of the project, really works."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from tests.e2e.conftest import ROOT, run_client, start_server

MARKER = re.compile(r"<!-- walkthrough: (?P<place>[^>]+?) -->\s*```python\n(?P<code>.*?)```", re.S)
ENUM_MEMBER = re.compile(r"^    [A-Z_]+ = \d+\n", re.M)
BODIES_MARKER = "# ---- your bodies go here, above the check"


def readme_blocks() -> dict[str, str]:
    readme = (ROOT / "README.md").read_text()
    blocks = {m["place"]: m["code"] for m in MARKER.finditer(readme)
              if not m["place"].startswith("database")}  # fmt: skip  # test_readme_database.py
    expected = {"package.py enum", "package.py bodies", "actions.py"}
    assert set(blocks) == expected, f"README walkthrough markers: {sorted(blocks)}"
    return blocks


def apply_walkthrough(project: Path) -> None:
    """Edit package.py and actions.py exactly where the README tells a user to."""
    blocks = readme_blocks()
    package_py = (project / "package.py").read_text()
    enum_start = package_py.index("class PACKAGE(")
    enum_end = package_py.index("\nclass ", enum_start + 1)
    last_member = list(ENUM_MEMBER.finditer(package_py, enum_start, enum_end))[-1]
    package_py = (
        package_py[: last_member.end()]
        + blocks["package.py enum"]
        + package_py[last_member.end() :]
    )
    marker_end = package_py.index("\n", package_py.index(BODIES_MARKER)) + 1
    package_py = (
        package_py[:marker_end] + "\n\n" + blocks["package.py bodies"] + package_py[marker_end:]
    )
    (project / "package.py").write_text(package_py)
    actions_py = (project / "actions.py").read_text()
    (project / "actions.py").write_text(actions_py + "\n\n" + blocks["actions.py"])


def test_walkthrough_adds_a_working_action(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    for source in ROOT.glob("*.py"):
        shutil.copy(source, project)
    shutil.copytree(ROOT / "pyasync", project / "pyasync")
    apply_walkthrough(project)
    untouched = (ROOT / "client.py").read_bytes()
    assert (project / "client.py").read_bytes() == untouched  # no client change needed
    server = start_server(project, program=project / "server.py")
    try:
        result = run_client(
            "--port",
            str(server.port),
            "call",
            "REVERSE",
            '{"text": "stressed"}',
            cwd=project,
            program=project / "client.py",
        )
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == {"text": "desserts"}
    finally:
        assert server.stop() == 0
