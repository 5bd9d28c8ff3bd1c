"""The run record: what was run (model, plan as executed, dtype), what the simulator
predicted for it, and what was measured. JSON round-trip; no torch."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from meshplan.simulator.model_spec import ModelSpec
from meshplan.simulator.plan import Plan


@dataclass(frozen=True)
class RunRecord:
    """One plan's run. `plan` is the plan as executed (pipeline partition filled in, dtype
    the compute dtype that ran); `step_times_s` holds every step, warm-up included;
    `memory_by_rank` is measure.RankMemory.to_json() per rank."""

    model: ModelSpec
    plan: Plan
    dtype_requested: str
    device: str
    world_size: int
    profile: str
    prediction: dict | None          # simulator.simulate(...).to_json(), or None
    prediction_note: str             # why the prediction is missing, or ""
    losses: tuple[float, ...]
    step_times_s: tuple[float, ...]
    warmup: int
    memory_by_rank: tuple[dict, ...]
    seed: int
    lr: float
    data: str | None

    @property
    def timed_step_times_s(self) -> tuple[float, ...]:
        return self.step_times_s[self.warmup:]

    @property
    def measured_step_time_s(self) -> float:
        return float(np.median(self.timed_step_times_s))

    @property
    def step_time_spread_s(self) -> float:
        """Interquartile range of the timed steps."""
        q1, q3 = np.percentile(self.timed_step_times_s, [25, 75])
        return float(q3 - q1)

    @property
    def tokens_per_s(self) -> float:
        return self.plan.global_batch * self.plan.seq_len / self.measured_step_time_s

    @property
    def measured_peak_memory_by_rank_bytes(self) -> list[int]:
        return [m["peak_bytes"] for m in self.memory_by_rank]

    @property
    def predicted_step_time_s(self) -> float | None:
        return self.prediction["step_time_s"] if self.prediction else None

    @property
    def predicted_peak_memory_bytes(self) -> float | None:
        return self.prediction["peak_memory_bytes"] if self.prediction else None

    def summary_json(self) -> dict:
        """What `meshplan run --json` prints: predicted vs measured."""
        return {
            "plan": self.plan.to_dict(),
            "world_size": self.world_size,
            "profile": self.profile,
            "dtype": self.plan.dtype,
            "predicted_step_time_s": self.predicted_step_time_s,
            "measured_step_time_s": self.measured_step_time_s,
            "measured_step_times_s": list(self.timed_step_times_s),
            "step_time_spread_s": self.step_time_spread_s,
            "tokens_per_s": self.tokens_per_s,
            "losses": list(self.losses),
            "predicted_peak_memory_bytes": self.predicted_peak_memory_bytes,
            "measured_peak_memory_bytes": max(self.measured_peak_memory_by_rank_bytes),
            "measured_peak_memory_by_rank_bytes": self.measured_peak_memory_by_rank_bytes,
            "prediction_note": self.prediction_note,
        }

    def to_json(self) -> dict:
        """The whole record (the --record file)."""
        return {
            "model": self.model.to_dict(), "plan": self.plan.to_dict(),
            "dtype_requested": self.dtype_requested, "dtype_run": self.plan.dtype,
            "device": self.device, "world_size": self.world_size, "profile": self.profile,
            "prediction": self.prediction, "prediction_note": self.prediction_note,
            "measurement": {
                "losses": list(self.losses), "step_times_s": list(self.step_times_s),
                "warmup": self.warmup, "step_time_s": self.measured_step_time_s,
                "step_time_spread_s": self.step_time_spread_s, "tokens_per_s": self.tokens_per_s,
                "memory_by_rank": list(self.memory_by_rank),
                "peak_memory_bytes": max(self.measured_peak_memory_by_rank_bytes),
                "memory_method": ("allocator peak (torch.cuda.max_memory_allocated)"
                                  if self.device == "cuda" else
                                  "parameters + gradients + optimizer state (local shards) + "
                                  "peak saved activations (saved_tensors_hooks)"),
            },
            "run": {"seed": self.seed, "lr": self.lr, "data": self.data or "synthetic"},
        }

    @classmethod
    def from_json(cls, data: dict) -> "RunRecord":
        meas, run = data["measurement"], data["run"]
        return cls(model=ModelSpec.from_dict(data["model"]), plan=Plan.from_dict(data["plan"]),
                   dtype_requested=data["dtype_requested"], device=data["device"],
                   world_size=data["world_size"], profile=data["profile"],
                   prediction=data["prediction"], prediction_note=data["prediction_note"],
                   losses=tuple(meas["losses"]), step_times_s=tuple(meas["step_times_s"]),
                   warmup=meas["warmup"], memory_by_rank=tuple(meas["memory_by_rank"]),
                   seed=run["seed"], lr=run["lr"],
                   data=None if run["data"] == "synthetic" else run["data"])
