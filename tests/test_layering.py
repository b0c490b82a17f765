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


def module_graph(
    root: Path, packages: tuple[str, ...] = ("alexnet", "pipeline", "cluster")
) -> dict[str, set[str]]:
    """Module -> the project modules it imports (every import statement, lazy ones too; ``from a
    import b`` counts as ``a.b`` where that is a module, else ``a``)."""
    files = {
        ".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p
        for pkg in packages
        for p in sorted((root / pkg).rglob("*.py"))
    }
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        for _, name in imported_modules(path.read_text()):
            target = name if name in files else name.rsplit(".", 1)[0] if "." in name else name
            if target in files and target != mod:
                graph[mod].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def test_no_import_circle_anywhere():
    """No two modules of the product import each other, directly or around a circle (lazy imports
    included: a circle hidden in a function is still one concern split in two)."""
    assert cycles(module_graph(ROOT)) == []


def test_a_planted_circle_is_found(tmp_path):
    pkg = tmp_path / "alexnet"
    (pkg / "data").mkdir(parents=True)
    (pkg / "data" / "reader.py").write_text("from alexnet.data.encoded import draw\n")
    (pkg / "data" / "encoded.py").write_text("def f():\n    from alexnet.data import reader\n")
    (pkg / "ok.py").write_text("import alexnet.data.reader\n")
    assert cycles(module_graph(tmp_path, ("alexnet",))) == [["alexnet.data.encoded", "alexnet.data.reader"]]


def test_a_trainer_or_data_actor_imports_neither_torchvision_nor_dynamo():
    """Every Ray actor of a run (trainer ranks, data workers, the positions registry) is a fresh
    process importing these modules; torchvision (whose ops import Dynamo) and Dynamo cost about
    as much CPU to import as torch itself, and only a process that decodes a JPEG or compiles
    needs them, so they are imported where used (measured: ``python -X importtime``)."""
    import subprocess
    import sys

    heavy = ("torchvision", "torch._dynamo")
    code = (
        "import sys, cluster.rank, cluster.data, cluster.val, cluster.group, cluster.job; "
        f"print(sorted(m for m in {heavy!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout


def test_an_eager_training_step_imports_no_dynamo():
    """A trainer rank's set-up and steps (the process flags, the real engine with the paper's
    update and keyed dropout, here on a 1x2x2 grid of threads) import no Dynamo when nothing
    compiles: torch's optimizer base class and ``torch.compiler.disable`` import it on their first
    call (~1.3 s of CPU with sympy, in every rank of every run) for what only a compiled run uses.
    """
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from alexnet.config import ModelConfig\n"
        "from pipeline.grid import Grid\n"
        "from pipeline.precision import configure_backends\n"
        "from pipeline.verify import check_nccl_rules\n"
        "configure_backends(torch.device('cpu'), 'fp32', False, False)\n"
        "grid = Grid.parse('1x2x2', 2, 4)\n"
        "assert check_nccl_rules(ModelConfig.small(num_classes=10, input_size=32), grid) == []\n"
        "print(sorted(m for m in ('torch._dynamo', 'torch._inductor') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout
