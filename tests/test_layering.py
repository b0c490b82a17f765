"""The layers import in one direction: ``alexnet`` (what is trained) <- ``pipeline`` (how it runs in
parallel) <- ``cluster`` (where it runs). Only ``cluster`` knows Ray; ``alexnet`` never touches
torch.distributed.

Read from the source (every import statement, at module level or inside a function), so a lazy
import breaks the rule as surely as a top-level one. The ``alexnet`` command's subcommand registry
(``alexnet/cli.py``) looks other packages' commands up by name at run time; that is a plugin lookup
that falls back when the package is absent, not an import of the layer above.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# package -> modules it must not import (a module counts with everything below it)
RULES: dict[str, tuple[str, ...]] = {
    "alexnet": ("ray", "torch.distributed", "pipeline", "cluster"),
    "pipeline": ("ray", "cluster"),
}


def imported_modules(source: str) -> list[tuple[int, str]]:
    """(line, module) of every import in ``source``; ``from a import b`` yields ``a`` and ``a.b``
    (``b`` may be a module: ``from torch import distributed``)."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
            out += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return out


def violations(package_dir: Path, forbidden: tuple[str, ...]) -> list[str]:
    """``file:line: module`` for each import under ``package_dir`` of a module in ``forbidden``."""
    found = []
    for path in sorted(package_dir.rglob("*.py")):
        for line, module in imported_modules(path.read_text()):
            if any(module == f or module.startswith(f + ".") for f in forbidden):
                found.append(f"{path.relative_to(package_dir.parent)}:{line}: {module}")
    return found


@pytest.mark.parametrize("package", sorted(RULES))
def test_the_product_keeps_its_layers(package):
    assert violations(ROOT / package, RULES[package]) == []


def test_a_planted_import_breaks_the_rule(tmp_path):
    pkg = tmp_path / "alexnet"
    (pkg / "data").mkdir(parents=True)
    (pkg / "ok.py").write_text(
        "import torch\nfrom torch import nn\nimport raylib\nimport pipelines_of_mine\n"
    )
    (pkg / "data" / "lazy.py").write_text(
        "def f():\n    import ray.util\n    from torch import distributed\n"
        "    import torch.distributed as dist\n    from cluster.data import DataPool\n"
    )
    assert violations(pkg, RULES["alexnet"]) == [
        "alexnet/data/lazy.py:2: ray.util",
        "alexnet/data/lazy.py:3: torch.distributed",
        "alexnet/data/lazy.py:4: torch.distributed",
        "alexnet/data/lazy.py:5: cluster.data",
        "alexnet/data/lazy.py:5: cluster.data.DataPool",
    ]
    (pkg / "ok.py").write_text("from pipeline.grid import Grid\n")
    assert "alexnet/ok.py:1: pipeline.grid" in violations(pkg, RULES["alexnet"])
    # pipeline may use torch.distributed, never Ray
    assert violations(pkg, RULES["pipeline"]) == [
        "alexnet/data/lazy.py:2: ray.util",
        "alexnet/data/lazy.py:5: cluster.data",
        "alexnet/data/lazy.py:5: cluster.data.DataPool",
    ]
