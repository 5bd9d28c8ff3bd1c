"""`meshplan plan`: search the legal plans, rank them, explain the winner, or emit it for
a training framework."""
from __future__ import annotations

import argparse
import sys

from meshplan.cli import common as common
from meshplan.cli.simulate import params_text
from meshplan.core.io import dump_json
from meshplan.core.errors import PlanError
from meshplan.core.units import GIB, rate_text
from meshplan.planner import launch_scripts



def register(subparsers) -> None:
    from meshplan.planner.exports import TARGETS
    from meshplan.planner.launch_scripts import KINDS

    parser = common.plan_command(
        subparsers, "plan", help="search for the fastest plan that fits, and explain why it wins",
        description="Search every legal plan (DP/TP/SP/CP/PP degrees, layer partition, ZeRO "
                    "stage, recompute, micro-batch, pipeline schedule, rank placement) for the "
                    "model on the cluster; any plan flag given is held fixed. Prints the ranked "
                    "plans and why the winner wins. With --tokens, also choose the GPU count: the "
                    "time and cost of training on each, and the smallest meeting --days.",
        gpu_counts=True)
    parser.add_argument("--slo-ttft-ms", type=float, help="serving: time-to-first-token limit")
    parser.add_argument("--slo-tpot-ms", type=float, help="serving: time-per-output-token limit")
    parser.add_argument("--top", type=int, default=10, help="plans to list (default 10)")
    capacity = parser.add_argument_group("how many GPUs, how long, how much")
    capacity.add_argument("--tokens", type=float, help="tokens to train on (e.g. 2e12): also search "
                          "the GPU count (--gpus as a list or range; default one node to 16384 GPUs)")
    capacity.add_argument("--days", type=float, help="deadline: answer with the smallest cluster "
                          "that trains --tokens within it")
    capacity.add_argument("--gpu-hour-price", type=float, help="price of one GPU-hour, to cost the run")
    parser.add_argument("--objective", choices=("throughput", "latency"), default="throughput",
                        help="what to optimise: tokens per second (default), or serving latency")
    out = parser.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print the ranked plans and the "
                     "explanation as JSON")
    out.add_argument("--emit", choices=TARGETS + ("vllm",), help="print only the best plan this "
                     "framework can run, as a script that launches it (torchtitan, Megatron-LM, "
                     "Megatron-DeepSpeed with its ds_config, or with --mode inference `vllm serve`) "
                     "or as meshplan plan JSON; the paths to add by hand are listed on stderr")
    emit = parser.add_argument_group("export (with --emit)")
    emit.add_argument("--target-version", help="the framework version to export for (torchtitan: "
                      "0.3, the default, or 0.2)")
    emit.add_argument("--model-id", help="the checkpoint's Hugging Face id or folder (default: the "
                      "config's _name_or_path, or the zoo model's released checkpoint)")
    emit.add_argument("--launch-script", choices=KINDS, default="torchrun",
                      help="how the script starts the job: plain torchrun run on every node "
                      "(default), or a Slurm sbatch script (srun torchrun)")
    capacity_only = "is for training runs: serving is sized by its load, not a token budget"
    serving_only = "is for serving plans"
    common.mode_only(parser, training={
        "tokens": capacity_only, "days": capacity_only, "gpu_hour_price": capacity_only,
        "target_version": "is for the training frameworks' exports (vLLM's is 0.33)"},
        inference={"slo_ttft_ms": serving_only, "slo_tpot_ms": serving_only, "objective": serving_only,
                   "model_id": "names the checkpoint that --emit vllm serves"})
    parser.set_defaults(handler=run)


def _check_top(top: int) -> None:
    if top < 1:
        raise PlanError("--top", f"must be >= 1, got {top}", "pass --top N with N >= 1")


