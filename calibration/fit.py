"""Fit a HardwareProfile from measured Samples (any source: Vidur CSVs, torch on this machine,
nccl-tests logs).

Every quantity (GEMMs of one dtype, memory-bound ops of one dtype, one collective at one
level and size) is fitted by robust least squares on log time (scipy soft_l1, scale 5%: a
few cuBLAS kernel-selection or network outliers must not drag the curve; memory-bound ops
use plain least squares, see _fit_memory_bound), on a random (1 - holdout_fraction) of its
points; the stored parameters are that fit (no refit on all points, so held-out residuals
describe the stored model), and fit_report gives the relative residuals
|pred/measured - 1| (median, p95, max) on the fitted and on the held-out points, and the
positions of the held-out rows in their samples table ("held_out_rows").

When the samples' cross-node rows come from a cluster whose fabric is not the one the profile
describes, `fabric` (published nccl-tests figures of the described fabric) sets the inter-node
level instead (fabric_inter_node); the measured cross-node fit is kept as reference evidence
in fit_report and extra, not used.

refit_collectives refits only the collectives (e.g. from nccl-tests logs) on top of an
existing profile, keeping its device description and compute fits.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
from scipy.optimize import least_squares

from meshplan.hw_profiles.collective_model import KINDS, CollectiveFit, Curve, Line, bus_factor, \
    collective_time_s, intra_time_s, ring_steps
from meshplan.hw_profiles.gemm_model import DTYPE_BYTES, OP_CLASSES, GemmFit, MemoryBoundFit, \
    gemm_time_s, memory_bound_time_s
from meshplan.hw_profiles.profile import BUS_RATE, LATENCY_S, HardwareProfile
from meshplan.calibration.samples import Samples
from meshplan.core.errors import ProfileError

BASE_FIELDS = {"name": str, "device_name": str, "memory_bytes": int, "peak_flops": dict,
               "hbm_bytes_per_s": float, "gpus_per_node": int, "nics_per_node": int,
               "nic_bytes_per_s": float, "intra_node_link": str, "sources": (list, tuple)}
# Dtype to borrow a GEMM / memory-bound fit from when a dtype was not measured: the sibling
# on the same units (fp16/bf16 share tensor cores; fp32/tf32 share the fp32 datapath and
# data size), else the first measured one.
SIBLING = {"bf16": "fp16", "fp16": "bf16", "tf32": "fp32", "fp32": "tf32"}
BORROW_ORDER = ("bf16", "fp16", "tf32", "fp32")
# Kind to derive an unmeasured collective from, best first.
DERIVE_ORDER = ("all_reduce", "reduce_scatter", "all_gather", "broadcast", "all_to_all",
                "send_recv")
TWO_REGIME_MIN_POINTS = 8
ROBUST_SCALE = 0.05
FABRIC_FIELDS = ("name", "allreduce_busbw_bytes_per_s", "nic_busbw_bytes_per_s", "alpha_s", "sources")
FABRIC_CALIBRATION_BYTES = 2**30  # large enough for the bandwidth regime (nccl-tests peak busbw)


def _stats(pred, measured) -> dict:
    rel = np.abs(np.asarray(pred, dtype=float) / np.asarray(measured, dtype=float) - 1.0)
    if rel.size == 0:
        return {"points": 0}
    return {"points": int(rel.size), "median": float(np.median(rel)),
            "p95": float(np.quantile(rel, 0.95)), "max": float(rel.max())}


def _split(n: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of the points to fit on; the rest is held out (none when n < 5)."""
    train = np.ones(n, dtype=bool)
    held = int(round(n * fraction)) if n >= 5 else 0
    if held:
        train[rng.choice(n, size=held, replace=False)] = False
    return train


def _exp(p) -> list[float]:
    """Parameters are fitted as logs (positive, scale-free); back to plain floats."""
    return [float(v) for v in np.exp(p)]


def _fit_log(predict, p0, bounds, measured, weights=None, loss="soft_l1") -> np.ndarray:
    """Parameters minimising the (robust) loss of log(predict(p)) - log(measured)."""
    log_t = np.log(measured)
    w = np.ones_like(log_t) if weights is None else weights

    def residual(p):
        return w * (np.log(predict(p)) - log_t)
    p0 = np.clip(p0, bounds[0], bounds[1])
    return least_squares(residual, p0, bounds=bounds, loss=loss, f_scale=ROBUST_SCALE).x


