"""How a run is launched (RunOptions for training, ServeOptions for serving) and what
crosses to the ranks (TrainRankOptions, ServeRankOptions: typed, written into RUN.json and
read back by the rank entry points). No torch."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from meshplan.core.errors import Issue, PlanError


def compute_dtype(plan_dtype: str, device_type: str) -> str:
    """The dtype a training plan computes in: bf16 autocast on CUDA for bf16 plans; fp32
    otherwise (on CPU, and for fp16, which would need loss scaling)."""
    return "bf16" if device_type == "cuda" and plan_dtype == "bf16" else "fp32"


# What this executor runs whatever a training plan says: model.py's norms, RoPE and MLPs as
# torch ops; ZeRO-1 by all-reduce and broadcast (zero_one.py); its attention reads grouped keys
# and values (scaled_dot_product_attention's enable_gqa)
EXECUTOR_KERNELS = {"elementwise": "eager", "mlp_kernel": "eager", "zero1_sync": "all_reduce", "kv_repeat": False,
                    "ddp_impl": "replicate"}


def training_fields(plan_dtype: str, device_type: str, cross_entropy: str) -> dict:
    """The plan fields a training run on `device_type` ranks takes, for a plan asking for
    `plan_dtype` and the `cross_entropy` kernel: its kernels, the dtype it computes in, and
    the loss (executor/loss.py runs fused and eager; a compiled loss runs eager, uncompiled)."""
    return {**EXECUTOR_KERNELS, "dtype": compute_dtype(plan_dtype, device_type),
            "cross_entropy": "eager" if cross_entropy == "compiled" else cross_entropy}


def serving_dtype(plan_dtype: str, device_type: str) -> str:
    """The dtype a serving plan runs in: the plan's on CUDA (weights, activations and KV
    cache); fp32 on CPU, whose bf16/fp16 matmuls are far slower than fp32 (the local
    profile: 3 vs 90 GFLOP/s)."""
    return plan_dtype if device_type == "cuda" else "fp32"


@dataclass(frozen=True)
class TrainRankOptions:
    """What a training rank needs: `save_grads` makes every rank save the first step's
    gradients into the run folder (the numerics tests); with `checkpoint_dir`, a checkpoint
    every `checkpoint_every` steps (None: after the last step only) and after the last
    step, and with `resume` (or on an elastic restart) training continues from the newest
    checkpoint there (executor/checkpoint.py)."""

    steps: int
    seed: int
    lr: float
    data: str | None
    timeout_s: float
    progress: bool
    save_grads: bool
    checkpoint_dir: str | None = None
    checkpoint_every: int | None = None
    resume: bool = False

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
    `rdzv_endpoint` (hosted by node 0; this one is `node_rank`) within `rdzv_timeout_s`, the
    process-group `timeout_s`, `run_dir` for the run's files (kept; default a temporary
    folder, removed), the profile the prediction comes from, whether rank 0 draws a
    progress bar, and how often torchrun restarts every rank after a failure
    (`max_restarts`)."""

    seed: int = 0
    profile: str = "local"
    timeout_s: float = 60.0
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None
    rdzv_timeout_s: float = 600.0  # torchrun's own default join_timeout
    progress: bool = False
    run_dir: str | None = None
    max_restarts: int = 0

    def issues(self) -> list[Issue]:
        issues = []
        if self.nnodes < 1:
            issues.append(("run.nnodes", f"{self.nnodes} nodes", "use 1 or more nodes"))
        if not 0 <= self.node_rank < max(self.nnodes, 1):
            issues.append(("run.node_rank", f"node {self.node_rank} of {self.nnodes}",
                           f"number the nodes 0 to {max(self.nnodes, 1) - 1}"))
        if self.nnodes > 1 and not self.rdzv_endpoint:
            issues.append(("run.rdzv_endpoint", "missing for a run on several nodes",
                           "give the HOST:PORT of the c10d rendezvous on node 0, the same on every node"))
        for field, value in (("timeout_s", self.timeout_s), ("rdzv_timeout_s", self.rdzv_timeout_s)):
            # below a second, starting the process group alone outlasts it
            if not (math.isfinite(value) and value >= 1):
                issues.append((f"run.{field}", f"{value!r} seconds", "use a finite timeout of 1 second or more"))
        if self.max_restarts < 0:
            issues.append(("run.max_restarts", f"{self.max_restarts} restarts", "use 0 or more"))
        return issues


@dataclass(frozen=True)
class RunOptions(LaunchOptions):
    """How to run a training plan: `steps` steps, the first `warmup` untimed, Adam at `lr`,
    batches from the token file `data` (default synthetic); `save_grads` keeps every rank's
    first-step gradients in run_dir. Checkpoints go to `checkpoint_dir` every
    `checkpoint_every` steps (None: after the last step only); `resume` continues from the
    newest one there (from step 0 when there is none yet)."""

    steps: int = 20
    warmup: int = 3
    lr: float = 1e-3
    data: str | None = None
    save_grads: bool = False
    checkpoint_dir: str | None = None
    checkpoint_every: int | None = None
    resume: bool = False

    def issues(self) -> list[Issue]:
        issues = super().issues()
        if self.steps < 1:
            issues.append(("run.steps", f"{self.steps} steps", "use 1 or more"))
        elif self.warmup < 0:
            issues.append(("run.warmup", f"{self.warmup} warm-up steps", "use 0 or more"))
        elif self.warmup >= self.steps:
            issues.append(("run.warmup", f"{self.warmup} warm-up steps leave no timed step of "
                           f"{self.steps}", "use fewer warm-up steps than steps"))
        if not (math.isfinite(self.lr) and self.lr > 0):
            issues.append(("run.lr", f"{self.lr!r}", "use a positive, finite learning rate"))
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            issues.append(("run.checkpoint_every", f"{self.checkpoint_every} steps",
                           "checkpoint every 1 or more steps"))
        no_folder = "give a checkpoint folder"
        if self.checkpoint_dir is None:
            for field, given, why in (
                    ("checkpoint_every", self.checkpoint_every is not None, "has no folder to save to"),
                    ("resume", self.resume, "has no folder to resume from"),
                    ("max_restarts", self.max_restarts > 0,
                     "would restart every rank from step 0: there is no checkpoint folder")):
                if given:
                    issues.append((f"run.{field}", why, no_folder))
        return issues

    def rank_options(self) -> TrainRankOptions:
        return TrainRankOptions(steps=self.steps, seed=self.seed, lr=self.lr, data=self.data,
                                timeout_s=self.timeout_s, progress=self.progress,
                                save_grads=self.save_grads, checkpoint_dir=self.checkpoint_dir,
                                checkpoint_every=self.checkpoint_every, resume=self.resume)


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
