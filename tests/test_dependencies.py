"""Every third-party import of the package is declared in pyproject.toml: a fresh install
from the README must be able to run every module. Optional extras are allowed only where
the import is guarded (try/except ImportError raising a clear error)."""
from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _dist_name(requirement: str) -> str:
    """'torch>=2.9' -> 'torch' (PEP 503 normalised)."""
    name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement).group(1)
    return re.sub(r"[-_.]+", "-", name).lower()


def package_dirs() -> list[Path]:
    """The folders pyproject.toml installs (its package-dir mapping)."""
    return sorted({ROOT / d for d in PYPROJECT["tool"]["setuptools"]["package-dir"].values()})


def _guarded(node: ast.AST, parents: dict) -> bool:
    """Inside a try whose handlers catch ImportError / ModuleNotFoundError."""
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.Try):
            for h in node.handlers:
                names = [h.type] if not isinstance(h.type, ast.Tuple) else h.type.elts
                if any(isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError")
                       for n in names):
                    return True
    return False


def third_party_imports(path: Path) -> list[tuple[str, int, bool]]:
    """(top-level module, line, guarded) of every absolute import in a file that is neither
    the standard library nor ours."""
    tree = ast.parse(path.read_text(), filename=str(path))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top in sys.stdlib_module_names or top in ("meshplan", "__future__"):
                continue
            found.append((top, node.lineno, _guarded(node, parents)))
    return found


def undeclared_imports() -> list[str]:
    declared = {_dist_name(r) for r in PYPROJECT["project"]["dependencies"]}
    optional = {_dist_name(r) for reqs in PYPROJECT["project"].get("optional-dependencies", {}).values()
                for r in reqs}
    providers = importlib.metadata.packages_distributions()
    problems = []
    for folder in package_dirs():
        for path in sorted(folder.rglob("*.py")):
            for module, line, guarded in third_party_imports(path):
                where = f"{path.relative_to(ROOT)}:{line}"
                dists = {_dist_name(d) for d in providers.get(module, [])}
                if not dists:
                    problems.append(f"{where}: import {module}: no installed distribution provides it")
                elif dists & declared:
                    continue
                elif dists & optional and guarded:
                    continue
                elif dists & optional:
                    problems.append(f"{where}: import {module} ({', '.join(sorted(dists))}) is an "
                                    "optional extra but the import is not guarded by "
                                    "try/except ImportError")
                else:
                    problems.append(f"{where}: import {module} ({', '.join(sorted(dists))}) is "
                                    "not in [project].dependencies")
    return problems


def test_every_third_party_import_is_declared():
    problems = undeclared_imports()
    assert not problems, "\n".join(problems)


def test_the_check_catches_an_undeclared_import(tmp_path):
    """The walker sees imports at any depth (lazy imports inside functions too), and tells
    guarded ones apart."""
    src = tmp_path / "mod.py"
    src.write_text("import os\nimport numpy as np\n\ndef f():\n    from tqdm import tqdm\n"
                   "try:\n    import yaml\nexcept ImportError:\n    raise SystemExit('pip install pyyaml')\n")
    assert sorted(third_party_imports(src), key=lambda t: t[1]) == [("numpy", 2, False), ("tqdm", 5, False), ("yaml", 7, True)]


def test_every_package_folder_is_installed():
    """Each folder with an __init__.py under a mapped package is listed in packages."""
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    mapping = PYPROJECT["tool"]["setuptools"]["package-dir"]
    missing = []
    for package, folder in mapping.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            name = ".".join((package, *rel.parts))
            if name not in listed:
                missing.append(name)
    assert not missing, f"add to [tool.setuptools].packages: {missing}"


def test_too_old_torch_is_refused_in_one_line(monkeypatch, capsys, tmp_path):
    """A torch older than the declared floor stops `meshplan run` before any rank starts."""
    from meshplan.cli import main
    from meshplan.core import requirements
    from meshplan.executor import launch

    floor = requirements.torch_floor()
    assert floor is not None, "pyproject.toml declares torch>=..."
    real_version = importlib.metadata.version
    monkeypatch.setattr(requirements.importlib.metadata, "version",
                        lambda d: "2.0.1+cpu" if d == "torch" else real_version(d))
    monkeypatch.setattr(launch, "torchrun", lambda *_a, **_k: pytest.fail("ranks started"))
    code = main(["run", "--model", str(ROOT / "examples/tiny-llama/config.json"), "--gpus", "1",
                 "--global-batch", "2", "--seq-len", "16", "--steps", "2", "--warmup", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert f"torch 2.0.1+cpu is installed, but meshplan needs torch>={floor}" in err
