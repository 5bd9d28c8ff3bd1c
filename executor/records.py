"""Run records: what was run (model, plan as executed, dtype), what the simulator predicted
for it, and what was measured, for training runs (RunRecord) and serving runs
(ServeRecord); and what the ranks report back to the launcher (TrainResult, ServeResult).
JSON round-trip; no torch."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from meshplan.simulator.model_spec import ModelSpec
from meshplan.simulator.plan import Plan
from meshplan.simulator.serve import InferencePlan

MEMORY_METHOD = {"cuda": "allocator peak (torch.cuda.max_memory_allocated)",
                 "cpu": "weights (local shards) + KV cache, counted; transient activations "
                        "not counted"}
# ... of a training rank (executor/measure.py)
TRAIN_MEMORY_METHOD = {"cuda": MEMORY_METHOD["cuda"],
                       "cpu": "counted: parameters, gradients (the shards' or FSDP2's unsharded, the "
                              "larger) and optimizer state, local shards, + the peak of saved "
                              "activations, checkpoint-kept outputs and the fused loss's logits and "
                              "probabilities; an eager backward's transient tensors not counted"}


@dataclass(frozen=True)
class TrainResult:
    """One training job as the ranks measured it: every step's loss (mean over the global
    batch) and wall time, each rank's memory (measure.RankMemory.to_json()), the compute
    dtype that ran, the device type, and with EP the routing's imbalance (moe
    .routing_imbalance, the busiest EP group's)."""

    losses: tuple[float, ...]
    step_times_s: tuple[float, ...]
    memory_by_rank: tuple[dict, ...]
    dtype: str
    device: str
    routing_imbalance: float | None = None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> TrainResult:
        return cls(tuple(data["losses"]), tuple(data["step_times_s"]), tuple(data["memory_by_rank"]),
                   data["dtype"], data["device"], data.get("routing_imbalance"))


@dataclass(frozen=True)
class ServeResult:
    """One serving job as the ranks measured it: TTFT and all-decode-steps time of each
    timed generation, each rank's memory (ServeMemory.to_json()), the dtype that ran, the
    device type, and the greedy tokens of every sequence, replica by replica."""

    ttft_s: tuple[float, ...]
    decode_s: tuple[float, ...]
    memory_by_rank: tuple[dict, ...]
    dtype: str
    device: str
    tokens: tuple[tuple[int, ...], ...]

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> ServeResult:
        return cls(tuple(data["ttft_s"]), tuple(data["decode_s"]), tuple(data["memory_by_rank"]),
                   data["dtype"], data["device"], tuple(tuple(row) for row in data["tokens"]))


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
            "memory_method": TRAIN_MEMORY_METHOD[self.device],
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
                "memory_method": TRAIN_MEMORY_METHOD[self.device],
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


