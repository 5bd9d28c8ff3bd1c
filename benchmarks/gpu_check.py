"""The GPU check, ready for the day a GPU is lent: measure this GPU's compute (GEMMs at
transformer shapes and memory-bound operators, calibration/measure/compute.py), fit them into a
profile of this GPU, run single-GPU training and serving steps through `meshplan run` (bf16
autocast, the allocator's peak memory), and print predicted vs measured, with the prediction
of this GPU's profile beside that of the nearest stock profile.

    python benchmarks/gpu_check.py OUT                # one CUDA device: under 10 minutes
    python benchmarks/gpu_check.py OUT --device cpu   # the same path at tiny sizes on CPU

Without a CUDA device (and without --device cpu) it says so and exits 0. It runs unattended
and never needs the network. OUT receives samples.json (every timing), profile.json (the
fitted profile), models/ (the configs run), records/ (each run's `meshplan run --record`),
results.json and results.txt (predicted vs measured); exit code 1 if a run failed.

One GPU cannot time collectives (NCCL puts one rank on a device), so the profile keeps the
stock profile's collectives; single-GPU runs use none.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from meshplan.calibration.fit import compute_fits, error_band
from meshplan.calibration.local_base import best_gemm_flops, best_memory_bytes_per_s, known_gpu
from meshplan.calibration.measure.compute import (MEMORY_BOUND_OPS, measure_gemms,
                                                  measure_memory_bound, torch_threads)
from meshplan.calibration.measure.machine import describe_machine
from meshplan.calibration.measure.run import THREADS_PER_RANK, measurement_plan, save_samples
from meshplan.calibration.samples import COLLECTIVE_COLUMNS, Samples
from meshplan.core.errors import MeshplanError
from meshplan.core.io import write_atomic, write_json
from meshplan.core.units import GIB, MIB
from meshplan.executor.records import RunRecord, ServeRecord
from meshplan.hw_profiles.gemm_model import DTYPE_BYTES
from meshplan.hw_profiles.profile import HardwareProfile, load_profile
from meshplan.simulator.model_spec import ModelSpec
from meshplan.simulator.plan import Cluster
from meshplan.simulator.serve import simulate_inference
from meshplan.simulator.train import simulate

BUDGET_S = 570  # the whole check on one GPU, under the 10 minutes it is given
RUN_TIMEOUT_S = 240
HOLDOUT, SEED = 0.2, 0

# TinyLlama-1.1B's shape (Zhang et al. 2024, Table 1): large enough to load an H100/H200.
LLAMA_1B = ModelSpec("llama-1.1b", num_layers=22, hidden_size=2048, num_heads=32, num_kv_heads=4,
                     ffn_hidden_size=5632, vocab_size=32000, max_seq_len=2048)
TINY = ModelSpec("tiny-llama", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2,
                 ffn_hidden_size=176, vocab_size=256, max_seq_len=64)


@dataclass(frozen=True)
class Check:
    """One `meshplan run` on one device: its name, model and flags (besides --model,
    --hardware and --gpus)."""

    name: str
    model: ModelSpec
    flags: tuple[str, ...]

    @property
    def serving(self) -> bool:
        return "inference" in self.flags


TRAIN = ("--dtype", "bf16", "--steps", "12", "--warmup", "3")
SERVE = ("--mode", "inference", "--dtype", "bf16", "--warmup", "1", "--repeats", "3")
GPU_CHECKS = (
    Check("train 1.1B seq 2048", LLAMA_1B, (*TRAIN, "--global-batch", "8", "--micro-batch", "2",
                                            "--seq-len", "2048")),
    Check("train 1.1B seq 2048 recompute", LLAMA_1B, (*TRAIN, "--global-batch", "8", "--micro-batch",
                                                      "4", "--seq-len", "2048", "--recompute", "full")),
    Check("serve 1.1B batch 16", LLAMA_1B, (*SERVE, "--batch", "16", "--prompt-len", "1024",
                                             "--gen-len", "128")),
    Check("serve 1.1B batch 64", LLAMA_1B, (*SERVE, "--batch", "64", "--prompt-len", "512",
                                             "--gen-len", "64")),
)
CPU_CHECKS = (
    Check("train tiny", TINY, ("--steps", "4", "--warmup", "1", "--global-batch", "4",
                               "--micro-batch", "2", "--seq-len", "32")),
    Check("serve tiny", TINY, ("--mode", "inference", "--warmup", "0", "--repeats", "2",
                               "--batch", "2", "--prompt-len", "16", "--gen-len", "8")),
)


def stock_profile_name(device_name: str) -> str:
    """The stock profile nearest this device: Hopper's for H100/H200, else Ampere's; on CPU
    the local one."""
    if device_name == "cpu":
        return "local"
    return "h100-80gb" if any(g in device_name.upper() for g in ("H100", "H200", "GH200")) else "a100-80gb"


def measure(device: str, machine: dict) -> Samples:
    """GEMMs and memory-bound operators at the sizes of `meshplan profile --quick`."""
    plan = measurement_plan(True, device == "cuda", machine["usable_cpus"], machine["gpu_count"])
    with torch_threads(THREADS_PER_RANK):
        gemm = [measure_gemms(list(shapes), [dtype], device, plan.repeats, plan.warmup, plan.budget_s)
                for dtype, shapes in plan.gemm_shapes.items()]
        memory = measure_memory_bound(list(MEMORY_BOUND_OPS), list(plan.memory_elements),
                                      list(plan.memory_dtypes), device, plan.repeats, plan.warmup,
                                      plan.budget_s)
    return Samples(gemm=pd.concat(gemm, ignore_index=True), memory_bound=memory,
                   collectives=pd.DataFrame(columns=list(COLLECTIVE_COLUMNS)))


def device_figures(samples: Samples, stock: HardwareProfile, device: str) -> dict:
    """Name, memory, peak FLOP/s and memory bandwidth of the device: the datasheet's for a
    known GPU (calibration.local_base.KNOWN_GPUS), else the best rates measured; on CPU the
    stock local profile's."""
    if device == "cpu":
        return {"device_name": stock.device_name, "memory_bytes": stock.memory_bytes,
                "peak_flops": dict(stock.peak_flops), "hbm_bytes_per_s": stock.hbm_bytes_per_s,
                "source": f"device figures of stock profile {stock.name}"}
    name = torch.cuda.get_device_name(0)
    memory = torch.cuda.get_device_properties(0).total_memory
    spec = known_gpu(name)
    if spec is not None:
        return {"device_name": name, "memory_bytes": memory, "peak_flops": dict(spec.peak_flops),
                "hbm_bytes_per_s": spec.hbm_bytes_per_s, "source": spec.source}
    best = best_gemm_flops(samples)
    peaks = {d: best.get(d, best.get({"tf32": "fp32", "fp16": "bf16"}.get(d, d), max(best.values())))
             for d in DTYPE_BYTES}
    return {"device_name": name, "memory_bytes": memory, "peak_flops": peaks,
            "hbm_bytes_per_s": best_memory_bytes_per_s(samples),
            "source": f"{name} is not a known GPU: peaks and bandwidth are the best rates measured"}


