"""Typed errors for user input. Each carries the field at fault and the fix, so the CLI
can print one line and exit 2."""


class MeshplanError(Exception):
    """Bad user input: `field` names what is wrong, `fix` says what would make it right."""

    def __init__(self, field: str, problem: str, fix: str):
        self.field = field
        self.problem = problem
        self.fix = fix
        super().__init__(f"{field}: {problem}; {fix}")


class ModelError(MeshplanError):
    """A model config or zoo name that cannot be turned into a ModelSpec."""


class PlanError(MeshplanError):
    """A parallel plan that is illegal for the model or cluster."""


class ProfileError(MeshplanError):
    """A hardware profile that is missing, corrupt or incomplete."""
