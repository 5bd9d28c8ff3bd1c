"""Typed errors for bad input. Each names the field at fault (a dotted field name such as
`plan.tp`, `cluster.num_gpus` or `<config path>:head_dim`, never a command-line flag: the
CLI alone maps fields to its flags), the problem and the fix, so that the CLI can print one
line and exit 2. One error can carry several such issues, so that every offending field is
named at once."""
from __future__ import annotations

from typing import Callable, Iterable

Issue = tuple[str, str, str]  # (field, problem, fix)


class MeshplanError(Exception):
    """Bad user input: `field` names what is wrong, `fix` says what would make it right;
    `issues` holds every (field, problem, fix) this error reports, the first of them first."""

    def __init__(self, field: str, problem: str, fix: str, more: Iterable[Issue] = ()):
        self.issues: tuple[Issue, ...] = ((field, problem, fix), *more)
        super().__init__(self.render())

    @property
    def field(self) -> str:
        return self.issues[0][0]

    @property
    def problem(self) -> str:
        return self.issues[0][1]

    @property
    def fix(self) -> str:
        return self.issues[0][2]

    def render(self, name: Callable[[str], str] = str) -> str:
        """One line: each issue as `field: problem; fix`, with `name` spelling the fields."""
        return " | ".join(f"{name(f)}: {p}; {x}" for f, p, x in self.issues)

    @classmethod
    def of(cls, issues: list[Issue]) -> MeshplanError:
        """One error reporting every issue in `issues` (at least one)."""
        (field, problem, fix), *more = issues
        return cls(field, problem, fix, more)


class ModelError(MeshplanError):
    """A model config or zoo name that cannot be turned into a ModelSpec."""


class OutputError(MeshplanError):
    """A file meshplan was asked to write that cannot be written (no folder, no permission)."""


class PlanError(MeshplanError):
    """A parallel plan that is illegal for the model or cluster."""


class ProfileError(MeshplanError):
    """A hardware profile that is missing, corrupt or incomplete."""
