"""What-if report: plan each scenario (hardware x GPU count, each scaled resource, each
fabric), then draw one self-contained HTML page (plotly.js inline): throughput and MFU
against GPU count per hardware, with a token budget the days to train it and its cost
against GPU count (planner.capacity's arithmetic), the best plan's memory per stage and its
pipeline timeline, the top plans of each scenario, the effect of each scaled resource on
throughput, and the best plan (placement included) on each fabric."""
from __future__ import annotations

import html
from dataclasses import dataclass

from meshplan.reports.page import heading, page
from meshplan.hw_profiles.fabric import parse_fabric
from meshplan.hw_profiles.profile import HardwareProfile
from meshplan.core.errors import PlanError, ProfileError
from meshplan.planner.capacity import Training, check_budget, training
from meshplan.planner.search import SearchResult, search
from meshplan.simulator.model_spec import ModelSpec
from meshplan.simulator.plan import Cluster
from meshplan.reports.timeline import timeline_figure
from meshplan.core.units import GIB

RESOURCES = ("flops", "hbm_bw", "intra_node_bw", "inter_node_bw", "memory")  # HardwareProfile.scaled
TOP_PER_SCENARIO = 5


@dataclass(frozen=True)
class Scenario:
    hardware: str          # the stock profile's name
    gpus: int
    resource: str | None   # the scaled resource, None for the profile as measured
    factor: float
    result: SearchResult | None
    error: str | None      # why no plan fits, when none does
    fabric: str | None = None  # the what-if fabric (hw_profiles.fabric label), None: the profile's

    @property
    def _variant(self) -> str:
        scale = f", {self.resource} x{self.factor:g}" if self.resource else ""
        return scale + (f", fabric {self.fabric}" if self.fabric else "")

    @property
    def series(self) -> str:
        """The scenario without its GPU count: one line of the charts against GPU count."""
        return self.hardware + self._variant

    @property
    def label(self) -> str:
        return f"{self.hardware}, {self.gpus} GPUs{self._variant}"

    @property
    def best(self):
        return self.result.ranked[0] if self.result else None


def plan_scenarios(model: ModelSpec, profiles: list[HardwareProfile], gpu_counts: list[int],
                   gpus_per_node: int | None, fixed: dict, scales: dict[str, list[float]],
                   fabrics: tuple[str, ...] = ()) -> list[Scenario]:
    """Each profile at each GPU count as measured; then each scaled resource at each factor,
    and each fabric ("TOPOLOGY[:OVERSUBSCRIPTION[:NODES_PER_LEAF]]", hw_profiles.fabric.
    parse_fabric), per profile at the largest GPU count (where communication weighs most)."""
    def one(hw: HardwareProfile, base: str, gpus: int, resource=None, factor=1.0, fabric=None) -> Scenario:
        try:
            cluster = Cluster(gpus, gpus_per_node or min(hw.gpus_per_node, gpus))
            return Scenario(base, gpus, resource, factor, search(model, cluster, hw, fixed), None, fabric)
        except PlanError as exc:
            return Scenario(base, gpus, resource, factor, None, str(exc), fabric)

    out = [one(hw, hw.name, n) for hw in profiles for n in gpu_counts]
    for resource, factors in scales.items():
        if resource not in RESOURCES:
            raise PlanError(f"whatif.scale_{resource}", "unknown resource",
                            f"scale one of {', '.join(RESOURCES)}")
        for hw in profiles:
            for f in factors:
                out.append(one(hw.scaled(**{resource: f}), hw.name, max(gpu_counts), resource, f))
    for spec in fabrics:
        for hw in profiles:
            try:
                fabric = parse_fabric(spec, hw.fabric)
            except ProfileError as exc:
                where = "" if exc.field == "fabric" else f"{exc.field}: "
                raise PlanError("whatif.fabric", where + exc.problem, exc.fix) from None
            out.append(one(hw.with_fabric(fabric), hw.name, max(gpu_counts), fabric=fabric.label))
    return out


@dataclass(frozen=True)
class Budget:
    """The tokens to train (and the price of one GPU-hour, to cost it)."""

    tokens: float
    gpu_hour_price: float | None = None

    def __post_init__(self):
        check_budget(self.tokens, price=self.gpu_hour_price)

    def of(self, s: Scenario, result) -> Training:
        """Training the budget with one of the scenario's plans (planner.capacity.training)."""
        return training(self.tokens, result.plan.global_batch, result.plan.seq_len,
                        result.step_time_s, s.gpus, self.gpu_hour_price)


