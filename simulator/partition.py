"""Pipeline layer partitions: contiguous layer counts per (virtual) stage.

Training (`simulate`, `plan` and `run` alike) uses the balanced partition: the split that
minimises the slowest stage, with the embedding counted on the first stage and the LM head
on the last (as Narayanan et al. 2021 sec 3.3 balance stages; Megatron-LM's
--decoder-first/last-pipeline-num-layers and torchtitan's pipeline layer counts run such
uneven splits). Serving uses vLLM's even split (vllm/distributed/utils.py get_pp_indices:
equal shares, the remainder to the first stages).

The balanced rule is computed for many pipelines at once (numpy arrays over candidates) and
described by its shape: the first part holds `first` layers, the last `last`, the middle
parts `base`, except middle parts 1..`short` which hold base - 1.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from meshplan.simulator.schedule import stage_index


@dataclass(frozen=True)
class PartitionShape:
    """Arrays over pipelines (see the module docstring); `parts` = pp x virtual stages."""

    parts: np.ndarray
    first: np.ndarray
    last: np.ndarray
    base: np.ndarray
    short: np.ndarray

    def take(self, index) -> PartitionShape:
        """The pipelines `index`."""
        return PartitionShape(self.parts[index], self.first[index], self.last[index],
                              self.base[index], self.short[index])

    def layers(self, i: int = 0) -> tuple[int, ...]:
        """The layer counts of pipeline i, in stage order."""
        p = int(self.parts[i])
        return (int(self.first[i]),) if p == 1 else tuple(self.take([i]).counts(p)[0].tolist())

    def counts(self, parts: int) -> np.ndarray:
        """The layer counts of pipelines of `parts` >= 2 stages each, in stage order,
        (pipelines, parts): the first and the last stage's, and `base` in the middle ones
        less one in the first `short` of them."""
        j = np.arange(parts)[None, :]
        middle = self.base[:, None] - (j <= self.short[:, None])
        return np.where(j == 0, self.first[:, None], np.where(j == parts - 1, self.last[:, None], middle))


def balanced_shape(num_layers: int, parts, layer_s, first_extra_s, last_extra_s) -> PartitionShape:
    """The balanced partition of `num_layers` identical layers (each `layer_s`) into `parts`
    contiguous parts, the first carrying `first_extra_s` of fixed work (the embedding) and
    the last `last_extra_s` (the head and loss), for arrays of pipelines. Middle parts hold
    >= 1 layer; the first and the last may hold none, a stage of the embedding or the head
    alone (Llama 3's 405B pipeline, Dubey et al. 2024 sec 3.3.2: the first chunk only the
    embedding, the last only the output projection and loss; Megatron-LM's
    --pipeline-model-parallel-layout "E|...|L"; torchtitan's module_fqns_per_model_part),
    so up to num_layers + 2 parts.

    The bottleneck time is the least n * layer_s + e (e one of the parts' extras) at which
    every part's capacity (the layers it can take within that time) sums to at least
    num_layers, each end part running its extra and each middle part a layer within it;
    the capacities in excess are then trimmed one layer at a time from the most loaded
    part, ties to the lowest index, keeping each middle part >= 1 layer: the optimum a
    dynamic program over split points finds, in closed form."""
    L = int(num_layers)
    P = np.asarray(parts, dtype=np.int64)
    if np.any(np.maximum(P - 2, 1) > L) or np.any(P < 1):
        raise ValueError(f"{L} layers cannot fill {P.max()} stages")
    ls = np.maximum(np.broadcast_to(np.asarray(layer_s, dtype=float), P.shape), 1e-30)
    e0 = np.broadcast_to(np.asarray(first_extra_s, dtype=float), P.shape)
    e1 = np.broadcast_to(np.asarray(last_extra_s, dtype=float), P.shape)
    mids = np.maximum(P - 2, 0)

    def cap(budget, extra, lay):
        return np.where(budget >= extra, (np.floor_divide(budget - extra, lay) + 1e-9).astype(np.int64), 0)

    def fits(budget, i=slice(None)):
        c0, c1, cm = cap(budget, e0[i], ls[i]), cap(budget, e1[i], ls[i]), cap(budget, 0.0, ls[i])
        return ((budget >= e0[i]) & (budget >= e1[i]) & ((mids[i] == 0) | (cm >= 1))
                & (c0 + c1 + mids[i] * cm >= L))

    def smallest_fitting(extra, least):  # least n >= least with fits(n * ls + extra), or L + 1
        # caps at n*ls + extra are n + floor((extra - e_i) / ls) up to rounding: start there
        # and step each pipeline toward the least fitting n (feasibility grows with n)
        d0, d1, dm = (np.floor((extra - e) / ls) for e in (e0, e1, 0.0))
        need = np.ceil((L - d0 - d1 - mids * dm) / (mids + 2))
        least = np.broadcast_to(least, P.shape)
        n = np.clip(np.maximum.reduce([need, -d0, -d1]), least, L).astype(np.int64)
        ok = np.zeros(n.shape, bool)
        todo = np.arange(n.size)
        while todo.size:
            nt, lt, xt = n[todo], ls[todo], extra[todo]
            here = fits(nt * lt + xt, todo)
            below = (nt > least[todo]) & fits((nt - 1) * lt + xt, todo)
            step = np.where(here, -below.astype(np.int64), (nt < L).astype(np.int64))
            n[todo], ok[todo] = nt + step, here
            todo = todo[step != 0]
        return np.where(ok, n, L + 1)

    best = np.full(ls.shape, np.inf)
    # an end part may be the bottleneck with no layer, a middle one with one at least
    for extra, least in ((e0, 0), (e1, 0), (np.where(P >= 3, 0.0, e0), np.where(P >= 3, 1, 0))):
        n = smallest_fitting(extra, least)
        best = np.where(n <= L, np.minimum(best, n * ls + extra), best)
    best = np.where(np.isfinite(best), best, 0.0)  # only one-part pipelines find none
    c0, c1, cm = cap(best, e0, ls), cap(best, e1, ls), cap(best, 0.0, ls)
    excess = np.where(P >= 2, c0 + c1 + mids * cm - L, 0)
    dec = np.zeros(ls.shape, np.int64)  # middle decrements so far
    safe_mids = np.maximum(mids, 1)
    todo = np.flatnonzero(excess > 0)
    while todo.size:
        c0t, c1t, dt, mt, lt = c0[todo], c1[todo], dec[todo], safe_mids[todo], ls[todo]
        top = cm[todo] - dt // mt
        k0 = np.where(c0t > 0, c0t * lt + e0[todo], -1.0)
        km = np.where((mids[todo] > 0) & (top > 1), top * lt, -1.0)
        k1 = np.where(c1t > 0, c1t * lt + e1[todo], -1.0)
        pick0 = (k0 >= km) & (k0 >= k1)
        pickm = ~pick0 & (km >= k1)
        c0[todo], dec[todo], c1[todo] = c0t - pick0, dt + pickm, c1t - (~pick0 & ~pickm)
        excess[todo] -= 1
        todo = todo[excess[todo] > 0]
    base = np.where(mids > 0, cm - dec // safe_mids, 0)
    short = np.where(mids > 0, dec % safe_mids, 0)
    first = np.where(P == 1, L, c0)
    return PartitionShape(P, first, np.where(P == 1, L, c1), base, short)


def balanced_partition(num_layers: int, num_parts: int, layer_s: float, first_extra_s: float = 0.0,
                       last_extra_s: float = 0.0) -> tuple[int, ...]:
    """Layers per part of one pipeline under the balanced rule (balanced_shape)."""
    return balanced_shape(num_layers, [num_parts], layer_s, first_extra_s, last_extra_s).layers(0)


def even_partition(num_layers: int, num_parts: int) -> tuple[int, ...]:
    """vLLM's split: equal shares, the remainder to the first parts."""
    base, extra = divmod(num_layers, num_parts)
    return tuple(base + (i < extra) for i in range(num_parts))


def split_text(split: tuple[int, ...]) -> str:
    """Layer counts with runs of one count written n*k, e.g. "1*30,2,0" (the repeat notation
    of Megatron-LM's pipeline layouts); parse_partition reads it back."""
    runs = [(n, len(list(group))) for n, group in itertools.groupby(split)]
    return ",".join(f"{n}*{k}" if k > 1 else str(n) for n, k in runs)


def parse_partition(text: str) -> tuple[int, ...]:
    """Layers per (virtual) stage written as split_text writes them, counts separated by
    commas with runs as count*repeat ("2,3*30,2": 2, thirty 3s, 2; "10,12,12,10").
    Raises ValueError on anything else."""
    counts: list[int] = []
    for part in text.split(","):
        layers, star, repeat = part.strip().partition("*")
        if star and not repeat.strip():
            raise ValueError(text)
        counts += [int(layers)] * int(repeat or 1)
    return tuple(counts)


def rank_chunks(partition: tuple[int, ...], pp: int, v_shaped: bool = False) -> np.ndarray:
    """Layers of each (pipeline rank, chunk), shape (pp, len(partition) // pp): virtual
    stage j is chunk j // pp of rank j % pp (Megatron-LM's interleaved assignment), or in a
    V (zb-v) rank s holds stages s and 2 pp - 1 - s (schedule.stage_index)."""
    layers = np.asarray(partition, dtype=np.int64)
    ranks, chunks = np.indices((pp, len(layers) // pp))
    return layers[stage_index(v_shaped, pp, ranks, chunks)]