def _quantity_report(pred, t, train, rows, form: str, **more) -> dict:
    """Residuals on the fitted and held-out points; rows = the points' positions in their
    samples table."""
    return {"form": form, "fitted": _stats(pred[train], t[train]),
            "held_out": _stats(pred[~train], t[~train]),
            "held_out_rows": [int(i) for i in np.asarray(rows)[~train]], **more}


def _fit_gemm(df: pd.DataFrame, peak: float, hbm: float, dtype_bytes: int, train) -> GemmFit:
    m, n, k, b, t = (df[c].to_numpy(float)[train] for c in ("m", "n", "k", "batch", "time_s"))

    def fit_of(p):
        return GemmFit(*_exp(p))
    p0 = np.log([0.5 * t.min(), 0.7, 64.0, 64.0, 64.0, 0.8])
    bounds = (np.log([1e-9, 1e-4, 1e-3, 1e-3, 1e-3, 1e-3]), np.log([1e-2, 2.0, 1e6, 1e6, 1e6, 4.0]))
    p = _fit_log(lambda p: gemm_time_s(fit_of(p), m, n, k, b, peak, hbm, dtype_bytes), p0, bounds, t)
    return fit_of(p)


def _fit_memory_bound(df: pd.DataFrame, hbm: float, train) -> MemoryBoundFit:
    """One latency for every op; one efficiency overall (the fallback for unmeasured
    classes) and one per operator class measured (OP_CLASSES), each by least squares."""
    x, t, ops = df["bytes"].to_numpy(float)[train], df["time_s"].to_numpy(float)[train], \
        df["op"].to_numpy()[train]
    # The overall curve: weight each op equally, however many points it has, and use plain
    # least squares: an op systematically off the curve is signal, not an outlier.
    counts = pd.Series(ops).map(pd.Series(ops).value_counts()).to_numpy(float)
    p = _fit_log(lambda p: memory_bound_time_s(MemoryBoundFit(*_exp(p)), x, hbm),
                 np.log([0.5 * t.min(), 0.8]), (np.log([1e-9, 1e-3]), np.log([1e-1, 4.0])), t,
                 weights=1.0 / np.sqrt(counts), loss="linear")
    latency, overall = _exp(p)
    classes = pd.Series(ops).map(OP_CLASSES).to_numpy()
    op_eff = {}
    for cls in sorted({c for c in classes if isinstance(c, str)}):
        mine = classes == cls
        q = _fit_log(lambda q: memory_bound_time_s(MemoryBoundFit(latency, float(np.exp(q[0]))),
                                                   x[mine], hbm),
                     np.log([overall]), (np.log([1e-3]), np.log([4.0])), t[mine], loss="linear")
        op_eff[cls] = float(np.exp(q[0]))
    return MemoryBoundFit(latency, overall, op_eff)


def _memory_bound_predictions(fit: MemoryBoundFit, df: pd.DataFrame, hbm: float) -> np.ndarray:
    """Each row at its operator class's efficiency."""
    classes = df["op"].map(OP_CLASSES)
    return np.array([float(memory_bound_time_s(fit, b, hbm, c if isinstance(c, str) else None))
                     for b, c in zip(df["bytes"].to_numpy(float), classes)])


def _borrow(fits: dict, what: str) -> tuple[dict, list[str]]:
    """Fill every dtype, borrowing unmeasured ones (see SIBLING); returns notes for sources."""
    full, notes = dict(fits), []
    for dtype in DTYPE_BYTES:
        if dtype in fits:
            continue
        donor = SIBLING[dtype] if SIBLING[dtype] in fits else next(d for d in BORROW_ORDER if d in fits)
        full[dtype] = fits[donor]
        notes.append(f"{what} {dtype}: not measured; fit of {donor} reused against the {dtype} "
                     f"peak/bandwidth ({'same units' if donor == SIBLING[dtype] else 'other units'})")
    return full, notes


