"""Imports point down: the CLI on top (imported by nothing), then lightning_modules and analysis, then the core
(chainforget), with no circle between modules, function-level imports included."""

import ast
from pathlib import Path

from conftest import ROOT

PACKAGES = {
    "chainforget": ROOT / "src" / "chainforget",
    "lightning_modules": ROOT / "lightning_modules",
    "analysis": ROOT / "analysis",
}


def module_files() -> dict[str, Path]:
    files = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join([package, *parts])
            files[name.removesuffix(".__init__")] = path
    return files


def imports(path: Path, modules: set[str]) -> set[str]:
    """Project modules ``path`` imports anywhere in it (``from a import b`` counts as ``a.b`` when that is a
    module, else as ``a``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module for a in node.names
            }
    return {name for name in found if name in modules}


def graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imports(path, set(files)) - {name} for name, path in files.items()}


def layer(module: str) -> int:
    if module == "chainforget.cli":
        return 2
    return 0 if module.startswith("chainforget") else 1


def test_the_module_walk_sees_the_project():
    edges = graph()
    assert len(edges) >= 30 and "chainforget.tasks.bbq" in edges and "lightning_modules.chain" in edges
    assert "chainforget.config" in edges["lightning_modules.search"]  # a function-level import is seen


def test_imports_point_down_and_nothing_imports_the_cli():
    upward = [
        (module, target)
        for module, targets in graph().items()
        for target in targets
        if layer(target) > layer(module) or target == "chainforget.cli"
    ]
    assert not upward, f"imports that point up: {upward}"
    sideways = [
        (m, t)
        for m, ts in graph().items()
        for t in ts
        if m.startswith("analysis") and t.startswith("lightning_modules")
    ]
    assert not sideways, f"analysis must not import the Lightning side: {sideways}"


def test_no_import_circles():
    edges = graph()
    circles = []
    for start in edges:  # a path from a module's imports back to the module itself
        seen, stack = set(), list(edges[start])
        while stack:
            module = stack.pop()
            if module == start:
                circles.append(start)
                break
            if module not in seen:
                seen.add(module)
                stack.extend(edges.get(module, ()))
    assert not circles, f"modules on an import circle: {sorted(circles)}"
