"""A few seconds' probe of this machine against its profile, before a run or a validation:
the rate of a GEMM and of an elementwise add at the executor's shapes, one decoder layer's
host overhead (eager PyTorch), the executor's one-rank training step of the validation
model's shape on every core at once, and optionally one all-reduce over two ranks at three
sizes, from one where the per-call latency dominates to one where the bytes do. Each is
compared with what the profile predicts for the same operation; when the machine has
drifted beyond the profile's error band, the profile's speed terms can be rescaled by the
measured ratios (`Probe.rescaled`), so that a slow spell of the machine is not charged to
the cost model. The one-rank step is set against the cost model's own prediction of it,
so its ratio is the machine's speed against the profile as the model prices a whole step;
the rescale takes the compute, memory and host terms from it, and the parallel plans a
validation runs then test the parallel terms (collectives, pipeline, sharding). For a
serving run it also times the one-rank decode step (machine_load.decode_step) against its
prediction, whose ratio then scales the costs only a decode step pays. A
validation reads the step again after each of its launches (`Drift.with_step_readings`)
and rescales by the median of all readings, since this machine's speed moves within its
minutes of runs. A profile measured by `meshplan profile` keeps the probe's own reading
taken then (extra["probe_reference"]), and the probe compares like with like: its reading
now over its reading then. Only against a profile without one (measured before it was
kept) is it compared with what the profile's fits predict for the same operations, which
a single rank alone on the machine may read faster or slower than the fits' samples.
`check_drift` is the one entry point of `meshplan run` and `meshplan validate`;
`repredicted` sets a run's prediction on the rescaled profile beside its measurement.

Measured as the profile was measured (calibration/measure: one torch thread, the same
timing helper); only one shape each, so that the probe takes seconds, not minutes. It
times CPU ranks only: against a profile not measured on CPU, or when the ranks run on a
CUDA device, it is skipped with a note."""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import statistics
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from meshplan.calibration.measure.compute import (GemmShape, measure_gemms, measure_memory_bound,
                                                   torch_threads)
from meshplan.calibration.measure.machine_load import DECODE_PLAN, LOAD_MODEL, LOAD_PLAN, step_s_by_core
from meshplan.calibration.overhead import measure_host_overhead
from meshplan.core.cpus import this_cpu_model
from meshplan.core.errors import ProfileError
from meshplan.core.host_memory import keep_freed_memory
from meshplan.executor.launch import prediction_or_why, torchrun
from meshplan.executor.records import RunRecord, ServeRecord
from meshplan.hw_profiles.collective_model import bus_factor
from meshplan.hw_profiles.profile import HardwareProfile, cpu_device_name
from meshplan.simulator.plan import Cluster
from meshplan.simulator.serve import simulate_inference
from meshplan.simulator.cost import per_rank_profile
from meshplan.simulator.train import simulate

# The validation model's MLP GEMM (validation.suite.VALIDATION_MODEL: hidden 256, ffn 704,
# 2 x 128 tokens per micro-batch) and a 1 Mi-element add: the sizes the runs see.
GEMM = GemmShape("probe", 256, 704, 256)
ADD_ELEMENTS = 1 << 20
COLLECTIVE_BYTES = 1 << 20
# The latency-bound and the bandwidth-bound sizes: over two gloo ranks the profile's
# per-call latency is 93% of a 64 KiB all-reduce, 44% at 1 MiB and 5% at 16 MiB; on
# 2026-12-02 here, with the machine drifted, 64 KiB took x3.9 its profiled time and 4 MiB
# x1.2, so one ratio cannot rescale both. (From 64 KiB and 1 MiB alone, one run's noise
# read the per-byte time at x0.04.)
COLLECTIVE_SMALL_BYTES = 64 << 10
COLLECTIVE_LARGE_BYTES = 16 << 20
COLLECTIVE_RANKS = 2
# Readings of each in-process operation, taken in turn; back to back on this VM single
# readings of the GEMM and layer overhead moved by up to 11% (2026-12-01)
ROUNDS = 3
GEMM_REPEATS = 8
# Timed one-rank steps per core (after STEP_WARMUP): twelve alternations with single GEMM
# probes read the GEMM at x0.99-1.37 of its profiled time while the step stayed within
# 154-179 ms (2026-12-02), so the step, not the GEMM, sets the rescale's compute speed
STEP_REPEATS, STEP_WARMUP = 10, 3
# Timed one-rank decode steps per core (3 ms each here): a serving validation's decode ran
# x1.24-1.6 its prediction within minutes while the training step read x1.15 (2026-12-04)
DECODE_REPEATS = 40


