"""The candidate table: every plan the search considers, one row each.

Rows are built by joins over the knobs (pandas): parallel degrees whose product is the GPU
count, the expert mesh of a mixture-of-experts model (expert-parallel degrees dividing the
experts and a pipeline stage's ranks, expert TP 1 or tp: Megatron-Core's parallel folding),
rank placements (deduplicated by the link levels their groups land on), micro-batch
sizes dividing the per-replica batch, pipeline schedules with their virtual-stage counts,
sequence parallelism, ZeRO stage, TP and all-to-all overlap, and recompute. After each join
the legality rules (simulator/rules.py, the ones Plan.validate applies) drop the illegal
rows, as soon as the table has the fields a rule reads, so every row is a legal plan.
Knobs the user fixed take only their fixed value.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from types import SimpleNamespace
from typing import Callable

import numpy as np
import pandas as pd

from meshplan.core.errors import PlanError
from meshplan.core.mesh import Group, Mesh
from meshplan.hw_profiles.fabric import Fabric, training_groups
from meshplan.simulator import rules
from meshplan.simulator.model_spec import ModelSpec
from meshplan.simulator.step import group_ids
from meshplan.simulator.plan import (ATTENTION, CP_COMMS, DTYPES, PLAN_WIDE, RECOMPUTE, SCHEDULES, Cluster,
                                     Plan, checked_plan, expert_order, grad_sync_once)

# Rank orders tried, innermost first: Megatron-LM's default (tp-cp-dp-pp), its
# --use-tp-pp-dp-mapping (tp-cp-pp-dp), data parallel inside context parallel, data parallel
# innermost (keeps a small DP group inside a node when TP traffic is light), and context
# parallel outermost (on a fabric whose leaf uplinks are oversubscribed, the ring exchange
# that hides behind attention crosses them instead of the DP or PP traffic).
PLACEMENTS = (("tp", "cp", "dp", "pp"), ("tp", "cp", "pp", "dp"), ("tp", "dp", "cp", "pp"),
              ("dp", "tp", "cp", "pp"), ("tp", "dp", "pp", "cp"))
ZERO_STAGES = (0, 1, 2, 3)
BUBBLE_FLOOR = 0.005  # interleaved chunk counts are tried until the bubble is below this
DENSE_GROUP_COLUMNS = ("tp_rpn", "cp_rpn", "dp_rpn", "pp_rpn", "tp_share", "cp_share", "dp_share", "pp_share")
EXPERT_GROUP_COLUMNS = ("ep_rpn", "etp_rpn", "edp_rpn")
GROUP_COLUMNS = DENSE_GROUP_COLUMNS + EXPERT_GROUP_COLUMNS


def divisors(n: int) -> list[int]:
    small = [d for d in range(1, int(n ** 0.5) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def _legal(table: pd.DataFrame, model: ModelSpec, cluster: Cluster, fixed: dict,
           new: tuple[str, ...] | None = None, checked: set[str] = frozenset()) -> pd.DataFrame:
    """The rows that break no legality rule whose fields the table has so far. `new`: the
    columns added since the table was last checked (None: check every rule); a rule that
    reads none of them held on the rows they were joined to, so it is not applied again,
    nor is one that reads only `checked` columns (and scalars): it held on the table the
    new columns came from."""
    if table.empty:
        return table
    scalars = {"global_batch": fixed["global_batch"], "seq_len": fixed["seq_len"],
               "layer_partition": fixed.get("layer_partition"), "dtype": fixed.get("dtype", DTYPES[1]),
               "cp_comm": fixed.get("cp_comm", CP_COMMS[0])}
    available = set(table.columns) | set(scalars) - (
        {"layer_partition"} if "virtual_stages" not in table.columns else set())
    fresh = None if new is None else set(new) | ({"layer_partition"} if "virtual_stages" in new else set())
    applied = tuple(rule for rule in rules.TRAINING if set(rule.needs) <= available
                    and (fresh is None or set(rule.needs) & fresh)
                    and not set(rule.needs) <= set(checked) | set(scalars))
    if not applied:
        return table
    read = set().union(*(rule.needs for rule in applied)) & set(table.columns)
    columns = {c: _values(table[c]) for c in read}
    if "placement" in columns:
        columns["placement"] = table["placement"].map(",".join).to_numpy().astype(str)
    for flag in ("tp_overlap", "reshard_after_forward", "sp", "moe_a2a_overlap"):
        if flag in columns:
            columns[flag] = columns[flag].astype(bool)
    keep = np.broadcast_to(rules.holds(applied, SimpleNamespace(**scalars, **columns), model, cluster), len(table))
    return table if keep.all() else table[keep]


def _values(column: pd.Series) -> np.ndarray:
    """A column as rules read it; a categorical's values taken from its categories by code
    (converting each row of string categories costs a search tenths of a second)."""
    if isinstance(column.dtype, pd.CategoricalDtype):
        return np.asarray(column.cat.categories, dtype=object)[column.cat.codes.to_numpy()]
    return column.to_numpy()


def _axes_rows(model: ModelSpec, cluster: Cluster, fixed: dict) -> pd.DataFrame:
    """Parallel degrees (dp, tp, pp, cp) with product = GPUs, each legal on its own."""
    n = cluster.num_gpus
    rows = [(n // (tp * cp * pp), tp, pp, cp) for tp in divisors(n) for cp in divisors(n // tp)
            for pp in divisors(n // (tp * cp))]
    axes = pd.DataFrame(rows, columns=["dp", "tp", "pp", "cp"])
    for knob in ("dp", "tp", "pp", "cp"):
        if knob in fixed:
            axes = axes[axes[knob] == fixed[knob]]
    return _legal(axes, model, cluster, fixed)


def _expert_rows(axes: pd.DataFrame, model: ModelSpec, cluster: Cluster, fixed: dict) -> pd.DataFrame:
    """Each degree tuple with its expert meshes: expert-parallel degrees dividing the experts
    and the stage's tp*cp*dp ranks (with etp), expert TP 1 or tp (the two Megatron-Core
    settings: experts whole, as its MoE guide advises for fine-grained experts, or sharded
    like the dense MLP, its default); a dense model keeps ep 1, etp tp."""
    def options(dp: int, tp: int, cp: int):
        etps = sorted({1, tp} | ({fixed["etp"]} if "etp" in fixed else set())) if model.num_experts else [tp]
        eps = divisors(model.num_experts) if model.num_experts else [1]
        return [(ep, etp) for etp in etps for ep in eps if (tp * cp * dp) % (ep * etp) == 0
                and fixed.get("ep", ep) == ep and fixed.get("etp", etp) == etp]
    table = _join(axes, ["dp", "tp", "cp"], options, ["ep", "etp"])
    return _legal(table.assign(moe=model.num_experts > 0), model, cluster, fixed, ("ep", "etp", "moe"))


def _placement_rows(axes: pd.DataFrame, cluster: Cluster, fixed: dict,
                    fabric: Fabric | None = None, nics_per_node: int = 1) -> pd.DataFrame:
    """Each degree tuple with the placements whose groups differ in ranks per node or in
    link share on `fabric` (hw_profiles/fabric.py; None: no contention, shares 1.0), and in
    the expert mesh's link levels where there are experts to place (a dense model's are
    never used)."""
    orders = (tuple(fixed["placement"]),) if "placement" in fixed else PLACEMENTS
    rows = []
    for dp, tp, pp, cp, ep, etp, moe in axes[["dp", "tp", "pp", "cp", "ep", "etp", "moe"]].itertuples(index=False):
        sizes = {"dp": dp, "tp": tp, "pp": pp, "cp": cp}
        expert_sizes = {"etp": etp, "ep": ep, "edp": tp * cp * dp // (ep * etp), "pp": pp}  # expert_order's axes
        seen = set()
        for order in orders:
            g = training_groups(fabric, nics_per_node, Mesh.of(sizes, order, cluster.gpus_per_node))
            if pp == 1:  # no p2p without PP
                g["pp"] = Group(2, 1)
            sig = (*(g[k].ranks_per_node for k in g), *(g[k].link_share for k in g),
                   *(_expert_rpn(tuple(expert_sizes.values()), expert_order(order), cluster.gpus_per_node)
                     if moe else (1, 1, 1)))
            if sig not in seen:
                seen.add(sig)
                rows.append((dp, tp, pp, cp, ep, etp, order) + sig)
    table = pd.DataFrame(rows, columns=["dp", "tp", "pp", "cp", "ep", "etp", "placement", *GROUP_COLUMNS])
    # categorical: a handful of values each, so the joins after copy a byte per row, not eight
    return table.astype({c: pd.CategoricalDtype(sorted(table[c].unique())) for c in GROUP_COLUMNS})


@functools.lru_cache(maxsize=4096)
def _expert_rpn(sizes: tuple[int, ...], order: tuple[str, ...], gpus_per_node: int) -> tuple[int, ...]:
    """Ranks per node of the expert mesh's EP, ETP and EDP groups (EXPERT_GROUP_COLUMNS order); many
    attention meshes share one expert mesh, so each is placed once."""
    mesh = Mesh.of(dict(zip(("etp", "ep", "edp", "pp"), sizes)), order, gpus_per_node)
    return tuple(mesh.group((c[:-4],)).ranks_per_node for c in EXPERT_GROUP_COLUMNS)


def _join(table: pd.DataFrame, keys: list[str], options, columns: list[str],
          categories: dict[str, tuple] | None = None, legal=None) -> pd.DataFrame:
    """Inner join of each row with the option tuples options(*key values) gives for it: the
    rows in table order, each followed by its options in the order given. `categories`:
    the option columns that are categorical, with their categories. `legal`: _legal bound
    to the search, applied to each key's options before they are copied onto its rows
    (rules that read only the keys and the options, so the joined table needs no filtering
    for them)."""
    ids, first = _key_ids(table, keys)
    found = [options(*key) for key in table.iloc[first][keys].itertuples(index=False, name=None)]
    counts = np.array([len(opts) for opts in found], dtype=np.int64)
    opts = pd.DataFrame([opt for opts in found for opt in opts], columns=columns).astype(
        {c: pd.CategoricalDtype(cats) for c, cats in (categories or {}).items()})
    if legal is not None:
        key_of = np.repeat(np.arange(len(first)), counts)
        pairs = table[keys].iloc[first[key_of]].reset_index(drop=True)
        kept = legal(pd.concat([pairs, opts], axis=1).assign(row=np.arange(len(opts))), tuple(columns))
        kept = kept["row"].to_numpy()
        counts = np.bincount(key_of[kept], minlength=len(first)).astype(np.int64)
        opts = opts.iloc[kept].reset_index(drop=True)
    per_row = counts[ids]
    left = np.repeat(np.arange(len(table)), per_row)
    # the j-th option of a row is the option table's row start[id] + j
    start = np.cumsum(counts) - counts
    j = np.arange(left.size) - np.repeat(np.cumsum(per_row) - per_row, per_row)
    # column by column with numpy's take into one frame that keeps the arrays (copy=False):
    # pandas' take of the whole frame and a concat copied every row twice, 0.5 s of the
    # largest join (1.8M rows) here
    picked = start[ids[left]] + j
    return pd.DataFrame({**{c: _take(table[c], left) for c in table.columns},
                         **{c: _take(opts[c], picked) for c in columns}}, copy=False)


def _take(column: pd.Series, index: np.ndarray):
    """The column's values at `index`: a numpy array, or a categorical taken by its codes."""
    if isinstance(column.dtype, pd.CategoricalDtype):
        return pd.Categorical.from_codes(column.cat.codes.to_numpy()[index], dtype=column.dtype)
    return column.to_numpy()[index]


