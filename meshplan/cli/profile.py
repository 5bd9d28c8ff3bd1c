"""`meshplan profile`: measure this machine into a hardware profile, refit a profile's
collectives from nccl-tests logs, or write a profile's calibration report."""
from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from pathlib import Path

from meshplan.core.progress import wanted

from meshplan.cli import common as common
from meshplan.core.io import write_atomic
from meshplan.core.processes import running
from meshplan.core.errors import OutputError, ProfileError


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "profile", help="measure this machine, import nccl-tests logs, or report a profile's fit",
        description="Measure this machine (GEMMs, memory-bound operators, collectives over "
                    "torchrun ranks) and fit a hardware profile, saving the samples beside it as "
                    "<name>.samples.json; or refit a profile's collectives from nccl-tests logs "
                    "(--import-nccl-tests); or write a profile's calibration report (--report); or "
                    "list the stock profiles (--list).")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--list", action="store_true",
                      help="list the stock profiles with their figures, measured or derived (--json: as JSON)")
    mode.add_argument("--import-nccl-tests", nargs="+", metavar="LOG",
                      help="nccl-tests stdout logs (*_perf) whose collectives replace --base's")
    mode.add_argument("--report", metavar="PROFILE",
                      help="profile name or JSON: write its fitted-vs-measured HTML report to --out")
    parser.add_argument("--out",
                        help="profile JSON to write (a .json path), or the report's HTML with --report")
    parser.add_argument("--json", action="store_true", help="with --list: the list as JSON on stdout")
    parser.add_argument("--quick", action="store_true",
                        help="fewer sizes and repeats: under about a minute on CPU")
    parser.add_argument("--name", help="profile name (default: the --out file name without .json)")
    parser.add_argument("--base", help="with --import-nccl-tests: the profile (stock name or JSON) "
                                       "whose device description and compute fits are kept")
    parser.add_argument("--holdout", type=float, default=0.2,
                        help="fraction of each quantity's samples held out of its fit (default 0.2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out draw")
    parser.set_defaults(handler=run)


def _check(args: argparse.Namespace) -> None:
    """Refuse the flags that do not go together, naming every one at fault at once."""
    issues = []
    if args.base and not args.import_nccl_tests:
        issues.append(("--base", "only used with --import-nccl-tests",
                       "drop --base, or pass --import-nccl-tests LOG..."))
    if args.import_nccl_tests and not args.base:
        issues.append(("--base", "missing", "pass --base a100-80gb (or another stock name or "
                                            "profile JSON) whose compute fits to keep"))
    if args.quick and (args.import_nccl_tests or args.report or args.list):
        issues.append(("--quick", "only used when measuring this machine",
                       "drop --quick with --import-nccl-tests, --report or --list"))
    if args.list and args.out:
        issues.append(("--out", "not used with --list", "drop --out"))
    if args.json and not args.list:
        issues.append(("--json", "only used with --list", "drop --json, or pass --list"))
    if not args.list and not args.out:
        issues.append(("--out", "missing", "pass --out PATH: the profile JSON to write, or the "
                                           "report's HTML with --report"))
    if not 0.0 <= args.holdout <= 0.5:  # the fit keeps at least half of each curve's samples
        issues.append(("--holdout", f"{args.holdout} is outside [0, 0.5]", "pass e.g. --holdout 0.2"))
    if args.out and not args.report and not args.list and not args.out.endswith(".json"):
        issues.append(("--out", f"{args.out!r} does not end in .json",
                       "pass the profile's path, e.g. --out hw_profiles/local.json"))
    if issues:
        raise ProfileError.of(issues)


def run(args: argparse.Namespace) -> int:
    _check(args)
    if args.list:
        return run_list(args)
    if args.report:
        return run_report(args)
    with _claimed(Path(args.out)):
        return run_import(args) if args.import_nccl_tests else run_measure(args)


@contextlib.contextmanager
def _claimed(out: Path):
    """Hold `.<name>.lock` beside --out while measuring and writing, so that a second
    `meshplan profile` writing the same profile is refused at once (a lock whose process is
    gone is taken over); an unwritable folder is refused before any measuring."""
    lock = out.parent / f".{out.name}.lock"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                break
            except FileExistsError:
                holder = lock.read_text().strip()
                if holder.isdigit() and running(int(holder)):
                    raise ProfileError("--out", f"another meshplan profile (pid {holder}) is writing "
                                       f"{out}", "wait for it, or write another --out") from None
                lock.unlink(missing_ok=True)
        else:
            raise FileExistsError(17, f"{lock} keeps reappearing")
    except OSError as exc:
        raise OutputError(str(out), f"cannot be written ({exc.strerror or exc})",
                          "give a profile path in a folder you can write") from None
    with os.fdopen(fd, "w") as handle:
        handle.write(str(os.getpid()))
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _name(args: argparse.Namespace) -> str:
    return args.name or Path(args.out).name.removesuffix(".json")


def _save_pair(profile, samples, machine, out: Path) -> None:
    """Write the profile and its samples beside it, each whole, and both or neither: temp files
    in the target folder, renamed at the end."""
    from meshplan.calibration.measure.run import save_samples
    from meshplan.hw_profiles.profile import samples_path

    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        tmp_samples, tmp_profile = Path(tmp) / "samples.json", Path(tmp) / "profile.json"
        save_samples(samples, tmp_samples, machine)
        profile.save(tmp_profile)
        os.replace(tmp_samples, samples_path(out))
        os.replace(tmp_profile, out)


