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
from meshplan.planner.neighbours import knob_changes, try_plan
from meshplan.planner.search import distinct
from meshplan.simulator.plan import Cluster, Plan
from meshplan.hw_profiles.accuracy import end_to_end, end_to_end_text, plan_kind
from meshplan.simulator.train import BREAKDOWN_KEYS, SimulationResult, mfu_text
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
    # terms that move the other way by more than 1% (a critical stage of other layers: its
    # compute shrinks as the wait for the others, the bubble, grows), largest first
    offsets: tuple[tuple[str, float], ...] = ()

    def text(self) -> str:
        if self.limit:
            return f"{self.label}: ruled out ({self.limit})"
        if abs(self.slower_rel) < TIE_REL:
            return f"{self.label}: ties (within {TIE_REL:.1%})"
        faster = self.slower_rel < 0
        terms = _terms(self.grows, "shrinks" if faster else "grows")
        if self.offsets:
            k, v = self.offsets[0]
            terms += f"; {k} {'grows' if faster else 'shrinks'} {abs(v):.3g} s"
        return f"{self.label}: {abs(self.slower_rel):.1%} {'faster' if faster else 'slower'} ({terms})"

    def to_json(self) -> dict:
        return {"label": self.label, "plan": self.plan, "step_time_s": self.step_time_s,
                "slower_rel": self.slower_rel, "grows_s": dict(self.grows), "offsets_s": dict(self.offsets),
                "limit": self.limit, "text": self.text()}


def _terms(deltas, verb: str) -> str:
    if not deltas:
        return "no term changes by more than 1%"
    return ", ".join(f"{k} {verb} {abs(v):.3g} s" for k, v in deltas[:2])


def compare(winner: SimulationResult, other: SimulationResult, label: str) -> Comparison:
    """`other` against `winner`: relative slowdown; the terms that grow when slower (or
    shrink when faster), and those that move the other way, each moving more than 1% of the
    winner's step, largest first."""
    rel = other.step_time_s / winner.step_time_s - 1.0
    sign = 1.0 if rel >= 0 else -1.0
    deltas = sorted(((k, other.breakdown_s[k] - winner.breakdown_s[k]) for k in BREAKDOWN_KEYS),
                    key=lambda kv: -sign * kv[1])
    moved = tuple((k, d) for k, d in deltas if sign * d > 0.01 * winner.step_time_s)
    offsets = tuple((k, d) for k, d in reversed(deltas) if -sign * d > 0.01 * winner.step_time_s)
    if not other.fits:
        return Comparison(label, other.plan.to_dict(), other.step_time_s, rel, moved,
                          f"memory: needs {other.peak_memory_bytes / GIB:.1f} GiB, "
                          f"{other.memory_limit_bytes / GIB:.1f} GiB usable")
    return Comparison(label, other.plan.to_dict(), other.step_time_s, rel, moved, offsets=offsets)


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


def explain(model: ModelSpec, cluster: Cluster, hw: HardwareProfile,
            ranked: tuple[SimulationResult, ...], fixed: dict, tried: dict | None = None) -> Explanation:
    """The winner of `ranked` explained against its runner-up and its single-knob changes
    (those the search already tried, kept in `tried`, not simulated again)."""
    winner = ranked[0]
    rows = distinct(ranked, 2)  # the table's runner-up: another interleave of the winner is no rival
    second = rows[1][0] if len(rows) > 1 else (ranked[1] if len(ranked) > 1 else None)
    runner = compare(winner, second, "runner-up " + _describe(second.plan, winner.plan)) if second else None
    changes = []
    for label, knob, fields in knob_changes(winner.plan, model.num_experts > 0, model.num_layers):
        held = f" (you fixed --{knob.replace('_', '-')})" if knob in fixed else ""
        if isinstance(fields, str):
            changes.append(Comparison(label + held, limit=fields, held=bool(held)))
            continue
        other = try_plan(model, cluster, hw, {**winner.plan.to_dict(), **fields, "layer_partition": None}, tried)
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
    """Each kind's communication on the critical stage (the pipeline's sends on every stage,
    which its fill and drain wait on), whole and exposed, and the overlap and contention
    assumed."""
    kinds = [f"{kind.upper()} {c['total_s']:.3g} s" + (f" over every stage, {c['stage_s']:.3g} s the critical "
                                                      "stage's" if "stage_s" in c else "")
             + f" ({c['exposed_s']:.3g} s exposed)"
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
