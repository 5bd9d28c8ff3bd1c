"""The validation suite: run many plans on this machine, set each measured step time and
peak memory beside the simulator's prediction, and summarise the error.

The plans cover every parallelism the executor runs at world size 2 (DP with ZeRO 0-3, TP,
TP+SP, PP with GPipe / 1F1B / interleaved and several micro-batch counts, recompute (of
layers, of the attention core, and per op under TP), CP by
Ulysses' all-to-all, the ring and the gather) and world size 4 (4 ranks sharing the 2 cores of this machine: the
profile's cores_per_node makes the cost model divide compute among them), and expert
parallelism (all-to-all token dispatch, EP alone and folded with expert data parallelism)
on a mixture-of-experts model of the same attention."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
from scipy.stats import spearmanr

from meshplan.calibration.probe import repredicted
from meshplan.executor.launch import RunFailed, launch_train_many
from meshplan.executor.options import RunOptions
from meshplan.executor.records import RunRecord
from meshplan.simulator.model_spec import ModelSpec
from meshplan.hw_profiles.profile import HardwareProfile
from meshplan.simulator.plan import Cluster, Plan

# A Llama-style model whose step takes ~0.1-0.5 s on one thread per rank: long enough to
# time well, short enough for the whole suite to run in a few minutes.
VALIDATION_MODEL = ModelSpec(name="validate-llama-8m", num_layers=4, hidden_size=256, num_heads=8,
                             num_kv_heads=4, ffn_hidden_size=704, vocab_size=4096, max_seq_len=1024)
# The same attention, then top-2 of 4 experts of half the dense width (active MLP FLOPs
# as the dense model's) in layers 1-3 after a dense first layer.
VALIDATION_MOE_MODEL = replace(VALIDATION_MODEL, name="validate-moe-8m", num_experts=4,
                               experts_per_token=2, moe_ffn_hidden_size=352, dense_layers=(0,))
SEQ_LEN = 128


def _p(**kw) -> Plan:
    base = dict(global_batch=8, seq_len=SEQ_LEN, micro_batch=2, dtype="fp32")
    base.update(kw)
    return Plan(**base)


SUITE: tuple[tuple[str, Plan], ...] = (
    ("dp2", _p(dp=2)),
    ("dp2 zero1", _p(dp=2, zero=1)),
    ("dp2 zero2", _p(dp=2, zero=2)),
    ("dp2 zero3", _p(dp=2, zero=3)),
    ("dp2 mb1", _p(dp=2, micro_batch=1)),
    ("dp2 recompute full", _p(dp=2, recompute="full")),
    ("tp2", _p(tp=2)),
    ("tp2 sp", _p(tp=2, sp=True)),
    ("tp2 sp selective", _p(tp=2, sp=True, recompute="selective")),
    ("tp2 sp op", _p(tp=2, sp=True, recompute="op")),
    ("pp2 gpipe m4", _p(pp=2, schedule="gpipe")),
    ("pp2 1f1b m4", _p(pp=2, schedule="1f1b")),
    ("pp2 1f1b m8", _p(pp=2, schedule="1f1b", micro_batch=1)),
    ("pp2 interleaved v2 m4", _p(pp=2, schedule="interleaved", virtual_stages=2)),
    ("cp2 a2a", _p(cp=2, cp_comm="a2a")),
    ("cp2 p2p", _p(cp=2)),
    ("cp2 allgather", _p(cp=2, cp_comm="allgather")),
    ("dp4", _p(dp=4)),
    ("dp2 tp2", _p(dp=2, tp=2, zero=2)),
    ("tp2 pp2", _p(tp=2, pp=2, schedule="1f1b")),
    ("dp2 pp2", _p(dp=2, pp=2, schedule="1f1b", micro_batch=1, zero=2)),
    ("dp2 cp2 a2a", _p(dp=2, cp=2, cp_comm="a2a")),
)
MOE_SUITE: tuple[tuple[str, Plan], ...] = (
    ("moe dp2 ep2", _p(dp=2, ep=2)),
    ("moe dp4 ep2", _p(dp=4, ep=2)),
    ("moe dp4 ep4", _p(dp=4, ep=4)),
    ("moe tp2 sp ep2", _p(tp=2, sp=True, etp=1, ep=2)),
)
# Each suite with the model it runs.
SUITES: tuple[tuple[ModelSpec, tuple[tuple[str, Plan], ...]], ...] = (
    (VALIDATION_MODEL, SUITE), (VALIDATION_MOE_MODEL, MOE_SUITE))


@dataclass(frozen=True)
class ValidationRun:
    name: str
    record: RunRecord

    @property
    def error(self) -> float:
        """Relative error of the predicted step time: predicted / measured - 1."""
        return self.record.predicted_step_time_s / self.record.measured_step_time_s - 1.0

    @property
    def memory_error(self) -> float:
        return (self.record.predicted_peak_memory_bytes
                / max(self.record.measured_peak_memory_by_rank_bytes) - 1.0)

    def to_json(self) -> dict:
        return {"name": self.name, **self.record.summary_json(), "error": self.error,
                "memory_error": self.memory_error}


def launched_again_if_failed(launch: Callable, *args):
    """launch(*args) (a torchrun launch of a suite's plans), started once more if its ranks
    fail: a measurement repeats, and one launch in about a hundred of the two-rank overhead
    probe, on the same DTensor and gloo code, died of glibc's heap check
    (calibration/measure/run.py RESTARTS). The first failure's output is on stderr, as the
    ranks' output is; a second failure raises."""
    try:
        return launch(*args)
    except RunFailed:
        return launch(*args)


def run_suite(options: RunOptions, names: tuple[str, ...] | None = None,
              suites: tuple[tuple[ModelSpec, tuple[tuple[str, Plan], ...]], ...] = SUITES,
              rounds: int = 1, after_launch: Callable[[], None] | None = None) -> list[ValidationRun]:
    """Run the suites' plans (or those named), one torchrun launch per world size and round
    (launched_again_if_failed).
    With rounds > 1 the launches take turns (world 2, world 4, world 2, ...), each with
    options.steps steps, and each plan keeps its least disturbed round (the lowest median
    step): a slow spell of the machine then costs a plan one round, not its measurement (on
    2026-12-02 one round of tp2 sp selective here ran 1123-1297 ms a step, the other 542-611).
    `after_launch` runs after each launch (the drift probe's later readings)."""
    chosen = [(n, m, p) for m, suite in suites for n, p in suite if names is None or n in names]
    worlds = sorted({p.world_size for _, _, p in chosen})
    kept: dict[str, RunRecord] = {}
    for _ in range(rounds):
        for world in worlds:
            group = [(n, m, p) for n, m, p in chosen if p.world_size == world]
            records = launched_again_if_failed(launch_train_many, [(m, p) for _, m, p in group],
                                               Cluster(world, world), options)
            if after_launch is not None:
                after_launch()
            for (n, _, _), r in zip(group, records):
                if n not in kept or r.measured_step_time_s < kept[n].measured_step_time_s:
                    kept[n] = r
    return [ValidationRun(n, kept[n]) for world in worlds
            for n, _, p in chosen if p.world_size == world]


def repredict(runs: list, hw: HardwareProfile) -> list:
    """The runs (ValidationRun, or serve_suite's ServeValidationRun) with their predictions
    made again on `hw` (e.g. a profile rescaled by a probe of the machine), the measurements
    kept."""
    return [replace(run, record=repredicted(run.record, Cluster(run.record.world_size, run.record.world_size),
                                            hw))
            for run in runs]


def error_stats(predicted: list[float], measured: list[float], errors: list[float]) -> dict:
    """Median and max |relative error|, and the Spearman rank correlation of predicted
    against measured (nan with fewer than 3 runs)."""
    rho = float(spearmanr(predicted, measured).statistic) if len(errors) > 2 else float("nan")
    return {"median_abs_error": float(np.median(np.abs(errors))),
            "max_abs_error": float(np.max(np.abs(errors))), "spearman": rho}


def summary(runs: list[ValidationRun]) -> dict:
    """error_stats of the step time, and median / max |error| of peak memory."""
    memory = np.abs([r.memory_error for r in runs])
    return {**error_stats([r.record.predicted_step_time_s for r in runs],
                          [r.record.measured_step_time_s for r in runs], [r.error for r in runs]),
            "memory_median_abs_error": float(np.median(memory)),
            "memory_max_abs_error": float(np.max(memory))}
