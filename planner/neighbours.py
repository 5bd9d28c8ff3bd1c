"""The single-knob changes of a plan (its neighbours): the search takes a faster one that
fits for its winner until none is (planner.search), and the explanation prices each against
the winner (planner.explain)."""
from __future__ import annotations

import json

from meshplan.core.errors import PlanError
from meshplan.hw_profiles.profile import HardwareProfile
from meshplan.simulator.model_spec import ModelSpec
from meshplan.simulator.plan import CP_COMMS, RECOMPUTE, SCHEDULES, Cluster, Plan
from meshplan.simulator.rules import max_virtual_stages
from meshplan.simulator.train import simulate


def knob_changes(plan: Plan, experts: bool = False,
                 num_layers: int | None = None) -> list[tuple[str, str, dict | str]]:
    """(label, knob, changed fields or why there is none) for each single-knob change of
    `plan`; a parallel degree's change moves the factor 2 to or from data parallelism (expert
    TP following TP where it did; a deeper interleaved pipeline of `num_layers` layers down
    to the chunks it can hold); the TP overlap toggled where sequence parallelism is on,
    resharding after forward where ZeRO-3 is; each other CP exchange where cp > 1; with
    `experts`, EP x2, /2 and none too, and the all-to-all overlap toggled where ep > 1."""
    out = []
    for axis in ("tp", "pp"):
        deg = getattr(plan, axis)
        for label, new, dp in (("x2", deg * 2, plan.dp / 2), ("/2", deg / 2, plan.dp * 2)):
            if new < 1 or new != int(new):
                continue
            name = f"{axis} {label} (dp {'/2' if label == 'x2' else 'x2'})"
            if dp != int(dp):
                out.append((name, axis, f"--gpus: dp {plan.dp} has no factor 2 to give up"))
                continue
            fields = {axis: int(new), "dp": int(dp)}
            if axis == "tp" and plan.etp == plan.tp:
                fields["etp"] = int(new)
            if axis == "tp" and new > 1 and plan.ep > 1:
                fields["sp"] = True   # expert with tensor parallelism needs SP
            if axis == "tp" and new == 1:  # no sequence parallelism, nor its overlap, without TP
                fields.update(sp=False, tp_overlap=False)
            if axis == "pp" and new == 1:
                fields.update(schedule="1f1b", virtual_stages=1)
            top = max_virtual_stages(num_layers, int(new)) if axis == "pp" and num_layers else None
            if top is not None and plan.virtual_stages > top:
                # the deeper pipeline holds fewer chunks per rank: as many as it can
                if top >= 2:
                    fields["virtual_stages"] = top
                    name += f", v {plan.virtual_stages} to {top}"
                else:
                    fields.update(schedule="1f1b", virtual_stages=1)
                    name += ", 1f1b: no two chunks per rank fit"
            out.append((name, axis, fields))
    # expert parallelism folds over the same ranks (parallel folding): the attention's mesh stays
    # at ep 1 nothing is exchanged, so nothing overlaps either
    out += [(f"ep {label}", "ep", {"ep": new, **({"moe_a2a_overlap": False} if new == 1 else {})})
            for label, new in (("x2", plan.ep * 2), ("/2", plan.ep // 2))
            if experts and new >= 1 and (label == "x2" or plan.ep % 2 == 0)]
    if experts and plan.ep > 2:  # what expert parallelism buys at all
        out.append(("ep 1 (experts not spread)", "ep", {"ep": 1, "moe_a2a_overlap": False}))
    mbs = [plan.micro_batch * 2] + ([plan.micro_batch // 2] if plan.micro_batch % 2 == 0 else [])
    out += [(f"micro-batch {b}", "micro_batch", {"micro_batch": b}) for b in mbs]
    # leaving ZeRO-3 leaves its choice of keeping the weights gathered with it
    out += [(f"zero {z}", "zero", {"zero": z, **({} if z == 3 else {"reshard_after_forward": True})})
            for z in (plan.zero - 1, plan.zero + 1) if 0 <= z <= 3]
    if plan.zero == 3:
        out.append(("reshard after forward " + ("off" if plan.reshard_after_forward else "on"),
                    "reshard_after_forward", {"reshard_after_forward": not plan.reshard_after_forward}))
    out += [(f"recompute {r}", "recompute", {"recompute": r}) for r in RECOMPUTE if r != plan.recompute]
    if plan.pp > 1:
        for s in SCHEDULES:
            if s != plan.schedule:
                v = 2 if s in ("interleaved", "zb-v") else 1
                out.append((f"schedule {s}" + (f" (v={v})" if v > 1 else ""), "schedule",
                            {"schedule": s, "virtual_stages": v}))
    if plan.tp > 1:
        # the TP overlap splits the sequence-parallel collectives: it goes with them
        out.append(("sequence parallel " + ("off" if plan.sp else "on"), "sp",
                    {"sp": not plan.sp, **({"tp_overlap": False} if plan.sp else {})}))
    if plan.tp > 1 and plan.sp:
        out.append(("TP overlap " + ("off" if plan.tp_overlap else "on"), "tp_overlap",
                    {"tp_overlap": not plan.tp_overlap}))
    if plan.cp > 1:
        out += [(f"CP exchange {c}", "cp_comm", {"cp_comm": c}) for c in CP_COMMS if c != plan.cp_comm]
    if experts and plan.ep > 1:
        out.append(("all-to-all overlap " + ("off" if plan.moe_a2a_overlap else "on"), "moe_a2a_overlap",
                    {"moe_a2a_overlap": not plan.moe_a2a_overlap}))
    return out


def try_plan(model: ModelSpec, cluster: Cluster, hw: HardwareProfile, fields: dict, tried: dict | None = None):
    """simulate() the plan `fields` describe, or the PlanError that rules it out; with
    `tried`, each outcome is kept there by its fields, and a plan tried before is not
    simulated again (the search's climb and the explanation try the same changes)."""
    key = json.dumps(fields, sort_keys=True)  # a tuple and its list are one plan's field
    if tried is not None and key in tried:
        return tried[key]
    try:
        plan = Plan(**fields)
        plan.validate(model, cluster)
        outcome = simulate(model, plan, cluster, hw)
    except PlanError as exc:
        outcome = exc
    if tried is not None:
        tried[key] = outcome
    return outcome
