"""The README's cluster, monitoring and troubleshooting sections name only real commands and files.

Each shell line of those sections is split into commands: `alexnet ...` (also after `--` in
`ray job submit` and quoted in `ray exec`) must parse with the real `alexnet` parser, `ray ...`
with Ray's own click commands, and every `deploy/...` path must exist.
"""

from __future__ import annotations

import glob
import re
import shlex
from pathlib import Path

from tests.deploy.test_configs import alexnet_parser, check_alexnet_command

ROOT = Path(__file__).resolve().parents[2]
SECTIONS = ("Running on a cluster", "Monitoring", "Troubleshooting")


def sections() -> str:
    """The text of this work's README sections."""
    text = (ROOT / "README.md").read_text()
    parts = re.split(r"^## ", text, flags=re.MULTILINE)
    mine = [p for p in parts if p.split("\n", 1)[0].strip() in SECTIONS]
    assert len(mine) == len(SECTIONS), "README lost one of: " + ", ".join(SECTIONS)
    return "\n".join(mine)


def shell_commands(text: str) -> list[list[str]]:
    """argv of every command in the ```sh blocks (continuations joined, comments dropped)."""
    out = []
    for block in re.findall(r"```sh\n(.*?)```", text, flags=re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()
            for part in re.split(r"&&|;|(?<!\|)\|(?!\|)|&\s*$", line):
                argv = shlex.split(part)
                while argv and re.match(r"^[A-Z_]+=", argv[0]):
                    argv = argv[1:]
                if argv and argv[0] != "export":
                    out.append(argv)
    return out


def check_ray(argv: list[str]) -> None:
    from ray.scripts.scripts import cli

    cmd, i = cli, 1
    while hasattr(cmd, "commands"):
        assert argv[i] in cmd.commands, f"`ray {' '.join(argv[1 : i + 1])}` does not exist"
        cmd, i = cmd.commands[argv[i]], i + 1
    ctx = cmd.make_context(argv[i - 1], argv[i:])  # click.UsageError on a bad flag
    if "--" in argv:
        check_alexnet_command(argv[argv.index("--") + 1 :], "README")
    for value in ctx.params.values():
        if isinstance(value, str) and value.startswith("alexnet "):
            check_alexnet_command(shlex.split(value), "README")


def test_readme_cluster_commands_exist():
    alexnet_parser()
    cmds = shell_commands(sections())
    assert len(cmds) >= 15, cmds
    seen = set()
    for argv in cmds:
        if argv[0] == "alexnet":
            check_alexnet_command(argv, "README")
        elif argv[0] == "ray":
            check_ray(argv)
        seen.add(argv[0])
    assert {"ray", "kubectl", "prometheus"} <= seen


def test_readme_deploy_paths_exist():
    paths = set(re.findall(r"\bdeploy/[\w./*-]+", sections()))
    assert len(paths) >= 10
    for p in paths:
        p = p.rstrip(".")
        assert glob.glob(str(ROOT / p)), f"README names {p}, which does not exist"
