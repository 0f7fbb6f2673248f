"""The README's "Add an action" walkthrough, applied to a copy of the project, really works."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT, clean_env, run_client_program, start_server_process

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
    shutil.copytree(ROOT / "pyasync", project / "pyasync")  # internals the faces import
    apply_walkthrough(project)
    untouched = (ROOT / "client.py").read_bytes()
    assert (project / "client.py").read_bytes() == untouched  # no client change needed
    server = start_server_process(project, program=project / "server.py")
    try:
        result = run_client_program(
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
        subscriber = subprocess.Popen(
            [sys.executable, str(project / "client.py"), "--port", str(server.port), "sub",
             "reversed", "--since", "0"],
            cwd=project, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        try:
            assert subscriber.stdout is not None
            assert subscriber.stdout.readline() == "reversed 1 desserts\n"
        finally:
            subscriber.send_signal(signal.SIGINT)  # Ctrl-C ends it cleanly
            _, errors = subscriber.communicate(timeout=15)
        assert subscriber.returncode == 0, errors
    finally:
        assert server.stop() == 0
