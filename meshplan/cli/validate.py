"""`meshplan validate`: run the validation suite here, predicted vs measured; `--refit`
closes the loop by refitting the profile from half of the runs. `--mode inference` runs the
serving suite instead (validation/serve_suite.py)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from meshplan.cli import common as common
from meshplan.core.io import dump_json
from meshplan.core.progress import wanted

if TYPE_CHECKING:
    from meshplan.calibration.probe import Drift


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "validate", help="run a suite of plans on this machine: predicted vs measured",
        description="Run the validation suite on real torch.distributed ranks of this machine and "
                    "report the simulator's error: table, CSV and plotly HTML.")
    parser.add_argument("--mode", choices=("training", "inference"), default="training",
                        help="training steps (default) or serving: TTFT and TPOT of greedy "
                             "generation (its own warm-up and repeats; no --steps, --refit)")
    parser.add_argument("--hardware", default="local", help="profile to predict with (default local)")
    parser.add_argument("--plans", help="comma-separated plan names of the suite (default all)")
    parser.add_argument("--steps", type=int, default=8, help="steps per plan (default 8)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed first steps (default 3)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="times the suite runs, plans taking turns; each plan keeps its "
                             "round with the lowest median step, so that a slow spell of the "
                             "machine costs a plan one round, not its measurement (default 2)")
    parser.add_argument("--out-dir", default="out/validate", help="where the CSV and HTML go")
    parser.add_argument("--refit", action="store_true",
                        help="refit the profile from half the runs; report before/after on the other half")
    parser.add_argument("--refit-out", default="out/validate/local-refit.json",
                        help="where the refitted profile is written")
    common.add_probe_args(parser)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.set_defaults(handler=run)


def chosen_names(plans: str | None, suite: tuple, what: str) -> tuple[str, ...] | None:
    """--plans as a tuple of suite names (None: all); PlanError naming an unknown one."""
    from meshplan.core.errors import PlanError

    if not plans:
        return None
    known = [name for name, _ in suite]
    names = tuple(n.strip() for n in plans.split(","))
    for name in names:
        if name not in known:
            raise PlanError("--plans", f"unknown {what} plan {name!r}", f"use names from: {', '.join(known)}")
    return names


def probed(args: argparse.Namespace, hw, run_suite, decode: bool = False) -> tuple[list, Drift | None]:
    """The suite's runs (run_suite(after_launch)) and the drift probe's verdict: the machine
    probed first (common.probe_machine; the decode step too with `decode`), and where the
    probe timed the one-rank step, the step (and decode step) read again after each launch,
    the readings' medians rescaling (Drift.with_step_readings); the drift None when not
    probed."""
    from meshplan.calibration.probe import decode_ratio, step_ratio

    drift = common.probe_machine(args, hw, collective=True, decode=decode)
    later: list[float] = []
    later_decode: list[float] = []

    def read_again():
        later.append(step_ratio(hw))
        if decode:
            later_decode.append(decode_ratio(hw))
    runs = run_suite(read_again if drift is not None and drift.timed_step else None)
    return runs, common.probe_again(args, hw, drift, later, "the runs", later_decode)


def rescaled_runs(runs: list, drift: Drift | None) -> list | None:
    """Under --rescale, the runs predicted again on the rescaled profile; else None."""
    from meshplan.validation.suite import repredict

    return repredict(runs, drift.rescaled) if drift is not None and drift.rescaled is not None else None


def with_probe(result: dict, drift: Drift | None, rescaled: list | None, summary) -> dict:
    """`result` with the probe's verdict and the rescaled runs (`summary` of them beside)."""
    if drift is None:
        return result
    result = {**result, "probe": drift.to_json()}
    if rescaled is not None:
        result["rescaled"] = {"runs": [r.to_json() for r in rescaled], **summary(rescaled)}
    return result


def run(args: argparse.Namespace) -> int:
    from meshplan.executor.options import RunOptions
    from meshplan.validation.suite import SUITES, run_suite, summary
    from meshplan.reports.validation import write_csv, write_html
    from meshplan.hw_profiles.profile import load_profile
    from meshplan.core.errors import PlanError

    if args.mode == "inference":
        return run_inference(args)
    hw = load_profile(args.hardware)
    names = chosen_names(args.plans, tuple(entry for _, suite in SUITES for entry in suite), "suite")
    if args.rounds < 1:
        raise PlanError("--rounds", f"must be at least 1, got {args.rounds}", "pass --rounds 1 or more")
    options = RunOptions(steps=args.steps, warmup=args.warmup, profile=args.hardware,
                         progress=wanted(args.json))
    runs, drift = probed(args, hw, lambda after_launch: run_suite(options, names, rounds=args.rounds,
                                                                 after_launch=after_launch))
    stats, rescaled = summary(runs), rescaled_runs(runs, drift)
    out = Path(args.out_dir)
    write_csv(runs, out / "validate.csv", rescaled)
    write_html(runs, stats, hw.relative_error_band(), out / "validate.html",
               f"meshplan validate ({hw.name})")
    result = with_probe({"runs": [r.to_json() for r in runs], **stats,
                         "csv": str(out / "validate.csv"), "html": str(out / "validate.html")},
                        drift, rescaled, summary)
    if args.refit:
        from meshplan.calibration.refit import refit
        fitted = refit(hw, [r.name for r in runs], [r.record for r in runs])
        fitted.profile.save(args.refit_out)
        result["refit"] = {**fitted.to_json(), "profile": args.refit_out}
    if args.json:
        sys.stdout.write(dump_json(result))
    else:
        print_table(result)
    return 0


