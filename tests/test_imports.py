"""The package's imports run one way: no module of reshape reaches itself through other reshape modules,
deferred imports (inside functions) included. And the CLI's help needs neither torch nor transformers."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "reshape"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every reshape module `path` imports, at any depth of its code."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "reshape"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "reshape":
                continue
            found.add(target)
            for alias in node.names:  # `from . import x` may name a module
                if (PACKAGE.parent / f"{target}.{alias.name}".replace(".", "/")).with_suffix(".py").is_file():
                    found.add(f"{target}.{alias.name}")
    return found - {name}


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges = {}
    for name, path in modules.items():
        targets = set()
        for target in imports(path):
            # importing reshape.a.b runs reshape/a/__init__.py first: that package is reached too
            parts = target.split(".")
            targets |= {".".join(parts[:i]) for i in range(2, len(parts) + 1)}
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        # a module's own parent packages are already being imported when it runs: not an edge back
        edges[name] = {t for t in targets if t in modules and t != name and not package.startswith(t)}
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_in_the_package():
    assert find_cycle(graph()) is None, " -> ".join(find_cycle(graph()))


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    edges = graph()  # relative, absolute and deferred imports are all read
    assert {"reshape.transfer", "reshape.version", "reshape.fx"} <= edges["reshape.pipeline"]
    assert "reshape.train.finetune" in edges["reshape.cli"]  # imported inside a command


@pytest.mark.integration
def test_help_imports_neither_torch_nor_transformers():
    code = ("import sys, runpy; sys.argv = ['reshape', '--help']\n"
            "try:\n    runpy.run_module('reshape.cli', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'transformers', 'timm') if m in sys.modules]\n"
            "print('heavy:', heavy)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "Rebuild transformers with more attention heads" in done.stdout
    assert done.stdout.strip().endswith("heavy: []")


def test_no_public_name_is_also_a_module():
    # Importing reshape.X sets the package attribute X to that module, hiding a lazily imported function X.
    import reshape

    modules = {p.stem for p in PACKAGE.glob("*.py")} | {p.name for p in PACKAGE.iterdir() if p.is_dir()}
    assert not set(reshape.__all__) & modules
    import reshape.reporting  # noqa: F401  (the module behind reshape.report)

    assert callable(reshape.report)
