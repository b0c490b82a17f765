"""The README's opening puts `alexnet` on the PATH (issue 24), as written, in a fresh shell.

`make demo` / `make test` are not run here (they are what set up .venv, which this test runs in);
every other line of the opening's shell blocks is, in one `bash -c` with a clean environment, and
so is the fix the troubleshooting table gives for `alexnet: command not found`.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
CLEAN = {"HOME": "/tmp", "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}  # a new login, nothing activated


def _fresh_shell(script: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", script], cwd=ROOT, env=CLEAN, capture_output=True, text=True, timeout=100
    )


def _version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def opening_lines() -> list[str]:
    """The shell lines of the README before its first section, less the `make` ones."""
    opening = (ROOT / "README.md").read_text().split("\n## ", 1)[0]
    lines = [
        line
        for block in re.findall(r"```sh\n(.*?)```", opening, flags=re.DOTALL)
        for line in block.splitlines()
    ]
    return [line for line in lines if line.strip() and not line.startswith("make ")]


def test_the_readme_opening_puts_alexnet_on_the_path_of_a_fresh_shell():
    assert _fresh_shell("alexnet --version").returncode != 0  # what a new shell has without it
    lines = opening_lines()
    assert any(line.split("#")[0].strip() == "alexnet --version" for line in lines), lines
    r = _fresh_shell("set -e\n" + "\n".join(lines))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"alexnet-pipeline {_version()}" in r.stdout


def test_the_troubleshooting_fix_for_command_not_found_works_as_written():
    text = (ROOT / "README.md").read_text()
    (row,) = [line for line in text.splitlines() if line.startswith("| `alexnet: command not found`")]
    fix = re.findall(r"`([^`]+)`", row.split("|")[2])[0]
    assert fix == ". .venv/bin/activate"
    r = _fresh_shell(f"set -e\n{fix}\nalexnet --version")
    assert r.returncode == 0 and f"alexnet-pipeline {_version()}" in r.stdout, r.stdout + r.stderr