@dataclass(frozen=True)
class ServeRecord:
    """One serving plan's run. `plan` is the plan as executed (dtype and kv_dtype the dtype
    that ran); `ttft_s` and `decode_s` hold each timed generation (warm-ups left out);
    `decode_s` is the time of a generation's gen_len - 1 decode steps; `tokens` holds the
    greedy tokens of every sequence, replica by replica, [replicas * batch][gen_len]."""

    model: ModelSpec
    plan: InferencePlan
    dtype_requested: str
    kv_dtype_requested: str
    device: str
    world_size: int
    profile: str
    prediction: dict | None          # simulator.serve.simulate_inference(...).to_json()
    prediction_note: str             # why the prediction is missing, or ""
    ttft_s: tuple[float, ...]
    decode_s: tuple[float, ...]
    warmup: int
    memory_by_rank: tuple[dict, ...]  # serve.ServeMemory.to_json() per rank
    tokens: tuple[tuple[int, ...], ...]
    seed: int

    @property
    def measured_ttft_s(self) -> float:
        return float(np.median(self.ttft_s))

    @property
    def measured_tpot_s(self) -> float:
        """Median over generations of the mean decode step time."""
        return float(np.median(self.decode_s)) / (self.plan.gen_len - 1)

    @property
    def measured_latency_s(self) -> float:
        return self.measured_ttft_s + (self.plan.gen_len - 1) * self.measured_tpot_s

    @property
    def measured_throughput_tokens_per_s(self) -> float:
        """Generated tokens per second over whole requests, as the simulator defines it."""
        plan = self.plan
        return plan.replicas * plan.batch * plan.gen_len / self.measured_latency_s

    @property
    def measured_peak_memory_bytes(self) -> int:
        return max(m["peak_bytes"] for m in self.memory_by_rank)

    def predicted(self, key: str) -> float | None:
        return self.prediction[key] if self.prediction else None

    def summary_json(self) -> dict:
        """What `meshplan run --mode inference --json` prints: predicted vs measured."""
        return {
            "plan": self.plan.to_dict(), "world_size": self.world_size, "profile": self.profile,
            "device": self.device, "dtype": self.plan.dtype,
            "dtype_requested": self.dtype_requested,
            "predicted_ttft_s": self.predicted("ttft_s"), "measured_ttft_s": self.measured_ttft_s,
            "measured_ttft_samples_s": list(self.ttft_s),
            "predicted_tpot_s": self.predicted("tpot_s"), "measured_tpot_s": self.measured_tpot_s,
            "predicted_latency_s": self.predicted("latency_s"),
            "measured_latency_s": self.measured_latency_s,
            "predicted_throughput_tokens_per_s": self.predicted("throughput_tokens_per_s"),
            "measured_throughput_tokens_per_s": self.measured_throughput_tokens_per_s,
            "predicted_weights_bytes": self.predicted("weights_bytes"),
            "predicted_kv_cache_bytes": self.predicted("kv_cache_bytes"),
            "predicted_peak_memory_bytes": self.predicted("peak_memory_bytes"),
            "measured_weights_bytes": max(m["weights_bytes"] for m in self.memory_by_rank),
            "measured_kv_cache_bytes": max(m["kv_cache_bytes"] for m in self.memory_by_rank),
            "measured_peak_memory_bytes": self.measured_peak_memory_bytes,
            "measured_memory_by_rank": list(self.memory_by_rank),
            "memory_method": MEMORY_METHOD[self.device],
            "generated_tokens": [list(row) for row in self.tokens],
            "prediction_note": self.prediction_note,
        }

    def to_json(self) -> dict:
        """The whole record (the --record file)."""
        return {
            "model": self.model.to_dict(), "plan": self.plan.to_dict(),
            "dtype_requested": self.dtype_requested, "kv_dtype_requested": self.kv_dtype_requested,
            "device": self.device, "world_size": self.world_size, "profile": self.profile,
            "prediction": self.prediction, "prediction_note": self.prediction_note,
            "measurement": {"ttft_s": list(self.ttft_s), "decode_s": list(self.decode_s),
                            "warmup": self.warmup, "memory_by_rank": list(self.memory_by_rank),
                            "memory_method": MEMORY_METHOD[self.device]},
            "tokens": [list(row) for row in self.tokens], "seed": self.seed,
        }

    @classmethod
    def from_json(cls, data: dict) -> "ServeRecord":
        meas = data["measurement"]
        return cls(model=ModelSpec.from_dict(data["model"]),
                   plan=InferencePlan.from_dict(data["plan"]),
                   dtype_requested=data["dtype_requested"],
                   kv_dtype_requested=data["kv_dtype_requested"], device=data["device"],
                   world_size=data["world_size"], profile=data["profile"],
                   prediction=data["prediction"], prediction_note=data["prediction_note"],
                   ttft_s=tuple(meas["ttft_s"]), decode_s=tuple(meas["decode_s"]),
                   warmup=meas["warmup"], memory_by_rank=tuple(meas["memory_by_rank"]),
                   tokens=tuple(tuple(row) for row in data["tokens"]), seed=data["seed"])
