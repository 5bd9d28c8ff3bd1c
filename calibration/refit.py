"""Closed loop: refit the profile's parameters from measured runs.

Five parameters of the profile (HardwareProfile.scaled: GEMM peak throughput, memory-bound
bandwidth, intra-node collective bandwidth and latency as factors, and a fixed cost added
to every operator, the framework's dispatch overhead that isolated operator timings do not
see) are fitted by least squares on the log of predicted / measured step time over half of
the runs; the other half measures whether the refit generalises. No torch here: it only
re-simulates recorded plans."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import least_squares

from meshplan.executor.records import RunRecord
from meshplan.hw_profiles.profile import HardwareProfile
from meshplan.simulator.plan import Cluster
from meshplan.simulator.train import simulate

FACTORS = ("flops", "hbm_bw", "intra_node_bw", "collective_latency")
OP_LATENCY_BOUNDS_S = (1e-7, 1e-3)


def _predict_s(hw: HardwareProfile, record: RunRecord) -> float:
    cluster = Cluster(record.world_size, record.world_size)
    return simulate(record.model, record.plan, cluster, hw).step_time_s


def log_errors(hw: HardwareProfile, records: list[RunRecord]) -> np.ndarray:
    return np.array([np.log(_predict_s(hw, r) / r.measured_step_time_s) for r in records])


@dataclass(frozen=True)
class Refit:
    profile: HardwareProfile
    factors: dict
    train: tuple[str, ...]
    held_out: tuple[str, ...]
    before: dict           # {"train"|"held_out": {"median_abs_error", "max_abs_error"}}
    after: dict

    def to_json(self) -> dict:
        return {"factors": self.factors, "train": list(self.train), "held_out": list(self.held_out),
                "before": self.before, "after": self.after}


def _errors(hw: HardwareProfile, records: list[RunRecord]) -> dict:
    rel = np.abs(np.expm1(log_errors(hw, records)))
    return {"median_abs_error": float(np.median(rel)), "max_abs_error": float(np.max(rel))}


def split_half(names: list[str]) -> tuple[list[int], list[int]]:
    """Alternate runs into a fitting half and a held-out half (every other plan), so both
    halves cover each world size and parallelism kind."""
    order = list(range(len(names)))
    return order[0::2], order[1::2]


def refit(hw: HardwareProfile, names: list[str], records: list[RunRecord]) -> Refit:
    train_idx, test_idx = split_half(names)
    train = [records[i] for i in train_idx]
    test = [records[i] for i in test_idx]

    def params(x: np.ndarray) -> dict:
        return {**{k: float(v) for k, v in zip(FACTORS, np.exp(x[:-1]))},
                "op_latency_s": float(np.exp(x[-1]))}

    def residuals(x: np.ndarray) -> np.ndarray:
        return log_errors(hw.scaled(**params(x)), train)

    lower = [np.log(0.1)] * len(FACTORS) + [np.log(OP_LATENCY_BOUNDS_S[0])]
    upper = [np.log(10.0)] * len(FACTORS) + [np.log(OP_LATENCY_BOUNDS_S[1])]
    start = np.array([0.0] * len(FACTORS) + [np.log(OP_LATENCY_BOUNDS_S[0])])
    fit = least_squares(residuals, start, bounds=(lower, upper))
    factors = params(fit.x)
    refitted = hw.scaled(**factors)
    return Refit(profile=refitted, factors=factors,
                 train=tuple(names[i] for i in train_idx), held_out=tuple(names[i] for i in test_idx),
                 before={"train": _errors(hw, train), "held_out": _errors(hw, test)},
                 after={"train": _errors(refitted, train), "held_out": _errors(refitted, test)})
