"""The serving run record: what was run (model, inference plan as executed), what the
serving simulator predicted for it, what was measured, and the generated tokens. JSON
round-trip; no torch."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from meshplan.simulator.serve import InferencePlan
from meshplan.simulator.model_spec import ModelSpec

MEMORY_METHOD = {"cuda": "allocator peak (torch.cuda.max_memory_allocated)",
                 "cpu": "weights (local shards) + KV cache, counted; transient activations "
                        "not counted"}


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
    prediction: dict | None          # simulator.inference.simulate_inference(...).to_json()
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
