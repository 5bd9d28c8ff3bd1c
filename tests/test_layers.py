"""Imports point one way: each package imports only itself and the layers below it, the
bottom layer (core) imports nothing of ours, the CLI is imported by nothing, and only the
executor and the measuring part of calibration import torch."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Lowest first; a package may import packages of a lower rank (and itself), never its own
# rank's siblings or anything above.
LAYERS = {"core": 0, "hw_profiles": 1, "simulator": 2, "planner": 3, "executor": 3,
          "calibration": 4, "validation": 5, "reports": 6, "cli": 7}
FOLDERS = {"core": "core", "hw_profiles": "hw_profiles", "simulator": "simulator",
           "planner": "planner", "executor": "executor", "calibration": "calibration",
           "validation": "validation", "reports": "reports", "cli": "meshplan/cli"}
TORCH_ALLOWED = ("executor", "calibration/measure", "calibration/overhead.py", "calibration/probe.py")


def _imports(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, node.lineno))
    return out


def _layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "meshplan" or len(parts) < 2:
        return None
    return parts[1]


def test_imports_point_down():
    wrong = []
    for package, folder in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            for module, line in _imports(path):
                target = _layer_of(module)
                if target is None or target == package:
                    continue
                if target not in LAYERS or LAYERS[target] >= LAYERS[package]:
                    wrong.append(f"{path.relative_to(ROOT)}:{line}: {package} imports {module}")
    assert not wrong, "\n".join(wrong)


def test_only_the_executor_and_measuring_import_torch():
    wrong = []
    for package, folder in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            if rel.startswith(TORCH_ALLOWED):
                continue
            wrong += [f"{rel}:{line}: imports {module}" for module, line in _imports(path)
                      if module.split(".")[0] == "torch"]
    assert not wrong, "\n".join(wrong)


def test_library_code_uses_namespaced_imports():
    """No generic top-level names (simulator, planner, ...): only meshplan.*."""
    generic = {"core", "hw_profiles", "simulator", "planner", "executor", "calibration",
               "validation", "reports"}
    wrong = [f"{path.relative_to(ROOT)}:{line}: import {module}"
             for folder in [*FOLDERS.values(), "tests", "benchmarks"]
             for path in sorted((ROOT / folder).rglob("*.py"))
             for module, line in _imports(path) if module.split(".")[0] in generic]
    assert not wrong, "\n".join(wrong)