def _throughput_figure(base: list[Scenario]):
    from plotly.subplots import make_subplots
    import plotly.graph_objects as go

    fig = make_subplots(rows=1, cols=2, subplot_titles=("throughput (tokens/s)", "MFU"))
    for hw in dict.fromkeys(s.hardware for s in base):
        pts = [s for s in base if s.hardware == hw and s.best]
        xs = [s.gpus for s in pts]
        fig.add_trace(go.Scatter(x=xs, y=[s.best.tokens_per_s for s in pts], name=hw,
                                 mode="lines+markers", legendgroup=hw), row=1, col=1)
        fig.add_trace(go.Scatter(x=xs, y=[s.best.mfu for s in pts], name=hw, mode="lines+markers",
                                 legendgroup=hw, showlegend=False), row=1, col=2)
    fig.update_xaxes(title_text="GPUs", type="log")
    fig.update_yaxes(tickformat=".0%", row=1, col=2)
    fig.update_layout(title="best plan per hardware and GPU count")
    return fig


def _training_figure(scenarios: list[Scenario], budget: Budget):
    from plotly.subplots import make_subplots
    import plotly.graph_objects as go

    priced = budget.gpu_hour_price is not None
    titles = (f"days to train {budget.tokens:g} tokens",) + (
        (f"cost at {budget.gpu_hour_price:g} per GPU-hour",) if priced else ())
    fig = make_subplots(rows=1, cols=len(titles), subplot_titles=titles)
    for series in dict.fromkeys(s.series for s in scenarios):
        pts = sorted((s for s in scenarios if s.series == series and s.best), key=lambda s: s.gpus)
        runs = [budget.of(s, s.best) for s in pts]
        mode = "lines+markers" if len(pts) > 1 else "markers"
        common = dict(x=[s.gpus for s in pts], mode=mode, legendgroup=series,
                      text=[s.best.plan.summary() for s in pts])
        fig.add_trace(go.Scatter(y=[t.days for t in runs], name=series, **common), row=1, col=1)
        if priced:
            fig.add_trace(go.Scatter(y=[t.cost for t in runs], name=series, showlegend=False,
                                     **common), row=1, col=2)
    fig.update_xaxes(title_text="GPUs", type="log")
    fig.update_yaxes(title_text="days", type="log", row=1, col=1)
    fig.update_layout(title=f"time{' and cost' if priced else ''} to train with the best plan "
                            "per scenario (steps = ceil(tokens / (global batch x sequence)))")
    return fig


def _memory_figure(s: Scenario):
    import plotly.graph_objects as go

    stages = s.best.stages
    fig = go.Figure()
    for part in ("weights", "gradients", "optimizer", "activations", "buffers"):
        fig.add_trace(go.Bar(name=part, x=[f"stage {i}" for i in range(len(stages))],
                             y=[st.memory.to_json()[part] / GIB for st in stages]))
    fig.add_hline(y=s.best.memory_limit_bytes / GIB, line_dash="dash", annotation_text="usable")
    fig.update_layout(barmode="stack", yaxis_title="GiB per device",
                      title=f"memory per pipeline stage: best plan of {s.label}")
    return fig


def _scaling_figure(scaled: list[Scenario], base: list[Scenario]):
    import plotly.graph_objects as go

    fig = go.Figure()
    largest = max(s.gpus for s in base)
    for resource in dict.fromkeys(s.resource for s in scaled):
        for hw in dict.fromkeys(s.hardware for s in scaled):
            ref = [s for s in base if s.hardware == hw and s.gpus == largest and s.best]
            pts = sorted(([(1.0, ref[0].best.tokens_per_s)] if ref else [])
                         + [(s.factor, s.best.tokens_per_s) for s in scaled
                            if s.resource == resource and s.hardware == hw and s.best])
            fig.add_trace(go.Scatter(x=[f for f, _ in pts], y=[t for _, t in pts],
                                     mode="lines+markers", name=f"{resource} ({hw})"))
    fig.update_layout(title=f"effect of each scaled resource, {largest} GPUs (best plan replanned)",
                      xaxis_title="scale factor", yaxis_title="tokens/s", xaxis_type="log")
    return fig


def _fabric_figure(fabrics: list[Scenario], base: list[Scenario]):
    import plotly.graph_objects as go

    fig = go.Figure()
    largest = max(s.gpus for s in base)
    for hw in dict.fromkeys(s.hardware for s in fabrics):
        ref = [s for s in base if s.hardware == hw and s.gpus == largest and s.best]
        pts = [("the profile's", r) for r in ref] + [(s.fabric, s) for s in fabrics
                                                     if s.hardware == hw and s.best]
        fig.add_trace(go.Bar(name=hw, x=[f for f, _ in pts], y=[s.best.tokens_per_s for _, s in pts],
                             text=[s.best.plan.summary() for _, s in pts]))
    fig.update_layout(title=f"best plan per fabric, {largest} GPUs (replanned: placement included)",
                      xaxis_title="fabric (topology:oversubscription:nodes per leaf)",
                      yaxis_title="tokens/s", barmode="group")
    return fig