@dataclass(frozen=True)
class Measurement:
    """What the probe timed on this machine: GEMM (fp32, shape GEMM), an fp32 add moving
    add_bytes, one decoder layer's forward host overhead, (when probed) an all-reduce of
    COLLECTIVE_BYTES over COLLECTIVE_RANKS ranks on one node, and the one-rank training step
    of LOAD_MODEL and the all-reduces of COLLECTIVE_SMALL_BYTES and COLLECTIVE_LARGE_BYTES
    (None in readings kept with profiles measured before they were probed), and (for a
    serving run) LOAD_MODEL's one-rank decode step (machine_load.decode_step)."""

    gemm_s: float
    add_s: float
    add_bytes: float
    layer_forward_s: float
    collective_s: float | None
    step_s: float | None = None
    collective_small_s: float | None = None
    collective_large_s: float | None = None
    decode_s: float | None = None

    def collectives(self) -> dict[int, float]:
        """The all-reduce readings by message bytes (none where not probed)."""
        sizes = (COLLECTIVE_SMALL_BYTES, COLLECTIVE_BYTES, COLLECTIVE_LARGE_BYTES)
        times = (self.collective_small_s, self.collective_s, self.collective_large_s)
        return {b: t for b, t in zip(sizes, times) if t is not None}

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data, where: str) -> Measurement:
        """From to_json's dict; ProfileError naming `where` and each bad field."""
        fields = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(data, dict):
            raise ProfileError(where, f"expected an object with {', '.join(fields)}",
                               "measure the profile again with `meshplan profile`")
        optional = ("collective_s", "step_s", "collective_small_s", "collective_large_s", "decode_s")
        bad = [k for k in fields if not (isinstance(data.get(k), (int, float)) and data[k] > 0
                                         or k in optional and data.get(k) is None)]
        bad += sorted(set(data) - set(fields))
        if bad:
            raise ProfileError.of([(f"{where}.{k}", "missing, not a positive number, or unknown",
                                    "measure the profile again with `meshplan profile`") for k in bad])
        return cls(**{k: data.get(k) for k in fields})


