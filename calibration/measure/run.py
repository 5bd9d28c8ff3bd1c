"""Measure this machine into Samples: GEMMs and memory-bound operators in this process (one
torch thread, as each executor rank runs), collectives through torchrun subprocesses; save
them as JSON so that calibration.fit can refit them later.

    python -c "from meshplan.calibration.measure.run import measure_machine; measure_machine(True, 'm.json')"
"""
from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch

from meshplan.hw_profiles.collective_model import KINDS
from meshplan.core.io import write_atomic
from meshplan.core.progress import progress_bar
from meshplan.core.requirements import check_torch
from meshplan.calibration.measure.compute import MEMORY_BOUND_OPS, GemmShape, measure_gemms, \
    measure_memory_bound, torch_threads, transformer_gemm_shapes
from meshplan.calibration.measure.machine import describe_machine
from meshplan.calibration.samples import COLLECTIVE_COLUMNS, GEMM_COLUMNS, MEMORY_BOUND_COLUMNS, Samples
from meshplan.core.errors import ProfileError
from meshplan.executor.launch import RunFailed, torchrun

FORMAT = "meshplan-samples/1"
KIB, MIB = 1024, 1024 ** 2
THREADS_PER_RANK = 1
# Most CPU ranks per core: beyond 2 the collectives measure the OS scheduler, not the fabric.
CPU_RANKS_PER_CORE = 2
CPU_MAX_WORLD = 4
TORCHRUN_TIMEOUT_S = 1800  # a launch killed after this is reported as hung
# Measurements are repeatable, and a launch that fails is started again once (torchrun
# --max-restarts): one two-rank probe in about a hundred here died of a glibc heap check
# ("malloc(): unaligned tcache chunk detected") in a DTensor collective's wait, and one in
# CI hung; neither came back when run again
RESTARTS = 1


@dataclass(frozen=True)
class MeasurePlan:
    """What one measure_machine call times. `gemm_shapes` per dtype; `launches` are torchrun
    world sizes with the group sizes each measures."""

    device: str
    gemm_shapes: dict[str, tuple[GemmShape, ...]]
    memory_elements: tuple[int, ...]
    memory_dtypes: tuple[str, ...]
    collective_sizes_bytes: tuple[int, ...]
    launches: tuple[tuple[int, tuple[int, ...]], ...]
    repeats: int
    warmup: int
    budget_s: float
    # gloo's calls on CPU are heavy-tailed (collectives.py): their mean needs many more calls
    # than a GEMM's median, and small ones are cheap; budget_s still bounds the large ones
    collective_repeats: int


