"""The package's layers, from the bottom: the base modules (``ichat/*.py``), the process
tools, the backends, the worker, the commands. No module imports a layer above its own;
the entry points (``ichat.cli``, ``ichat.__main__``) only dispatch to the commands."""

from __future__ import annotations

import ast
from pathlib import Path

import ichat

PACKAGE = Path(ichat.__file__).parent
LAYERS = {"process": 1, "backends": 2, "worker": 3, "observability": 3, "commands": 4}
ENTRY_POINTS = {"cli.py", "__main__.py"}


def layer(module: str) -> int:
    """``ichat.worker.supervisor`` -> 3; a base module (``ichat.errors``) -> 0."""
    parts = module.split(".")
    return LAYERS.get(parts[1], 0) if len(parts) > 1 else 0


def imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ichat"):
            found += [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("ichat")]
    return found


def test_no_import_points_up() -> None:
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent)
        if relative.parent == Path("ichat") and relative.name in ENTRY_POINTS:
            continue
        own = layer(".".join(relative.with_suffix("").parts))
        upward += [f"{relative} -> {m}" for m in imports(path) if layer(m) > own]
    assert upward == []


def test_every_module_is_in_a_layer_folder_or_the_base() -> None:
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders == set(LAYERS)


def test_the_readme_lists_every_module() -> None:
    readme = (PACKAGE.parent / "README.md").read_text()
    modules = [
        str(p.relative_to(PACKAGE.parent))
        for p in PACKAGE.rglob("*.py")
        if p.name not in ("__init__.py", "__main__.py")
    ]
    assert [m for m in modules if m not in readme] == []
