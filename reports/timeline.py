"""Writers for a simulated pipeline timeline: a Chrome trace (open it in Perfetto or
chrome://tracing) and a plotly Gantt chart saved as a self-contained HTML page.

Besides each rank's compute ops (F, B, W), its pipeline sends (SEND) and its tail (SYNC:
exposed data-parallel communication and the optimizer step), the exposed TP and CP
communication inside each forward and backward, and the exposed EP all-to-all (MoE token
dispatch and combine), is drawn on a communication track, at the end of its op, from the
share of the op it takes (SimulationResult.op_comm)."""
from __future__ import annotations

import json

from meshplan.reports.page import page
from meshplan.core.io import write_atomic
from meshplan.simulator.pipeline_sim import PipelineEvent, PipelineResult

KIND_COLOURS = {"F": "#4c78a8", "B": "#f58518", "W": "#54a24b", "SEND": "#9d9d9d",
                "SYNC": "#e45756", "TP": "#b279a2", "CP": "#72b7b2", "EP": "#eeca3b"}
COMM_KINDS = ("TP", "CP", "EP")
_US_PER_S = 1e6
_MS_PER_S = 1e3


def _event_name(e: PipelineEvent) -> str:
    return e.kind if e.kind == "SYNC" else f"{e.kind} mb{e.microbatch} c{e.chunk}"


def comm_segments(result: PipelineResult, op_comm: dict | None) -> list[PipelineEvent]:
    """The exposed TP, CP and EP communication of each forward and backward, at its op's
    end: op_comm[kind of op][TP, CP or EP] is the share of the op's time it takes (kind
    "F paired" or "B paired" for an op run in an all-to-all overlap pair)."""
    out = []
    for e in result.events:
        shares = (op_comm or {}).get(e.kind + " paired" if e.paired else e.kind, {})
        end = e.end_s
        for kind in COMM_KINDS:
            length = shares.get(kind, 0.0) * (e.end_s - e.start_s)
            if length > 0:
                out.append(PipelineEvent(e.stage, kind, e.microbatch, e.chunk, end - length, end))
                end -= length
    return out


def chrome_trace(result: PipelineResult, label: str = "", op_comm: dict | None = None) -> dict:
    """Trace-event JSON: one process, one thread per stage for its compute ops and tail, one
    more per stage for its communication (sends, exposed TP, CP and EP); complete ("X") events
    with times in microseconds."""
    p = len(result.stage_busy_s)
    meta = [{"name": "process_name", "ph": "M", "pid": 0, "tid": 0,
             "args": {"name": label or "pipeline"}}]
    for s in range(p):
        meta.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": s,
                     "args": {"name": f"stage {s}"}})
        meta.append({"name": "thread_sort_index", "ph": "M", "pid": 0, "tid": s,
                     "args": {"sort_index": 2 * s}})
        meta.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": p + s,
                     "args": {"name": f"stage {s} communication"}})
        meta.append({"name": "thread_sort_index", "ph": "M", "pid": 0, "tid": p + s,
                     "args": {"sort_index": 2 * s + 1}})
    spans = [{"name": _event_name(e), "cat": e.kind, "ph": "X", "pid": 0,
              "tid": p + e.stage if e.kind in ("SEND", *COMM_KINDS) else e.stage,
              "ts": e.start_s * _US_PER_S, "dur": (e.end_s - e.start_s) * _US_PER_S,
              "args": {"kind": e.kind, "microbatch": e.microbatch, "chunk": e.chunk}}
             for e in (*result.events, *comm_segments(result, op_comm))]
    return {"traceEvents": meta + spans, "displayTimeUnit": "ms",
            "otherData": {"label": label, "step_time_s": result.step_time_s}}


def write_chrome_trace(result: PipelineResult, path, label: str = "", op_comm: dict | None = None) -> None:
    write_atomic(path, json.dumps(chrome_trace(result, label, op_comm)))


def timeline_figure(result: PipelineResult, title: str = "", op_comm: dict | None = None):
    """Gantt chart: one row per stage (stage 0 on top), time in ms, one bar trace per kind;
    communication (sends, exposed TP, CP and EP) is drawn as a thin strip under its rank's row."""
    import plotly.graph_objects as go

    fig = go.Figure()
    events = (*result.events, *comm_segments(result, op_comm))
    for kind, colour in KIND_COLOURS.items():
        evs = [e for e in events if e.kind == kind]
        if not evs:
            continue
        send = kind in ("SEND", *COMM_KINDS)
        fig.add_trace(go.Bar(
            name=kind, orientation="h", marker_color=colour, width=0.15 if send else 0.7,
            y=[e.stage + (0.45 if send else 0.0) for e in evs],
            base=[e.start_s * _MS_PER_S for e in evs],
            x=[(e.end_s - e.start_s) * _MS_PER_S for e in evs],
            customdata=[(e.microbatch, e.chunk, e.stage) for e in evs],
            hovertemplate=(f"{kind} stage %{{customdata[2]}} mb %{{customdata[0]}} chunk "
                           "%{customdata[1]}<br>%{base:.3f} ms + %{x:.3f} ms<extra></extra>")))
    p = len(result.stage_busy_s)
    fig.update_layout(
        title=title or f"pipeline timeline: step {result.step_time_s * _MS_PER_S:.3f} ms",
        barmode="overlay", xaxis_title="time (ms)", legend_title="op",
        yaxis={"tickvals": list(range(p)), "ticktext": [f"stage {s}" for s in range(p)],
               "autorange": "reversed"})
    return fig


def write_timeline_html(result: PipelineResult, path, title: str = "", op_comm: dict | None = None) -> None:
    write_atomic(path, page(title or "meshplan pipeline timeline",
                            [timeline_figure(result, title, op_comm)]))
