"""The package's shape: no import cycle, and a CLI that reads studies without torch."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import make_study

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ablations", "datamodules", "lightning_modules")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Every import between the project's modules, at module level or inside a function."""
    modules = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from pkg import mod` names the submodule when there is one
                targets = [
                    f"{node.module}.{a.name}"
                    if f"{node.module}.{a.name}" in modules
                    else node.module
                    for a in node.names
                ]
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert "ablations.export" in graph["ablations.launcher"]  # the graph sees lazy imports
    assert cycles(graph) == []


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def _imports_of(args: list[str], cwd: Path) -> dict:
    """Run `ablate ARGS` in a fresh interpreter; report its exit code and heavy imports."""
    code = (
        "import json, sys\n"
        "from ablations.cli import main\n"
        "try:\n"
        f"    rc = main({args!r})\n"
        "except SystemExit as e:\n"
        "    rc = e.code\n"
        "heavy = [m for m in ('torch', 'lightning', 'torchvision', 'wandb') if m in sys.modules]\n"
        "print(json.dumps({'rc': rc, 'heavy': heavy}), file=sys.stderr)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True
    )
    return json.loads(done.stderr.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["sweep", "--help"],
        ["status", "paper"],
        ["export", "paper", "--format", "csv,md"],
        ["report", "paper"],
    ],
    ids=["help", "sweep-help", "status", "export", "report"],
)
def test_reading_commands_import_neither_torch_nor_lightning(args, tmp_path):
    make_study(tmp_path)
    got = _imports_of(args, tmp_path)
    assert got == {"rc": 0, "heavy": []}
    if args[0] == "export":
        assert (tmp_path / "runs/paper/export/summary.csv").is_file()
    if args[0] == "report":  # it reads the study, never W&B
        assert (tmp_path / "runs/paper/report.html").is_file()


def test_models_may_import_torch_but_not_lightning(tmp_path):
    code = (
        "import sys\nfrom ablations.cli import main\nmain(['models', '--format', 'csv'])\n"
        "print('lightning' in sys.modules, file=sys.stderr)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "All-CNN-C" in done.stdout
    assert done.stderr.strip().splitlines()[-1] == "False"