def fit_this_device(samples: Samples, stock: HardwareProfile, figures: dict,
                    name: str) -> HardwareProfile:
    """The stock profile with this device's figures and GEMM / memory-bound fits of
    `samples` (calibration.fit's compute fits and held-out report, as fit_profile makes
    them); its collectives are the stock profile's. fit_profile itself needs collectives,
    which one device cannot time."""
    base = {"peak_flops": figures["peak_flops"], "hbm_bytes_per_s": figures["hbm_bytes_per_s"]}
    gemm, memory, report, notes = compute_fits(samples, base, HOLDOUT, np.random.default_rng(SEED))
    report["error_band"] = error_band(report)
    return dataclasses.replace(
        stock, name=name, gpus_per_node=1,
        device_name=figures["device_name"], memory_bytes=int(figures["memory_bytes"]),
        peak_flops={d: float(v) for d, v in figures["peak_flops"].items()},
        hbm_bytes_per_s=float(figures["hbm_bytes_per_s"]), gemm=gemm, memory_bound=memory,
        fit_report=report,
        sources=(f"measured by benchmarks/gpu_check.py on {figures['device_name']}, torch "
                 f"{torch.__version__}", figures["source"], *notes,
                 f"collectives, overhead, NICs: of stock profile {stock.name}, not measured (one "
                 "device)"),
        extra={"machine": describe_machine()})


def run_check(check: Check, profile_path: Path, out: Path, device: str) -> dict:
    """Run one check through `meshplan run`; its record, or {"error": ...}."""
    config = out / "models" / f"{check.model.name}.json"
    write_json(config, check.model.to_dict())
    record = out / "records" / f"{check.name.replace(' ', '-')}.json"
    env = dict(os.environ, **({"CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else {}))
    command = [sys.executable, "-m", "meshplan.cli", "run", "--model", str(config), "--hardware",
               str(profile_path), "--gpus", "1", *check.flags, "--json", "--record", str(record)]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"error": f"ran past {RUN_TIMEOUT_S} s"}
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]}
    return json.loads(record.read_text())