def compute_fits(samples: Samples, base: dict, fraction: float, rng) -> tuple[dict, dict, dict, list]:
    gemm_df = samples.gemm.reset_index(drop=True)
    gemm_df = gemm_df[gemm_df["time_s"].astype(float) > 0]
    if gemm_df.empty:
        raise ProfileError("samples.gemm", "has no timed GEMM rows", "measure GEMMs before fitting")
    hbm, gemm, mem, report = float(base["hbm_bytes_per_s"]), {}, {}, {}
    for dtype, df in gemm_df.groupby("dtype"):
        if dtype not in DTYPE_BYTES:
            raise ProfileError("samples.gemm.dtype", f"{dtype!r} is unknown",
                               f"use one of {list(DTYPE_BYTES)}")
        rows, df = df.index, df.reset_index(drop=True)
        train = _split(len(df), fraction, rng)
        args = (float(base["peak_flops"][dtype]), hbm, DTYPE_BYTES[dtype])
        gemm[dtype] = fit = _fit_gemm(df, *args, train)
        report[f"gemm/{dtype}"] = _quantity_report(
            gemm_time_s(fit, *(df[c].to_numpy(float) for c in ("m", "n", "k", "batch")), *args),
            df["time_s"].to_numpy(float), train, rows,
            "latency + max(2mnk/(peak*eff_max*prod x/(x+x_half)), bytes/(hbm*hbm_eff))")
    mem_df = samples.memory_bound.reset_index(drop=True)
    mem_df = mem_df[mem_df["time_s"].astype(float) > 0]
    for dtype, df in mem_df.groupby("dtype"):
        rows, df = df.index, df.reset_index(drop=True)
        train = _split(len(df), fraction, rng)
        mem[dtype] = fit = _fit_memory_bound(df, hbm, train)
        pred = _memory_bound_predictions(fit, df, hbm)
        t = df["time_s"].to_numpy(float)
        report[f"memory_bound/{dtype}"] = _quantity_report(
            pred, t, train, rows, "latency + bytes/(hbm*eff of the op's class)",
            by_op={op: _stats(pred[(df["op"] == op).to_numpy()], t[(df["op"] == op).to_numpy()])
                   for op in sorted(df["op"].unique())})
    notes = []
    if not mem:
        donor = gemm[next(d for d in BORROW_ORDER if d in gemm)]
        mem = {d: MemoryBoundFit(donor.latency_s, donor.hbm_eff) for d in gemm}
        notes.append("memory-bound ops: no samples; latency and bandwidth of the GEMM fit's "
                     "memory-bound regime")
    gemm, gemm_notes = _borrow(gemm, "gemm")
    mem, mem_notes = _borrow(mem, "memory-bound")
    return gemm, mem, report, notes + gemm_notes + mem_notes


def _curve_fit(predict_with, x, t, two_regimes: bool) -> Curve:
    """Alpha-beta curve (one or two regimes) minimising the robust log-time loss, where
    predict_with(curve) gives the modelled times of the points."""
    a0 = float(np.median(t[x <= np.quantile(x, 0.1)]))
    big = x >= np.quantile(x, 0.7)
    slope = np.polyfit(x[big], t[big], 1)[0] if big.sum() >= 2 and np.ptp(x[big]) > 0 else 0.0
    b0 = 1.0 / slope if slope > 0 else float(x.max() / t.max())
    if not two_regimes:
        p = _fit_log(lambda p: predict_with(Curve(Line(*_exp(p)), Line(*_exp(p)), "")),
                     np.log([a0, b0]), (np.log([1e-9, 1e3]), np.log([10.0, 1e15])), t)
        return Curve(Line(*_exp(p)), Line(*_exp(p)), "measured")

    def curve(p):  # p = log(alpha_small), log(alpha_large/alpha_small), log(bw_large), log(bw_large/bw_small)
        return Curve(Line(*_exp([p[0], p[2] - p[3]])), Line(*_exp([p[0] + p[1], p[2]])), "")
    bounds = ([np.log(1e-9), 0.0, np.log(1e3), 0.0], [np.log(10.0), np.log(1e4), np.log(1e15), np.log(1e6)])
    best, best_cost = None, np.inf
    for ratios in ((np.log(2.0), np.log(3.0)), (np.log(5.0), np.log(10.0)), (0.01, 0.01)):
        p = _fit_log(lambda p: predict_with(curve(p)), [np.log(a0 / 2), *ratios[:1], np.log(b0), ratios[1]],
                     bounds, t)
        cost = np.sum(np.log1p((np.log(predict_with(curve(p))) - np.log(t)) ** 2 / ROBUST_SCALE ** 2))
        if cost < best_cost:
            best, best_cost = p, cost
    c = curve(best)
    if c.small.busbw_bytes_per_s < BUS_RATE[0]:  # a flat latency regime: the min of the two only
        c = Curve(Line(c.small.alpha_s, BUS_RATE[0]), c.large, "")  # below a few bytes either way
    if c.large.alpha_s > LATENCY_S[1]:  # a large regime no size reaches: one regime is the fit
        return Curve(c.small, c.small, "measured (one regime: the second fitted above any latency)")
    return Curve(c.small, c.large, "measured (two regimes)")


