"""`meshplan run`: run one plan on real processes (torchrun) and print predicted vs measured;
`--mode inference` serves a batch with greedy generation instead."""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from meshplan.cli import common
from meshplan.core.errors import PlanError
from meshplan.core.io import dump_json, write_atomic
from meshplan.core.progress import wanted
from meshplan.core.units import rate_text
from meshplan.planner import launch_scripts
from meshplan.simulator import rules
from meshplan.simulator.plan import Cluster, checked_plan


def register(subparsers) -> None:
    parser = common.plan_command(
        subparsers, "run", help="run a plan on real ranks (torchrun) and compare with the prediction",
        description="Train a few steps of a plan on real processes, one rank per device (on a "
                    "CPU machine --gpus N means N ranks of one thread each), and report the "
                    "measured step time, memory and losses beside the simulator's prediction. "
                    "With --mode inference, generate greedily with a KV cache (prefill, then "
                    "decode) and report TTFT, TPOT, latency, throughput and memory instead.",
        default_hardware="local")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed generations, after the warm-up (--mode inference; default 3)")
    parser.add_argument("--steps", type=int, default=20, help="training steps (default 20)")
    parser.add_argument("--warmup", type=int, default=3,
                        help="first steps (or generations) left out of the timing (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="weights and synthetic data seed")
    parser.add_argument("--data", help=".npy file of int token ids (default: synthetic tokens)")
    parser.add_argument("--nnodes", type=int, default=1, help="machines taking part (default 1)")
    parser.add_argument("--node-rank", type=int, default=0, help="this machine's index")
    parser.add_argument("--rdzv-endpoint",
                        help="HOST:PORT of the c10d rendezvous on node 0, which hosts it (several nodes)")
    parser.add_argument("--rdzv-timeout-s", type=float, default=600.0,
                        help="how long the nodes wait for each other at the rendezvous (default 600)")
    parser.add_argument("--timeout-s", type=float, default=60.0,
                        help="process-group timeout: a stuck collective fails after this long")
    faults = parser.add_argument_group("checkpoints and restarts (training)")
    faults.add_argument("--checkpoint-dir",
                        help="folder for checkpoints (torch.distributed.checkpoint); shared by all nodes")
    faults.add_argument("--checkpoint-every", type=int,
                        help="save a checkpoint every N steps (default: after the last step only)")
    faults.add_argument("--resume", action="store_true",
                        help="continue from the newest checkpoint in --checkpoint-dir (from step 0 "
                             "if it has none); a changed parallel layout is resharded")
    faults.add_argument("--max-restarts", type=int, default=0,
                        help="torchrun restarts every rank up to N times after a failure, each "
                             "time from the newest checkpoint (needs --checkpoint-dir)")
    common.add_probe_args(parser)
    parser.add_argument("--json", action="store_true", help="print predicted vs measured as JSON")
    parser.add_argument("--record", help="write the full run record (JSON) to this path")
    parser.add_argument("--launch-script", choices=launch_scripts.KINDS,
                        help="print a script that runs this plan across the cluster's nodes instead "
                        "of running it here: slurm (an sbatch script; srun starts meshplan run on "
                        "each node) or torchrun (run the script on each node)")
    stateless = "serving runs keep no state to checkpoint or restart from"
    common.mode_only(parser, training={
        "steps": "serving runs generate (--repeats times), they take no steps",
        "nnodes": "serving runs on one machine", "rdzv_endpoint": "serving runs on one machine",
        "node_rank": "serving runs on one machine",
        "launch_script": "serving runs on one machine (vLLM serves across machines: meshplan plan "
                         "--mode inference --emit vllm)",
        "data": "serving runs generate from synthetic prompts drawn from --seed",
        "checkpoint_dir": stateless, "checkpoint_every": stateless, "resume": stateless,
        "max_restarts": stateless}, inference={"repeats": "training times its --steps"})
    parser.set_defaults(handler=run)


def resolve(args: argparse.Namespace):
    """(model, plan, cluster): --gpus defaults to the plan's world size; a node holds the
    ranks of one machine."""
    model = common.load_model_arg(args)
    fields = common.user_plan_fields(args)
    gpus = (args.gpus if args.gpus is not None
            else math.prod(fields.get(a, 1) for a in ("dp", "tp", "pp", "cp")))
    per_node = common.gpus_per_node(args, max(1, gpus // max(1, args.nnodes)))
    cluster = Cluster(num_gpus=gpus, gpus_per_node=per_node)
    return model, checked_plan(fields, model, cluster, also=rules.EXECUTOR_TRAINING), cluster


def run(args: argparse.Namespace) -> int:
    from meshplan.executor.launch import launch_train
    from meshplan.executor.options import RunOptions, refuse

    common.gathered(lambda: common.refuse_other_mode_flags(args), lambda: _refuse_probe_flags(args))
    if args.mode == "inference":
        return run_inference(args)
    options = RunOptions(steps=args.steps, warmup=args.warmup, seed=args.seed, data=args.data,
                         profile=args.hardware, timeout_s=args.timeout_s, nnodes=args.nnodes,
                         node_rank=args.node_rank, rdzv_endpoint=args.rdzv_endpoint,
                         rdzv_timeout_s=args.rdzv_timeout_s, progress=wanted(args.json),
                         checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every,
                         resume=args.resume, max_restarts=args.max_restarts)
    # the plan's and the options' mistakes in one line (a script carries the options to each node)
    (model, plan, cluster), _ = common.gathered(lambda: resolve(args), lambda: refuse(options.issues()))
    if args.launch_script:
        sys.stdout.write(launch_scripts.script(args.launch_script, run_launch(args, model, plan, cluster)))
        return 0
    return report(args, cluster, lambda checked: launch_train(model, plan, cluster, options, checked),
                  print_summary)


PLAN_FILE = "meshplan-plan.json"


def _refuse_probe_flags(args: argparse.Namespace) -> None:
    """--rescale rescales by the probe, which --no-probe turns off."""
    if args.rescale and not args.probe:
        raise PlanError("--rescale", "rescales the prediction by the probe, which --no-probe skips",
                        "drop --no-probe, or --rescale")


def run_launch(args: argparse.Namespace, model, plan, cluster) -> launch_scripts.Launch:
    """This run as a launch: the plan in a file beside the script, and on each node
    `meshplan run` with the same options, meeting the others at the first node."""
    if plan.world_size % cluster.ranks_per_node:
        raise PlanError("cluster.gpus_per_node", f"{plan.world_size} ranks do not fill nodes of "
                        f"{cluster.ranks_per_node}", "use a GPU count that is a multiple of the GPUs per node")
    def path(value):  # nodes see the same files under the same absolute paths
        return str(Path(value).resolve()) if Path(value).exists() else value

    words = ["--model", path(args.model), "--hardware", path(args.hardware),
             "--gpus", str(plan.world_size), "--gpus-per-node", str(cluster.ranks_per_node),
             "--plan", PLAN_FILE, "--steps", str(args.steps), "--warmup", str(args.warmup),
             "--seed", str(args.seed), "--timeout-s", str(args.timeout_s)]
    words += ["--data", path(args.data)] if args.data else []
    words += ["--rdzv-timeout-s", str(args.rdzv_timeout_s)]
    # checkpoints are saved and read by every node under one path (a shared file system)
    words += ["--checkpoint-dir", str(Path(args.checkpoint_dir).resolve())] if args.checkpoint_dir else []
    words += ["--checkpoint-every", str(args.checkpoint_every)] if args.checkpoint_every else []
    words += ["--resume"] if args.resume else []
    words += ["--max-restarts", str(args.max_restarts)] if args.max_restarts else []
    words += ["--record", args.record] if args.record else []
    words += ["--json"] if args.json else []
    words += ["--no-probe"] if not args.probe else []
    words += ["--rescale"] if args.rescale else []
    return launch_scripts.Launch(
        name="meshplan-run", header=f"meshplan run: {model.name}, {plan.world_size} ranks on "
        f"{cluster.num_nodes} node(s) of {cluster.ranks_per_node}", nnodes=cluster.num_nodes,
        gpus_per_node=cluster.ranks_per_node, rendezvous="meshplan", program=("meshplan", "run"),
        args=tuple(words), files=((PLAN_FILE, dump_json(plan.to_dict())),))


def report(args: argparse.Namespace, cluster: Cluster, launch_run, print_table, serving: bool = False) -> int:
    """Launch (once the run has passed its checks, note ranks crowding the cores beyond
    what validate checks, and probe the machine against the profile: common.probe_machine),
    then write the record (--record) and print the summary (--json or a table), with the
    prediction on the rescaled profile beside the stock one under --rescale; a failed run is
    one line on stderr and exit code 1. Where the probe timed the one-rank step, it is read
    again after the run and the two readings' median (their mean) rescales, as `meshplan
    validate` does after each launch; a `serving` run's probe times the decode step too."""
    from meshplan.calibration.probe import decode_ratio, repredicted, step_ratio
    from meshplan.executor.launch import RunFailed, crowding_note
    from meshplan.hw_profiles.profile import load_profile

    probed = []  # (profile, drift) once the run has passed its checks

    def probe():
        note = crowding_note(cluster.ranks_per_node)
        if note:
            print(f"meshplan run: note: {note}", file=sys.stderr)
        hw = load_profile(args.hardware)
        probed.append((hw, common.probe_machine(args, hw, collective=cluster.ranks_per_node > 1,
                                                decode=serving)))
    try:
        record = launch_run(probe)
    except RunFailed as exc:
        print(f"meshplan run: run failed: {exc}", file=sys.stderr)
        return 1
    hw, drift = probed[0] if probed else (None, None)
    if drift is not None and drift.timed_step:
        drift = common.probe_again(args, hw, drift, [step_ratio(hw)], "the run",
                                   [decode_ratio(hw)] if serving else [])
    rescaled = (repredicted(record, cluster, drift.rescaled)
                if drift is not None and drift.rescaled is not None else None)
    if args.record:
        write_atomic(args.record, dump_json(record.to_json()))
    if args.json:
        sys.stdout.write(dump_json(summary_json(record, drift, rescaled)))
    else:
        print_table(record, rescaled)
    return 0


def summary_json(record, drift, rescaled) -> dict:
    """What --json prints: the record's summary, the probe's ratios (with --no-probe:
    absent) and the predictions on the rescaled profile (with --rescale)."""
    out = record.summary_json()
    if drift is not None:
        out["probe"] = drift.to_json()
    if rescaled is not None:
        out["rescaled"] = {k: v for k, v in rescaled.summary_json().items()
                           if k.startswith("predicted_") or k in ("profile", "prediction_note")}
    return out


def prediction_columns(table, rescaled) -> None:
    """The columns of a predicted-vs-measured table: stock prediction, the rescaled one
    (with --rescale), measurement."""
    for col in ("", "predicted", *(("predicted, rescaled",) if rescaled else ()), "measured"):
        table.add_column(col, justify="right")


def show(table, rescaled) -> None:
    """Print the table, and under it the rescaled profile's name (its factors)."""
    common.console().print(table)
    if rescaled is not None:
        print(f"rescaled: profile {rescaled.profile}")


def dtype_label(record) -> str:
    """The dtype that ran, and the one asked for when the device changed it."""
    ran = record.plan.dtype
    return ran if ran == record.dtype_requested else f"{ran}, {record.dtype_requested} requested"


def print_summary(record, rescaled=None) -> None:
    from rich.table import Table

    mib = 2 ** 20
    summary = record.summary_json()
    predictions = [r.summary_json() for r in (record, rescaled) if r is not None]
    plan = record.plan
    ran = dtype_label(record)
    table = Table(title=f"{record.model.name}: {record.world_size} ranks on {record.device} "
                        f"({ran}), profile {record.profile}")
    prediction_columns(table, rescaled)

    def fmt(value, unit_scale=1.0, spec=".4f"):
        return "n/a" if value is None else format(value / unit_scale, spec)

    def tokens_per_s(step_s):
        return plan.global_batch * plan.seq_len / step_s if step_s else None

    spread = summary["step_time_spread_s"]
    table.add_row("step time (s)", *(fmt(p["predicted_step_time_s"]) for p in predictions),
                  f"{summary['measured_step_time_s']:.4f} (IQR {spread:.4f})")
    table.add_row("tokens/s", *(fmt(tokens_per_s(p["predicted_step_time_s"]), spec=",.0f")
                                for p in predictions), f"{summary['tokens_per_s']:,.0f}")
    table.add_row("peak memory (MiB)", *(fmt(p["predicted_peak_memory_bytes"], mib, ".1f")
                                         for p in predictions),
                  f"{summary['measured_peak_memory_bytes'] / mib:.1f}")
    show(table, rescaled)
    losses = summary["losses"]
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps")
    print(f"measured memory: {summary['memory_method']}")
    if plan.ep > 1:
        print(f"routing measured: the busiest expert-parallel rank ran {plan.moe_capacity_factor:.2f}x "
              f"the balanced share of rows (averaged over MoE forwards); predicted with that "
              f"as --moe-capacity-factor")
    if record.prediction_note:
        print(record.prediction_note)


def run_inference(args: argparse.Namespace) -> int:
    """Serve one inference plan on this machine: --gpus defaults to tp * pp * replicas."""
    from meshplan.executor.launch import launch_serve
    from meshplan.executor.options import ServeOptions
    from meshplan.simulator.serve import InferencePlan

    model = common.load_serving_model(args)
    gpus = args.gpus if args.gpus is not None else (args.tp or 1) * (args.pp or 1) * (args.replicas or 1)
    cluster = Cluster(num_gpus=gpus, gpus_per_node=common.gpus_per_node(args, gpus))
    plan = InferencePlan(**common.inference_plan_fields(args, cluster))
    options = ServeOptions(warmup=args.warmup, repeats=args.repeats, seed=args.seed,
                           profile=args.hardware, timeout_s=args.timeout_s,
                           rdzv_timeout_s=args.rdzv_timeout_s, progress=wanted(args.json))
    return report(args, cluster, lambda checked: launch_serve(model, plan, cluster, options, checked),
                  print_inference_summary, serving=True)


def print_inference_summary(record, rescaled=None) -> None:
    from rich.table import Table

    mib = 2 ** 20
    s = record.summary_json()
    predictions = [r.summary_json() for r in (record, rescaled) if r is not None]
    plan = record.plan
    ran = dtype_label(record)
    requested_kv = record.kv_dtype_requested
    if requested_kv not in (None, plan.kv_dtype):  # the device's dtype holds the cache too
        ran += f"; KV cache {plan.kv_dtype}, {requested_kv} requested"
    table = Table(title=f"{record.model.name} serving: {record.world_size} ranks on "
                        f"{record.device} ({ran}), profile {record.profile}; tp {plan.tp} pp "
                        f"{plan.pp} replicas {plan.replicas}, batch {plan.batch}, prompt "
                        f"{plan.prompt_len}, gen {plan.gen_len}")
    prediction_columns(table, rescaled)

    def fmt(value, scale=1.0, spec=".2f"):
        if value is None:
            return "n/a"
        return spec(value * scale) if callable(spec) else format(value * scale, spec)

    rows = (("time to first token (ms)", "ttft_s", 1e3, ".2f"),
            ("time per output token (ms)", "tpot_s", 1e3, ".3f"),
            ("latency (s)", "latency_s", 1.0, ".3f"),
            ("throughput (generated tokens/s)", "throughput_tokens_per_s", 1.0, rate_text),
            ("weights per rank (MiB)", "weights_bytes", 1 / mib, ".2f"),
            ("KV cache per rank (MiB)", "kv_cache_bytes", 1 / mib, ".2f"),
            ("peak memory (MiB)", "peak_memory_bytes", 1 / mib, ".2f"))
    for label, key, scale, spec in rows:
        table.add_row(label, *(fmt(p[f"predicted_{key}"], scale, spec) for p in predictions),
                      fmt(s[f"measured_{key}"], scale, spec))
    show(table, rescaled)
    rss = max(m["max_rss_bytes"] for m in record.memory_by_rank)
    print(f"measured memory: {s['memory_method']}; peak RSS {rss / mib:.0f} MiB")
    print(f"first sequence's tokens: {s['generated_tokens'][0]}")
    if record.prediction_note:
        print(record.prediction_note)
