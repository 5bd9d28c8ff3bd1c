"""Serving validation outputs: a CSV of the runs and a self-contained plotly HTML
(predicted vs measured TTFT and TPOT, with the profile's error band)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from meshplan.reports.page import page
from meshplan.validation.serve_suite import ServeValidationRun
from meshplan.core.io import write_atomic


def runs_table(runs: list[ServeValidationRun]) -> pd.DataFrame:
    rows = []
    for r in runs:
        rec, plan = r.record, r.record.plan
        rows.append({
            "plan": r.name, "world_size": rec.world_size, "tp": plan.tp, "pp": plan.pp,
            "replicas": plan.replicas, "batch": plan.batch, "prompt_len": plan.prompt_len,
            "gen_len": plan.gen_len,
            "predicted_ttft_s": rec.predicted("ttft_s"), "measured_ttft_s": rec.measured_ttft_s,
            "ttft_spread_s": float(np.subtract(*np.percentile(rec.ttft_s, [75, 25]))),
            "ttft_error_pct": 100 * r.ttft_error,
            "predicted_tpot_s": rec.predicted("tpot_s"), "measured_tpot_s": rec.measured_tpot_s,
            "tpot_error_pct": 100 * r.tpot_error,
            "predicted_throughput_tokens_per_s": rec.predicted("throughput_tokens_per_s"),
            "measured_throughput_tokens_per_s": rec.measured_throughput_tokens_per_s,
            "predicted_peak_memory_bytes": rec.predicted("peak_memory_bytes"),
            "measured_peak_memory_bytes": rec.measured_peak_memory_bytes})
    return pd.DataFrame(rows)


def write_csv(runs: list[ServeValidationRun], path: Path) -> None:
    write_atomic(path, runs_table(runs).to_csv(index=False))


def write_html(runs: list[ServeValidationRun], summary: dict, band: tuple[float, float],
               path: Path, title: str) -> None:
    table = runs_table(runs)
    fig = make_subplots(rows=1, cols=2, subplot_titles=(
        "time to first token (ms): predicted vs measured",
        "time per output token (ms): predicted vs measured"))
    for col, key in ((1, "ttft"), (2, "tpot")):
        for world, part in table.groupby("world_size"):
            predicted_ms = part[f"predicted_{key}_s"] * 1e3
            fig.add_trace(go.Scatter(
                x=part[f"measured_{key}_s"] * 1e3, y=predicted_ms, mode="markers",
                name=f"{key.upper()}, world size {world}", text=part.plan,
                error_y=dict(type="data", array=predicted_ms * band[0]),
                hovertemplate="%{text}<br>measured %{x:.2f} ms<br>predicted %{y:.2f} ms"),
                row=1, col=col)
        values = pd.concat([table[f"measured_{key}_s"], table[f"predicted_{key}_s"]]) * 1e3
        lo, hi = float(values.min()) * 0.8, float(values.max()) * 1.2
        fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="y = x",
                                 line=dict(dash="dash", color="gray"), showlegend=col == 1),
                      row=1, col=col)
        fig.update_xaxes(title_text="measured (ms)", type="log", row=1, col=col)
        fig.update_yaxes(title_text="predicted (ms)", type="log", row=1, col=col)
    ttft, tpot = summary["ttft"], summary["tpot"]
    fig.update_layout(title=f"{title}: TTFT median |error| {ttft['median_abs_error']:.1%} "
                            f"(Spearman {ttft['spearman']:.2f}), TPOT median |error| "
                            f"{tpot['median_abs_error']:.1%} (Spearman {tpot['spearman']:.2f})",
                      height=560)
    rows = table.assign(ttft_error_pct=table.ttft_error_pct.round(1),
                        tpot_error_pct=table.tpot_error_pct.round(1))
    write_atomic(path, page(title, [fig, rows.to_html(index=False)]))
