"""Why the planner picked its plan: the winner's step-time breakdown; for the runner-up and
for each single-knob change of the winner, how much slower it is and which breakdown term
grows, or which limit it breaks (memory, or the legality rule, as PlanError words it); and
the prediction's error band from the hardware profile's fit residuals."""
from __future__ import annotations

from dataclasses import dataclass, replace

from meshplan.hw_profiles.profile import HardwareProfile
from meshplan.core.errors import PlanError
from meshplan.simulator.model_spec import ModelSpec
from meshplan.simulator.partition import split_text
from meshplan.simulator.plan import CP_COMMS, RECOMPUTE, SCHEDULES, Cluster, Plan
from meshplan.simulator.rules import max_virtual_stages
from meshplan.hw_profiles.accuracy import end_to_end, end_to_end_text, plan_kind
from meshplan.simulator.train import BREAKDOWN_KEYS, SimulationResult, mfu_text, simulate
from meshplan.core.units import GIB

TIE_REL = 1e-3  # step times closer than this are reported as a tie


@dataclass(frozen=True)
class Comparison:
    """Another plan against the winner: its relative slowdown and the breakdown terms that
    grow (seconds, largest first), or the limit that rules it out; `held` when it changes a
    knob the user fixed (the search could not take it)."""

    label: str
    plan: dict | None = None
    step_time_s: float | None = None
    slower_rel: float | None = None
    grows: tuple[tuple[str, float], ...] = ()
    limit: str | None = None
    held: bool = False

    def text(self) -> str:
        if self.limit:
            return f"{self.label}: ruled out ({self.limit})"
        if abs(self.slower_rel) < TIE_REL:
            return f"{self.label}: ties (within {TIE_REL:.1%})"
        if self.slower_rel < 0:
            return f"{self.label}: {-self.slower_rel:.1%} faster ({_terms(self.grows, 'shrinks')})"
        return f"{self.label}: {self.slower_rel:.1%} slower ({_terms(self.grows, 'grows')})"

    def to_json(self) -> dict:
        return {"label": self.label, "plan": self.plan, "step_time_s": self.step_time_s,
                "slower_rel": self.slower_rel, "grows_s": dict(self.grows), "limit": self.limit,
                "text": self.text()}


def _terms(deltas, verb: str) -> str:
    if not deltas:
        return "no term changes by more than 1%"
    return ", ".join(f"{k} {verb} {abs(v):.3g} s" for k, v in deltas[:2])


def compare(winner: SimulationResult, other: SimulationResult, label: str) -> Comparison:
    """`other` against `winner`: relative slowdown; the terms that grow when slower (or
    shrink when faster), those moving more than 1% of the winner's step, largest first."""
    rel = other.step_time_s / winner.step_time_s - 1.0
    sign = 1.0 if rel >= 0 else -1.0
    deltas = sorted(((k, other.breakdown_s[k] - winner.breakdown_s[k]) for k in BREAKDOWN_KEYS),
                    key=lambda kv: -sign * kv[1])
    moved = tuple((k, d) for k, d in deltas if sign * d > 0.01 * winner.step_time_s)
    if not other.fits:
        return Comparison(label, other.plan.to_dict(), other.step_time_s, rel, moved,
                          f"memory: needs {other.peak_memory_bytes / GIB:.1f} GiB, "
                          f"{other.memory_limit_bytes / GIB:.1f} GiB usable")
    return Comparison(label, other.plan.to_dict(), other.step_time_s, rel, moved)


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