@dataclass(frozen=True)
class Probe:
    """measured / predicted of each probed quantity (1.0: the machine is as profiled); `step`
    and `decode` always against the cost model's prediction of the step."""

    gemm: float
    memory: float
    overhead: float
    collective: float | None
    band: float
    against: str = "fits"  # "reference": the probe's reading kept with the profile
    step: float | None = None
    step_readings: tuple[float, ...] = ()  # when `step` is their median
    # the collective ratio split into its per-call latency's and its per-byte time's
    # (collective_split), where the three sizes were probed
    collective_latency: float | None = None
    collective_per_byte: float | None = None
    # this machine's CPU model where the profile was measured on another (its device_name)
    other_cpu: str | None = None
    # the one-rank decode step's, where probed for a serving run (the median of
    # decode_readings where read again)
    decode: float | None = None
    decode_readings: tuple[float, ...] = ()

    @property
    def drifted(self) -> list[str]:
        """The quantities off by more than the profile's p95 band."""
        ratios = {"gemm": self.gemm, "memory-bound": self.memory, "layer overhead": self.overhead,
                  "collective": self.collective, "one-rank step": self.step,
                  "one-rank decode step": self.decode}
        return [k for k, v in ratios.items() if v is not None and abs(v - 1) > self.band]

    def text(self) -> str:
        parts = [f"GEMM x{self.gemm:.2f}", f"memory-bound x{self.memory:.2f}",
                 f"layer overhead x{self.overhead:.2f}"]
        if self.collective is not None:
            parts.append(f"collective x{self.collective:.2f}" + (
                f" (latency x{self.collective_latency:.2f}, per byte x{self.collective_per_byte:.2f})"
                if self.collective_latency is not None else ""))
        if self.step is not None:
            spread = (f"; median of {len(self.step_readings)} readings, x{min(self.step_readings):.2f}-"
                      f"{max(self.step_readings):.2f}" if self.step_readings else "")
            parts.append(f"one-rank step x{self.step:.2f} (against its prediction{spread})")
        if self.decode is not None:
            spread = (f"; median of {len(self.decode_readings)}, x{min(self.decode_readings):.2f}-"
                      f"{max(self.decode_readings):.2f}" if self.decode_readings else "")
            parts.append(f"one-rank decode step x{self.decode:.2f} (against its prediction{spread})")
        drift = self.drifted
        verdict = (f"drifted beyond the profile's ±{self.band:.0%} band: {', '.join(drift)}" if drift
                   else f"within the profile's ±{self.band:.0%} band")
        base = "its reading when profiled" if self.against == "reference" else "the profile's fits"
        other = (f"; the profile was measured on another CPU than this {self.other_cpu} (`meshplan "
                 "profile --out mine.json` measures this one)" if self.other_cpu else "")
        return f"probe (measured / profiled, against {base}): {', '.join(parts)}; {verdict}{other}"

    def to_json(self) -> dict:
        return {"gemm": self.gemm, "memory": self.memory, "overhead": self.overhead,
                "collective": self.collective, "collective_latency": self.collective_latency,
                "collective_per_byte": self.collective_per_byte, "step": self.step,
                "step_readings": list(self.step_readings), "band": self.band,
                "drifted": self.drifted, "against": self.against, "other_cpu": self.other_cpu,
                "decode": self.decode, "decode_readings": list(self.decode_readings)}

    def rescaled(self, hw: HardwareProfile) -> HardwareProfile:
        """The profile with its speed terms scaled by the measured ratios: GEMM rate,
        memory bandwidth, host overhead per layer and the operators' fixed cost per call all
        by the one-rank step's where it was probed (else each by its own, the fixed costs by
        the overhead's: host time on CPU ranks), and (when probed) the collectives' latency
        and bandwidth: each by its own share of the ratio where the sizes split it, else
        both by the one ratio; where the decode step was probed with the step, the costs
        only a decode step pays (its host time per layer, its cached reads, its attention
        over the cache) by the decode step's ratio instead."""
        coll = self.collective or 1.0
        latency, per_byte = ((self.collective_latency, self.collective_per_byte)
                             if self.collective_latency is not None else (coll, coll))
        gemm, memory, overhead = (self.step,) * 3 if self.step is not None else (
            self.gemm, self.memory, self.overhead)
        decode = self.decode / self.step if self.decode is not None and self.step is not None else 1.0
        return hw.scaled(flops=1 / gemm, hbm_bw=1 / memory, intra_node_bw=1 / per_byte,
                         collective_latency=latency, overhead=overhead, op_latency=overhead, decode=decode)


REFERENCE_KEY = "probe_reference"


def reference(hw: HardwareProfile) -> Measurement | None:
    """The probe's reading kept with `hw` when it was measured, if any."""
    if REFERENCE_KEY not in hw.extra:
        return None
    return Measurement.from_json(hw.extra[REFERENCE_KEY], f"extra.{REFERENCE_KEY}")


