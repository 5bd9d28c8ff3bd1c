"""Measure this machine into a fitted profile: samples of GEMMs, memory-bound operators and
collectives (calibration/measure/run.py), the framework overhead of the executor's layer on
CPU (overhead.py), and the fit (fit.py) onto the machine's base description
(local_base.py), then the fused attention kernel against that fit (measure/attention.py)
and the rate of reading weights back from the caches (measure/cached_reads.py).
On CPU the drift probe's own reading (probe.py) is kept with the profile, so that later
probes compare their reading with it, like with like."""
from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path

from meshplan.calibration.measure.attention import fit_attention
from meshplan.calibration.measure.cached_reads import measure_cached_reads, median_reading
from meshplan.calibration.fit import fit_profile
from meshplan.calibration.local_base import local_base
from meshplan.calibration.measure.machine import describe_machine
from meshplan.calibration.measure.machine_load import neighbour_slowdown
from meshplan.calibration.measure.run import CPU_MAX_WORLD, measure_machine, measurement_plan
from meshplan.calibration.overhead import measure_decode_overhead, measure_overhead
from meshplan.calibration.probe import REFERENCE_KEY, measure as probe
from meshplan.calibration.samples import Samples
from meshplan.core.errors import ProfileError
from meshplan.core.host_memory import keep_freed_memory
from meshplan.core.progress import progress_bar
from meshplan.hw_profiles.profile import HardwareProfile


QUICK_CACHED_BYTES = 2 ** 28  # a quick profile's cached reads stop at 256 MiB of working set


def measure_profile(quick: bool, name: str, holdout: float, seed: int,
                    progress: bool = False) -> tuple[HardwareProfile, Samples, dict, float]:
    """(profile, samples, machine description, seconds spent measuring)."""
    started = time.perf_counter()
    keep_freed_memory()  # as the executor's ranks run (core/host_memory.py)
    machine = describe_machine()
    cuda = machine["gpu_count"] > 0
    plan = measurement_plan(quick, cuda, machine["usable_cpus"], machine["gpu_count"])
    if not plan.launches:
        raise ProfileError("devices", "one CUDA device: collectives need 2 or more ranks",
                           "run on a machine with 2 or more GPUs, or refit a stock profile "
                           "from your cluster's logs with --import-nccl-tests")
    with tempfile.TemporaryDirectory(prefix="meshplan-profile-") as tmp:
        samples, machine = measure_machine(quick, Path(tmp) / "samples.json", progress=progress)
    profile = fit_profile(samples, local_base(samples, machine, name), holdout, seed)
    overhead = reference = slowdown = None
    # the executor computes in fp32 on CPU and bf16 on a GPU (executor.options.compute_dtype)
    device, dtype = ("cuda", "bf16") if cuda else ("cpu", "fp32")
    # a shared CPU's speed comes in spells: its cached reads are read three times, minutes
    # apart (before, between and after the other calibrations), and the median kept
    spaced = not cuda and not quick
    cached_bytes = QUICK_CACHED_BYTES if quick else 0
    readings = []
    with progress_bar(2 if cuda else 6 + 2 * spaced, "calibrating", progress) as bar:
        if spaced:
            bar.describe("calibrating: cached reads (1 of 3)")
            readings.append(measure_cached_reads(device, dtype, cached_bytes))
            bar.advance()
        # On a GPU the host queues kernels ahead of the device: its overhead is not on the
        # path. On CPU the fitted collectives price those inside the overhead's two-rank probe.
        if not cuda:
            bar.describe("calibrating: host overhead")
            overhead = measure_overhead(profile, repeats=15 if quick else 40)
            bar.advance()
            bar.describe("calibrating: drift probe")
            reference = probe(collective=machine["usable_cpus"] >= 2, step=False)
            bar.advance()
            bar.describe("calibrating: busy neighbours")
            slowdown = neighbour_slowdown(min(machine["usable_cpus"], CPU_MAX_WORLD), rounds=2 if quick else 3)
            bar.advance()
        if spaced:
            bar.describe("calibrating: cached reads (2 of 3)")
            readings.append(measure_cached_reads(device, dtype, cached_bytes))
            bar.advance()
        bar.describe("calibrating: fused attention")
        attention = fit_attention(profile, device, dtype)
        bar.advance()
        bar.describe("calibrating: cached reads" + (" (3 of 3)" if spaced else ""))
        readings.append(measure_cached_reads(device, dtype, cached_bytes))
        bar.advance()
        profile = replace(profile, attention=attention, cached_reads=median_reading(readings))
        if overhead is not None:
            # the decode layer's time beyond the operators the profile now prices
            bar.describe("calibrating: decode overhead")
            layer_s, per_byte_s, edge_s = measure_decode_overhead(profile, repeats=15 if quick else 40)
            overhead = replace(overhead, decode_layer_s=layer_s, decode_layer_per_byte_s=per_byte_s,
                               decode_edge_s=edge_s)
            bar.advance()
    measured_s = time.perf_counter() - started
    if overhead is not None:
        profile = replace(profile, overhead=overhead,
                          extra={**profile.extra, REFERENCE_KEY: reference.to_json(),
                                 "neighbour_slowdown": slowdown})
    return profile, samples, machine, measured_s