@dataclass(frozen=True)
class Explanation:
    step_time_s: float
    breakdown_s: dict
    error_band: tuple[float, float]
    runner_up: Comparison | None
    changes: tuple[Comparison, ...]
    communication: dict
    mfu: float
    mfu_causal: float
    kind: str  # the family of published runs its end-to-end error is quoted from (plan_kind)
    split: tuple[int, ...] = ()  # the winner's layers per (virtual) stage, SimulationResult.layer_split
    derived: str = ""  # how a datasheet variant's profile derives from a measured one (variant_text)

    def lines(self) -> list[str]:
        parts = ", ".join(f"{k} {v:.3g} s ({v / self.step_time_s:.0%})"
                          for k, v in self.breakdown_s.items() if v > 1e-6 * self.step_time_s)
        lo, hi = self.error_band
        out = [f"winner: {self.step_time_s:.3f} s per step = {parts}",
               mfu_text(self.mfu, self.mfu_causal),
               *split_lines(self.split),
               *communication_lines(self.communication),
               f"error band of the profile's operator fits (held-out kernel and collective timings, "
               f"not end to end): ±{lo:.0%} median, ±{hi:.0%} p95; {end_to_end_text(self.kind)}",
               *([self.derived] if self.derived else [])]
        if self.runner_up is not None:
            close = self.runner_up.slower_rel is not None and self.runner_up.slower_rel < lo
            out.append(self.runner_up.text() + (" -- inside the median error band: a toss-up"
                                                if close else ""))
        out += [c.text() for c in self.changes]
        return out

    def to_json(self) -> dict:
        return {"step_time_s": self.step_time_s, "breakdown_s": dict(self.breakdown_s),
                "error_band": {"median_rel": self.error_band[0], "p95_rel": self.error_band[1]},
                "end_to_end": end_to_end(), "kind": self.kind, "communication": self.communication,
                "layer_split": list(self.split), "derived_profile": self.derived or None,
                "runner_up": self.runner_up.to_json() if self.runner_up else None,
                "changes": [c.to_json() for c in self.changes], "text": self.lines()}


def try_plan(model: ModelSpec, cluster: Cluster, hw: HardwareProfile, fields: dict):
    """simulate() the plan `fields` describe, or the PlanError that rules it out."""
    try:
        plan = Plan(**fields)
        plan.validate(model, cluster)
    except PlanError as exc:
        return exc
    return simulate(model, plan, cluster, hw)


def explain(model: ModelSpec, cluster: Cluster, hw: HardwareProfile,
            ranked: tuple[SimulationResult, ...], fixed: dict) -> Explanation:
    winner = ranked[0]
    runner = compare(winner, ranked[1], "runner-up " + _describe(ranked[1].plan, winner.plan)) \
        if len(ranked) > 1 else None
    changes = []
    for label, knob, fields in knob_changes(winner.plan, model.num_experts > 0, model.num_layers):
        held = f" (you fixed --{knob.replace('_', '-')})" if knob in fixed else ""
        if isinstance(fields, str):
            changes.append(Comparison(label + held, limit=fields, held=bool(held)))
            continue
        other = try_plan(model, cluster, hw, {**winner.plan.to_dict(), **fields, "layer_partition": None})
        if isinstance(other, PlanError):
            changes.append(Comparison(label + held, limit=f"{other.field}: {other.problem}", held=bool(held)))
        else:
            changes.append(replace(compare(winner, other, label + held), held=bool(held)))
    return Explanation(winner.step_time_s, dict(winner.breakdown_s), winner.error_band, runner,
                       tuple(changes), winner.communication, winner.mfu, winner.mfu_causal,
                       plan_kind(model.num_experts, winner.plan.cp), winner.layer_split, variant_text(hw))


def variant_text(hw: HardwareProfile) -> str:
    """For a profile built from a measured one by datasheet ratios (variants.VARIANTS), what
    it is: the base's fits, error band included, with the factors; else ""."""
    variant = hw.variant_of
    if not variant:
        return ""
    factors = ", ".join(f"{k} x{v:.3g}" for k, v in variant.items() if k != "base")
    return (f"profile {hw.name}: not measured; {variant['base']}'s measured fits with {factors} "
            f"(datasheet ratios, hw_profiles/variants.py), its error band {variant['base']}'s")


def split_lines(split: tuple[int, ...]) -> list[str]:
    """The pipeline split in one line (none without a pipeline), saying where the embedding
    or the head has a stage of its own."""
    if len(split) < 2:
        return []
    ends = [what for what, n in (("the embedding", split[0]), ("the head", split[-1])) if n == 0]
    alone = (f" ({' and '.join(ends)} alone on {'its own stage' if len(ends) == 1 else 'their own stages'})"
             if ends else "")
    return [f"pipeline split, layers per (virtual) stage in pipeline order: {split_text(split)}{alone}"]


