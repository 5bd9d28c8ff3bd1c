"""The terms of a training step for rows of plans, vectorised: per-layer and per-block
times (cost.py), the ZeRO-3 gathers, the pipeline hop, the time of a stage's chunks, the
parameters and memory of a pipeline rank, and the tail after its last backward (exposed
data-parallel sync and the optimizer step).

`simulate` evaluates one plan (one row, every pipeline rank); the planner evaluates every
candidate (many rows, a few representative ranks each). Both call these functions, so the
two agree term by term; they differ only in the pipeline makespan (a discrete-event
simulation against closed forms).

Rows are a dict of arrays with one entry per plan ("r" below): the plan knobs dp, tp, pp,
cp, sp, zero, rc (recompute code), micro_batch, sched (schedule code), virtual_stages,
num_microbatches, ep, etp, a2a_overlap, the link levels of the groups (tp_rpn, cp_rpn, dp_rpn, pp_rpn,
and the expert mesh's ep_rpn, etp_rpn, edp_rpn: ranks of the group per node), the link
shares of the dense groups (tp_share, cp_share, dp_share, pp_share: core.mesh.Group
.link_share, 1.0 where not given) and the scalars dtype, d (dtype bytes), flash. Per-rank
quantities are (rows, ranks) arrays: rank index s, layers n on that rank. Parameters split
into the routed experts' (reduced and sharded over the expert data-parallel group, edp
ranks) and the rest (over DP x CP).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np
import pandas as pd

from meshplan.hw_profiles.profile import HardwareProfile
from meshplan.simulator.cost import (FULL, NONE, OP, ExpertMesh, ShardTimes, collective_s, layer_times,
                                     overlap_split, shard_times, tp_edge_comm_s)
from meshplan.simulator.memory import (adam_step_bytes_per_param, cross_entropy_logits,
                                       expert_layer_params, layer_activation_bytes, logits_bytes,
                                       model_state_bytes, stage_params)
from meshplan.simulator.model_spec import ModelSpec
from meshplan.simulator.ops import Shard, kinds_ops, layer_ops
from meshplan.simulator.plan import DTYPE_BYTES, RECOMPUTE, SCHEDULES, grad_sync_once
from meshplan.simulator.rules import FUSED_ATTENTION
from meshplan.simulator.schedule import SPLIT_BACKWARD, loss_in_flight

SHARD_KEYS = ("tp", "sp", "cp", "micro_batch", "ep", "etp")
COST_KEYS = SHARD_KEYS + ("rc", "tp_overlap", "a2a_overlap", "tp_rpn", "cp_rpn", "ep_rpn", "etp_rpn", "tp_share",
                          "cp_share")
KNOBS = ("dp", "tp", "pp", "cp", "sp", "zero", "rc", "micro_batch", "sched", "virtual_stages",
         "num_microbatches", "tp_overlap", "a2a_overlap", "reshard", "ep", "etp", "tp_rpn", "cp_rpn", "dp_rpn",
         "pp_rpn", "ep_rpn", "etp_rpn", "edp_rpn")
SHARES = ("tp_share", "cp_share", "dp_share", "pp_share")
STATE_KNOBS = ("dp", "tp", "pp", "cp", "ep", "etp", "zero", "num_microbatches")  # what state_rows reads
DP_GROUP_KEYS = ("dps", "dp_rpn", "dp_share", "edp", "edp_rpn")  # what dp_collective_s reads
ZB_V = SCHEDULES.index("zb-v")
SPLIT_CODES = [SCHEDULES.index(s) for s in SPLIT_BACKWARD]


def group_ids(key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row -> id of its key (ids in order of first appearance), and each id's first row."""
    ids = pd.factorize(key)[0]
    return ids, np.flatnonzero(np.diff(np.maximum.accumulate(ids), prepend=-1) > 0)


