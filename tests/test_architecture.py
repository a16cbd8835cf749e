"""The package's layout holds: imports step only to lower rooms, modules stay small, models are
peers (no kind switches outside the registry), and no test module imports another."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tests.support.paths import REPO

PACKAGE = REPO / "mri_vqvae"
LAYER = {"core": 0, "models": 1, "metrics": 1, "config": 2, "data": 3, "artifacts": 4,
         "training": 5, "tasks": 5, "evaluation": 6, "api": 7}
MAX_LINES = 420


def _room(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _imported_rooms(path: Path) -> set[str]:
    """Rooms of mri_vqvae that `path` imports, at any depth of its code."""
    rooms = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module == "mri_vqvae":
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mri_vqvae."):
            names = [node.module.split(".")[1]]
        elif isinstance(node, ast.Import):
            names = [a.name.split(".")[1] for a in node.names if a.name.startswith("mri_vqvae.")]
        rooms.update(n for n in names if n in LAYER)
    return rooms


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if _room(p) in LAYER)


def test_every_module_belongs_to_a_room() -> None:
    loose = [p.name for p in PACKAGE.glob("*.py") if p.stem not in LAYER and p.stem != "__init__"]
    assert loose == []


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_step_only_to_lower_rooms(path: Path) -> None:
    room = _room(path)
    upward = sorted(r for r in _imported_rooms(path) if r != room and LAYER[r] >= LAYER[room])
    assert upward == [], f"{room} may not import {upward}"


def test_modules_stay_small() -> None:
    lines = {str(p.relative_to(REPO)): len(p.read_text().splitlines())
             for p in [*PACKAGE.rglob("*.py"), *(REPO / "pipelines").glob("*.py")]}
    assert {k: n for k, n in lines.items() if n > MAX_LINES} == {}


def test_model_kinds_are_named_only_in_the_registry_and_their_own_folders() -> None:
    kinds = re.compile(r"""[=!]=\s*["'](vqvae|pixelcnn|unigram|prior)["']""")
    switches = [f"{p.relative_to(REPO)}:{n}" for p in PACKAGE.rglob("*.py")
                for n, line in enumerate(p.read_text().splitlines(), 1) if kinds.search(line)]
    assert switches == []


def test_no_test_module_imports_another() -> None:
    tests = REPO / "tests"
    pattern = re.compile(r"^\s*(from|import) tests(\.\w+)*\.(test_\w+|conftest)\b", re.M)
    offenders = [str(p.relative_to(REPO)) for p in tests.rglob("*.py")
                 if pattern.search(p.read_text(encoding="utf-8"))]
    assert offenders == []


def _module_imports() -> dict[str, set[str]]:
    """Top-level imports between modules of the package: {module: modules it imports}."""
    modules = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
               for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mri_vqvae"):
                targets |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def test_no_import_cycles_between_modules() -> None:
    graph, done, cycles = _module_imports(), set(), []

    def visit(module: str, path: list[str]) -> None:
        for target in graph[module]:
            if target in path:
                cycles.append(path[path.index(target):] + [target])
            elif target not in done:
                visit(target, [*path, target])
        done.add(module)

    for module in graph:
        if module not in done:
            visit(module, [module])
    assert cycles == []