def _key_ids(table: pd.DataFrame, keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Row -> id of its key values (ids in order of first appearance), and each id's first row."""
    key = np.zeros(len(table), np.int64)
    for k in keys:
        codes, uniq = pd.factorize(table[k])
        key = key * len(uniq) + codes
    return group_ids(key)


def _schedules(model: ModelSpec, fixed: dict):
    def options(pp: int, m: int):
        if pp == 1:
            opts = [(fixed.get("schedule", "1f1b"), 1)]
        else:
            opts = [(s, 1) for s in ("gpipe", "1f1b", "zb-h1")]
            # Chunk counts up to (layers + 2)/pp: the balanced partition splits the layers
            # unevenly where they do not divide, and may leave the first and the last stage
            # the embedding or the head alone (Megatron-LM's pipeline layouts and torchtitan's
            # per-stage module lists run such splits). More chunks only shrink
            # the bubble, (p-1)/(v m) of the steady state (Narayanan et al. 2021 sec 2.2.2),
            # and add hops, first gathers and in-flight memory per chunk: past the v whose
            # bubble is under BUBBLE_FLOOR no further chunk can gain more than that.
            top = min(rules.max_virtual_stages(model.num_layers, pp),
                      max(2, math.ceil((pp - 1) / (BUBBLE_FLOOR * m))))
            vs = [fixed["virtual_stages"]] if fixed.get("virtual_stages", 1) > 1 else list(
                range(2, top + 1))
            opts += [("interleaved", v) for v in vs]
            # zb-v: two chunks per rank in a V (schedule.stage_index)
            if rules.max_virtual_stages(model.num_layers, pp) >= 2:
                opts.append(("zb-v", 2))
        return [o for o in opts if fixed.get("schedule", o[0]) == o[0]
                and fixed.get("virtual_stages", o[1]) == o[1]]
    return options


def _dominated_zero(pp: int, microbatches: int, fixed: dict) -> int | None:
    """The ZeRO stage another beats in time and memory at once: where the gradients are
    reduced once a step (one micro-batch, or plan.grad_sync_once), without a pipeline ZeRO-1
    (ZeRO-2 moves the same bytes and shards the gradients too, or, accumulating them whole,
    holds as much), under a pipeline accumulating over its micro-batches ZeRO-2 (it holds
    them as ZeRO-1 does, and reduces them after the last backward instead of inside it:
    step.rank_tail_s); else neither (a pipeline's one micro-batch: ZeRO-2 holds sharded
    gradients; a sync after each micro-batch: ZeRO-2 holds sharded gradients and moves them
    once a micro-batch, ZeRO-1 once a step)."""
    once = microbatches == 1 or bool(grad_sync_once(fixed.get("grad_sync", "default"), pp))
    if pp == 1:
        return 1 if once else None
    return 2 if microbatches > 1 and once else None


def searched(model: ModelSpec, fields: dict, fixed: dict) -> bool:
    """Whether the search's space holds plans with these field values: the norms' recompute
    (norm_act, Megatron-LM's --recompute-modules layernorm moe_act) for a model with experts,
    whose routed activations it frees too, or where the user fixed it."""
    return fields.get("recompute") != "norm_act" or bool(model.num_experts) or "recompute" in fixed


def candidate_table(model: ModelSpec, cluster: Cluster, fixed: dict, fabric: Fabric | None = None,
                    nics_per_node: int = 1, prune_dominated: bool = True,
                    states_fit: Callable[[pd.DataFrame], np.ndarray] | None = None) -> pd.DataFrame:
    """All legal plans for the model on the cluster with the user's fixed knobs held, their
    groups placed on `fabric` (the profile's; None: no contention between groups).
    Scalar settings (global batch, sequence, dtype, attention, layer partition) ride in
    table.attrs. Raises PlanError naming the broken rule when no plan is legal.

    With `prune_dominated`, knob values another value beats in time and memory at once are
    left out unless fixed: one of ZeRO-1 and ZeRO-2 (_dominated_zero) and selective
    recompute under fused attention (which redoes the kernel's forward to free only its fp32
    log-sum-exp, 4 bytes a query and head, where none keeps it; selective_twins brings
    them back where none may not fit). A search restricted to a framework that lacks the
    dominating value keeps them (planner.search passes False).

    With `states_fit` (which rows' weights, gradients and optimizer states fit in memory on
    their own, given the degrees, the ZeRO stage and the micro-batch count), a row they
    do not fit is left out once those columns are joined, before the knobs that cannot
    shrink them multiply it; the count left out rides in table.attrs["over_memory"]. Where
    that would leave no row, none is, so the search can say how far over the best one is."""
    missing = [(f"plan.{name}", "missing", "give it") for name in ("global_batch", "seq_len")
               if name not in fixed]
    if missing:
        raise PlanError.of(missing)
    gb, attrs = fixed["global_batch"], _attrs(fixed)
    table = _expert_rows(_axes_rows(model, cluster, fixed), model, cluster, fixed)
    placed = _legal(_placement_rows(table, cluster, fixed, fabric, nics_per_node), model, cluster, fixed,
                    ("placement", *GROUP_COLUMNS))
    if not table.empty:
        table = _join(table, ["dp"], lambda dp: [(b,) for b in divisors(gb // dp) if gb % dp == 0
                                                 and fixed.get("micro_batch", b) == b], ["micro_batch"])
        table = _legal(table, model, cluster, fixed, ("micro_batch",))
    if not table.empty:
        table["num_microbatches"] = gb // (table["dp"] * table["micro_batch"])
        table = _join(table, ["pp", "num_microbatches"], _schedules(model, fixed),
                      ["schedule", "virtual_stages"], {"schedule": SCHEDULES})
        table = _legal(table, model, cluster, fixed, ("num_microbatches", "schedule", "virtual_stages"))
    if not table.empty:
        table = _join(table, ["tp", "cp"], lambda tp, cp: [
            (sp,) for sp in (False, True) if fixed.get("sp", sp) == sp], ["sp"])
        table = _legal(table, model, cluster, fixed, ("sp",))
    if not table.empty:
        table = _join(table, ["dp", "cp", "pp", "num_microbatches"], lambda dp, cp, pp, m: [
            (z,) for z in (ZERO_STAGES if "zero" in fixed or dp * cp > 1 else (0,))
            if not (prune_dominated and "zero" not in fixed and z == _dominated_zero(pp, m, fixed))
            if fixed.get("zero", z) == z], ["zero"])
    over_memory = 0
    if states_fit is not None and not table.empty:
        table.attrs.update(attrs)
        fits = states_fit(table)
        if fits.any():
            over_memory = int((~fits).sum())
            table = table[fits]
    if not table.empty:
        table = _join(table, ["sp"], lambda sp: [
            (o,) for o in ((False, True) if sp else (False,)) if fixed.get("tp_overlap", o) == o],
            ["tp_overlap"])
        table = _legal(table, model, cluster, fixed, ("zero", "tp_overlap"))
    if not table.empty:
        table = _join(table, ["ep"], lambda ep: [
            (o,) for o in ((False, True) if ep > 1 else (False,)) if fixed.get("moe_a2a_overlap", o) == o],
            ["moe_a2a_overlap"])
        table = _legal(table, model, cluster, fixed, ("moe_a2a_overlap",))
    if not table.empty:
        table = _join(table, ["zero"], lambda z: [
            (o,) for o in ((True, False) if z == 3 else (True,))
            if fixed.get("reshard_after_forward", o) == o], ["reshard_after_forward"])
        table = _legal(table, model, cluster, fixed, ("reshard_after_forward",))
    if not table.empty:
        # placements join late, so the joins before them copy a table that many times smaller
        degrees = ["dp", "tp", "pp", "cp", "ep", "etp"]
        options = {}
        for row in placed[degrees + ["placement", *GROUP_COLUMNS]].itertuples(index=False, name=None):
            options.setdefault(row[:len(degrees)], []).append(row[len(degrees):])
        table = _join(table, degrees, lambda *key: options.get(key, []), ["placement", *GROUP_COLUMNS],
                      {c: tuple(placed[c].cat.categories) for c in GROUP_COLUMNS})
        table = _legal(table.drop(columns="moe"), model, cluster, fixed, ("placement", *GROUP_COLUMNS),
                       checked=set(placed.columns))
    if not table.empty:
        # the layout each recompute choice is made for (closed_forms: none dominates full, op
        # and norm_act where it fits); norm_act, which frees the norms' outputs and the routed
        # experts' activations, is searched for models with experts (fixed, for any). The
        # largest join: the rules on recompute and the knobs it is keyed by are checked on
        # each key's options, before they are copied onto the rows
        table["layout"] = np.arange(len(table))
        table = _join(table, ["tp", "moe_a2a_overlap"], lambda tp, a2a: [
            (r,) for r in RECOMPUTE if fixed.get("recompute", r) == r and not (
                prune_dominated and r == "selective" and "recompute" not in fixed
                and fixed.get("attention", ATTENTION[0]) in rules.FUSED_ATTENTION)
            and searched(model, {"recompute": r}, fixed)],
            ["recompute"], {"recompute": RECOMPUTE},
            legal=lambda options, new: _legal(options, model, cluster, fixed, new))
        table = _legal(table, model, cluster, fixed, ("recompute",))
    if table.empty:
        raise _why_empty(model, cluster, fixed)
    table = table.reset_index(drop=True)
    table.attrs.update(attrs, over_memory=over_memory)
    return table


def kept_rows(table: pd.DataFrame, keep) -> pd.DataFrame:
    """The rows of candidate table `table` that `keep` selects (a mask or row positions),
    renumbered, its attrs (the plan-wide settings) kept."""
    attrs = dict(table.attrs)
    table = (table[keep] if isinstance(keep, np.ndarray) and keep.dtype == bool
             else table.iloc[list(keep)]).reset_index(drop=True)
    table.attrs.update(attrs)
    return table


def selective_twins(table: pd.DataFrame, peak_bytes: np.ndarray, limit_bytes: float, model: ModelSpec,
                    cluster: Cluster, fixed: dict, prune_dominated: bool = True) -> pd.DataFrame:
    """The plans candidate_table left out as dominated that may fit where their dominator
    does not: selective recompute under fused attention frees the kernel's fp32 log-sum-exp
    (4 bytes a query row and head of each layer, memory.layer_activation_bytes), so it fits
    where no recompute misses the limit by less than that. The rows of `table` with
    recompute none whose peak (`peak_bytes`, closed_forms.evaluate's: exact, or a lower
    bound) is over `limit_bytes` by at most 4 x micro-batch x heads / tp x sequence / cp x
    layers x micro-batches (every layer of every micro-batch in flight at once, a bound on
    what selective frees), as selective; none where candidate_table kept selective (the
    user held recompute, or nothing was pruned) or attention is unfused."""
    empty = table.iloc[:0]
    if (not prune_dominated or "recompute" in fixed
            or table.attrs["attention"] not in rules.FUSED_ATTENTION or table.empty):
        return empty
    recompute = table["recompute"].cat
    over = np.flatnonzero((recompute.codes.to_numpy() == recompute.categories.get_loc("none"))
                          & (peak_bytes > limit_bytes))
    column = lambda name: table[name].to_numpy()[over]  # noqa: E731
    freed = (4.0 * column("micro_batch") * -(-model.num_heads // column("tp")) * table.attrs["seq_len"]
             / column("cp") * model.num_layers * column("num_microbatches"))
    near = over[peak_bytes[over] - freed <= limit_bytes]
    if not near.size:
        return empty
    rows = kept_rows(table, near)
    rows["recompute"] = pd.Categorical.from_codes(np.full(len(rows), recompute.categories.get_loc("selective")),
                                                  dtype=table["recompute"].dtype)
    rows = _legal(rows, model, cluster, fixed, ("recompute",)).reset_index(drop=True)
    rows.attrs.update(table.attrs)
    return rows


def cp_comm_variants(table: pd.DataFrame, model: ModelSpec, cluster: Cluster, fixed: dict,
                     prune_dominated: bool = True) -> list[pd.DataFrame]:
    """The rows of `table` with context parallelism under each other CP exchange
    (plan.CP_COMMS) the rules allow them, a table per exchange (cp_comm is plan-wide: one
    value per table, in its attrs); none where the user held cp_comm. With
    `prune_dominated`, torch's alltoall rotation is left out of a table priced with the p2p
    ring: the same K,V hops forward, in backward fp32 gradients besides them and the last
    pass exposed, and the merges (cost.cp_comm_s, ops.cp_merge_op), at the same memory."""
    cp_rows = table[table["cp"] > 1] if "cp_comm" not in fixed else table.iloc[:0]
    dominated = {"alltoall"} if prune_dominated and table.attrs["cp_comm"] == "p2p" else set()
    out = []
    for comm in CP_COMMS:
        if cp_rows.empty or comm == table.attrs["cp_comm"] or comm in dominated:
            continue
        rows = _legal(cp_rows, model, cluster, {**fixed, "cp_comm": comm}, ("cp_comm",))
        if not rows.empty:
            rows = rows.reset_index(drop=True)
            rows.attrs.update(table.attrs, cp_comm=comm)
            out.append(rows)
    return out


def _attrs(fixed: dict) -> dict:
    """The candidate table's scalars: the plan-wide settings, fixed or default."""
    defaults = {f.name: f.default for f in dataclasses.fields(Plan)}
    partition = fixed.get("layer_partition")
    return {**{k: fixed.get(k, defaults[k]) for k in PLAN_WIDE if k != "seq_len"},
            "global_batch": fixed["global_batch"], "seq_len": fixed["seq_len"],
            "moe_capacity_factor": float(fixed.get("moe_capacity_factor", defaults["moe_capacity_factor"])),
            "layer_partition": tuple(partition) if partition is not None else None}


def row_plan(table: pd.DataFrame, i: int) -> Plan:
    """The Plan of row i."""
    row = table.iloc[i]
    a = table.attrs
    return Plan(global_batch=a["global_batch"], dp=int(row.dp), tp=int(row.tp),
                pp=int(row.pp), cp=int(row.cp), sp=bool(row.sp), zero=int(row.zero),
                recompute=str(row.recompute), micro_batch=int(row.micro_batch),
                schedule=str(row.schedule), virtual_stages=int(row.virtual_stages),
                layer_partition=a["layer_partition"], placement=tuple(row.placement),
                tp_overlap=bool(row.tp_overlap), moe_a2a_overlap=bool(row.moe_a2a_overlap),
                reshard_after_forward=bool(row.reshard_after_forward), ep=int(row.ep), etp=int(row.etp),
                **{k: a[k] for k in PLAN_WIDE})


def _why_empty(model: ModelSpec, cluster: Cluster, fixed: dict) -> PlanError:
    """The rules that leave no legal plan: the violations of the plan made of the fixed
    knobs and defaults, or a summary when each knob is legal on its own."""
    try:
        checked_plan(fixed, model, cluster)
    except PlanError as exc:
        return exc
    return PlanError("cluster.num_gpus", f"no combination of dp, tp, pp, cp, ep, micro-batch and schedule is "
                     f"legal for {model.name} on {cluster.num_gpus} GPUs with global batch "
                     f"{fixed['global_batch']}", "fix fewer knobs or change the GPU count or batch")
