"""Calibration report: a profile's fitted curves against the samples it was fitted on, as one
self-contained plotly HTML page (plotly.js inlined, opens offline).

For every fitted quantity of fit_report (GEMMs and memory-bound operators per dtype, each
collective per intra-node group size or inter-node ranks per node): measured vs predicted time
(log-log, with the y = x line) and the relative residual predicted/measured - 1 against size,
the points the fit used and the held-out ones ("held_out_rows" of fit_report) marked apart;
then the fit table (build_stock.fit_table). The samples are the `.samples.json` beside the
profile, or for a stock profile Vidur's data rebuilt through calibration.vidur_import.
Where the profile measured decode GEMMs on cached weights (CachedReads), their read rate
against the working set, one line per row count.
"""
from __future__ import annotations

import html
import re

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from meshplan.reports.page import page
from meshplan.calibration.build_stock import STOCK, default_data_dir, fit_table
from meshplan.hw_profiles.profile import HardwareProfile, load_profile, profile_path, samples_path
from meshplan.calibration.samples import Samples
from meshplan.calibration.vidur_import import load_vidur_samples
from meshplan.core.errors import ProfileError

SPLITS = {"fitted": ("circle", "#1f77b4"), "held-out": ("x", "#d62728"),
          "split not recorded": ("circle-open", "#7f7f7f")}
SIZE_LABELS = {"gemm": "FLOPs (2mnk x batch)", "memory_bound": "bytes read + written",
               "collective": "message bytes (nccl-tests size)"}


def profile_samples(name_or_path: str) -> tuple[HardwareProfile, Samples, str]:
    """The profile, the samples it was fitted on, and where those came from."""
    from meshplan.calibration.measure.run import load_samples  # imports torch

    profile = load_profile(name_or_path)
    variant = profile.variant_of
    if variant:
        raise ProfileError("report", f"{name_or_path} is {variant['base']} scaled by datasheet ratios "
                           "(hw_profiles/variants.py), not measured: no samples of its own",
                           f"report the measured profile it derives from: --report {variant['base']}")
    path = profile_path(name_or_path)
    beside = samples_path(path)
    if beside.is_file():
        return profile, load_samples(beside), str(beside)
    stock = STOCK.get(profile.name.removesuffix("-vidur-fabric"))
    data = default_data_dir()
    if stock and data.is_dir():
        samples = load_vidur_samples(data, stock["gpu"], stock["system"])
        return profile, samples, f"Vidur's measurements under {data} (rebuilt by calibration.vidur_import)"
    fix = ("set MESHPLAN_VIDUR_DATA to a copy of microsoft/vidur's data/profiling" if stock else
           f"measure again with `meshplan profile --out {path}`, which writes the samples beside it")
    raise ProfileError("report", f"{beside} does not exist (the samples {path.name} was fitted on)",
                       fix)


def _split(n: int, quantity_report: dict, rows: np.ndarray) -> np.ndarray:
    if "held_out_rows" not in quantity_report:
        return np.full(n, "split not recorded")
    return np.where(np.isin(rows, quantity_report["held_out_rows"]), "held-out", "fitted")


def quantity_points(profile: HardwareProfile, samples: Samples, quantity: str) -> pd.DataFrame:
    """One row per sample of `quantity`: size, measured_s, predicted_s, split, label; empty
    when the samples hold none of it (e.g. a fit inherited from a base profile)."""
    parts = quantity.split("/")
    if parts[0] == "gemm":
        t = samples.gemm.reset_index(drop=True)
        t = t[(t["dtype"] == parts[1]) & (t["time_s"].astype(float) > 0)]
        m, n, k, b = (t[c].to_numpy(float) for c in ("m", "n", "k", "batch"))
        size, predicted = 2 * m * n * k * b, profile.gemm_time_s(m, n, k, parts[1], b)
        label = [f"{o} m={a:.0f} n={c:.0f} k={d:.0f} batch={e:.0f}" for o, a, c, d, e in
                 zip(t["op"], m, n, k, b)]
    elif parts[0] == "memory_bound":
        t = samples.memory_bound.reset_index(drop=True)
        t = t[(t["dtype"] == parts[1]) & (t["time_s"].astype(float) > 0)]
        size = t["bytes"].to_numpy(float)
        predicted, label = profile.memory_bound_time_s(size, parts[1]), list(t["op"])
    elif parts[0] == "collective" and len(parts) == 4:
        level, kind, key = parts[1], parts[2], int(parts[3][1:])
        t = samples.collectives.reset_index(drop=True)
        t = t[(t["collective"] == kind) & (t["time_s"].astype(float) > 0)]
        n, r = t["group_size"].astype(int), t["ranks_per_node"].astype(int)
        t = t[(n == key) & (r >= n)] if level == "intra" else t[(r == key) & (r < n)]
        size = t["message_bytes"].to_numpy(float)
        predicted = np.array([profile.collective_time_s(kind, s, int(g), int(q)) for s, g, q in
                              zip(size, t["group_size"], t["ranks_per_node"])], dtype=float)
        label = [f"group {g}, {q} per node" for g, q in zip(t["group_size"], t["ranks_per_node"])]
    else:
        raise ValueError(f"unknown quantity {quantity!r}")
    return pd.DataFrame({"size": size, "measured_s": t["time_s"].to_numpy(float),
                         "predicted_s": np.asarray(predicted, dtype=float), "label": label,
                         "split": _split(len(t), profile.fit_report[quantity], t.index.to_numpy())})


