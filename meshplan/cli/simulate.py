"""`meshplan simulate`: predict one plan's step time, throughput and memory."""
from __future__ import annotations

import argparse
import sys

from meshplan.core.errors import PlanError
from meshplan.core.units import GIB, rate_text
from meshplan.cli import common as common
from meshplan.core.io import dump_json
from meshplan.simulator.plan import checked_plan


def register(subparsers) -> None:
    parser = common.plan_command(
        subparsers, "simulate", help="predict step time, throughput and per-device memory of one plan",
        description="Predict one training plan on a cluster: step time, tokens/s, MFU, "
                    "per-device memory, a time breakdown and the pipeline timeline.")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--trace", help="write a Chrome/Perfetto trace of the pipeline schedule")
    parser.add_argument("--timeline", help="write a plotly Gantt chart (HTML) of the schedule")
    schedule = "a serving plan has no pipeline schedule to draw"
    common.mode_only(parser, training={"trace": schedule, "timeline": schedule}, inference={})
    parser.set_defaults(handler=run)


def resolve(args: argparse.Namespace):
    """(model, plan, cluster, hardware profile) from the shared flags."""
    model, hw = common.model_and_profile(args)
    cluster = common.cluster_from_args(args, hw.gpus_per_node)
    plan = checked_plan(common.held_fields(common.user_plan_fields(args), hw), model, cluster)
    return model, plan, cluster, hw


def run(args: argparse.Namespace) -> int:
    from meshplan.simulator.train import simulate
    from meshplan.reports.timeline import write_chrome_trace, write_timeline_html

    common.refuse_other_mode_flags(args)
    if args.mode == "inference":
        return run_inference(args)
    model, plan, cluster, hw = resolve(args)
    result = simulate(model, plan, cluster, hw)
    if not result.fits:
        raise _over_memory(result, hw.memory_bytes)
    if args.trace:
        write_chrome_trace(result.pipeline, args.trace, label=result.label, op_comm=result.op_comm)
    if args.timeline:
        write_timeline_html(result.pipeline, args.timeline, title=result.label, op_comm=result.op_comm)
    if args.json:
        sys.stdout.write(dump_json(result.to_json()))
    else:
        print_summary(result)
        if hw.measured_on == "cpu":
            print(common.held_note("priced", plan.to_dict()))
    return 0


def run_inference(args: argparse.Namespace) -> int:
    from meshplan.simulator.serve import InferencePlan, simulate_inference

    model, hw = common.model_and_profile(args, serving=True)
    cluster = common.cluster_from_args(args, hw.gpus_per_node)
    plan = InferencePlan(**common.held_serving_fields(common.inference_plan_fields(args, cluster), hw))
    result = simulate_inference(model, plan, cluster, hw)
    if not result.fits:
        raise _over_memory_serving(result, hw.memory_bytes)
    if args.json:
        sys.stdout.write(dump_json(result.to_json()))
    else:
        print_inference_summary(result.to_json(), model.name, hw.name)
        if hw.measured_on == "cpu":
            print(f"priced as `meshplan run --mode inference` serves on these CPU ranks: weights and KV cache "
                  f"in {plan.dtype}")
    return 0


def _over_memory(result, capacity_bytes: float) -> PlanError:
    """The refusal of a training plan over the device's usable memory: its fullest stage's
    parts, and the knobs that would shrink them."""
    i = max(range(len(result.stages)), key=lambda k: result.stages[k].memory.total_bytes)
    mem, plan = result.stages[i].memory, result.plan
    parts = ", ".join(f"{name} {b / GIB:.1f}" for name, b in (
        ("weights", mem.weights_bytes), ("gradients", mem.gradients_bytes), ("optimizer", mem.optimizer_bytes),
        ("activations", mem.activations_bytes), ("buffers", mem.buffers_bytes)))
    helps = (["--zero 3 (shards weights, gradients and optimizer over the dp x cp ranks)"]
             if plan.zero < 3 and plan.dp * plan.cp > 1 else []) + (
             ["--recompute full"] if plan.recompute != "full" else []) + (
             ["a smaller --micro-batch"] if plan.micro_batch > 1 else []) + ["more --tp or --pp", "more --gpus"]
    return PlanError("plan", f"needs {result.peak_memory_bytes / GIB:.1f} GiB per device at its peak (stage {i}: "
                     f"{parts} GiB), over the {result.memory_limit_bytes / GIB:.1f} GiB usable of "
                     f"{capacity_bytes / GIB:.0f} GiB", "try " + ", ".join(helps)
                     + "; `meshplan plan` with the knobs you want held finds the fastest plan that fits")


def _over_memory_serving(result, capacity_bytes: float) -> PlanError:
    """The refusal of a serving plan over the device's usable memory."""
    batch = (f"--batch {result.max_batch} (the largest that fits), " if result.max_batch > 0 else "")
    return PlanError("plan", f"needs {result.peak_memory_bytes / GIB:.1f} GiB per device at its peak (weights "
                     f"{result.weights_bytes / GIB:.1f}, KV cache {result.kv_cache_bytes / GIB:.1f} GiB), over "
                     f"the {result.memory_limit_bytes / GIB:.1f} GiB usable of {capacity_bytes / GIB:.0f} GiB"
                     + ("" if batch else "; not even one sequence fits"),
                     f"try {batch}more --tp or --pp, or weights quantized (--quantization int8 or int4); "
                     "`meshplan plan --mode inference` finds the best layout that fits")


