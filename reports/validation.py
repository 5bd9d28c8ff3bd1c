"""Validation outputs: a CSV of the runs and a self-contained plotly HTML (predicted vs
measured step time with the profile's error band, and peak memory)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from meshplan.reports.page import page
from meshplan.validation.suite import ValidationRun
from meshplan.core.io import write_atomic


def runs_table(runs: list[ValidationRun]) -> pd.DataFrame:
    return pd.DataFrame([{
        "plan": r.name, "world_size": r.record.world_size,
        "predicted_step_time_s": r.record.predicted_step_time_s,
        "measured_step_time_s": r.record.measured_step_time_s,
        "error_pct": 100 * r.error,
        "step_time_spread_s": r.record.step_time_spread_s,
        "predicted_peak_memory_bytes": r.record.predicted_peak_memory_bytes,
        "measured_peak_memory_bytes": max(r.record.measured_peak_memory_by_rank_bytes),
        "memory_error_pct": 100 * r.memory_error} for r in runs])


def write_csv(runs: list[ValidationRun], path: Path, rescaled: list[ValidationRun] | None = None) -> None:
    """The runs; with `rescaled` (the same runs predicted again on a probe-rescaled
    profile), their predictions and errors beside."""
    table = runs_table(runs)
    if rescaled is not None:
        after = table.columns.get_loc("error_pct") + 1
        table.insert(after, "rescaled_predicted_step_time_s", [r.record.predicted_step_time_s for r in rescaled])
        table.insert(after + 1, "rescaled_error_pct", [100 * r.error for r in rescaled])
    write_atomic(path, table.to_csv(index=False))


def write_html(runs: list[ValidationRun], summary: dict, band: tuple[float, float], path: Path,
               title: str) -> None:
    table = runs_table(runs)
    fig = make_subplots(rows=1, cols=2, subplot_titles=(
        "step time: predicted vs measured (error bars: profile's median residual band)",
        "peak memory per rank (MiB): predicted vs measured"))
    for world, part in table.groupby("world_size"):
        fig.add_trace(go.Scatter(
            x=part.measured_step_time_s * 1e3, y=part.predicted_step_time_s * 1e3, mode="markers",
            name=f"world size {world}", text=part.plan,
            error_y=dict(type="data", array=part.predicted_step_time_s * 1e3 * band[0]),
            error_x=dict(type="data", array=part.step_time_spread_s * 1e3),
            hovertemplate="%{text}<br>measured %{x:.1f} ms<br>predicted %{y:.1f} ms"), row=1, col=1)
        fig.add_trace(go.Scatter(
            x=part.measured_peak_memory_bytes / 2**20, y=part.predicted_peak_memory_bytes / 2**20,
            mode="markers", name=f"memory, world size {world}", text=part.plan,
            hovertemplate="%{text}<br>measured %{x:.1f} MiB<br>predicted %{y:.1f} MiB"), row=1, col=2)
    for col, values in ((1, table.measured_step_time_s * 1e3),
                        (2, table.measured_peak_memory_bytes / 2**20)):
        lo, hi = float(values.min()) * 0.8, float(values.max()) * 1.2
        fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="y = x",
                                 line=dict(dash="dash", color="gray"), showlegend=col == 1), row=1, col=col)
    fig.update_xaxes(title_text="measured (ms)", row=1, col=1)
    fig.update_yaxes(title_text="predicted (ms)", row=1, col=1)
    fig.update_xaxes(title_text="measured (MiB)", row=1, col=2)
    fig.update_yaxes(title_text="predicted (MiB)", row=1, col=2)
    fig.update_layout(title=f"{title}: median |error| {summary['median_abs_error']:.1%}, max "
                            f"{summary['max_abs_error']:.1%}, Spearman {summary['spearman']:.2f}",
                      height=560)
    rows = table.assign(error_pct=table.error_pct.round(1), memory_error_pct=table.memory_error_pct.round(1))
    write_atomic(path, page(title, [fig, rows.to_html(index=False)]))