def run(args: argparse.Namespace) -> int:
    from meshplan.planner.explain import explain
    from meshplan.planner.search import search

    common.gathered(lambda: _check_top(args.top), lambda: common.refuse_other_mode_flags(args))
    if args.mode == "inference":
        return run_inference(args)
    if args.tokens is not None or args.days is not None or args.gpu_hour_price is not None:
        return run_capacity(args)
    if args.emit == "vllm":
        raise PlanError("--emit vllm", "is for serving plans", "add --mode inference")
    model, hw = common.model_and_profile(args)
    cluster = common.cluster_from_args(args, hw.gpus_per_node)
    fixed = common.user_plan_fields(args)
    if args.emit:
        return emit(args, model, cluster, hw, fixed)
    fixed = common.held_fields(fixed, hw)
    found = search(model, cluster, hw, fixed)
    why = explain(model, cluster, hw, found.ranked, fixed, found.tried)
    if args.json:
        sys.stdout.write(dump_json({
            "params": model.num_params(), "active_params": model.num_params(active=True),
            "legal_plans": found.candidates, "feasible": found.feasible,
            "step_times_computed": found.evaluated, "simulated": found.simulated,
            "left_out_over_memory": found.over_memory,
            "search_time_s": found.search_time_s,
            "plans": [r.to_json() for r in found.ranked[:args.top]],
            "explanation": why.to_json()}))
    else:
        print_ranking(found, why, args.top)
        if hw.measured_on == "cpu":
            print(common.held_note("planned", fixed))
    return 0


def run_capacity(args: argparse.Namespace) -> int:
    """Search the GPU count too: each count's best plan, time to train and cost."""
    from meshplan.core.progress import wanted
    from meshplan.planner.capacity import capacity_search, check_budget, gpu_counts

    if args.tokens is None:
        raise PlanError("search.tokens", "missing", "give the token budget with --tokens (e.g. 2e12)")
    if args.emit:
        raise PlanError("emit", "emits one plan, not a choice of cluster", "drop --tokens, or --emit")
    (model, hw), _ = common.gathered(lambda: common.model_and_profile(args),
                                     lambda: check_budget(args.tokens, args.days, args.gpu_hour_price))
    per_node = common.gpus_per_node(args, hw.gpus_per_node)
    counts = gpu_counts(args.gpus or f"{per_node}-16384", per_node)
    fixed = common.held_fields(common.user_plan_fields(args), hw)
    missing = [(f"plan.{k}", "missing", "give it as a flag") for k in ("global_batch", "seq_len") if k not in fixed]
    if missing:
        raise PlanError.of(missing)
    found = capacity_search(model, hw, counts, per_node, fixed, args.tokens, args.days,
                            args.gpu_hour_price, progress=wanted(args.json))
    if args.days is not None and found.answer is None:
        done = [o for o in found.options if o.days is not None]
        fastest = min(done, key=lambda o: o.days) if done else None
        tried = (f"{counts[0]} GPUs do not train" if len(counts) == 1
                 else f"no count of {counts[0]}-{counts[-1]} GPUs trains")
        raise PlanError("search.days", f"{tried} {args.tokens:g} tokens within {args.days:g} "
                        f"day{'' if args.days == 1 else 's'}" + (f" (fastest: {fastest.days:.1f} days on "
                                                                 f"{fastest.gpus} GPUs)" if fastest else ""),
                        "allow more GPUs (--gpus) or more days, or a larger global batch")
    if args.json:
        sys.stdout.write(dump_json(found.to_json()))
        return 0
    from rich.table import Table

    table = Table(title=f"{model.name}: {args.tokens:g} tokens on {hw.name}, global batch "
                        f"{fixed['global_batch']} x {fixed['seq_len']}")
    for col in ("GPUs", "best plan", "step s", "days", "cost", ""):
        table.add_column(col, justify="right" if col not in ("best plan", "") else "left")
    for o in found.options:
        mark = "<- answer" if o is found.answer else ""
        if o.result is None:
            table.add_row(str(o.gpus), o.why_not, "-", "-", "-", "")
            continue
        table.add_row(str(o.gpus), o.result.plan.summary(), f"{o.result.step_time_s:.3f}", f"{o.days:.1f}",
                      "-" if o.cost is None else f"{o.cost:,.0f}", mark)
    common.console().print(table)
    if found.answer is not None:
        a = found.answer
        cost = "" if a.cost is None else f", costing {a.cost:,.0f} at {args.gpu_hour_price:g} per GPU-hour"
        how = f"within {args.days:g} days" if args.days is not None else "fastest"
        print(f"answer ({how}): {a.gpus} GPUs, {a.steps:,} steps of {a.result.step_time_s:.3f} s = "
              f"{a.days:.1f} days{cost}")
    return 0