def collective_split(hw: HardwareProfile, readings: dict[int, float],
                     offset: float = 1.0) -> tuple[float, float] | None:
    """(latency, per-byte time) factors under which `hw`'s all-reduce over COLLECTIVE_RANKS
    ranks best takes the `readings` (seconds by message bytes): at each size the alpha-beta
    line in force there (collective_model.Curve) once scaled, its alpha_s times the first
    factor and its bytes / busbw times the second, fitted by least squares of the relative
    errors (each size weighs alike); divided by `offset`, the probe's ratio to the fits when
    the profile's own reading was taken (1: none kept). The scaled lines can cross elsewhere
    than the profile's (4x the latency at half the time per byte moves a 1 MiB all-reduce onto
    the latency line): every choice of line per size is fitted, and the best fit whose sizes
    sit on the lines the rescaled profile prices them by is kept. None for fewer than two
    sizes or where the readings admit no positive pair."""
    if len(readings) < 2:
        return None
    curve = hw.collectives.intra_curve("all_reduce", COLLECTIVE_RANKS)
    sizes = [size * bus_factor("all_reduce", COLLECTIVE_RANKS) for size in readings]
    best = None
    for lines in itertools.product((curve.small, curve.large), repeat=len(sizes)):
        rows = np.array([(ln.alpha_s / seconds, b / ln.busbw_bytes_per_s / seconds)
                         for ln, b, seconds in zip(lines, sizes, readings.values())])
        (latency, per_byte), *_ = np.linalg.lstsq(rows, np.ones(len(rows)), rcond=None)

        def price(ln, b):
            return latency * ln.alpha_s + per_byte * b / ln.busbw_bytes_per_s
        held = all(price(ln, b) <= min(price(curve.small, b), price(curve.large, b)) * (1 + 1e-9)
                   for ln, b in zip(lines, sizes))
        residual = float(np.sum((rows @ (latency, per_byte) - 1) ** 2))
        if held and latency > 0 and per_byte > 0 and (best is None or residual < best[0]):
            best = (residual, latency, per_byte)
    if best is None:
        return None
    _, latency, per_byte = best
    latency, per_byte = latency / offset, per_byte / offset
    return (float(latency), float(per_byte)) if latency > 0 and per_byte > 0 else None


def _all_reduce_s(hw: HardwareProfile, size: int) -> float:
    return float(hw.collective_time_s("all_reduce", size, COLLECTIVE_RANKS, COLLECTIVE_RANKS))


def compare(hw: HardwareProfile, measured: Measurement) -> Probe:
    """The measurement over the probe's reading kept with `hw` (reference), or else over
    what `hw`'s fits predict for the same operations; the one-rank step over its prediction
    on `hw` either way."""
    then, band = reference(hw), hw.relative_error_band()[1]
    cpu = this_cpu_model()
    other_cpu = cpu if hw.device_name != cpu_device_name(cpu) else None
    step = measured.step_s / predicted_step_s(hw) if measured.step_s is not None else None
    decode = measured.decode_s / predicted_decode_s(hw) if measured.decode_s is not None else None
    # the split is fitted against the fits and set relative to the profile's own reading
    offset = (then.collective_s / _all_reduce_s(hw, COLLECTIVE_BYTES)
              if then is not None and then.collective_s is not None else 1.0)
    latency, per_byte = collective_split(hw, measured.collectives(), offset) or (None, None)
    if then is not None:
        collective = (measured.collective_s / then.collective_s
                      if measured.collective_s is not None and then.collective_s is not None else None)
        return Probe(measured.gemm_s / then.gemm_s,
                     (measured.add_s / measured.add_bytes) / (then.add_s / then.add_bytes),
                     measured.layer_forward_s / then.layer_forward_s, collective, band, "reference", step,
                     collective_latency=latency, collective_per_byte=per_byte, other_cpu=other_cpu,
                     decode=decode)
    gemm = measured.gemm_s / float(hw.gemm_time_s(GEMM.m, GEMM.n, GEMM.k, "fp32", batch=GEMM.batch))
    memory = measured.add_s / float(hw.memory_bound_time_s(measured.add_bytes, "fp32", "add"))
    profiled = hw.overhead.layer_forward_s
    overhead = measured.layer_forward_s / profiled if profiled > 0 else 1.0
    collective = None
    if measured.collective_s is not None:
        collective = measured.collective_s / _all_reduce_s(hw, COLLECTIVE_BYTES)
    return Probe(gemm, memory, overhead, collective, band, step=step, collective_latency=latency,
                 collective_per_byte=per_byte, other_cpu=other_cpu, decode=decode)


