"""How a run is launched (RunOptions for training, ServeOptions for serving) and what
crosses to the ranks (TrainRankOptions, ServeRankOptions: typed, written into RUN.json and
read back by the rank entry points). No torch."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from meshplan.core.errors import Issue, PlanError


@dataclass(frozen=True)
class TrainRankOptions:
    """What a training rank needs: `save_grads` makes every rank save the first step's
    gradients into the run folder (the numerics tests)."""

    steps: int
    seed: int
    lr: float
    data: str | None
    timeout_s: float
    progress: bool
    save_grads: bool

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ServeRankOptions:
    """What a serving rank needs: `warmup` untimed generations, then `repeats` timed ones."""

    seed: int
    warmup: int
    repeats: int
    timeout_s: float
    progress: bool

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class LaunchOptions:
    """Where and how ranks start: `nnodes` machines meeting at the c10d rendezvous
    `rdzv_endpoint` (this one is `node_rank`), the process-group `timeout_s`, `run_dir` for
    the run's files (kept; default a temporary folder, removed), the profile the prediction
    comes from, and whether rank 0 draws a progress bar."""

    seed: int = 0
    profile: str = "local"
    timeout_s: float = 60.0
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None
    progress: bool = False
    run_dir: str | None = None

    def issues(self) -> list[Issue]:
        issues = []
        if self.nnodes < 1:
            issues.append(("run.nnodes", f"{self.nnodes} nodes", "use 1 or more nodes"))
        if self.nnodes > 1 and not self.rdzv_endpoint:
            issues.append(("run.rdzv_endpoint", "missing for a run on several nodes",
                           "give the HOST:PORT of the c10d rendezvous, the same on every node"))
        if not (math.isfinite(self.timeout_s) and self.timeout_s > 0):
            issues.append(("run.timeout_s", f"{self.timeout_s!r} seconds", "use a positive, finite timeout"))
        return issues


@dataclass(frozen=True)
class RunOptions(LaunchOptions):
    """How to run a training plan: `steps` steps, the first `warmup` untimed, Adam at `lr`,
    batches from the token file `data` (default synthetic); `save_grads` keeps every rank's
    first-step gradients in run_dir."""

    steps: int = 20
    warmup: int = 3
    lr: float = 1e-3
    data: str | None = None
    save_grads: bool = False

    def issues(self) -> list[Issue]:
        issues = super().issues()
        if not 0 <= self.warmup < self.steps:
            issues.append(("run.warmup", f"{self.warmup} warm-up steps leave no timed step of "
                           f"{self.steps}", "use fewer warm-up steps than steps"))
        return issues

    def rank_options(self) -> TrainRankOptions:
        return TrainRankOptions(steps=self.steps, seed=self.seed, lr=self.lr, data=self.data,
                                timeout_s=self.timeout_s, progress=self.progress,
                                save_grads=self.save_grads)


@dataclass(frozen=True)
class ServeOptions(LaunchOptions):
    """How to run a serving plan: `warmup` untimed generations, then `repeats` timed ones."""

    warmup: int = 1
    repeats: int = 3

    def issues(self) -> list[Issue]:
        issues = super().issues()
        if self.warmup < 0:
            issues.append(("run.warmup", f"{self.warmup} warm-up generations", "use 0 or more"))
        if self.repeats < 1:
            issues.append(("run.repeats", f"{self.repeats} timed generations leave nothing timed",
                           "use 1 or more"))
        return issues

    def rank_options(self) -> ServeRankOptions:
        return ServeRankOptions(seed=self.seed, warmup=self.warmup, repeats=self.repeats,
                                timeout_s=self.timeout_s, progress=self.progress)


def refuse(issues: list[Issue]) -> None:
    """One PlanError naming every issue, if there are any."""
    if issues:
        raise PlanError.of(issues)