def _gated_ffn(hidden: int) -> int:
    """SwiGLU width 2/3 * 4h (Shazeer 2020, "GLU variants", sec. 2), rounded up to 64."""
    return -(-8 * hidden // 3 // 64) * 64


def _shapes(hiddens: list[int], head_dim: int, tokens: list[int], seqs: list[int]) -> tuple:
    out = []
    for h in hiddens:
        out += transformer_gemm_shapes(h, h // head_dim, _gated_ffn(h), tokens, seqs)
    return tuple(out)


def measurement_plan(quick: bool, cuda: bool, cpus: int, gpus: int) -> MeasurePlan:
    """Sizes for a CPU (single-thread rank) or a CUDA device, quick or full. On CPU bf16 GEMMs
    have no fast kernel without AVX512-BF16/AMX, so their shapes are small."""
    if cuda:
        tokens = [256, 1024, 4096] if quick else [128, 512, 2048, 8192, 16384]
        seqs = [1024, 4096] if quick else [512, 1024, 2048, 4096]
        hiddens = [2048, 8192] if quick else [1024, 2048, 4096, 8192]
        gemm = {d: _shapes(hiddens, 128, tokens, seqs) for d in ("fp32", "bf16", "fp16")}
        memory = tuple(4 ** i for i in range(8, 14 if quick else 15))
        top = 256 * MIB if quick else 1024 * MIB
        launches = ((gpus, tuple(range(2, gpus + 1))),) if gpus >= 2 else ()
        return MeasurePlan("cuda", gemm, memory, ("fp32", "bf16", "fp16"),
                           _powers(KIB, top, 4 if quick else 2), launches, 20, 3, 0.5, 20)
    if quick:
        gemm = {"fp32": _shapes([512], 64, [64, 256, 1024], [256]),
                "bf16": _shapes([256], 64, [64], [128])}
        memory = tuple(4 ** i for i in range(7, 12))
        sizes, repeats, warmup, budget, calls = _powers(KIB, 64 * MIB, 16), 5, 1, 0.1, 30
    else:
        gemm = {"fp32": _shapes([256, 512, 1024], 64, [32, 128, 512, 2048], [256, 1024]),
                "bf16": _shapes([256], 64, [32, 128, 512], [128, 256])}
        memory = tuple(2 ** i for i in range(12, 23))
        sizes, repeats, warmup, budget, calls = _powers(KIB, 256 * MIB, 4), 10, 2, 0.3, 200
    # Largest CPU activation 2^22 fp32 = 16 MiB; no allocation faults in a fresh mapping per
    # call (core/host_memory.py keeps every block in the heap).
    worlds = range(2, min(CPU_MAX_WORLD, cpus * CPU_RANKS_PER_CORE) + 1)
    # One launch per world size, measuring the whole world: every process busy, as in training.
    return MeasurePlan("cpu", gemm, memory, ("fp32", "bf16"), sizes,
                       tuple((w, (w,)) for w in worlds), repeats, warmup, budget, calls)


def _powers(lo: int, hi: int, factor: int) -> tuple[int, ...]:
    out = [lo]
    while out[-1] * factor <= hi:
        out.append(out[-1] * factor)
    return tuple(out if out[-1] == hi else out + [hi])


def launch_rows(module: str, args: list[str], world: int, field: str, what: str,
                on_line=lambda _line: None, timeout_s: float = TORCHRUN_TIMEOUT_S) -> list[dict]:
    """The rows rank 0 of a measurement module writes to its --out, from one torchrun launch
    of `world` ranks (executor.launch.torchrun, the executor's launcher), started again once
    if it fails (RESTARTS); a launch failing twice is a ProfileError on `field` saying `what`
    failed and where the command to rerun it is."""
    with tempfile.TemporaryDirectory(prefix="meshplan-measure-") as tmp:
        out = Path(tmp) / "rows.json"
        try:
            torchrun(module, ["--out", str(out), *args], world, on_line=on_line, timeout_s=timeout_s,
                     max_restarts=RESTARTS)
        except RunFailed as exc:
            source = module.removeprefix("meshplan.").replace(".", "/") + ".py"
            raise ProfileError(field, f"{what} failed: {exc}",
                               f"run the command in {source}'s docstring by hand to see the whole error") from None
        return json.loads(out.read_text())


def collectives_launch(world: int, groups: tuple[int, ...], plan: MeasurePlan, advance) -> pd.DataFrame:
    """Collective rows of one torchrun launch of `world` ranks; advance() per measured row
    (once per row: a launch started again prints its rows again)."""
    args = ["--group-sizes", *map(str, groups),
            "--sizes", *map(str, plan.collective_sizes_bytes), "--repeats", str(plan.collective_repeats),
            "--warmup", str(plan.warmup), "--budget-s", str(plan.budget_s)]
    seen: set[str] = set()

    def on_line(line: str) -> None:
        if line.startswith("measured ") and line not in seen:
            seen.add(line)
            advance()
    rows = launch_rows("meshplan.calibration.measure.collectives", args, world, "collectives",
                       f"the measurement over {world} ranks", on_line=on_line)
    return pd.DataFrame.from_records(rows, columns=list(COLLECTIVE_COLUMNS))


def measure_machine(quick: bool, out_samples_path, progress: bool = True) -> tuple[Samples, dict]:
    """Measure this machine (CUDA device 0 and all GPUs if CUDA, else the CPU), save the
    samples with the machine description to out_samples_path, and return both."""
    check_torch()
    started = time.perf_counter()
    machine = describe_machine()
    cuda = torch.cuda.is_available()
    plan = measurement_plan(quick, cuda, machine["usable_cpus"], machine["gpu_count"])
    device = torch.device(plan.device)
    mem_ops = list(MEMORY_BOUND_OPS)
    n_gemm = sum(len(s) for s in plan.gemm_shapes.values())
    n_mem = sum(len(plan.memory_elements) * len([o for o in mem_ops if o != "adam" or d == "fp32"])
                for d in plan.memory_dtypes)
    n_coll = sum(len(groups) * len(KINDS) * len(plan.collective_sizes_bytes)
                 for _, groups in plan.launches)
    with progress_bar(n_gemm + n_mem + n_coll, "measuring", progress) as bar:

        def advance(n: int = 1, what: str | None = None):
            if what:
                bar.describe(what)
            bar.advance(n)

        gemm, mem, coll = [], [], []
        with torch_threads(THREADS_PER_RANK):
            for dtype, shapes in plan.gemm_shapes.items():
                for shape in shapes:
                    advance(0, f"GEMM {dtype} {shape.op}")
                    gemm.append(measure_gemms([shape], [dtype], device, plan.repeats,
                                              plan.warmup, plan.budget_s))
                    advance()
            for dtype in plan.memory_dtypes:
                for op in mem_ops:
                    advance(0, f"memory-bound {dtype} {op}")
                    rows = measure_memory_bound([op], list(plan.memory_elements), [dtype], device,
                                                plan.repeats, plan.warmup, plan.budget_s)
                    mem.append(rows)
                    advance(len(rows))
        for world, groups in plan.launches:
            advance(0, f"collectives, {world} ranks")
            coll.append(collectives_launch(world, groups, plan, advance))
    samples = Samples(gemm=pd.concat(gemm, ignore_index=True),
                      memory_bound=pd.concat(mem, ignore_index=True),
                      collectives=(pd.concat(coll, ignore_index=True) if coll
                                   else pd.DataFrame(columns=list(COLLECTIVE_COLUMNS))))
    cores = machine["usable_cpus"]
    machine["measurement"] = {
        "quick": quick, "device": plan.device, "torch_threads_per_rank": THREADS_PER_RANK,
        "collective_backend": "nccl" if cuda else "gloo", "collective_dtype": "fp32",
        "collective_launches": [{"world_size": w, "group_sizes": list(g), "usable_cpus": cores,
                                 "ranks_per_core": w / cores} for w, g in plan.launches],
        "gemm_shapes": {d: [asdict(s) for s in shapes] for d, shapes in plan.gemm_shapes.items()},
        "elapsed_s": round(time.perf_counter() - started, 1),
    }
    save_samples(samples, out_samples_path, machine)
    return samples, machine


def _records(df: pd.DataFrame, columns) -> list[dict]:
    """Rows as plain-Python dicts (full float precision, JSON-native types)."""
    values = [df[c].tolist() for c in columns]
    return [dict(zip(columns, row)) for row in zip(*values)]


def save_samples(samples: Samples, path, machine: dict | None = None) -> None:
    """Write samples (and the machine they came from) as JSON, whole or not at all."""
    doc = {"format": FORMAT, "machine": machine,
           "gemm": _records(samples.gemm, GEMM_COLUMNS),
           "memory_bound": _records(samples.memory_bound, MEMORY_BOUND_COLUMNS),
           "collectives": _records(samples.collectives, COLLECTIVE_COLUMNS)}
    write_atomic(path, json.dumps(doc, indent=1))


def load_samples(path) -> Samples:
    """Samples saved by save_samples."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise ProfileError(str(path), "no such samples file", "pass the path measure_machine "
                           "or save_samples wrote") from None
    except json.JSONDecodeError as e:
        raise ProfileError(str(path), f"not JSON ({e})", "re-run the measurement") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ProfileError(str(path), f"not a {FORMAT} file", "pass a file save_samples wrote")
    try:
        return Samples(*(pd.DataFrame.from_records(doc[name], columns=list(cols))
                         for name, cols in (("gemm", GEMM_COLUMNS),
                                            ("memory_bound", MEMORY_BOUND_COLUMNS),
                                            ("collectives", COLLECTIVE_COLUMNS))))
    except (KeyError, TypeError, ValueError) as e:
        raise ProfileError(str(path), f"malformed samples ({e})",
                           "re-run the measurement") from None
