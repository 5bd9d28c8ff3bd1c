"""A few seconds' probe of this machine against its profile, before a run or a validation:
the rate of a GEMM and of an elementwise add at the executor's shapes, one decoder layer's
host overhead (eager PyTorch), and optionally one collective over two ranks. Each is
compared with what the profile predicts for the same operation; when the machine has
drifted beyond the profile's error band, the profile's speed terms can be rescaled by the
measured ratios (`rescaled`), so that a slow spell of the machine is not charged to the
cost model.

Measured as the profile was measured (calibration/measure: one torch thread, the same
timing helper); only one shape each, so that the probe takes seconds, not minutes."""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from meshplan.calibration.measure.compute import (GemmShape, measure_gemms, measure_memory_bound,
                                                   torch_threads)
from meshplan.calibration.overhead import measure_overhead
from meshplan.executor.launch import torchrun
from meshplan.hw_profiles.profile import HardwareProfile

# The validation model's MLP GEMM (validation.suite.VALIDATION_MODEL: hidden 256, ffn 704,
# 2 x 128 tokens per micro-batch) and a 1 Mi-element add: the sizes the runs see.
GEMM = GemmShape("probe", 256, 704, 256)
ADD_ELEMENTS = 1 << 20
COLLECTIVE_BYTES = 1 << 20


@dataclass(frozen=True)
class Probe:
    """measured / predicted of each probed quantity (1.0: the machine is as profiled)."""

    gemm: float
    memory: float
    overhead: float
    collective: float | None
    band: float

    @property
    def drifted(self) -> list[str]:
        """The quantities off by more than the profile's p95 band."""
        ratios = {"gemm": self.gemm, "memory-bound": self.memory, "layer overhead": self.overhead,
                  "collective": self.collective}
        return [k for k, v in ratios.items() if v is not None and abs(v - 1) > self.band]

    def text(self) -> str:
        parts = [f"GEMM x{self.gemm:.2f}", f"memory-bound x{self.memory:.2f}",
                 f"layer overhead x{self.overhead:.2f}"]
        if self.collective is not None:
            parts.append(f"collective x{self.collective:.2f}")
        drift = self.drifted
        verdict = (f"drifted beyond the profile's ±{self.band:.0%} band: {', '.join(drift)}" if drift
                   else f"within the profile's ±{self.band:.0%} band")
        return f"probe (measured / profiled): {', '.join(parts)}; {verdict}"

    def to_json(self) -> dict:
        return {"gemm": self.gemm, "memory": self.memory, "overhead": self.overhead,
                "collective": self.collective, "band": self.band, "drifted": self.drifted}

    def rescaled(self, hw: HardwareProfile) -> HardwareProfile:
        """The profile with its speed terms scaled by the measured ratios: GEMM rate,
        memory bandwidth, host overhead per layer and (when probed) collective bandwidth
        and latency."""
        coll = self.collective or 1.0
        scaled = hw.scaled(flops=1 / self.gemm, hbm_bw=1 / self.memory, intra_node_bw=1 / coll,
                           collective_latency=coll)
        return replace(scaled, overhead=hw.overhead.scaled(self.overhead))


def _collective_s(world: int = 2) -> float:
    """Median all-reduce time of COLLECTIVE_BYTES over `world` gloo ranks, through the
    measurement module the profile's collectives came from."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        torchrun("meshplan.calibration.measure.collectives",
                 ["--out", str(out), "--group-sizes", str(world), "--kinds", "all_reduce",
                  "--sizes", str(COLLECTIVE_BYTES), "--repeats", "5", "--warmup", "2"],
                 world, on_line=lambda _line: None, timeout_s=120)
        return float(json.loads(out.read_text())[0]["time_s"])


def probe(hw: HardwareProfile, collective: bool = False) -> Probe:
    """Probe this machine (CPU, one thread, as the executor's ranks run) against `hw`."""
    device = torch.device("cpu")
    with torch_threads(1):
        gemm = measure_gemms([GEMM], ["fp32"], device, repeats=20, warmup=3, budget_s=0.5)
        mem = measure_memory_bound(["add"], [ADD_ELEMENTS], ["fp32"], device, repeats=20, warmup=3,
                                   budget_s=0.5)
        overhead = measure_overhead(repeats=8, warmup=2)
    g = gemm.iloc[0]
    gemm_ratio = float(g["time_s"]) / float(hw.gemm_time_s(g["m"], g["n"], g["k"], "fp32", batch=g["batch"]))
    m = mem.iloc[0]
    mem_ratio = float(m["time_s"]) / float(hw.memory_bound_time_s(float(m["bytes"]), "fp32", "add"))
    profiled = hw.overhead.layer_forward_s
    overhead_ratio = overhead.layer_forward_s / profiled if profiled > 0 else 1.0
    coll_ratio = None
    if collective:
        coll_ratio = _collective_s() / float(hw.collective_time_s("all_reduce", COLLECTIVE_BYTES, 2, 2))
    return Probe(gemm_ratio, mem_ratio, overhead_ratio, coll_ratio, hw.relative_error_band()[1])