def _fit_intra(df: pd.DataFrame, fraction: float, rng) -> tuple[dict, dict]:
    table, report = {}, {}
    for (kind, n), g in df.groupby(["collective", "group_size"]):
        n = int(n)
        x = g["message_bytes"].to_numpy(float) * bus_factor(kind, n)
        t = g["time_s"].to_numpy(float)
        train = _split(len(t), fraction, rng)
        curve = _curve_fit(lambda c: c.time_s(x[train]), x[train], t[train],
                           train.sum() >= TWO_REGIME_MIN_POINTS)
        table.setdefault(kind, {})[n] = curve
        report[f"collective/intra/{kind}/n{n}"] = _quantity_report(
            curve.time_s(x), t, train, g.index, "min over regimes of alpha + size*busfactor/busbw",
            busbw_large_GBps=curve.large.busbw_bytes_per_s / 1e9, alpha_large_us=curve.large.alpha_s * 1e6)
    return table, report


def _derive(table: dict, steps: bool) -> dict:
    """Every kind: measured ones as they are, others from the best measured kind with its
    busbw (nccl-tests' busbw is the same hardware limit for every collective, PERFORMANCE.md)
    and its alpha scaled by ring steps (intra) or kept (inter, one NIC hop)."""
    donor = next(k for k in DERIVE_ORDER if k in table)
    full = dict(table)
    for kind in KINDS:
        if kind not in table:
            full[kind] = {n: c.scaled(alpha=ring_steps(kind, n) / ring_steps(donor, n) if steps else 1.0,
                                      source=f"derived from {donor}") for n, c in table[donor].items()}
    return full


def _fit_inter(df: pd.DataFrame, intra: dict, nics: int, fraction: float, rng) -> tuple[dict, dict]:
    """Per (kind, ranks_per_node): one alpha-beta line for the per-rank inter-node step, the
    intra-node parts of the hierarchical composition taken from the intra fit."""
    table, report = {}, {}
    for (kind, r), g in df.groupby(["collective", "ranks_per_node"]):
        r = int(r)
        rows, g = g.index, g.reset_index(drop=True)
        train = _split(len(g), fraction, rng)
        t = g["time_s"].to_numpy(float)

        def predict(curve: Curve, rows: np.ndarray) -> np.ndarray:
            fit = CollectiveFit(intra, {kind: {r: curve}}, nics)
            out = np.empty(rows.sum())
            sub = g[rows]
            for n, idx in sub.groupby("group_size").indices.items():
                out[idx] = collective_time_s(fit, kind, sub["message_bytes"].to_numpy(float)[idx], int(n), r)
            return out
        x = g["message_bytes"].to_numpy(float)[train]
        curve = _curve_fit(lambda c: predict(c, train), x, t[train], two_regimes=False)
        table.setdefault(kind, {})[r] = curve
        report[f"collective/inter/{kind}/r{r}"] = _quantity_report(
            predict(curve, np.ones(len(g), dtype=bool)), t, train, rows,
            "hierarchical: intra fit + alpha + per-rank inter bytes/busbw",
            groups=sorted(int(n) for n in g["group_size"].unique()),
            per_rank_busbw_GBps=curve.large.busbw_bytes_per_s / 1e9, alpha_us=curve.large.alpha_s * 1e6)
    return table, report