def emit(args: argparse.Namespace, model, cluster, hw, fixed: dict) -> int:
    """The fastest plan the target runs, as its launch script (or plan JSON) on stdout; what
    the user must add by hand and what the target does differently on stderr."""
    from meshplan.planner import exports
    from meshplan.planner.exports.checkpoint import checkpoint_of
    from meshplan.planner.search import search

    target, version = args.emit, args.target_version
    exports.rule_set(target, version)
    dictated = {k: v for k, v in exports.dictated(target, fixed, hw).items() if k not in fixed}
    user = set(fixed)
    fixed, free = exports.target_fields(target, fixed, hw)
    if target == "plan" and args.launch_script != "torchrun":
        raise PlanError("emit.plan", "a plan JSON has no launch script", "use meshplan run "
                        "--plan FILE --launch-script, or --emit a framework")
    try:
        found = search(model, cluster, hw, fixed,
                       allowed=lambda table: exports.supported(target, model, table, version), free=free,
                       admits=lambda plan: exports.runs(target, model, plan, version))
    except PlanError as exc:
        if exc.field != "emit":
            raise
        # why the target runs none: the model it cannot build, else the knobs of the best plan
        # that the user held (the search was free to change the others), else all of them
        try:
            exports.check(target, model, search(model, cluster, hw, fixed).ranked[0].plan, version)
        except PlanError as why:
            unbuilt = [issue for issue in why.issues if issue[1].startswith("model: ")]
            held = [issue for issue in why.issues if issue[1].split(":")[0] in user]
            raise PlanError.of(unbuilt or held or list(why.issues)) from None
        raise
    checkpoint = checkpoint_of(args.model, model)
    artifact, first_error = None, None
    for result in found.ranked:  # the fastest whose pipeline split the target can express
        try:
            artifact = exports.export(target, exports.train_job(model, result, hw, checkpoint, version))
            break
        except PlanError as exc:
            first_error = first_error or exc
    if artifact is None:
        raise first_error
    if target == "plan":
        sys.stdout.write(artifact.files[0][1])
    else:
        launch = exports.launch(artifact, cluster.num_nodes, cluster.ranks_per_node)
        sys.stdout.write(launch_scripts.script(args.launch_script, launch))
    name = target + (f" {version}" if version else "")
    print(f"meshplan plan: best of {found.candidates:,} legal plans that {name} runs (none left out as "
          f"dominated: {name} may refuse the plan that dominates one): "
          f"{result.plan.summary()}" + (f"; priced with what {name} runs: " + ", ".join(
              f"{k.replace('_', ' ')} {getattr(result.plan, k)}" for k in dictated) if dictated else ""),
          file=sys.stderr)
    report_export(artifact)
    return 0


def report_export(artifact) -> None:
    """What the user adds by hand (the paths) and what the target does its own way."""
    for name, what in artifact.user_paths:
        print(f"meshplan plan: add by hand: {name} = {what}", file=sys.stderr)
    for note in artifact.notes:
        print(f"meshplan plan: note: {note}", file=sys.stderr)