def compare(check: Check, record: dict, stock: HardwareProfile) -> list[dict]:
    """Rows (quantity, measured, predicted by this device's profile, by the stock one)."""
    cluster = Cluster(1, 1)
    if check.serving:
        run = ServeRecord.from_json(record)
        stock_pred = simulate_inference(run.model, run.plan, cluster, stock).to_json()
        quantities = ("ttft_s", "tpot_s", "peak_memory_bytes")
    else:
        run = RunRecord.from_json(record)
        stock_pred = simulate(run.model, run.plan, cluster, stock).to_json()
        quantities = ("step_time_s", "peak_memory_bytes")
    summary = run.summary_json()
    return [{"check": check.name, "quantity": q, "measured": summary[f"measured_{q}"],
             "predicted": summary[f"predicted_{q}"], "predicted_stock": stock_pred[q]}
            for q in quantities]


def table(rows: list[dict], profile: str, stock: str) -> str:
    """Predicted vs measured, one line per check and quantity, aligned."""
    def fmt(quantity: str, value) -> str:
        if value is None:
            return "n/a"
        if quantity.endswith("bytes"):
            return f"{value / GIB:.2f} GiB" if value >= GIB else f"{value / MIB:.2f} MiB"
        return f"{value * 1e3:.2f} ms"

    def err(pred, meas) -> str:
        return "" if pred is None or not meas else f"{pred / meas - 1:+.0%}"
    lines = [("check", "quantity", "measured", f"predicted ({profile})", "error",
              f"stock ({stock})", "error")]
    lines += [(r["check"], r["quantity"], fmt(r["quantity"], r["measured"]),
               fmt(r["quantity"], r["predicted"]), err(r["predicted"], r["measured"]),
               fmt(r["quantity"], r["predicted_stock"]), err(r["predicted_stock"], r["measured"]))
              for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "".join("  ".join(cell.ljust(w) if i < 2 else cell.rjust(w)
                             for i, (cell, w) in enumerate(zip(line, widths))).rstrip() + "\n"
                   for line in lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder for the profile, records and results")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: the same steps at tiny sizes on this machine's CPU (a dry run)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device on this machine (torch {torch.__version__}, CUDA build "
              f"{torch.version.cuda or 'none'}); nothing to check", file=sys.stderr)
        return 0
    try:
        return check(args.out, args.device)
    except MeshplanError as exc:
        print(f"gpu_check: error: {exc}", file=sys.stderr)
        return 1


def check(out: Path, device: str) -> int:
    """Measure, fit, run and compare on `device`; 1 if a run failed."""
    started = time.monotonic()
    machine = describe_machine()
    print(f"gpu_check: measuring GEMMs and memory-bound operators on {device}", file=sys.stderr)
    samples = measure(device, machine)
    if device == "cuda":  # hand the measurement's cached blocks back before the runs
        torch.cuda.empty_cache()
    save_samples(samples, out / "samples.json", machine)
    device_name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    stock = load_profile(stock_profile_name(device_name))
    name = "gpu-check-" + ("cpu" if device == "cpu" else "-".join(device_name.lower().split()[:2]))
    profile = fit_this_device(samples, stock, device_figures(samples, stock, device), name)
    profile.save(out / "profile.json")
    band = profile.fit_report.get("error_band", {})
    print(f"gpu_check: profile {profile.name} of {profile.device_name}; held-out fit error "
          f"median {band.get('median', float('nan')):.1%}", file=sys.stderr)
    rows, failed = [], []
    for one in GPU_CHECKS if device == "cuda" else CPU_CHECKS:
        if time.monotonic() - started > BUDGET_S - RUN_TIMEOUT_S:
            failed.append({"check": one.name, "error": "skipped: the time budget ran out"})
            continue
        print(f"gpu_check: meshplan run: {one.name}", file=sys.stderr)
        record = run_check(one, out / "profile.json", out, device)
        if "error" in record:
            failed.append({"check": one.name, "error": record["error"]})
            continue
        rows += compare(one, record, stock)
    text = table(rows, profile.name, stock.name)
    text += "".join(f"{f['check']}: {f['error']}\n" for f in failed)
    write_atomic(out / "results.txt", text)
    write_json(out / "results.json", {"device": profile.device_name, "profile": profile.name,
                                      "stock_profile": stock.name, "rows": rows, "failed": failed,
                                      "elapsed_s": round(time.monotonic() - started, 1)})
    sys.stdout.write(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
