"""How many GPUs, how long, how much: the best plan at each candidate GPU count, the time
to train a token budget with it, its cost at a GPU-hour price, and the smallest cluster that
meets a deadline.

    time to train = ceil(tokens / (global batch x sequence)) steps x step time
    cost = GPUs x time in hours x price per GPU-hour

GPU counts are tried from the smallest up; counts where no plan is legal or fits are
reported with the reason and skipped, as a brute-force loop over the counts would."""
from __future__ import annotations

import math
from dataclasses import dataclass

from meshplan.core.errors import MeshplanError, PlanError
from meshplan.core.progress import progress_bar
from meshplan.hw_profiles.profile import HardwareProfile
from meshplan.planner.search import search
from meshplan.simulator.model_spec import ModelSpec
from meshplan.simulator.plan import Cluster, field_issues
from meshplan.simulator.train import SimulationResult

SECONDS_PER_DAY = 86400.0
MAX_GPUS = 1 << 20


@dataclass(frozen=True)
class Option:
    """One GPU count: its best plan and what training with it takes, or why it has none."""

    gpus: int
    result: SimulationResult | None
    steps: int
    days: float | None
    cost: float | None
    why_not: str = ""

    def to_json(self) -> dict:
        return {"gpus": self.gpus, "steps": self.steps, "days": self.days, "cost": self.cost,
                "step_time_s": self.result.step_time_s if self.result else None,
                "plan": self.result.plan.to_dict() if self.result else None, "why_not": self.why_not}


@dataclass(frozen=True)
class Capacity:
    options: tuple[Option, ...]
    answer: Option | None        # the smallest count meeting the deadline (or the fastest)
    deadline_days: float | None

    def to_json(self) -> dict:
        return {"deadline_days": self.deadline_days, "answer": self.answer.to_json() if self.answer else None,
                "options": [o.to_json() for o in self.options]}


def gpu_counts(text: str, gpus_per_node: int) -> list[int]:
    """"256,512,1024" as given; "64-4096" as the whole nodes from 64 to 4096 GPUs doubling
    (one node, two, four, ...); each count in whole nodes once it reaches a node."""
    issues = []
    counts: set[int] = set()
    for part in (p.strip() for p in text.split(",")):
        lo_text, dash, hi_text = part.partition("-")
        try:
            lo, hi = int(lo_text), int(hi_text) if dash else int(lo_text)
        except ValueError:
            issues.append(("cluster.num_gpus", f"{part!r} is not a count or a range", "write e.g. 256,512 or 64-4096"))
            continue
        if not 1 <= lo <= hi <= MAX_GPUS:
            issues.append(("cluster.num_gpus", f"{part!r} is not a range of counts from 1 to {MAX_GPUS}",
                           "write LOW-HIGH with 1 <= LOW <= HIGH"))
            continue
        count = lo
        while count <= hi:
            counts.add(count)
            if not dash:
                break
            count *= 2
    issues += [("cluster.num_gpus", f"{count} GPUs do not fill whole nodes of {gpus_per_node}",
                "use multiples of the GPUs per node")
               for count in sorted(counts) if count > gpus_per_node and count % gpus_per_node]
    if issues:
        raise PlanError.of(issues)
    return sorted(counts)


@dataclass(frozen=True)
class Training:
    """Training a token budget at one plan's step time on `gpus` GPUs."""

    steps: int
    days: float
    cost: float | None   # at the price per GPU-hour; None without a price


def steps_to_train(tokens: float, global_batch: int, seq_len: int) -> int:
    return math.ceil(tokens / (global_batch * seq_len))


def training(tokens: float, global_batch: int, seq_len: int, step_time_s: float, gpus: int,
             price: float | None = None) -> Training:
    """ceil(tokens / (global batch x sequence)) steps x step time; GPUs x hours x price."""
    steps = steps_to_train(tokens, global_batch, seq_len)
    seconds = steps * step_time_s
    cost = gpus * seconds / 3600 * price if price is not None else None
    return Training(steps, seconds / SECONDS_PER_DAY, cost)


def check_budget(tokens: float, deadline_days: float | None = None, price: float | None = None) -> None:
    """One PlanError naming each of the token budget, deadline and price that is not a
    usable number."""
    issues = []
    if not (math.isfinite(tokens) and tokens > 0):
        issues.append(("search.tokens", f"{tokens!r} tokens", "give a positive token budget, e.g. 2e12"))
    if deadline_days is not None and not (math.isfinite(deadline_days) and deadline_days > 0):
        issues.append(("search.days", f"{deadline_days!r} days", "give a positive deadline"))
    if price is not None and not (math.isfinite(price) and price >= 0):
        issues.append(("search.gpu_hour_price", f"{price!r}", "give a price per GPU-hour >= 0"))
    if issues:
        raise PlanError.of(issues)


def option(model: ModelSpec, hw: HardwareProfile, cluster: Cluster, fixed: dict, tokens: float,
           price: float | None) -> Option:
    """The best plan at this GPU count and the time and cost of training `tokens` with it."""
    try:
        best = search(model, cluster, hw, fixed).ranked[0]
    except MeshplanError as exc:
        steps = steps_to_train(tokens, fixed["global_batch"], fixed["seq_len"])
        return Option(cluster.num_gpus, None, steps, None, None, exc.render())
    t = training(tokens, fixed["global_batch"], fixed["seq_len"], best.step_time_s, cluster.num_gpus, price)
    return Option(cluster.num_gpus, best, t.steps, t.days, t.cost)


def capacity_search(model: ModelSpec, hw: HardwareProfile, counts: list[int], gpus_per_node: int,
                    fixed: dict, tokens: float, deadline_days: float | None = None,
                    price: float | None = None, progress: bool = False) -> Capacity:
    """Each count's best plan from the smallest count up; with a deadline, stop at the
    first (smallest) count that meets it."""
    check_budget(tokens, deadline_days, price)
    issues = field_issues(fixed)   # a count's failed search must still be able to count steps
    if issues:
        raise PlanError.of(issues)
    options = []
    with progress_bar(len(counts), "GPU counts", progress) as bar:
        for count in counts:
            bar.describe(f"{count} GPUs")
            opt = option(model, hw, Cluster(count, min(gpus_per_node, count)), fixed, tokens, price)
            options.append(opt)
            bar.advance()
            if deadline_days is not None and opt.days is not None and opt.days <= deadline_days:
                return Capacity(tuple(options), opt, deadline_days)
    done = [o for o in options if o.days is not None]
    answer = None if deadline_days is not None or not done else min(done, key=lambda o: o.days)
    return Capacity(tuple(options), answer, deadline_days)