def _table_figure(scenarios: list[Scenario], budget: Budget | None):
    import plotly.graph_objects as go

    header = ["scenario", "rank", "plan", "step s", "tokens/s", "MFU", "peak GiB"]
    widths = [3, 1, 5, 1.3, 1.6, 1, 1.2]
    priced = budget is not None and budget.gpu_hour_price is not None
    if budget is not None:
        header += ["days"] + (["cost"] if priced else [])
        widths += [1.2] + ([1.6] if priced else [])
    rows = []
    for s in scenarios:
        if s.result is None:
            rows.append((s.label, "-", s.error) + ("",) * (len(header) - 3))
        for i, r in enumerate(s.result.ranked[:TOP_PER_SCENARIO] if s.result else (), start=1):
            row = (s.label, str(i), r.plan.summary(), f"{r.step_time_s:.3f}", f"{r.tokens_per_s:,.0f}",
                   f"{r.mfu:.1%}", f"{r.peak_memory_bytes / GIB:.1f}")
            if budget is not None:
                t = budget.of(s, r)
                row += (f"{t.days:,.2f}",) + ((f"{t.cost:,.0f}",) if priced else ())
            rows.append(row)
    cols = list(zip(*rows)) if rows else [()] * len(header)
    fig = go.Figure(go.Table(header={"values": header}, cells={"values": [list(c) for c in cols]},
                             columnwidth=widths))
    fig.update_layout(title=f"top {TOP_PER_SCENARIO} plans per scenario",
                      height=120 + 28 * max(len(rows), 1))
    return fig


def scenarios_json(scenarios: list[Scenario], budget: Budget | None = None) -> list[dict]:
    """Each scenario's best plan and its figures (with a budget: steps, days and cost)."""
    out = []
    for s in scenarios:
        row = {"label": s.label, "hardware": s.hardware, "gpus": s.gpus, "resource": s.resource,
               "factor": s.factor, "fabric": s.fabric, "error": s.error, "plan": None}
        if s.best:
            r = s.best
            row.update(plan=r.plan.to_dict(), step_time_s=r.step_time_s, tokens_per_s=r.tokens_per_s,
                       mfu=r.mfu, peak_memory_bytes=r.peak_memory_bytes)
            if budget is not None:
                t = budget.of(s, r)
                row.update(steps=t.steps, days=t.days, cost=t.cost)
        out.append(row)
    return out


def report_html(model: ModelSpec, scenarios: list[Scenario], budget: Budget | None = None) -> str:
    """The page as one string; plotly.js is inlined once, so it opens offline."""
    base = [s for s in scenarios if s.resource is None and s.fabric is None]
    scaled = [s for s in scenarios if s.resource is not None]
    fabrics = [s for s in scenarios if s.fabric is not None]
    solved = [s for s in base if s.best]
    if not solved:
        raise PlanError("cluster.num_gpus", "no scenario has a plan that fits: "
                        + "; ".join(f"{s.label}: {s.error}" for s in base), "add GPUs or hardware")
    top = max(solved, key=lambda s: s.best.tokens_per_s)
    figures = [("Throughput and MFU", _throughput_figure(base))]
    if budget is not None:
        figures.append(("Time and cost to train", _training_figure(scenarios, budget)))
    figures += [("Memory per stage", _memory_figure(top)),
                ("Pipeline timeline", timeline_figure(top.best.pipeline, top.best.label,
                                                      top.best.op_comm)),
                ("Top plans", _table_figure(scenarios, budget))]
    if scaled:
        figures.append(("Scaled resources", _scaling_figure(scaled, base)))
    if fabrics:
        figures.append(("Fabric", _fabric_figure(fabrics, base)))
    body = [f"<p>best overall: {html.escape(top.label)}, {top.best.tokens_per_s:,.0f} tokens/s, "
            f"MFU {top.best.mfu:.1%}, step {top.best.step_time_s:.3f} s (error band "
            f"±{top.best.error_band[0]:.0%} median, ±{top.best.error_band[1]:.0%} p95)</p>"]
    if budget is None:
        body.append("<p>No token budget given: for the days to train and the cost against GPU "
                    "count, run <code>meshplan whatif ... --tokens 2e12 --gpu-hour-price 2.5</code>"
                    "</p>")
    else:
        t = budget.of(top, top.best)
        cost = "" if t.cost is None else f", costing {t.cost:,.0f} at {budget.gpu_hour_price:g} per GPU-hour"
        body.append(f"<p>{budget.tokens:g} tokens on the best overall: {t.steps:,} steps, "
                    f"{t.days:,.2f} days{html.escape(cost)}</p>")
    for title, fig in figures:
        body += [heading(title), fig]
    return page(f"meshplan what-if: {model.name}", body)
