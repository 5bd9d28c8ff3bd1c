"""`meshplan whatif`: plan a model across hardware, GPU counts, scaled resources and fabrics,
and write one self-contained HTML report; with --tokens, the days and cost of training."""
from __future__ import annotations

import argparse
import sys

from meshplan.cli import common as common
from meshplan.core.io import dump_json, write_atomic
from meshplan.core.errors import PlanError
from meshplan.simulator.plan import MAX_COUNT

SCALE_FLAGS = {"scale_tflops": "flops", "scale_hbm_bw": "hbm_bw",
               "scale_intra_node_bw": "intra_node_bw", "scale_inter_node_bw": "inter_node_bw",
               "scale_memory": "memory"}
# Largest factor a resource may be scaled by (1000x is beyond any hardware generation).
MAX_FACTOR = 1000.0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "whatif", help="compare best plans across hardware, GPU counts and scaled resources",
        description="Plan the model for each hardware profile and GPU count (and for each "
                    "scaled resource), and write an HTML report: throughput and MFU against GPU "
                    "count, the best plan's memory per stage and pipeline timeline, the top "
                    "plans per scenario and the effect of each scaled resource; with --tokens, the "
                    "days to train and their cost against GPU count.")
    common.add_model_args(parser)
    parser.add_argument("--hardware", default="a100-80gb",
                        help="comma-separated stock profile names or profile JSON paths")
    parser.add_argument("--gpus", required=True, help="comma-separated GPU counts, e.g. 256,512,1024")
    parser.add_argument("--gpus-per-node", type=int, help="devices per node (default: each profile's)")
    common.add_plan_args(parser)
    for flag, resource in SCALE_FLAGS.items():
        parser.add_argument("--" + flag.replace("_", "-"), help=f"comma-separated factors for the "
                            f"profile's {resource} (e.g. 0.5,1,2), planned at the largest GPU count")
    parser.add_argument("--fabric", help="comma-separated fabrics TOPOLOGY[:OVERSUBSCRIPTION"
                        "[:NODES_PER_LEAF]] (rail-optimized or rail, fat-tree, single-switch; "
                        "nodes per leaf defaults to the profile's), e.g. rail,fat-tree:2,fat-tree:4, "
                        "each planned at the largest GPU count with rank placement searched")
    parser.add_argument("--tokens", type=float, help="tokens to train on (e.g. 2e12): chart and "
                        "tabulate the days each scenario's plans take to train them")
    parser.add_argument("--gpu-hour-price", type=float, help="price of one GPU-hour (with --tokens): "
                        "chart and tabulate the cost too")
    parser.add_argument("--out", required=True, help="HTML file to write")
    parser.add_argument("--json", action="store_true", help="also print each scenario's best plan "
                        "and figures (with --tokens: steps, days, cost) as JSON")
    parser.set_defaults(handler=run)


def _numbers(text: str, flag: str, kind):
    """Comma-separated GPU counts (1..MAX_COUNT) or resource factors (finite, 0 < f <= MAX_FACTOR)."""
    top = MAX_COUNT if kind is int else MAX_FACTOR
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or not all(0 < v <= top for v in values):
        raise PlanError(flag, f"{text!r} is not a comma-separated list of numbers above 0 and up to {top}",
                        f"pass e.g. {flag} {'256,512' if kind is int else '0.5,1,2'}")
    return values


def run(args: argparse.Namespace) -> int:
    from meshplan.hw_profiles.profile import load_profile
    from meshplan.reports.whatif import Budget, plan_scenarios, report_html, scenarios_json

    if args.gpu_hour_price is not None and args.tokens is None:
        raise PlanError("search.gpu_hour_price", "prices the training of a token budget",
                        "add --tokens N (e.g. 2e12)")
    budget = Budget(args.tokens, args.gpu_hour_price) if args.tokens is not None else None
    model = common.load_model_arg(args)
    profiles = [load_profile(name.strip()) for name in args.hardware.split(",") if name.strip()]
    if not profiles:
        raise PlanError("--hardware", "no profile given", "pass e.g. --hardware a100-80gb,h100-80gb")
    gpus = _numbers(args.gpus, "--gpus", int)
    scales = {resource: [f for f in _numbers(getattr(args, flag), "--" + flag.replace("_", "-"), float)
                         if f != 1.0]
              for flag, resource in SCALE_FLAGS.items() if getattr(args, flag)}
    fields = common.user_plan_fields(args)
    for required, flag in (("global_batch", "--global-batch"), ("seq_len", "--seq-len")):
        if required not in fields:
            raise PlanError(flag, "missing", f"pass {flag} N")
    fabrics = tuple(f.strip() for f in (args.fabric or "").split(",") if f.strip())
    scenarios = plan_scenarios(model, profiles, gpus, args.gpus_per_node, fields,
                               {r: f for r, f in scales.items() if f}, fabrics)
    write_atomic(args.out, report_html(model, scenarios, budget))
    if args.json:
        sys.stdout.write(dump_json({"tokens": args.tokens, "gpu_hour_price": args.gpu_hour_price,
                                    "html": args.out, "scenarios": scenarios_json(scenarios, budget)}))
        return 0
    solved = sum(1 for s in scenarios if s.best)
    print(f"meshplan whatif: {solved} of {len(scenarios)} scenarios have a plan that fits; "
          f"wrote {args.out}")
    return 0