def run_measure(args: argparse.Namespace) -> int:
    from meshplan.calibration.local_profile import measure_profile

    started = time.perf_counter()
    out = Path(args.out)
    profile, samples, machine, measured_s = measure_profile(args.quick, _name(args), args.holdout,
                                                            args.seed, progress=wanted())
    measured = started + measured_s
    overhead = profile.overhead
    if machine["gpu_count"] == 0:
        print(f"framework overhead per layer (fwd/bwd ms): plain {overhead.layer_forward_s * 1e3:.2f}/"
              f"{overhead.layer_backward_s * 1e3:.2f}, TP {overhead.tp_layer_forward_s * 1e3:.2f}/"
              f"{overhead.tp_layer_backward_s * 1e3:.2f}, TP+SP {overhead.sp_layer_forward_s * 1e3:.2f}/"
              f"{overhead.sp_layer_backward_s * 1e3:.2f}, MoE block +{overhead.moe_forward_s * 1e3:.2f}/"
              f"{overhead.moe_backward_s * 1e3:.2f}; decode {overhead.decode_layer_s * 1e3:.2f} "
              f"+ {overhead.decode_layer_per_byte_s * 2 ** 20 * 1e3:.3f} a MiB of weights, "
              f"{overhead.decode_edge_s * 1e3:.2f} a step; split backward {overhead.split_backward_layer_s * 1e3:.2f} "
              f"+ {overhead.split_backward_per_activation_byte_s * 2 ** 20 * 1e3:.3f} a MiB of activations")
    _save_pair(profile, samples, machine, out)
    print_fit(profile)
    print(f"meshplan profile: wrote {out} and {out.name.removesuffix('.json')}.samples.json beside "
          f"it in {time.perf_counter() - started:.0f} s (measuring {measured - started:.0f} s, "
          f"fitting {time.perf_counter() - measured:.1f} s)")
    return 0


def run_import(args: argparse.Namespace) -> int:
    import pandas as pd

    from meshplan.calibration.fit import refit_collectives
    from meshplan.calibration.nccl_tests import parse_nccl_tests_log
    from meshplan.hw_profiles.profile import load_profile
    from meshplan.calibration.samples import Samples, empty_samples

    base = _named(load_profile, args.base, "--base")
    tables = [parse_nccl_tests_log(Path(log)) for log in args.import_nccl_tests]
    empty = empty_samples()
    samples = Samples(empty.gemm, empty.memory_bound, pd.concat(tables, ignore_index=True))
    names = [Path(log).name for log in args.import_nccl_tests]
    profile = refit_collectives(samples, base, _name(args), [f"nccl-tests log {n}" for n in names],
                                args.holdout, args.seed)
    _save_pair(profile, samples, {"nccl_tests_logs": names, "base_profile": base.name}, Path(args.out))
    print_fit(profile)
    print(f"meshplan profile: refitted {base.name}'s collectives from {len(names)} log(s); "
          f"wrote {args.out}")
    return 0


def run_list(args: argparse.Namespace) -> int:
    """The stock profiles, one row each: the device, its node and what the figures rest on."""
    from meshplan.core.io import dump_json
    from meshplan.hw_profiles.profile import available_profiles, load_profile, profile_summary

    rows = [profile_summary(load_profile(name), name) for name in available_profiles()]
    if args.json:
        print(dump_json(rows), end="")
        return 0
    from rich.table import Table

    table = Table(title="stock profiles (--hardware NAME)")
    columns = {"name": "name", "device": "device", "memory_gib": "GiB", "bf16_tflops": "bf16 TFLOP/s",
               "memory_tb_per_s": "memory TB/s", "node": "node", "network": "network", "basis": "figures"}
    for title in columns.values():
        table.add_column(title, justify="right" if title in ("GiB", "bf16 TFLOP/s", "memory TB/s") else "left")
    for row in rows:
        table.add_row(*(f"{row[k]:.3g}" if isinstance(row[k], float) else str(row[k]) for k in columns))
    common.console().print(table)
    return 0


def run_report(args: argparse.Namespace) -> int:
    from meshplan.reports.calibration import profile_samples, report_html

    profile, samples, source = _named(profile_samples, args.report, "--report")
    page, plotted = report_html(profile, samples, source)
    write_atomic(args.out, page)
    print(f"meshplan profile: wrote {args.out}: {len(plotted)} quantities of {profile.name} "
          f"plotted against {source}")
    return 0


def _named(load, profile_arg: str, flag: str):
    """load(profile_arg), its errors about the profile or its samples naming `flag` (the
    profile loader names --hardware, the flag of every other command)."""
    try:
        return load(profile_arg)
    except ProfileError as exc:
        raise ProfileError.of([(flag if field in ("hardware", "report") else field, problem, fix)
                               for field, problem, fix in exc.issues]) from None


def print_fit(profile) -> None:
    """The fit table: per quantity, points and the median / max relative residual on the
    points fitted and on those held out."""
    from meshplan.calibration.build_stock import fit_table

    table = fit_table(profile)[["points", "fit_median", "fit_max", "held_median", "held_max"]]
    print(f"{profile.name}: relative residual |predicted/measured - 1| per fitted quantity")
    print(table.to_string(float_format=lambda x: f"{x:.1%}", na_rep="-"))
    median, p95 = profile.relative_error_band()
    print(f"error band (held-out, point-weighted): median {median:.1%}, p95 {p95:.1%}")
