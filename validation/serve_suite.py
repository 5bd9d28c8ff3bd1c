"""The serving validation suite: run serving plans on this machine, set each measured time
to first token (TTFT) and time per output token (TPOT) beside the serving simulator's
prediction, and summarise the error.

The plans cover what the serving executor runs at world size 1 (batch 1, 4, 8, several
prompt and generation lengths), 2 (TP, PP, replicas) and 4 (TP, TP x PP, replicas: 4 ranks
sharing the 2 cores of this machine)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from meshplan.executor.launch import launch_serve_many
from meshplan.executor.options import ServeOptions
from meshplan.executor.records import ServeRecord
from meshplan.validation.suite import error_stats, launched_again_if_failed
from meshplan.simulator.serve import InferencePlan
from meshplan.simulator.model_spec import ModelSpec
from meshplan.simulator.plan import Cluster

# A Llama-style model whose decode step takes a few ms and whose prefill takes tens of ms on
# one thread per rank: long enough to time, short enough for the suite to take minutes.
SERVE_MODEL = ModelSpec(name="serve-llama-2m", num_layers=4, hidden_size=192, num_heads=8,
                        num_kv_heads=4, ffn_hidden_size=512, vocab_size=2048, max_seq_len=1024)
SUITE_OPTIONS = ServeOptions(warmup=2, repeats=5)


def _p(**kw) -> InferencePlan:
    base = dict(batch=4, prompt_len=128, gen_len=32, dtype="fp32")
    base.update(kw)
    return InferencePlan(**base)


SUITE: tuple[tuple[str, InferencePlan], ...] = (
    ("b1", _p(batch=1)),
    ("b4", _p()),
    ("b8 p64 g64", _p(batch=8, prompt_len=64, gen_len=64)),
    ("b4 p512 g16", _p(prompt_len=512, gen_len=16)),
    ("tp2", _p(tp=2)),
    ("tp2 b8 p256", _p(tp=2, batch=8, prompt_len=256, gen_len=16)),
    ("pp2", _p(pp=2)),
    ("pp2 b8 p64", _p(pp=2, batch=8, prompt_len=64)),
    ("replicas2", _p(replicas=2)),
    ("tp4", _p(tp=4)),
    ("tp2 pp2", _p(tp=2, pp=2)),
    ("replicas4 b1", _p(replicas=4, batch=1)),
)


@dataclass(frozen=True)
class ServeValidationRun:
    name: str
    record: ServeRecord

    @property
    def ttft_error(self) -> float:
        """Relative error of the predicted TTFT: predicted / measured - 1."""
        return self.record.predicted("ttft_s") / self.record.measured_ttft_s - 1.0

    @property
    def tpot_error(self) -> float:
        return self.record.predicted("tpot_s") / self.record.measured_tpot_s - 1.0

    def to_json(self) -> dict:
        summary = self.record.summary_json()
        del summary["generated_tokens"]
        return {"name": self.name, **summary, "ttft_error": self.ttft_error,
                "tpot_error": self.tpot_error}


def run_suite(options: ServeOptions = SUITE_OPTIONS, names: tuple[str, ...] | None = None,
              suite: tuple[tuple[str, InferencePlan], ...] = SUITE, model: ModelSpec = SERVE_MODEL,
              after_launch: Callable[[], None] | None = None) -> list[ServeValidationRun]:
    """Run the suite's plans (or those named), one torchrun launch per world size
    (suite.launched_again_if_failed);
    `after_launch` (e.g. a probe reading) runs after each."""
    chosen = [(n, p) for n, p in suite if names is None or n in names]
    runs: list[ServeValidationRun] = []
    for world in sorted({p.num_gpus for _, p in chosen}):
        group = [(n, p) for n, p in chosen if p.num_gpus == world]
        records = launched_again_if_failed(launch_serve_many, [(model, p) for _, p in group],
                                           Cluster(world, world), options)
        runs += [ServeValidationRun(n, r) for (n, _), r in zip(group, records)]
        if after_launch is not None:
            after_launch()
    return runs


def summary(runs: list[ServeValidationRun]) -> dict:
    """Median / max |error| and the Spearman rank correlation of predicted against measured,
    for TTFT and for TPOT."""
    return {
        "ttft": error_stats([r.record.predicted("ttft_s") for r in runs],
                       [r.record.measured_ttft_s for r in runs], [r.ttft_error for r in runs]),
        "tpot": error_stats([r.record.predicted("tpot_s") for r in runs],
                       [r.record.measured_tpot_s for r in runs], [r.tpot_error for r in runs]),
    }
