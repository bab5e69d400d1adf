"""Does a vLLM release have everything ``ichat.backends.vllm_compat`` looks up?

Reads the release's sources without importing them (a release may need a torch this
machine cannot run): each name of the compat module's tables must be defined or
re-exported at the top level of one of its candidate modules, and each engine-client
internal that a workaround reaches for must appear in ``AsyncLLM``'s source.

    python scripts/check_vllm_release.py vllm-0.33.0-...whl   # a wheel, or
    python scripts/check_vllm_release.py .venv/lib/python3.11/site-packages  # an install

Prints one line a name and a JSON summary (``--json FILE``); exits 1 when a required
name is found nowhere.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: ichat

from ichat.backends import vllm_compat

ASYNC_LLM = "vllm.v1.engine.async_llm"
# what the workarounds reach for on the engine client, as it appears in AsyncLLM's source
CLIENT_INTERNALS = {
    "engine_core_zmq_context": r"self\.engine_core\s*[:=]",
    "engine_errored_flag": r"def errored\(",
    "abort_all_requests": r"def pause_generation\([^)]*mode",
}


def reader(source: Path) -> Callable[[str], str | None]:
    """``read(module)`` -> the module's source from a wheel or an install, or None."""
    if source.suffix == ".whl":
        wheel = zipfile.ZipFile(source)
        names = set(wheel.namelist())

        def from_wheel(module: str) -> str | None:
            base = module.replace(".", "/")
            for path in (f"{base}.py", f"{base}/__init__.py"):
                if path in names:
                    return wheel.read(path).decode()
            return None

        return from_wheel

    def from_tree(module: str) -> str | None:
        base = source / module.replace(".", "/")
        for path in (base.with_suffix(".py"), base / "__init__.py"):
            if path.is_file():
                return path.read_text()
        return None

    return from_tree


def top_level_names(code: str) -> set[str]:
    """Names a module defines or imports at its top level (what ``getattr`` finds)."""
    names: set[str] = set()
    for node in ast.parse(code).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


def find(read: Callable[[str], str | None], name: str, modules: tuple[str, ...]) -> str | None:
    """The first of ``modules`` that has ``name``, as the compat module would find it."""
    for module in modules:
        code = read(module)
        if code is not None and name in top_level_names(code):
            return module
    return None


def check(source: Path) -> dict[str, object]:
    read = reader(source)
    tables = {
        "required": vllm_compat.CANDIDATES,
        "optional": vllm_compat.OPTIONAL,
        "engine_keyed_caches": vllm_compat.ENGINE_KEYED_CACHES,
    }
    found = {
        table: {name: find(read, name, modules) for name, modules in names.items()}
        for table, names in tables.items()
    }
    client = read(ASYNC_LLM) or ""
    internals = {name: bool(re.search(p, client)) for name, p in CLIENT_INTERNALS.items()}
    missing = sorted(name for name, module in found["required"].items() if module is None)
    return {"source": source.name, "found": found, "client_internals": internals,
            "missing_required": missing}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="a vLLM wheel, or the folder holding vllm/")
    parser.add_argument("--json", type=Path, default=None, help="write the summary here")
    args = parser.parse_args()
    result = check(args.source)
    for table, names in result["found"].items():  # type: ignore[attr-defined]
        for name, module in names.items():
            print(f"{table:20} {name:28} {module or 'NOT FOUND'}")
    for name, ok in result["client_internals"].items():  # type: ignore[attr-defined]
        print(f"{'client internal':20} {name:28} {'found' if ok else 'NOT FOUND'}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 1 if result["missing_required"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