def fabric_inter_node(intra: dict, nics: int, fabric: dict) -> tuple[dict, dict]:
    """Inter-node curves of a rail-optimised fabric (one NIC per GPU) from published figures:
    fabric["allreduce_busbw_bytes_per_s"], nccl-tests all_reduce busbw across nodes with `nics`
    ranks per node; fabric["nic_busbw_bytes_per_s"], one NIC's point-to-point busbw;
    fabric["alpha_s"], the inter-node latency.

    all_reduce (reduce_scatter, all_gather, broadcast derive from it): with r ranks per node
    NCCL's ring drives r NICs per node and its busbw is that of the bottleneck link
    (NVIDIA/nccl-tests#160, doc/PERFORMANCE.md), so a 2-node all_reduce reaches r/nics of the
    published busbw; the per-rank inter busbw is set so that the hierarchical composition (intra
    fit + inter step) takes exactly that time on 1 GiB. The composition runs the NVLink and IB
    phases one after the other where NCCL pipelines them, so at r = nics this per-rank figure
    exceeds one NIC's. send_recv and all_to_all: each rank its own NIC at the point-to-point
    busbw (all_to_all cannot aggregate NICs: NVIDIA/nccl-tests#267)."""
    missing = [f for f in FABRIC_FIELDS if f not in fabric]
    if missing:
        raise ProfileError(f"fabric.{missing[0]}", "missing", f"give all of {list(FABRIC_FIELDS)}")
    alpha, m = float(fabric["alpha_s"]), float(FABRIC_CALIBRATION_BYTES)
    intra_only = CollectiveFit(intra, {}, nics)
    source = f"published nccl-tests figures for {fabric['name']}"
    table, report = {"all_reduce": {}}, {}
    for r in sorted({1, nics} | {2**k for k in range(nics.bit_length()) if 2**k < nics}):
        target = float(fabric["allreduce_busbw_bytes_per_s"]) * r / nics
        total_s = bus_factor("all_reduce", 2 * r) * m / target
        inter_s = total_s - alpha - float(intra_time_s(intra_only, "reduce_scatter", m, r)
                                          + intra_time_s(intra_only, "all_gather", m, r))
        if inter_s <= 0:
            raise ProfileError("fabric.allreduce_busbw_bytes_per_s",
                               f"{target / 1e9:.0f} GB/s at {r} ranks per node is faster than the "
                               "intra-node fit alone allows", "check the figure and the intra samples")
        line = Line(alpha, m / r / inter_s)  # inter step over 2 nodes: bus factor 2*(2-1)/2 = 1
        table["all_reduce"][r] = Curve(line, line, source)
        report[f"collective/inter/all_reduce/r{r}"] = {
            "form": "hierarchical: intra fit + alpha + per-rank inter bytes/busbw, busbw set to "
                    "reproduce the published ring busbw x r/nics on 2 nodes, 1 GiB",
            "target_busbw_GBps": target / 1e9, "per_rank_busbw_GBps": line.busbw_bytes_per_s / 1e9,
            "alpha_us": alpha * 1e6, "source": source}
    nic = Line(alpha, float(fabric["nic_busbw_bytes_per_s"]))
    for kind in ("send_recv", "all_to_all"):
        table[kind] = {1: Curve(nic, nic, source)}
        report[f"collective/inter/{kind}/r1"] = {
            "form": "alpha + per-rank bytes / one NIC's point-to-point busbw",
            "per_rank_busbw_GBps": nic.busbw_bytes_per_s / 1e9, "alpha_us": alpha * 1e6, "source": source}
    return table, report


def _usable_collectives(samples: Samples) -> tuple[pd.DataFrame, pd.Series]:
    """The timed rows of groups of 2 or more, and which of them sit inside one node."""
    df = samples.collectives.reset_index(drop=True)
    df = df[(df["time_s"].astype(float) > 0) & (df["group_size"].astype(int) >= 2)]
    unknown = set(df["collective"]) - set(KINDS)
    if unknown:
        raise ProfileError("samples.collectives.collective", f"unknown kinds {sorted(unknown)}",
                           f"use {list(KINDS)}")
    return df, df["ranks_per_node"].astype(int) >= df["group_size"].astype(int)