# What the explanation says of each CP exchange (plan.CP_COMMS, cost.cp_comm_s)
CP_EXCHANGES = {
    "p2p": "CP passes K,V round a ring beside the attention of the blocks after the first",
    "alltoall": "CP passes K,V round a ring beside the later blocks' attention, and their gradients "
                "in fp32 after each block, the last pass exposed (torch's context_parallel)",
    "allgather": "CP gathers K,V beside the local block's attention alone, and passes their gradients "
                 "in fp32 after each block, the last pass exposed (torch's context_parallel)",
    "a2a": "CP all-to-alls Q,K,V to head shards before the attention and its output back, exposed "
           "(Ulysses)"}


def communication_lines(communication: dict) -> list[str]:
    """Each kind's communication on the critical stage, whole and exposed, and the overlap
    and contention assumed."""
    kinds = [f"{kind.upper()} {c['total_s']:.3g} s ({c['exposed_s']:.3g} s exposed)"
             for kind, c in communication.items() if kind != "overlap" and c["total_s"] > 0]
    overlap = communication.get("overlap", {})
    if not overlap.get("overlaps_compute", True):
        how = "collectives cannot overlap compute on this device: all of them are exposed"
    else:
        how = (f"overlapped communication slows the compute beside it by "
               f"{overlap['compute_slowdown']:.1%} ({overlap['contention_s']:.3g} s: "
               f"{overlap['source'].split(':')[0]})")
    if overlap.get("tp_overlap"):
        how += f"; TP communication overlaps the GEMMs beside it in the {overlap['tp_overlap']}"
    if overlap.get("cp_comm"):
        how += "; " + CP_EXCHANGES[overlap["cp_comm"]]
    if overlap.get("stragglers_s", 0.0) > 0:
        how += (f"; each ZeRO-3 gather waits for the group's slowest rank ({overlap['stragglers_s']:.3g} s; "
                f"per-layer time spread {overlap['straggler_spread']:.1%}, "
                f"{overlap['straggler_source'].split(':')[0]})")
    if overlap.get("host_gap_s", 0.0) > 0:
        how += (f"; each MoE block's forward waits {overlap['moe_host_gap_s'] * 1e3:.2f} ms for the host "
                f"({overlap['host_gap_s']:.3g} s: {overlap['moe_gap_source'].split(':')[0]})")
    if overlap.get("gemm_loss", 0.0) > 0:
        how += (f"; GEMMs at {1 - overlap['gemm_loss']:.1%} of the fitted rate, as training runs sustain "
                f"it ({overlap['gemm_loss_source'].split(':')[0]})")
    if overlap.get("attention") == "cudnn":
        forward, backward = overlap["attention_scales"]
        how += (f"; attention on cuDNN's kernel, {forward:.2f}x / {backward:.2f}x the GEMM fits' price "
                f"forward / backward ({overlap['attention_source'].split(':')[0]})")
    return [f"communication, critical stage: {', '.join(kinds) or 'none'}; {how}"]


def _describe(plan: Plan, base: Plan) -> str:
    """The knobs where `plan` differs from `base`, e.g. "(tp 4, dp 32, sp)"."""
    # expert TP that follows TP in both (every dense plan's) is not a difference of its own
    follows = plan.etp == plan.tp and base.etp == base.tp
    diffs = [f"{k} {getattr(plan, k)}" for k in ("dp", "tp", "pp", "cp", "ep", "etp", "zero", "recompute",
                                                 "micro_batch", "schedule", "virtual_stages")
             if getattr(plan, k) != getattr(base, k) and not (k == "etp" and follows)]
    for k, on, off in (("sp", "sp", "no sp"), ("tp_overlap", "TP overlap", "no TP overlap"),
                       ("reshard_after_forward", "reshard after forward", "weights kept from forward"),
                       ("moe_a2a_overlap", "all-to-all overlap", "no all-to-all overlap")):
        if getattr(plan, k) != getattr(base, k):
            diffs.append(on if getattr(plan, k) else off)
    if plan.layer_partition != base.layer_partition:
        diffs.append("layers " + ("balanced" if plan.layer_partition is None
                                  else ",".join(map(str, plan.layer_partition))))
    if plan.placement != base.placement:
        diffs.append("placement " + ",".join(plan.placement))
    return f"({', '.join(diffs) or 'same knobs'})"
