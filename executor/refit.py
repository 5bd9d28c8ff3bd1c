"""Closed loop: refit the profile's throughput parameters from measured runs.

Three factors of the profile (GEMM peak throughput, memory-bound bandwidth, intra-node
collective bandwidth; HardwareProfile.scaled) are fitted by least squares on the log of
predicted / measured step time over half of the runs; the other half measures whether the
refit generalises. No torch here: it only re-simulates recorded plans."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import least_squares

from executor.record import RunRecord
from hw_profiles.profile import HardwareProfile
from simulator.plan import Cluster
from simulator.simulate import simulate

FACTORS = ("flops", "hbm_bw", "intra_node_bw")


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

    def residuals(log_factors: np.ndarray) -> np.ndarray:
        scaled = hw.scaled(**dict(zip(FACTORS, np.exp(log_factors))))
        return log_errors(scaled, train)

    fit = least_squares(residuals, np.zeros(len(FACTORS)), bounds=(np.log(0.1), np.log(10.0)))
    factors = {k: float(v) for k, v in zip(FACTORS, np.exp(fit.x))}
    refitted = hw.scaled(**factors)
    return Refit(profile=refitted, factors=factors,
                 train=tuple(names[i] for i in train_idx), held_out=tuple(names[i] for i in test_idx),
                 before={"train": _errors(hw, train), "held_out": _errors(hw, test)},
                 after={"train": _errors(refitted, train), "held_out": _errors(refitted, test)})
