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


def _launch_issues(nnodes: int, rdzv_endpoint: str | None, timeout_s: float) -> list[Issue]:
    issues = []
    if nnodes < 1:
        issues.append(("run.nnodes", f"{nnodes} nodes", "use 1 or more nodes"))
    if nnodes > 1 and not rdzv_endpoint:
        issues.append(("run.rdzv_endpoint", "missing for a run on several nodes",
                       "give the HOST:PORT of the c10d rendezvous, the same on every node"))
    if not (math.isfinite(timeout_s) and timeout_s > 0):
        issues.append(("run.timeout_s", f"{timeout_s!r} seconds", "use a positive, finite timeout"))
    return issues


@dataclass(frozen=True)
class RunOptions:
    """How to run a training plan. `run_dir`: folder for the run's files, kept (default: a
    temporary folder, removed); `profile`: the profile the prediction (and the pipeline
    partition) comes from."""

    steps: int = 20
    warmup: int = 3
    seed: int = 0
    lr: float = 1e-3
    data: str | None = None
    profile: str = "local"
    timeout_s: float = 60.0
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None
    progress: bool = False
    run_dir: str | None = None
    save_grads: bool = False

    def issues(self) -> list[Issue]:
        issues = _launch_issues(self.nnodes, self.rdzv_endpoint, self.timeout_s)
        if not 0 <= self.warmup < self.steps:
            issues.append(("run.warmup", f"{self.warmup} warm-up steps leave no timed step of "
                           f"{self.steps}", "use fewer warm-up steps than steps"))
        return issues

    def rank_options(self) -> TrainRankOptions:
        return TrainRankOptions(steps=self.steps, seed=self.seed, lr=self.lr, data=self.data,
                                timeout_s=self.timeout_s, progress=self.progress,
                                save_grads=self.save_grads)


@dataclass(frozen=True)
class ServeOptions:
    """How to run a serving plan: `warmup` untimed generations, then `repeats` timed ones."""

    warmup: int = 1
    repeats: int = 3
    seed: int = 0
    profile: str = "local"
    timeout_s: float = 60.0
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None
    progress: bool = False
    run_dir: str | None = None

    def issues(self) -> list[Issue]:
        issues = _launch_issues(self.nnodes, self.rdzv_endpoint, self.timeout_s)
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
