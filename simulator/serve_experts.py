"""Where a served mixture-of-experts model's experts run, as vLLM lays them out, what the
busiest expert rank carries, and the token exchange of its MoE layers.

vLLM runs each MoE layer over all tp x replicas ranks of a pipeline stage (its data-parallel
engines step in lock step; vllm/model_executor/layers/fused_moe/config.py,
FusedMoEParallelConfig.make flattens TP across DP). Without --enable-expert-parallel every
expert is sharded over those G = tp x replicas ranks (its intermediate size / G); with it a
rank holds E / G whole experts (EP size G, no expert TP). Either way a rank holds 1/G of the
expert weights, while attention and the shared experts keep their TP layout per replica.

Tokens: with replicas > 1 each MoE layer gathers every replica's tokens and hands its part
of the output back: vLLM's default all2all backend, allgather_reducescatter (docs, "Expert
Parallel Deployment"; all2all.py AgRsAll2AllManager: all_gatherv of the hidden states and
router logits over the DP group, reduce_scatterv after), the only backend priced here; the
TP all-reduce of the block's output stays as for a dense MLP. So every rank's experts see
T = replicas x the replica's tokens:
- sharded: every rank runs its slice of every active expert, T k rows over
  ops.active_experts(E, k, T) experts: all ranks equally loaded.
- expert parallel: a rank runs the rows routed to its own E / G experts, and the step waits
  for the busiest rank: the expected maximum over the G ranks of its rows and of its distinct
  active experts, under uniform routing (real routers are more skewed, so this is the
  imbalance's lower bound).
"""
from __future__ import annotations

import math

import numpy as np

from meshplan.core.mesh import Group
from meshplan.hw_profiles.profile import HardwareProfile
from meshplan.simulator.model_spec import ModelSpec
from meshplan.simulator.ops import active_experts


def expert_degrees(model: ModelSpec, tp: int, replicas: int, expert_parallel: bool) -> tuple[int, int]:
    """(ep, etp) of the MoE layers: whole experts over the tp x replicas ranks, or every
    expert sharded over them; a dense model's (1, tp)."""
    if not model.num_experts:
        return 1, tp
    return (tp * replicas, 1) if expert_parallel else (1, tp * replicas)


def expected_max_binomial(n: int, p: float, g: int) -> float:
    """E[max of g independent Binomial(n, p)] = sum_{j >= 1} P(max >= j) = sum_j 1 - F(j-1)^g
    (the tail sum of a non-negative integer variable), summed over the window of mean +- 12
    standard deviations outside which F is 0 or 1 to double precision; the pmf by its ratio
    recurrence P(j+1) / P(j) = (n - j) p / ((j + 1) (1 - p))."""
    if g == 1 or n == 0 or p <= 0.0 or p >= 1.0:
        return n * min(max(p, 0.0), 1.0)
    mean, sd = n * p, math.sqrt(n * p * (1.0 - p))
    lo, hi = max(0, int(mean - 12 * sd)), min(n, math.ceil(mean + 12 * sd))
    j = np.arange(lo, hi, dtype=float)
    first = (math.lgamma(n + 1) - math.lgamma(lo + 1) - math.lgamma(n - lo + 1)
             + lo * math.log(p) + (n - lo) * math.log1p(-p))
    log_pmf = first + np.concatenate(([0.0], np.cumsum(np.log(n - j) - np.log(j + 1)
                                                        + math.log(p / (1.0 - p)))))
    cdf = np.minimum(np.cumsum(np.exp(log_pmf)), 1.0)
    return lo + float(np.sum(1.0 - cdf[:-1] ** g))


def expert_load(model: ModelSpec, tp: int, replicas: int, expert_parallel: bool,
                tokens: int) -> tuple[float, float]:
    """(routed rows, distinct experts) one rank's experts run in an MoE layer when each of
    the replicas feeds it `tokens` tokens: the whole group's, or under expert parallelism
    the busiest of the G ranks' (each of the T k rows lands on a given rank with probability
    1/G; each of its E/G experts is hit with probability 1 - (1 - k/E)^T, ops.active_experts;
    ranks taken as independent)."""
    e, k = model.num_experts, model.experts_per_token
    total = tokens * replicas
    if not expert_parallel:
        return float(total * k), active_experts(e, k, total)
    group = tp * replicas
    rows = expected_max_binomial(total * k, 1.0 / group, group)
    hit = active_experts(e, k, total) / e
    return rows, max(1.0, expected_max_binomial(e // group, hit, group))


def dispatch_s(model: ModelSpec, hw: HardwareProfile, dp: Group, tokens: int, dtype_bytes: int) -> float:
    """One MoE layer's token exchange beyond TP, per replica of `tokens` tokens: the
    all-gather of every replica's hidden states and router logits over the DP group, and
    the reduce-scatter of the outputs (allgather_reducescatter); nothing with one replica."""
    if dp.size == 1 or not model.num_experts:
        return 0.0
    gathered = dp.size * tokens * dtype_bytes
    return (hw.collective_time_s("all_gather", gathered * (model.hidden_size + model.num_experts),
                                 dp.size, dp.ranks_per_node)
            + hw.collective_time_s("reduce_scatter", gathered * model.hidden_size, dp.size,
                                   dp.ranks_per_node))