def _collective_s() -> tuple[float, float, float]:
    """Median all-reduce times of COLLECTIVE_SMALL_BYTES, COLLECTIVE_BYTES and
    COLLECTIVE_LARGE_BYTES over COLLECTIVE_RANKS gloo ranks in one launch, through the
    measurement module the profile's collectives came from."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        torchrun("meshplan.calibration.measure.collectives",
                 ["--out", str(out), "--group-sizes", str(COLLECTIVE_RANKS), "--kinds", "all_reduce",
                  "--sizes", str(COLLECTIVE_SMALL_BYTES), str(COLLECTIVE_BYTES), str(COLLECTIVE_LARGE_BYTES),
                  "--repeats", "90", "--warmup", "5"],
                 COLLECTIVE_RANKS, on_line=lambda _line: None, timeout_s=120)
        times = {row["message_bytes"]: float(row["time_s"]) for row in json.loads(out.read_text())}
        return times[COLLECTIVE_SMALL_BYTES], times[COLLECTIVE_BYTES], times[COLLECTIVE_LARGE_BYTES]


def step_s() -> float:
    """Seconds of the executor's one-rank training step of LOAD_MODEL with every usable core
    running it at once, on the slowest core (the median of each core's steps): a run's
    ranks fill the cores, and a step that synchronises them waits for the slowest. Both
    move with the machine: on 2026-12-02 here the step alone went from 79-83 ms to 51 ms
    within hours while, with both cores busy, the second core then ran 9% slower than the
    first."""
    return max(step_s_by_core(sorted(os.sched_getaffinity(0)), STEP_WARMUP, STEP_REPEATS).values())


def predicted_step_s(hw: HardwareProfile) -> float:
    """The cost model's time on `hw` for the step `step_s` times: one rank beside as many
    busy ranks as there are other usable cores."""
    ranks = len(os.sched_getaffinity(0))
    return simulate(LOAD_MODEL, LOAD_PLAN, Cluster(1, 1), per_rank_profile(hw, ranks)).step_time_s


def decode_s() -> float:
    """Seconds of LOAD_MODEL's one-rank decode step (machine_load.decode_step) with every
    usable core running it at once, on the slowest core, as `step_s` times the training step."""
    return max(step_s_by_core(sorted(os.sched_getaffinity(0)), STEP_WARMUP, DECODE_REPEATS, "decode").values())


def predicted_decode_s(hw: HardwareProfile) -> float:
    """The cost model's time per output token on `hw` for the step `decode_s` times, beside
    busy ranks as `predicted_step_s`."""
    ranks = len(os.sched_getaffinity(0))
    return simulate_inference(LOAD_MODEL, DECODE_PLAN, Cluster(1, 1), per_rank_profile(hw, ranks)).tpot_s


def decode_ratio(hw: HardwareProfile) -> float:
    """One more reading of the one-rank decode step over its prediction on `hw`."""
    return decode_s() / predicted_decode_s(hw)


def step_ratio(hw: HardwareProfile) -> float:
    """One more reading of the one-rank step over its prediction on `hw`, measured as in
    `measure`."""
    return step_s() / predicted_step_s(hw)


def measure(collective: bool, rounds: int = ROUNDS, step: bool = True,
            decode_step: bool = False) -> Measurement:
    """Time the probe's operations on this machine's CPU, one thread, as the executor's
    ranks run (freed memory kept, core/host_memory.py): each in-process operation the median
    of `rounds` readings taken in turn, so that a second's swing of the machine moves one
    reading of each; then, with `step`, the one-rank step (compare sets it against the cost
    model, never against a kept reading, so a profile keeps its reading without it), and with
    `decode_step` the one-rank decode step after it."""
    keep_freed_memory()
    device = torch.device("cpu")
    readings = []
    with torch_threads(1):
        for _ in range(rounds):
            # each timed GEMM follows a sweep of the last-level cache (57 ms of the 480 MiB
            # here): eight a round keep the probe near 10 s
            gemm = measure_gemms([GEMM], ["fp32"], device, repeats=GEMM_REPEATS, warmup=3, budget_s=0.5)
            mem = measure_memory_bound(["add"], [ADD_ELEMENTS], ["fp32"], device, repeats=20, warmup=3,
                                       budget_s=0.5)
            overhead = measure_host_overhead(repeats=8, warmup=2)
            readings.append((float(gemm.iloc[0]["time_s"]), float(mem.iloc[0]["time_s"]),
                             overhead.layer_forward_s))
        one_rank_s = step_s() if step else None
        decode_step_s = decode_s() if decode_step else None
    gemm_s, add_s, layer_s = (statistics.median(column) for column in zip(*readings))
    small_s, mid_s, large_s = _collective_s() if collective else (None, None, None)
    return Measurement(gemm_s, add_s, float(mem.iloc[0]["bytes"]), layer_s, mid_s, one_rank_s, small_s, large_s,
                       decode_step_s)


@dataclass(frozen=True)
class Drift:
    """The probe against a profile: its ratios (None when skipped, `note` says why) and,
    when asked for, the profile rescaled by them."""

    probe: Probe | None
    rescaled: HardwareProfile | None
    note: str = ""

    def text(self) -> str:
        return self.probe.text() if self.probe is not None else self.note

    def to_json(self) -> dict:
        return {**(self.probe.to_json() if self.probe is not None else {}), "note": self.note,
                "rescaled_profile": self.rescaled.name if self.rescaled is not None else None}

    @property
    def timed_step(self) -> bool:
        """Whether the probe timed the one-rank step (later readings can join it)."""
        return self.probe is not None and self.probe.step is not None

    def with_step_readings(self, hw: HardwareProfile, later: list[float],
                           later_decode: list[float] = ()) -> Drift:
        """The drift with the one-rank step's ratio the median of the probe's reading and
        `later` ones (step_ratio, e.g. between a validation's launches), the decode step's
        likewise with `later_decode` (decode_ratio) where it was probed, and `hw` rescaled
        by them; as it is where the step was not probed or nothing was read later."""
        if not (self.timed_step and later):
            return self
        readings = (self.probe.step, *later)
        probe = replace(self.probe, step=statistics.median(readings), step_readings=readings)
        if self.probe.decode is not None and later_decode:
            decodes = (self.probe.decode, *later_decode)
            probe = replace(probe, decode=statistics.median(decodes), decode_readings=decodes)
        return replace(self, probe=probe, rescaled=probe.rescaled(hw) if self.rescaled is not None else None)


def check_drift(hw: HardwareProfile, device: str, rescale: bool, collective: bool,
                measured: Callable[..., Measurement] | None = None, decode: bool = False) -> Drift:
    """Probe this machine (`measured`, default `measure`, the decode step too with `decode`;
    one collective if asked) against `hw`, whose ranks run on `device` ("cpu" or "cuda");
    with `rescale` also the profile rescaled by the probe. Skipped, with a note, where the
    probe cannot speak for the ranks: ranks on a CUDA device, or a profile not measured on
    CPU."""
    if device != "cpu" or hw.measured_on != "cpu":
        where = (f"the ranks run on {device}" if device != "cpu" else
                 f"profile {hw.name} was not measured on CPU ranks")
        return Drift(None, None, f"probe skipped: {where}, and the probe times CPU ranks against "
                                 "a CPU profile; predictions use the profile as it is")
    probe = compare(hw, (measured or measure)(collective, decode_step=decode))
    return Drift(probe, probe.rescaled(hw) if rescale else None)


def repredicted(record: RunRecord | ServeRecord, cluster: Cluster,
                hw: HardwareProfile) -> RunRecord | ServeRecord:
    """The record with its prediction made again on `hw` (a profile rescaled by a probe),
    the measurement kept."""
    simulator = simulate_inference if isinstance(record, ServeRecord) else simulate
    prediction, note = prediction_or_why(
        lambda: simulator(record.model, record.plan, cluster, hw).to_json())
    return replace(record, profile=hw.name, prediction=prediction, prediction_note=note)