def _collective_fit(samples: Samples, base: dict, fraction: float, rng,
                    fabric: dict | None) -> tuple[CollectiveFit, dict, list, dict | None]:
    """Intra and inter curves, report, notes, and the measured inter-node fit left unused
    because `fabric` replaced it (None when nothing was left out)."""
    df, within = _usable_collectives(samples)
    if not within.any():
        raise ProfileError("samples.collectives", "has no intra-node rows (ranks_per_node == group_size)",
                           "measure collectives over 2 or more ranks of one node")
    nics = int(base["nics_per_node"])
    intra, report = _fit_intra(df[within], fraction, rng)
    notes = [f"collective intra {k}: derived from {next(d for d in DERIVE_ORDER if d in intra)} "
             "(same busbw, alpha scaled by ring steps)" for k in KINDS if k not in intra]
    intra = _derive(intra, steps=True)
    measured, measured_report, unused = None, {}, None
    if (~within).any():
        measured, measured_report = _fit_inter(df[~within], intra, nics, fraction, rng)
    if fabric is not None:
        inter, inter_report = fabric_inter_node(intra, nics, fabric)
        report.update(inter_report)
        notes.append(f"collective inter: {fabric['name']}, from published figures (fabric_inter_node)")
        notes += list(fabric["sources"])
        if measured is not None:
            unused = {"note": "measured cross-node samples, not used: the cluster they come from has "
                              f"another fabric than the one this profile describes ({fabric['name']})",
                      "curves": {k: {str(r): {"alpha_s": c.large.alpha_s,
                                              "per_rank_busbw_bytes_per_s": c.large.busbw_bytes_per_s}
                                     for r, c in sorted(by_r.items())} for k, by_r in measured.items()},
                      "fits": measured_report}
    elif measured is not None:
        inter = measured
        report.update(measured_report)
    else:
        alpha = max(c.large.alpha_s for by_n in intra.values() for c in by_n.values())
        nic = Line(alpha, float(base["nic_bytes_per_s"]))
        nominal = Curve(nic, nic,
                        "nominal NIC bandwidth from base, alpha = largest intra-node alpha")
        inter = {k: {1: nominal} for k in KINDS}
        report["collective/inter"] = {"note": "no cross-node samples: inter-node step uses the nominal "
                                              "NIC bandwidth per rank and the largest intra-node alpha"}
        notes.append("collective inter: nominal NIC figure (no cross-node samples)")
    notes += [f"collective inter {k}: derived from {next(d for d in DERIVE_ORDER if d in inter)} "
              "(same per-rank NIC busbw and alpha)" for k in KINDS if k not in inter]
    return CollectiveFit(intra, _derive(inter, steps=False), nics), report, notes, unused


def _check_base(base: dict) -> None:
    for name, kind in BASE_FIELDS.items():
        if name not in base:
            raise ProfileError(f"base.{name}", "missing",
                               f"add it to the device description ({sorted(BASE_FIELDS)})")
        ok = isinstance(base[name], (int, float)) if kind is float else isinstance(base[name], kind)
        if not ok or isinstance(base[name], bool):
            raise ProfileError(f"base.{name}", f"is {type(base[name]).__name__}", f"give a {kind}")
    missing = set(DTYPE_BYTES) - set(base["peak_flops"])
    if missing:
        raise ProfileError("base.peak_flops", f"lacks {sorted(missing)}", f"give all of {list(DTYPE_BYTES)}")


def _summary(samples: Samples) -> dict:
    g, m, c = samples.gemm, samples.memory_bound, samples.collectives
    return {"gemm_rows": len(g), "gemm_dtypes": sorted(map(str, g["dtype"].unique())),
            "gemm_m_range": [int(g["m"].min()), int(g["m"].max())] if len(g) else [],
            "memory_bound_rows_by_op": {str(k): int(v)
                                        for k, v in m["op"].value_counts().sort_index().items()},
            "collective_rows": {f"{k}/n{n}/r{r}": int(v) for (k, n, r), v in
                                c.groupby(["collective", "group_size", "ranks_per_node"]).size().items()}}


def error_band(report: dict) -> dict:
    held = [q["held_out"] for q in report.values() if q.get("held_out", {}).get("points")]
    weights = np.array([h["points"] for h in held], dtype=float)
    return {
        "median": float(np.average([h["median"] for h in held], weights=weights)) if held else 0.0,
        "p95": float(np.average([h["p95"] for h in held], weights=weights)) if held else 0.0,
        "what": "held-out relative residual: point-weighted mean over fitted quantities of "
                "their median and 95th percentile"}