def combo_ids(r: dict, keys: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """group_ids over the combination of several knob arrays: integer knobs enter a
    mixed-radix key by their offset from the smallest value (others by their factorize
    codes), the key renumbered whenever the next radix could overflow int64; any one-to-one
    key gives the same ids, as they count in order of first appearance."""
    key, span = np.zeros(len(r["tp"]), np.int64), 1
    for k in keys:
        x = np.asarray(r[k])
        if x.dtype.kind in "biu":
            low, x = int(x.min()), x.astype(np.int64, copy=False)  # no copy of an int64 knob
            codes, size = x - low if low else x, int(x.max()) - low + 1
        else:
            codes, uniq = pd.factorize(x)
            size = len(uniq)
        if span * size >= 2 ** 62:
            key, uniq = pd.factorize(key)
            span = len(uniq)
        key, span = key * size + codes, span * size
    return group_ids(key)


def rows(model: ModelSpec, knobs: dict, wide: dict) -> dict:
    """Rows of plans from their knob arrays (KNOBS) and the fields all of them share (`wide`:
    plan.PLAN_WIDE), with the memory terms that need no timing: each row's shard, activation
    bytes per layer and parameters per layer (all, and the routed experts'), and each shard's
    layer operators (shard_ops, built once for memory and times)."""
    dtype, attention, capacity = wide["dtype"], wide["attention"], wide["moe_capacity_factor"]
    r = {k: np.asarray(knobs[k]) for k in KNOBS}
    r.update({k: np.broadcast_to(np.asarray(knobs.get(k, 1.0), dtype=float), r["tp"].shape)
              for k in SHARES})
    for flag in ("sp", "tp_overlap", "a2a_overlap", "reshard"):
        r[flag] = r[flag].astype(bool)
    r.update(state_rows(model, r, wide))
    d = r["d"]
    shard_id, first = combo_ids(r, SHARD_KEYS)
    shards = [Shard(int(r["micro_batch"][i]), wide["seq_len"], int(r["tp"][i]), int(r["cp"][i]),
                    bool(r["sp"][i]), d, attention in FUSED_ATTENTION, int(r["ep"][i]), int(r["etp"][i]),
                    capacity, wide["fp8_recipe"] if dtype == "fp8" else None,
                    fused_mlp=wide["mlp_kernel"] == "fused", fp8_saved=wide["fp8_saved_dtype"] == "fp8",
                    eager=wide["elementwise"] == "eager", kv_repeat=bool(wide["kv_repeat"]),
                    cp_comm=wide["cp_comm"])
              for i in first]
    used = set(np.unique(r["rc"]).tolist()) | {NONE}  # the recompute settings the rows hold
    kind_ops = [kinds_ops(model, s) for s in shards]
    act = np.array([[layer_activation_bytes(model, s, k, ops) if i in used else np.nan
                     for i, k in enumerate(RECOMPUTE)] for s, ops in zip(shards, kind_ops)])
    r.update(shard_id=shard_id, shards=shards,
             shard_ops=[layer_ops(model, s, ops) for s, ops in zip(shards, kind_ops)],
             attention=attention, tp_overlap_bwd=wide["tp_overlap_scope"] == "both",
             cp_comm=wide["cp_comm"], kv_repeat=bool(wide["kv_repeat"]), eager=wide["elementwise"] == "eager",
             capacity=capacity, dispatcher=wide["moe_dispatcher"], routing=wide["moe_routing"],
             zero1_all_reduce=wide["zero1_sync"] == "all_reduce",
             act=act[shard_id, r["rc"]], act_none=act[shard_id, NONE],
             tokens=np.array([s.tokens for s in shards], dtype=float)[shard_id],
             in_tokens=np.array([s.norm_tokens for s in shards], dtype=float)[shard_id],
             per_layer=stage_params(model, r["tp"], r["pp"], 1, False, False, r["ep"], r["etp"]))
    r["loss_kept"], r["loss_peak"] = cross_entropy_logits(wide["cross_entropy"], d, r["tp"])
    return r


def state_rows(model: ModelSpec, knobs: dict, wide: dict) -> dict:
    """What the model-state terms (model_states, rank_params) read of rows given by their
    STATE_KNOBS arrays and the plan-wide fields: the dtype's bytes, the gradients' (reduced
    and kept in the wider of it and the reduce dtype; memory.model_state_bytes keeps them in
    the dtype without master weights), whether master weights are kept, Adam's moments'
    bytes, the data-parallel and expert data-parallel degrees, the routed experts' parameters
    per layer, and how gradients are synchronised under accumulation."""
    r = {k: np.asarray(knobs[k]) for k in STATE_KNOBS}
    d = DTYPE_BYTES[wide["dtype"]]
    # ZeRO-2/3 under gradient accumulation: whole gradients accumulated and reduced once, or
    # a reduce-scatter after each micro-batch (plan.grad_sync)
    accumulating = (r["zero"] >= 2) & (r["num_microbatches"] > 1)
    whole = accumulating & grad_sync_once(wide["grad_sync"], r["pp"])
    return {**r, "dtype": wide["dtype"], "d": d, "gd": max(d, DTYPE_BYTES[wide["grad_reduce_dtype"]]),
            "master": wide["master_weights"], "mb": DTYPE_BYTES[wide["moments_dtype"]],
            "fsdp_copies": wide["fsdp_layout"] == "per_param",
            # FSDP2's replicate (plan.ddp_impl) keeps a second copy of the weights it replicates
            "replicate_copy": ((wide["ddp_impl"] == "replicate") & (r["zero"] < 2) & ((r["tp"] > 1) | (r["pp"] > 1))
                               & (r["dp"] * r["cp"] > 1)),
            "dps": r["dp"] * r["cp"], "edp": r["dp"] * r["cp"] * r["tp"] // (r["ep"] * r["etp"]),
            "per_layer_expert": expert_layer_params(model, r["ep"], r["etp"]) * np.ones(len(r["tp"])),
            "accumulate_whole": whole,
            "grad_syncs": np.where(accumulating & ~whole, r["num_microbatches"], 1)}


def take(r: dict, index) -> dict:
    """The rows `index` of r."""
    return {k: (x[index] if isinstance(x, np.ndarray) else x) for k, x in r.items()}


def rows_shard_times(r: dict, model: ModelSpec, hw: HardwareProfile, index=slice(None)) -> ShardTimes:
    """shard_times of every shard of r["shards"], computed for those of the rows `index`
    only (the others' entries repeat one of those: never read for rows outside `index`)."""
    used = np.unique(r["shard_id"][index])
    at = np.zeros(len(r["shards"]), dtype=np.int64)
    at[used] = np.arange(used.size)
    return shard_times(model, hw.attention_kernel(r["attention"]), [r["shards"][i] for i in used], r["dtype"],
                       [r["shard_ops"][i] for i in used]).take(at)


def cost_times(r: dict, model: ModelSpec, hw: HardwareProfile, st: ShardTimes) -> tuple[np.ndarray, dict]:
    """Per row the id of its cost combination (the COST_KEYS it has), and per combination its
    layer's times, l_fwd / l_bwd (a layer's whole forward / backward, cost.LayerTimes), their
    parts (l_fwd_compute, l_bwd_in, l_bwd_w, l_recompute, l_tp, l_cp), the same in an
    all-to-all overlap pair (l_fwd_pair, l_bwd_pair, with their exposed exchange l_ep_pair_*
    and the contention l_contention_pair_*), and the TP communication beside the embedding
    and the head (emb_tp_*, head_tp_*). `st`: rows_shard_times of these rows or more."""
    shard_id = r["shard_id"]
    cost_id, cfirst = combo_ids(r, COST_KEYS)
    c = {k: r[k][cfirst] for k in ("tp", "cp", "sp", "rc", "tp_rpn", "cp_rpn", "tokens", "ep", "etp",
                                   "ep_rpn", "etp_rpn", "in_tokens", "tp_share", "cp_share")}
    em = ExpertMesh(c["ep"], c["etp"], c["ep_rpn"], c["etp_rpn"], r["capacity"], c["in_tokens"],
                    r["dispatcher"], r["routing"])
    lt = layer_times(model, hw, st.take(shard_id[cfirst]), c["tokens"], r["d"], c["tp"], c["sp"],
                     c["cp"], c["rc"], c["tp_rpn"], c["cp_rpn"], r["attention"] in FUSED_ATTENTION,
                     r["tp_overlap"][cfirst], em,
                     c["tp_share"], c["cp_share"], r["a2a_overlap"][cfirst], r["tp_overlap_bwd"],
                     r["cp_comm"], r["kv_repeat"], r["eager"])
    parts = {"l_fwd": lt.fwd_s, "l_bwd": lt.bwd_s, "l_recompute": lt.recompute_s,
             "l_fwd_compute": lt.fwd_compute_s, "l_bwd_in": lt.bwd_input_s, "l_bwd_w": lt.bwd_weight_s,
             "l_tp": lt.tp_fwd_s + lt.tp_bwd_s, "l_cp": lt.cp_fwd_s + lt.cp_bwd_s,
             "l_tp_fwd": lt.tp_fwd_s, "l_cp_fwd": lt.cp_fwd_s,
             "l_contention": lt.contention_fwd_s + lt.contention_bwd_s,
             "l_tp_raw": lt.tp_raw_s, "l_cp_raw": lt.cp_raw_fwd_s + lt.cp_raw_bwd_s,
             "l_cp_bwd_raw": lt.cp_raw_bwd_s, "l_ep": lt.ep_fwd_s + lt.ep_bwd_s, "l_ep_fwd": lt.ep_fwd_s,
             "l_ep_bwd": lt.ep_bwd_s, "l_fwd_pair": lt.fwd_pair_s, "l_bwd_pair": lt.bwd_pair_s,
             "l_ep_pair_fwd": lt.ep_pair_fwd_s, "l_ep_pair_bwd": lt.ep_pair_bwd_s,
             "l_contention_pair_fwd": lt.contention_pair_fwd_s, "l_contention_pair_bwd": lt.contention_pair_bwd_s,
             "l_host_gap": lt.host_gap_fwd_s + lt.host_gap_bwd_s}
    edges = tp_edge_comm_s(model, c["tokens"], c["sp"], r["d"], hw, c["tp"], c["tp_rpn"], c["tp_share"])
    parts |= dict(zip(("emb_tp_fwd", "emb_tp_bwd", "head_tp_fwd", "head_tp_bwd"), edges))
    return cost_id, parts


def block_times(st: ShardTimes, shard_id: np.ndarray, cost) -> dict:
    """Per row, the embedding's and the head's blocks (forward, backward, its input- and
    weight-gradient parts) with the TP communication beside them, which is on the path of
    the stage they run in, and a layer's forward + backward (`layer`). `st`: the shards'
    times; `cost(name)`: a part of cost_times per row."""
    out = {}
    for block, t in (("emb", st.embedding), ("head", st.head)):
        out[f"{block}_fwd"] = t.fwd_s[shard_id] + cost(f"{block}_tp_fwd")
        out[f"{block}_bwd_in"] = t.bwd_input_s[shard_id] + cost(f"{block}_tp_bwd")
        out[f"{block}_bwd_w"] = t.bwd_weight_s[shard_id]
        out[f"{block}_bwd"] = out[f"{block}_bwd_in"] + out[f"{block}_bwd_w"]
    out["layer"] = cost("l_fwd") + cost("l_bwd")
    return out


def add_times(r: dict, model: ModelSpec, hw: HardwareProfile, st: ShardTimes | None = None,
              costs: tuple[np.ndarray, dict] | None = None) -> dict:
    """r with its times, computed once per distinct shard and cost combination (cost_times,
    whose parts it takes per row, with r["cost_id"]); where the caller times its rows in
    parts, `st` is rows_shard_times and `costs` cost_times (each row's id, every id's parts)
    of rows including these: the layer's times, the embedding and head blocks, the ZeRO-3
    gather `ag` with the exposed part of each further gather (xf, xb) and the wait for the
    group's straggler at each (sync_f, sync_b), and the pipeline hop."""
    r = dict(r)
    shard_id = r["shard_id"]
    st = rows_shard_times(r, model, hw) if st is None else st
    cost_id, parts = cost_times(r, model, hw, st) if costs is None else costs
    for k, x in parts.items():
        r[k] = x[cost_id]
    r["cost_id"] = cost_id
    # a split backward's second autograd pass (zb-h1, zb-v: the weight gradients), on the
    # host, per layer of a stage that splits it (chunk_s), and for the head by what the loss
    # keeps of its logits
    split = np.isin(r["sched"], SPLIT_CODES)
    r["split_layer"] = split * hw.overhead.split_backward_s(r["act_none"])
    r["split_head"] = split * hw.overhead.split_backward_per_activation_byte_s * (
        r["loss_kept"] * logits_bytes(r["tokens"], model.vocab_size, r["tp"]))
    r.update(block_times(st, shard_id, r.__getitem__))
    # ZeRO-3 gathers each layer's weights before its forward, and again before its backward
    # when it reshards after forward (FSDP2 reshard_after_forward); each gather beyond a
    # chunk's first hides behind the previous layer's compute (slowing it by the contention),
    # except on CPU ranks (gloo computes on the same cores) where all of it is exposed.
    zero3 = r["zero"] == 3
    group = {k: r[k][zero3] for k in DP_GROUP_KEYS}
    r["ag"] = np.zeros(zero3.shape)
    # each FSDP call with its host work (FrameworkOverhead.fsdp_gather_s; zero on a GPU)
    # and its copy-in of the local shard (fsdp_gather_copies_s)
    gather_host, copies = hw.overhead.fsdp_gather_s, r["fsdp_copies"]
    dense_bytes, expert_bytes = (r["per_layer"] - r["per_layer_expert"]) * r["d"], r["per_layer_expert"] * r["d"]
    shard_bytes = dense_bytes / r["dps"] + expert_bytes / r["edp"]
    copy_in, copy_out = fsdp_gather_copies_s(hw, r["per_layer"] * r["d"], shard_bytes, copies)
    r["ag"][zero3] = (dp_collective_s(hw, "all_gather", group, dense_bytes[zero3], expert_bytes[zero3])
                      + gather_host + copy_in[zero3])
    # ... and its copy-out into the unsharded weights, on the compute stream after the
    # gather: exposed wherever the gather itself hides
    r["agc"] = np.where(zero3, copy_out, 0.0)
    # Under a pipeline whose gradients sync once per step, weights that are not resharded
    # after forward stay gathered from the first micro-batch to the last (torch.distributed.
    # pipelining stage.py: FSDP2 modules set_reshard_after_backward(False) and
    # set_requires_gradient_sync(False) until the last backward): one gather a layer a
    # step, priced here per micro-batch as its m-th part; memory holds them all either way.
    once = zero3 & ~r["reshard"].astype(bool) & (r["pp"] > 1) & r["accumulate_whole"]
    per_mb = np.where(once, 1.0 / r["num_microbatches"], 1.0)
    r["ag"], r["agc"] = r["ag"] * per_mb, r["agc"] * per_mb
    r["agb"], r["agcb"] = np.where(r["reshard"], r["ag"], 0.0), np.where(r["reshard"], r["agc"], 0.0)
    # ... and its root module (FSDP2's: the embedding on the first stage, the final norm and
    # head on the last) once per micro-batch (or step, as above), before the forward, kept
    # until its backward (FSDP2 does not reshard the root after forward)
    for key, first, last in (("emb_ag", True, False), ("head_ag", False, True)):
        root = stage_params(model, r["tp"][zero3], r["pp"][zero3], 0, first, last) * r["d"]
        r[key] = np.zeros(zero3.shape)
        r[key][zero3] = (dp_collective_s(hw, "all_gather", group, root, 0.0) + gather_host
                         + sum(fsdp_gather_copies_s(hw, root, root / group["dps"], copies)))
        r[key] = r[key] * per_mb
    # Each of those gathers is a barrier of the DP x CP group: it completes when the slowest
    # rank reaches it, so every layer waits out the group's straggler (HardwareProfile.
    # stragglers). DDP and ZeRO-1/2 meet once per step, where a rank's lag is averaged over
    # all its layers and micro-batches (spread / sqrt(their number)): not counted.
    wait = np.where(zero3, hw.stragglers.wait_share(r["dps"]), 0.0)
    r["sync_f"], r["sync_b"] = wait * r["l_fwd"] * per_mb, np.where(r["reshard"], wait * r["l_bwd"], 0.0)
    r["xf"], r["cf"] = overlap_split(r["ag"], r["l_fwd_compute"], hw)
    r["xb"], r["cb"] = overlap_split(r["agb"], r["l_bwd_in"], hw)
    p2p_bytes = r["tokens"] * model.hidden_size * r["d"] / np.where(r["sp"], r["tp"], 1)
    r["hop"] = _where(r["pp"] > 1, lambda b, rpn, share: collective_s(hw, "send_recv", b, 2, rpn, share),
                      p2p_bytes, r["pp_rpn"], r["pp_share"])
    return r


def fsdp_copy_s(hw: HardwareProfile, num_bytes, copies=True) -> np.ndarray:
    """FSDP2's copies around its collectives (plan.fsdp_layout per_param), moving `num_bytes`
    (read + write) at the profile's memory-bound rate: the shard into the all-gather's input,
    the gathered buffer out into the unsharded weights, the gradients into the reduce-scatter's
    input in the reduce dtype (torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py:
    all_gather_copy_in, split_with_sizes_copy, _chunk_cat); none where `copies` is false (flat
    buffers) or no bytes move."""
    num_bytes = np.asarray(num_bytes, dtype=float) * copies
    return np.where(num_bytes > 0, hw.memory_bound_time_s(num_bytes, "fp32"), 0.0)


def fsdp_gather_copies_s(hw: HardwareProfile, gathered_bytes, shard_bytes, copies=True):
    """(copy-in, copy-out) of one FSDP2 all-gather (fsdp_copy_s): the rank's `shard_bytes`
    read and written into the gather's input, the `gathered_bytes` read and written out."""
    return fsdp_copy_s(hw, 2 * shard_bytes, copies), fsdp_copy_s(hw, 2 * gathered_bytes, copies)


def fsdp_reduce_copy_s(hw: HardwareProfile, params, param_bytes, reduce_bytes, copies=True) -> np.ndarray:
    """The copy-in of one FSDP2 reduce-scatter (fsdp_copy_s): `params` gradients read at
    `param_bytes` each and written in the reduce dtype, `reduce_bytes` each."""
    return fsdp_copy_s(hw, params * (param_bytes + reduce_bytes), copies)


def dp_collective_s(hw: HardwareProfile, kind: str, r: dict, dense_bytes, expert_bytes, c=lambda x: x):
    """A data-parallel collective of the non-expert bytes over DP x CP and of the routed
    experts' bytes over the expert data-parallel group; one collective of both where the
    two groups are the same ranks (ep 1, etp = tp). `c` lifts a per-row value to the shape
    of the bytes."""
    dps, rpn, share, edp, edp_rpn = (c(r[k]) for k in DP_GROUP_KEYS)
    together = (edp == dps) & (edp_rpn == rpn)
    run = partial(collective_s, hw, kind)
    return (_where(together, run, dense_bytes + expert_bytes, dps, rpn, share)
            + _where(~together & (dense_bytes > 0), run, dense_bytes, dps, rpn, share)
            + _where(~together & (expert_bytes > 0), run, expert_bytes, edp, edp_rpn))


def _where(cond, fn, *args) -> np.ndarray:
    """fn(*args) where `cond` holds, 0.0 elsewhere (all broadcast together); fn works
    element by element and runs on those elements only."""
    cond, *args = np.broadcast_arrays(cond, *(np.asarray(a) for a in args))
    out = np.zeros(cond.shape)
    out[cond] = fn(*(a[cond] for a in args))
    return out


def _col(x):
    """A per-row value against (rows, ranks) arrays."""
    return np.asarray(x)[:, None]


def chunk_s(r: dict, n, chunks, first, last, paired: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(forward, whole backward, weight-gradient part) of one micro-batch through `chunks`
    model chunks holding `n` layers in all, with the embedding (`first`: the first stage,
    whose backward is not split; so too a whole pipeline's sum, which then leaves the split
    out) and the LM head (`last`), each after its ZeRO-3 root gather: each chunk's first ZeRO-3 gather is
    exposed, the others hide behind compute (cost.overlap_split, summed over the chunks),
    and each layer waits for the ZeRO-3 group's straggler (sync_f, sync_b). `paired`: the
    forward and backward as they run in a combined F, B pair of the all-to-all overlap (the
    same where it is off). (rows, k) arrays."""
    c = _col
    hidden_f, hidden_b = r["xf"] + r["cf"], r["xb"] + r["cb"]
    layer_f, layer_b = (r["l_fwd_pair"], r["l_bwd_pair"]) if paired else (r["l_fwd"], r["l_bwd"])
    fwd = (n * c(layer_f + hidden_f + r["sync_f"] + r["agc"]) + chunks * c(r["ag"] - hidden_f)
           + first * c(r["emb_fwd"] + r["emb_ag"]) + last * c(r["head_fwd"] + r["head_ag"]))
    split = split_host_s(r, n, first, last)
    bwd = (n * c(layer_b + hidden_b + r["sync_b"] + r["agcb"]) + chunks * c(r["agb"] - hidden_b)
           + first * c(r["emb_bwd"]) + last * c(r["head_bwd"]) + split)
    wgrad = n * c(r["l_bwd_w"]) + first * c(r["emb_bwd_w"]) + last * c(r["head_bwd_w"]) + split
    return fwd, bwd, wgrad


def split_host_s(r: dict, n, first, last) -> np.ndarray:
    """A split backward's host time in its weight-gradient pass through chunks of `n`
    layers, with the LM head where `last`; none in the first stage (`first`):
    torch.distributed.pipelining runs that one's backward whole in its W op, as no stage
    needs its input gradient (stage.py backward_one_chunk)."""
    return np.where(first, 0.0, n * _col(r["split_layer"]) + last * _col(r["split_head"]))


def head_rank(r: dict) -> np.ndarray:
    """Per row, the pipeline rank that holds the final norm and the LM head: the last, or
    rank 0 in zb-v's V (schedule.stage_index), (rows, 1). Rows without a schedule (the state
    rows) ask only about ranks holding neither end."""
    last = _col(r["pp"]) - 1
    return np.where(_col(r["sched"]) == ZB_V, 0, last) if "sched" in r else last


def rank_params(r: dict, model: ModelSpec, s, n) -> np.ndarray:
    """Parameters on pipeline rank s holding n layers (memory.stage_params), (rows, k)."""
    return stage_params(model, _col(r["tp"]), _col(r["pp"]), n, s == 0, s == head_rank(r),
                        _col(r["ep"]), _col(r["etp"]))


def _split(r: dict, params, n):
    """(the rest, the routed experts) of a rank's parameters, and their data-parallel
    degrees (DP x CP; the expert data-parallel group), (rows, k)."""
    expert = n * _col(r["per_layer_expert"])
    return (params - expert, expert), (_col(r["dps"]), _col(r["edp"]))


def model_states(r: dict, params, n) -> list:
    """(weights, gradients, Adam states) bytes of a rank holding n layers and `params`
    parameters (rank_params), (rows, k) each, under the ZeRO stage
    (memory.model_state_bytes): the routed experts' sharded over the expert data-parallel
    group, the rest over DP x CP. ZeRO-2/3 gradients reduced once per step (plan.grad_sync
    last) stay whole from the first backward to the last: FSDP2 accumulates them unsharded,
    in the reduce dtype (FSDPParam.to_accumulated_grad_if_needed). FSDP2's replicate
    (plan.ddp_impl) holds the rest's weights twice. Reads state_rows."""
    parts, degrees = _split(r, params, n)
    stage = [_col(r["zero"]) == k for k in range(4)]
    states = [0.0, 0.0, 0.0]
    for part, degree in zip(parts, degrees):
        per_param = [model_state_bytes(1.0, r["dtype"], r["d"], k, degree, r["gd"], r["master"], r["mb"])
                     for k in range(4)]
        states = [total + part * np.select(stage, [b[i] for b in per_param]) for i, total in enumerate(states)]
    states[1] = np.where(_col(r["accumulate_whole"]), params * r["gd"], states[1])
    # the copy FSDP2's replicate gathers, of the weights it manages: all but the routed experts
    states[0] = states[0] + _col(r["replicate_copy"]) * parts[0] * r["d"]
    return states


def rank_memory(r: dict, model: ModelSpec, s, n, params, inflight) -> dict:
    """Bytes on pipeline rank s (n layers, `params` parameters, `inflight` micro-batch
    chunks of activations held at the peak): weights, gradients and Adam states under the
    ZeRO stage (memory.model_state_bytes), activations (Korthikanti et al. 2022), and
    buffers: on the last rank the loss, what the cross-entropy keeps of each micro-batch in
    flight (schedule.loss_in_flight) and holds in its backward (memory.cross_entropy_logits);
    one layer rebuilt in backward under full or per-op recompute; the gathered weights of the
    current and the prefetched layer under ZeRO-3. The head's backward frees the loss's
    tensors before the first layer's backward rebuilds and gathers: the larger of the two."""
    c = _col
    z, v = r["zero"], r["virtual_stages"]
    states = model_states(r, params, n)
    # ZeRO-3 gathered weights: in backward the current and the prefetched layer, or, without
    # resharding after forward, every layer of the rank from its forward to its backward
    layer_bytes = c((z == 3) * r["per_layer"] * r["d"])
    in_backward = np.where(c(r["reshard"]), 2, 0) * layer_bytes + c(np.isin(r["rc"], (FULL, OP)) * r["act_none"])
    logits = (s == head_rank(r)) * c(logits_bytes(r["tokens"], model.vocab_size, r["tp"]))
    held = c(loss_in_flight(r["sched"], r["pp"], r["num_microbatches"], r["a2a_overlap"]))
    kept, peak = c(r["loss_kept"]) * logits, c(r["loss_peak"]) * logits
    buffers = ((held - 1) * kept + np.maximum(peak, in_backward)
               + np.where(c(r["reshard"]), 0, n) * layer_bytes)
    return {"weights": states[0], "gradients": states[1], "optimizer": states[2],
            "activations": inflight * n / c(v) * c(r["act"]), "buffers": buffers}


@dataclass(frozen=True)
class Tail:
    """After a pipeline rank's last backward, (rows, k) arrays: the data-parallel
    communication exposed and whole, the contention it causes, the optimizer step."""

    dp_exposed_s: np.ndarray
    dp_total_s: np.ndarray
    contention_s: np.ndarray
    optimizer_s: np.ndarray

    @property
    def total_s(self) -> np.ndarray:
        return self.dp_exposed_s + self.contention_s + self.optimizer_s


def rank_tail_s(r: dict, model: ModelSpec, hw: HardwareProfile, s, n, params) -> Tail:
    """The Tail of rank s:
    the gradient sync (in the gradient dtype) bucketed per layer and overlapped with the
    backward (PyTorch DDP, Li et al. 2020: each bucket hides behind the next layer's
    backward, slowing it by the contention; the last one is exposed; under a pipeline the
    ZeRO-2/3 last chunk's all), once per step or, for
    ZeRO-2/3 with plan.grad_sync each, once per micro-batch, sharing the NIC with
    the ring-attention exchange when both cross nodes; the ZeRO-1/2 all-gather of the
    updated weights (Rajbhandari et al. 2020 sec 5.2; ZeRO-1 by all-reduce broadcasts them
    instead, plan.zero1_sync), overlapped with the next forward;
    Megatron-LM's all-reduce of a tied
    embedding's gradient between the first and last stage (none in zb-v's V, which holds
    both on rank 0); then the Adam step over this
    rank's share of the parameters."""
    c = _col
    z, dps, rpn = r["zero"], r["dps"], r["dp_rpn"]
    parts, degrees = _split(r, params, n)

    def per_layer_s(kind: str, bytes_per_param):
        """dp_collective_s of one layer's share of the gradients or weights."""
        return dp_collective_s(hw, kind, r, *(part * bytes_per_param / np.maximum(n, 1) for part in parts), c)
    # ZeRO-1 by all-reduce (plan.zero1_sync): DDP's all-reduce, then each rank broadcasts the
    # weights it updated (torch's ZeroRedundancyOptimizer)
    by_all_reduce = (z == 0) | ((z == 1) & r["zero1_all_reduce"])
    # FSDP2's (ZeRO-2/3) calls with their host work (FrameworkOverhead.fsdp_*; zero on a GPU),
    # the reduce-scatter after copying the layer's gradients into its input in the reduce
    # dtype, the gather with its copies in and out (fsdp_copy_s)
    layer_params, copies = sum(parts) / np.maximum(n, 1), r["fsdp_copies"]
    bucket = np.where(c(by_all_reduce), per_layer_s("all_reduce", r["gd"]),
                      per_layer_s("reduce_scatter", r["gd"]) + c(z >= 2) * (
                          hw.overhead.fsdp_reduce_s + fsdp_reduce_copy_s(hw, layer_params, r["d"], r["gd"], copies)))
    both_cross = (rpn < dps) & (r["cp_rpn"] < r["cp"])
    bucket = bucket + c(np.where(both_cross, r["l_cp_bwd_raw"], 0.0)) * (bucket > 0)
    exposed, slowed = overlap_split(bucket, c(r["l_bwd"]), hw)
    # ZeRO-2/3 syncing after each micro-batch (plan.grad_sync each) pays this in every one
    syncs = c(r["grad_syncs"])
    # ZeRO-2/3 under a pipeline, syncing once a step: each chunk's gradients are reduced
    # after its last backward, not bucket by bucket inside it (torch.distributed.pipelining
    # perform_reduce_grad runs FSDP2's post-backward then), so the last chunk's are exposed
    # whole; the other chunks' hide behind the backward ops still to run
    after = c((z >= 2) & (r["pp"] > 1) & (r["grad_syncs"] == 1))
    alone = np.where(after, np.maximum(n / c(r["virtual_stages"]), 1.0), 1.0)
    dp = syncs * np.where(n > 0, alone * bucket + (n - alone) * exposed, 0.0)
    contention = syncs * np.where(n > 0, (n - alone) * slowed, 0.0)
    # the updated weights of ZeRO-1/2 are gathered bucket by bucket behind the next step's
    # forward (Megatron-LM --overlap-param-gather), the first bucket exposed
    gather = c(np.isin(z, (1, 2))) * per_layer_s("all_gather", r["d"]) + c(z == 2) * (
        hw.overhead.fsdp_gather_s + fsdp_copy_s(hw, 2 * layer_params * r["d"] * (1 + 1 / c(dps)), copies))
    if r["zero1_all_reduce"]:
        gather = np.where(c(z == 1), per_layer_s("broadcast", r["d"]), gather)
    gather_exposed, gather_slowed = overlap_split(gather, c(r["l_fwd_compute"]), hw)
    dp = dp + np.where(n > 0, gather + (n - 1) * gather_exposed, 0.0)
    contention = contention + np.where(n > 0, (n - 1) * gather_slowed, 0.0)
    total = n * (syncs * bucket + gather)
    if model.tied_embeddings:
        sync = collective_s(hw, "all_reduce", model.vocab_size * model.hidden_size / r["tp"] * r["gd"],
                            2, r["pp_rpn"], r["pp_share"])
        tied = ((s == 0) | (s == head_rank(r))) * c(np.where((r["pp"] > 1) & (r["sched"] != ZB_V), sync, 0.0))
        dp, total = dp + tied, total + tied
    opt_params = sum(part / np.where(c(z) >= 1, degree, 1) for part, degree in zip(parts, degrees))
    opt = hw.memory_bound_time_s(adam_step_bytes_per_param(r["dtype"], r["d"], r["master"], r["mb"]) * opt_params,
                                 "fp32", "optimizer")
    return Tail(dp, total, contention, np.asarray(opt, dtype=float))


def schedule_codes(names) -> np.ndarray:
    return np.array([SCHEDULES.index(str(x)) for x in np.atleast_1d(names)])
