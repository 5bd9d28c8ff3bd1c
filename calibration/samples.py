"""Measured samples: the file format between measuring (or importing) and fitting.

Every source of measurements (this machine through torch, Vidur's CSVs, nccl-tests logs)
produces these three tables; `calibration.fit` fits them into a HardwareProfile.
One row is one measured configuration, summarised over its repeats.
"""
from dataclasses import dataclass

import pandas as pd

# GEMM (batch x [m,k] @ [k,n]); dtype is one of "fp32", "tf32", "bf16", "fp16".
GEMM_COLUMNS = ("op", "m", "n", "k", "batch", "dtype", "time_s", "time_std_s", "repeats")
# Memory-bound operators: bytes read + written by one call.
MEMORY_BOUND_COLUMNS = ("op", "bytes", "dtype", "time_s", "time_std_s", "repeats")
# Collectives, message_bytes in nccl-tests' "size" convention: all_reduce = buffer,
# all_gather = whole output, reduce_scatter = whole input, send_recv = bytes sent,
# all_to_all / broadcast = per-rank buffer. ranks_per_node = how many of the group's
# ranks share one node (== group_size when the group sits inside one node).
COLLECTIVE_COLUMNS = ("collective", "group_size", "ranks_per_node", "message_bytes",
                      "time_s", "time_std_s", "repeats")


@dataclass(frozen=True)
class Samples:
    """The three measured tables of one machine."""

    gemm: pd.DataFrame
    memory_bound: pd.DataFrame
    collectives: pd.DataFrame

    def __post_init__(self):
        for name, cols in (("gemm", GEMM_COLUMNS), ("memory_bound", MEMORY_BOUND_COLUMNS),
                           ("collectives", COLLECTIVE_COLUMNS)):
            missing = set(cols) - set(getattr(self, name).columns)
            if missing:
                raise ValueError(f"samples.{name} lacks columns {sorted(missing)}")


def empty_samples() -> Samples:
    return Samples(pd.DataFrame(columns=list(GEMM_COLUMNS)),
                   pd.DataFrame(columns=list(MEMORY_BOUND_COLUMNS)),
                   pd.DataFrame(columns=list(COLLECTIVE_COLUMNS)))