def fit_profile(samples: Samples, base: dict, holdout_fraction: float = 0.2,
                seed: int = 0, fabric: dict | None = None) -> HardwareProfile:
    """Fit GEMM, memory-bound and collective curves to `samples`; `base` holds the non-fitted
    device description (BASE_FIELDS, optionally "extra"). `fabric` (FABRIC_FIELDS: published
    figures of the inter-node fabric the profile describes) replaces the cross-node fit, which is
    then kept in fit_report and extra under "measured_inter_node_not_used"."""
    _check_base(base)
    rng = np.random.default_rng(seed)
    gemm, mem, report, notes = compute_fits(samples, base, holdout_fraction, rng)
    collectives, coll_report, coll_notes, unused = _collective_fit(samples, base, holdout_fraction,
                                                                    rng, fabric)
    report.update(coll_report)
    if unused:
        report["measured_inter_node_not_used"] = {k: unused[k] for k in ("note", "fits")}
    report["error_band"] = error_band(report)
    return HardwareProfile(
        name=base["name"], device_name=base["device_name"], memory_bytes=int(base["memory_bytes"]),
        peak_flops={d: float(base["peak_flops"][d]) for d in DTYPE_BYTES},
        hbm_bytes_per_s=float(base["hbm_bytes_per_s"]), gpus_per_node=int(base["gpus_per_node"]),
        nics_per_node=int(base["nics_per_node"]), nic_bytes_per_s=float(base["nic_bytes_per_s"]),
        intra_node_link=base["intra_node_link"], gemm=gemm, memory_bound=mem, collectives=collectives,
        sources=tuple(base["sources"]) + tuple(notes + coll_notes), fit_report=report,
        extra={**base.get("extra", {}), "samples_summary": _summary(samples),
               **({"measured_inter_node_not_used": {k: unused[k] for k in ("note", "curves")}}
                  if unused else {})})


def refit_collectives(samples: Samples, base: HardwareProfile, name: str, sources: list[str],
                      holdout_fraction: float = 0.2, seed: int = 0) -> HardwareProfile:
    """`base` with its collectives refitted to `samples` (e.g. nccl-tests logs); device
    description, GEMM and memory-bound fits stay the base's. A measured intra-node (kind, group
    size) replaces the base's curve; kinds the base derived are derived again from the merged
    table. Cross-node rows, when there are any, replace the whole inter-node level."""
    df, within = _usable_collectives(samples)
    if df.empty:
        raise ProfileError("samples.collectives", "has no timed rows of groups of 2 or more",
                           "pass logs of collectives over 2 or more ranks")
    rng, nics = np.random.default_rng(seed), base.nics_per_node
    fitted, report = _fit_intra(df[within], holdout_fraction, rng) if within.any() else ({}, {})
    merged = {k: {n: c for n, c in by_n.items() if not c.source.startswith("derived")}
              for k, by_n in base.collectives.intra.items()}
    for kind, by_n in fitted.items():
        merged.setdefault(kind, {}).update(by_n)
    intra = _derive({k: v for k, v in merged.items() if v}, steps=True)
    logs = ", ".join(sources)
    refitted = ", ".join(f"{k}/n{n}" for k, by_n in sorted(fitted.items()) for n in sorted(by_n))
    notes = [f"collective intra {refitted}: refitted from {logs}"] if fitted else []
    kept = {q: v for q, v in base.fit_report.items() if q != "error_band"}
    extra = dict(base.extra)
    inter = base.collectives.inter
    if (~within).any():
        measured, inter_report = _fit_inter(df[~within], intra, nics, holdout_fraction, rng)
        inter = _derive(measured, steps=False)
        kept = {q: v for q, v in kept.items() if not q.startswith(("collective/inter",
                                                                   "measured_inter_node_not_used"))}
        extra.pop("measured_inter_node_not_used", None)
        report.update(inter_report)
        notes.append(f"collective inter: replaced by the cross-node fit of {logs}")
    report = {**kept, **report}
    report["error_band"] = error_band(report)
    return replace(base, name=name, collectives=CollectiveFit(intra, inter, nics),
                   sources=base.sources + tuple(notes), fit_report=report,
                   extra={**extra, "collectives_refit": {"base": base.name, "logs": list(sources),
                                                         "samples_summary": _summary(samples)}})