def quantity_figure(quantity: str, points: pd.DataFrame) -> go.Figure:
    """Measured vs predicted (log-log, y = x) beside the residual against size."""
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.1, subplot_titles=(
        "predicted vs measured time (s)", "residual predicted/measured - 1 vs size"))
    residual = points["predicted_s"] / points["measured_s"] - 1.0
    for split, (symbol, color) in SPLITS.items():
        sel = points["split"] == split
        if not sel.any():
            continue
        marker = {"symbol": symbol, "color": color, "size": 7}
        common = {"mode": "markers", "marker": marker, "text": points["label"][sel],
                  "legendgroup": split}
        fig.add_trace(go.Scatter(x=points["measured_s"][sel], y=points["predicted_s"][sel],
                              name=f"{split} ({sel.sum()})", **common), row=1, col=1)
        fig.add_trace(go.Scatter(x=points["size"][sel], y=residual[sel], name=split, showlegend=False,
                              **common), row=1, col=2)
    lo = float(points[["measured_s", "predicted_s"]].min().min())
    hi = float(points[["measured_s", "predicted_s"]].max().max())
    fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="y = x",
                             line={"dash": "dash", "color": "black"}), row=1, col=1)
    fig.add_hline(y=0.0, line={"dash": "dash", "color": "black"}, row=1, col=2)
    fig.update_xaxes(type="log", title_text="measured (s)", row=1, col=1)
    fig.update_yaxes(type="log", title_text="predicted (s)", row=1, col=1)
    fig.update_xaxes(type="log", title_text=SIZE_LABELS[quantity.split("/")[0]], row=1, col=2)
    fig.update_yaxes(title_text="relative residual", tickformat=".0%", row=1, col=2)
    fig.update_layout(title=quantity, height=420)
    return fig


CACHED_ANCHOR = "cached-reads"


def cached_reads_figure(profile: HardwareProfile) -> go.Figure:
    """The weight read rate of decode GEMMs of each measured row count (1 / the table's
    seconds per byte; the per-call cost is apart), by working set."""
    reads = profile.cached_reads
    fig = go.Figure()
    sizes_mib = np.asarray(reads.working_set_bytes) / 2 ** 20
    for j, rows in enumerate(reads.rows):
        rate = [1e-9 / row[j] for row in reads.seconds_per_byte]
        fig.add_trace(go.Scatter(x=sizes_mib, y=rate, mode="lines+markers", name=f"{rows:g}-row GEMMs"))
    fig.update_xaxes(type="log", title="working set (MiB)")
    fig.update_yaxes(title="weight read (GB/s)")
    fig.update_layout(height=380, margin=dict(t=30))
    return fig


def _anchor(quantity: str) -> str:
    return "q-" + re.sub(r"[^A-Za-z0-9]+", "-", quantity)


def report_html(profile: HardwareProfile, samples: Samples,
                samples_source: str) -> tuple[str, list[str]]:
    """The page as one string (each fitted quantity's section has id _anchor(quantity)) and
    the quantities it plots."""
    table = fit_table(profile)
    median, p95 = profile.relative_error_band()
    body = [f"<p>{html.escape(profile.device_name)}. Samples: {html.escape(samples_source)}. "
            f"Held-out relative residual |predicted/measured - 1|: median {median:.1%}, p95 "
            f"{p95:.1%} (point-weighted over quantities).</p>",
            table.to_html(float_format=lambda x: f"{x:.1%}", na_rep="-", border=0),
            "<p>fit_* over the points each fit used, held_* over the points it did not see "
            "(the stored parameters are the fit on the former).</p>"]
    if any("held_out_rows" not in profile.fit_report[q] for q in table.index):
        body.append("<p>Some fits do not record which points were held out (profiles built "
                    "before fit_report kept held_out_rows); their points are drawn as 'split not "
                    "recorded'. Refitting the profile marks them.</p>")
    plotted = []
    for quantity in table.index:
        body.append(f'<h2 id="{_anchor(quantity)}">{html.escape(quantity)}</h2>')
        points = quantity_points(profile, samples, quantity)
        if points.empty:
            body.append(f"<p>fitted on samples not in {html.escape(samples_source)} (a fit "
                        "inherited from a base profile); see the table above.</p>")
            continue
        body.append((quantity_figure(quantity, points), _anchor(quantity) + "-plot"))
        plotted.append(quantity)
    reads = profile.cached_reads
    if reads.measured:
        body += [f'<h2 id="{CACHED_ANCHOR}">decode GEMMs on cached weights ({html.escape(reads.dtype)})</h2>',
                 f"<p>{html.escape(reads.source)}; {reads.latency_s * 1e6:.2f} us per call besides. A "
                 "decode step's GEMMs are priced at its working set (its weights and KV cache).</p>",
                 (cached_reads_figure(profile), CACHED_ANCHOR + "-plot")]
    return page(f"meshplan calibration report: {profile.name}", body), plotted