def params_text(params: int, active_params: int) -> str:
    """Total parameters, and the active ones per token where experts make them fewer."""
    total = f"{params:,} ({params / 1e9:.1f}B)"
    if active_params == params:
        return total
    return f"{total} total, {active_params:,} ({active_params / 1e9:.1f}B) active per token"


def print_inference_summary(data: dict, model_name: str, hardware: str) -> None:
    from rich.table import Table

    plan = data["plan"]
    table = Table(title=f"{model_name} serving on {hardware}", show_header=False)
    rows = (("parameters", params_text(data["params"], data["active_params"])),
            ("plan", f"tp {plan['tp']}  pp {plan['pp']}  replicas {plan['replicas']}  batch "
                     f"{plan['batch']}  prompt {plan['prompt_len']}  gen {plan['gen_len']}  {plan['dtype']}"
                     + ("" if plan["quantization"] == "none" else f"  weights {plan['quantization']}")
                     + ("  expert-parallel" if plan["expert_parallel"] else "")),
            ("time to first token", f"{data['ttft_s'] * 1e3:.1f} ms"),
            ("time per output token", f"{data['tpot_s'] * 1e3:.2f} ms"),
            ("latency (prompt + all tokens)", f"{data['latency_s']:.2f} s"),
            ("throughput", f"{rate_text(data['throughput_tokens_per_s'])} generated tokens/s"),
            ("KV cache per device", f"{data['kv_cache_bytes'] / GIB:.2f} GiB"),
            ("peak memory", f"{data['peak_memory_bytes'] / GIB:.1f} GiB of {data['memory_limit_bytes'] / GIB:.1f} "
                            f"GiB usable; max batch {data['max_batch']}"))
    for key, value in rows:
        table.add_row(key, value)
    common.console().print(table)


def print_summary(result) -> None:
    from rich.table import Table

    from meshplan.hw_profiles.accuracy import end_to_end_text, plan_kind
    from meshplan.planner.explain import communication_lines, split_lines
    from meshplan.simulator.train import mfu_text

    gib = GIB
    plan = result.plan
    console = common.console()
    head = Table(title=f"{result.model.name}: {result.cluster.num_gpus} x {result.hardware}",
                 show_header=False)
    exchange = f" ({plan.cp_comm})" if plan.cp > 1 and plan.cp_comm != "p2p" else ""
    knobs = (f"dp {plan.dp}  tp {plan.tp}{' +sp' if plan.sp else ''}  pp {plan.pp}  cp {plan.cp}{exchange}  "
             f"zero {plan.zero}  recompute {plan.recompute}  micro-batch {plan.micro_batch} x "
             f"{plan.num_microbatches}  schedule {plan.schedule}"
             + (f" (v={plan.virtual_stages})" if plan.virtual_stages > 1 else ""))
    lo, hi = result.error_band
    rows = (("parameters", params_text(result.model.num_params(), result.model.num_params(active=True))),
            ("plan", knobs),
            ("step time", f"{result.step_time_s:.3f} s  (error band ±{lo:.0%} median, ±{hi:.0%} p95)"),
            ("throughput", f"{rate_text(result.tokens_per_s)} tokens/s"),
            ("model TFLOP/s per GPU", f"{result.model_tflops_per_gpu:.1f}  (MFU {result.mfu:.1%}; "
                                      f"{result.mfu_causal:.1%} causal)"),
            ("peak memory", f"{result.peak_memory_bytes / gib:.1f} GiB of {result.memory_limit_bytes / gib:.1f}"
                            f" GiB usable"))
    for key, value in rows:
        head.add_row(key, value)
    console.print(head)
    parts = Table(title="where the step time goes (critical stage)")
    parts.add_column("term")
    parts.add_column("seconds", justify="right")
    parts.add_column("share", justify="right")
    for key, value in result.breakdown_s.items():
        parts.add_row(key, f"{value:.4f}", f"{value / result.step_time_s:.1%}")
    console.print(parts)
    for line in [mfu_text(result.mfu, result.mfu_causal), *communication_lines(result.communication),
                 f"error band: the profile's operator fits (held-out kernel and collective "
                 f"timings), not end to end; {end_to_end_text(plan_kind(result.model.num_experts, plan.cp))}"]:
        console.print(line, highlight=False)
    stages = Table(title="pipeline stages")
    for col in ("stage", "layers", "weights", "grads", "optimizer", "activations", "buffers",
                "total GiB", "compute s"):
        stages.add_column(col, justify="right")
    for i, st in enumerate(result.stages):
        mem = st.memory
        stages.add_row(str(i), str(st.layers), *(f"{x / gib:.2f}" for x in (
            mem.weights_bytes, mem.gradients_bytes, mem.optimizer_bytes, mem.activations_bytes,
            mem.buffers_bytes, mem.total_bytes)), f"{st.compute_s:.3f}")
    console.print(stages)
    for line in split_lines(result.layer_split):
        console.print(line, highlight=False)