def run_inference(args: argparse.Namespace) -> int:
    """Serving: search TP, PP, replicas and batch for the best throughput per GPU (or
    latency) that meets the SLOs."""
    from meshplan.planner import exports
    from meshplan.planner.exports import vllm
    from meshplan.planner.exports.checkpoint import checkpoint_of
    from meshplan.planner.explain import variant_text
    from meshplan.planner.serve_search import FIXABLE, explain_inference, search_inference

    if args.emit not in (None, "vllm"):
        raise PlanError("--emit", f"{args.emit} is a training format", "use --emit vllm with --mode inference")
    model, hw = common.model_and_profile(args, serving=True)
    cluster = common.cluster_from_args(args, hw.gpus_per_node)
    missing = [(flag, "missing", f"pass {flag} N with --mode inference")
               for flag, name in (("--prompt-len", "prompt_len"), ("--gen-len", "gen_len"))
               if getattr(args, name) is None]
    if missing:
        raise PlanError.of(missing)
    fixed = {k: getattr(args, k) for k in FIXABLE if getattr(args, k) is not None}
    fixed = common.held_serving_fields(fixed, hw)
    ms = lambda v: None if v is None else v / 1e3  # noqa: E731
    found = search_inference(model, cluster, hw, args.prompt_len, args.gen_len,
                             slo_ttft_s=ms(args.slo_ttft_ms), slo_tpot_s=ms(args.slo_tpot_ms),
                             objective=args.objective, fixed=fixed)
    if args.emit == "vllm":
        artifact = vllm.export(found[0][1], model, checkpoint_of(args.model, model), hw, args.model_id)
        per_node = cluster.ranks_per_node
        launch = exports.launch(artifact, max(1, found[0][0].num_gpus // per_node), per_node)
        sys.stdout.write(launch_scripts.script(args.launch_script, launch))
        report_export(artifact)
        return 0
    derived = variant_text(hw)
    if args.json:
        sys.stdout.write(dump_json({
            "params": model.num_params(), "active_params": model.num_params(active=True),
            "plans": [r.to_json() for _, r in list(found)[:args.top]],
            "explanation": explain_inference(found), "derived_profile": derived or None}))
        return 0
    from rich.table import Table

    table = Table(title=f"{model.name} ({params_text(model.num_params(), model.num_params(active=True))}) "
                        f"serving on {cluster.num_gpus} x {hw.name}: prompt {args.prompt_len}, generate "
                        f"{args.gen_len}")
    for col in ("rank", "tp", "pp", "replicas", "EP", "weights", "batch", "TTFT ms", "TPOT ms", "tokens/s",
                "per GPU", "peak GiB"):
        table.add_column(col, justify="right")
    for i, (plan, result) in enumerate(list(found)[:args.top], 1):
        data = result.to_json()
        table.add_row(str(i), str(plan.tp), str(plan.pp), str(plan.replicas),
                      "yes" if plan.expert_parallel else "-",
                      plan.dtype if plan.quantization == "none" else plan.quantization, str(plan.batch),
                      f"{data['ttft_s'] * 1e3:.1f}", f"{data['tpot_s'] * 1e3:.2f}",
                      rate_text(data['throughput_tokens_per_s']),
                      rate_text(data['throughput_tokens_per_s'] / cluster.num_gpus),
                      f"{data['peak_memory_bytes'] / GIB:.1f}")
    console = common.console()
    console.print(table)
    console.print(explain_inference(found))
    if derived:
        console.print(derived, highlight=False)
    if hw.measured_on == "cpu":
        console.print(f"planned as `meshplan run --mode inference` serves on these CPU ranks: weights and "
                      f"KV cache in {fixed['dtype']}", highlight=False)
    return 0


def _v_ranges(counts) -> str:
    """Virtual-stage counts as runs, e.g. "v14-16, v18"."""
    runs: list[list[int]] = []
    for v in sorted(set(counts)):
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return ", ".join(f"v{a}" if a == b else f"v{a}-{b}" for a, b in runs)


def print_ranking(found, why, top: int) -> None:
    from rich.table import Table

    from meshplan.planner.search import distinct

    best = found.ranked[0]
    console = common.console()
    model = best.model
    table = Table(title=f"{model.name} ({params_text(model.num_params(), model.num_params(active=True))}): "
                        f"{best.cluster.num_gpus} x {best.hardware}, global batch {best.plan.global_batch} x "
                        f"{best.plan.seq_len} tokens")
    for col in ("rank", "plan", "step s", "tokens/s", "MFU", "peak GiB", "headroom GiB"):
        table.add_column(col, justify="left" if col == "plan" else "right", no_wrap=col != "plan")
    rows = distinct(found.ranked, top)
    for i, (r, _) in enumerate(rows, start=1):
        table.add_row(str(i), r.plan.summary(), f"{r.step_time_s:.3f}", f"{r.tokens_per_s:,.0f}",
                      f"{r.mfu:.1%}", f"{r.peak_memory_bytes / GIB:.1f}",
                      f"{(r.memory_limit_bytes - r.peak_memory_bytes) / GIB:.1f}")
    console.print(table)
    folded = [f"rank {i}: {_v_ranges(v.plan.virtual_stages for v in variants)} (up to "
              f"{max(v.step_time_s for v in variants) / r.step_time_s - 1:.1%} slower)"
              for i, (r, variants) in enumerate(rows, start=1) if variants]
    if folded:
        console.print("other virtual-stage counts of these layouts, folded into their rows: "
                      + "; ".join(folded), highlight=False)
    console.print("[bold]why[/bold]")
    for line in why.lines():
        console.print(f"  {line}", highlight=False)
    console.print(f"searched {found.candidates:,} legal plans, those another beats in time and memory at "
                  f"once left out ({found.feasible:,} fit in memory; "
                  f"{found.over_memory:,} layouts left out first, their weights, gradients and "
                  f"optimizer states alone over it): "
                  f"closed-form step times for {found.evaluated:,}, discrete-event simulation of "
                  f"the best {found.simulated}, in {found.search_time_s:.2f} s", highlight=False)
