"""The torch this install needs: the lower bound that pyproject.toml declares (read back from
the installed package's metadata, so it is stated once), checked before any torch code runs
(a launch of ranks, a profile measurement), so that a too-old torch is one clear line rather
than an AttributeError deep inside a rank."""
from __future__ import annotations

import importlib.metadata
import re

from meshplan.core.errors import MeshplanError


def _version_tuple(text: str) -> tuple[int, ...]:
    """'2.9.1+cu128' -> (2, 9, 1)."""
    return tuple(int(x) for x in re.findall(r"\d+", text.split("+")[0])[:3])


def torch_floor() -> str | None:
    """The `torch>=X` bound of meshplan's declared dependencies, or None if none is declared."""
    for requirement in importlib.metadata.requires("meshplan") or ():
        found = re.match(r"\s*torch\s*>=\s*([\d.]+)", requirement)
        if found and "extra ==" not in requirement:
            return found.group(1)
    return None


def check_torch() -> None:
    """MeshplanError if the installed torch is older than the declared floor."""
    floor = torch_floor()
    installed = importlib.metadata.version("torch")
    if floor and _version_tuple(installed) < _version_tuple(floor):
        raise MeshplanError("torch", f"torch {installed} is installed, but meshplan needs "
                            f"torch>={floor}", f"pip install 'torch>={floor}' (CPU build: "
                            "pip install torch==2.13.0)")