def print_table(result: dict) -> None:
    from rich.table import Table

    again = result["rescaled"]["runs"] if "rescaled" in result else None
    table = Table(title="predicted vs measured (this machine)")
    for col in ("plan", "ranks", "predicted ms", "measured ms", "error",
                *(("rescaled ms", "rescaled error") if again else ()), "pred MiB", "meas MiB", "mem error"):
        table.add_column(col, justify="right" if col != "plan" else "left")
    for i, r in enumerate(result["runs"]):
        rescaled = (f"{again[i]['predicted_step_time_s'] * 1e3:.1f}", f"{again[i]['error']:+.1%}") if again else ()
        table.add_row(r["name"], str(r["world_size"]), f"{r['predicted_step_time_s'] * 1e3:.1f}",
                      f"{r['measured_step_time_s'] * 1e3:.1f}", f"{r['error']:+.1%}", *rescaled,
                      f"{r['predicted_peak_memory_bytes'] / 2**20:.1f}",
                      f"{r['measured_peak_memory_bytes'] / 2**20:.1f}", f"{r['memory_error']:+.1%}")
    console = common.console()
    console.print(table)
    console.print(f"median |error| {result['median_abs_error']:.1%}  max |error| {result['max_abs_error']:.1%}  "
                  f"Spearman {result['spearman']:.2f}  memory median |error| "
                  f"{result['memory_median_abs_error']:.1%} (max {result['memory_max_abs_error']:.1%})")
    console.print(f"CSV: {result['csv']}  HTML: {result['html']}")
    if "rescaled" in result:
        r = result["rescaled"]
        console.print(f"with the profile rescaled by the probe: median |error| {r['median_abs_error']:.1%}  "
                      f"max |error| {r['max_abs_error']:.1%}  Spearman {r['spearman']:.2f}")
    if "refit" in result:
        fit = result["refit"]
        console.print(f"refit factors {fit['factors']} -> {fit['profile']}")
        for half in ("train", "held_out"):
            console.print(f"  {half}: median |error| {fit['before'][half]['median_abs_error']:.1%} -> "
                          f"{fit['after'][half]['median_abs_error']:.1%}, max "
                          f"{fit['before'][half]['max_abs_error']:.1%} -> {fit['after'][half]['max_abs_error']:.1%}")


def run_inference(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from meshplan.validation.serve_suite import SUITE, SUITE_OPTIONS, run_suite, summary
    from meshplan.reports.serve_validation import write_csv, write_html
    from meshplan.hw_profiles.profile import load_profile
    from meshplan.core.errors import PlanError

    if args.refit:
        raise PlanError("--refit", "refits the profile from training runs only",
                        "drop --refit with --mode inference")
    hw = load_profile(args.hardware)
    names = chosen_names(args.plans, SUITE, "serving suite")
    options = replace(SUITE_OPTIONS, profile=args.hardware, progress=wanted(args.json))
    runs, drift = probed(args, hw, lambda after_launch: run_suite(options, names, after_launch=after_launch),
                         decode=True)
    stats = summary(runs)
    out = Path(args.out_dir)
    csv, html = out / "validate-inference.csv", out / "validate-inference.html"
    write_csv(runs, csv)
    write_html(runs, stats, hw.relative_error_band(), html,
               f"meshplan validate --mode inference ({hw.name})")
    result = with_probe({"runs": [r.to_json() for r in runs], **stats, "csv": str(csv), "html": str(html)},
                        drift, rescaled_runs(runs, drift), summary)
    if args.json:
        sys.stdout.write(dump_json(result))
    else:
        print_inference_table(result)
    return 0


def print_inference_table(result: dict) -> None:
    from rich.table import Table

    again = result["rescaled"]["runs"] if "rescaled" in result else None
    table = Table(title="serving: predicted vs measured (this machine)")
    for col in ("plan", "ranks", "pred TTFT ms", "meas TTFT ms", "error",
                *(("rescaled error",) if again else ()), "pred TPOT ms", "meas TPOT ms", "error",
                *(("rescaled error",) if again else ())):
        table.add_column(col, justify="right" if col != "plan" else "left")
    for i, r in enumerate(result["runs"]):
        ttft, tpot = (((f"{again[i]['ttft_error']:+.1%}",), (f"{again[i]['tpot_error']:+.1%}",))
                      if again else ((), ()))
        table.add_row(r["name"], str(r["world_size"]), f"{r['predicted_ttft_s'] * 1e3:.2f}",
                      f"{r['measured_ttft_s'] * 1e3:.2f}", f"{r['ttft_error']:+.1%}", *ttft,
                      f"{r['predicted_tpot_s'] * 1e3:.3f}", f"{r['measured_tpot_s'] * 1e3:.3f}",
                      f"{r['tpot_error']:+.1%}", *tpot)
    console = common.console()
    console.print(table)
    for key in ("ttft", "tpot"):
        s = result[key]
        console.print(f"{key.upper()}: median |error| {s['median_abs_error']:.1%}  max |error| "
                      f"{s['max_abs_error']:.1%}  Spearman {s['spearman']:.2f}")
    console.print(f"CSV: {result['csv']}  HTML: {result['html']}")
    if "rescaled" in result:
        for key in ("ttft", "tpot"):
            s = result["rescaled"][key]
            console.print(f"with the profile rescaled by the probe, {key.upper()}: median |error| "
                          f"{s['median_abs_error']:.1%}  max |error| {s['max_abs_error']:.1%}  Spearman {s['spearman']:.2f}")
