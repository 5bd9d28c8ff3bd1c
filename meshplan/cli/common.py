"""Arguments shared by the subcommands: model, cluster, hardware and plan flags.

Flag names follow Megatron-LM / torchtitan where they exist (tp, pp, dp, cp, micro-batch,
global-batch, recompute)."""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from meshplan.core.errors import PlanError
from meshplan.simulator.model_spec import ModelSpec, load_model
from meshplan.simulator.plan import ATTENTION, AXES, DTYPES, RECOMPUTE, SCHEDULES, Cluster, Plan, load_plan

PLAN_FLAGS = ("dp", "tp", "pp", "cp", "sp", "zero", "recompute", "micro_batch", "global_batch",
              "seq_len", "schedule", "virtual_stages", "dtype", "attention", "placement",
              "layer_partition")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="zoo name (e.g. llama-2-7b, gpt3-175b) or path to an HF config.json")


def add_cluster_args(parser: argparse.ArgumentParser, default_hardware: str = "a100-80gb") -> None:
    parser.add_argument("--hardware", default=default_hardware,
                        help="stock profile name (a100-80gb, h100-80gb, local) or a profile JSON path")
    parser.add_argument("--gpus", type=int, help="number of devices (ranks on a CPU machine)")
    parser.add_argument("--gpus-per-node", type=int,
                        help="devices per node (default: the profile's node size)")


def add_plan_args(parser: argparse.ArgumentParser) -> None:
    """Plan knobs; all default to None so a caller can tell which ones the user fixed."""
    g = parser.add_argument_group("plan")
    g.add_argument("--plan", help="plan JSON file (from simulate --json or plan --emit plan); "
                   "flags given as well override its fields")
    for axis in ("dp", "tp", "pp", "cp"):
        g.add_argument(f"--{axis}", type=int, help=f"{axis.upper()} degree")
    g.add_argument("--sp", "--sequence-parallel", dest="sp", action=argparse.BooleanOptionalAction,
                   default=None, help="sequence parallel (with TP; Megatron-LM's spelling too)")
    g.add_argument("--zero", type=int, choices=(0, 1, 2, 3), help="ZeRO stage (3 = FSDP)")
    g.add_argument("--recompute", choices=RECOMPUTE, help="activation recompute")
    g.add_argument("--micro-batch", type=int, help="micro-batch size (sequences)")
    g.add_argument("--global-batch", type=int, help="global batch size (sequences)")
    g.add_argument("--seq-len", type=int, help="sequence length (tokens)")
    g.add_argument("--schedule", choices=SCHEDULES, help="pipeline schedule")
    g.add_argument("--virtual-stages", type=int, help="model chunks per pipeline rank (interleaved)")
    g.add_argument("--dtype", choices=DTYPES, help="compute dtype (mixed precision, fp32 master)")
    g.add_argument("--attention", choices=ATTENTION, help="attention kernel (default flash)")
    g.add_argument("--placement", help=f"rank order innermost-first, default {','.join(AXES)}")
    g.add_argument("--layer-partition", help="layers per (virtual) stage, comma separated")


def add_inference_args(parser: argparse.ArgumentParser) -> None:
    """Serving knobs (used with --mode inference)."""
    parser.add_argument("--mode", choices=("training", "inference"), default="training",
                        help="plan a training step (default) or serving")
    g = parser.add_argument_group("inference (with --mode inference)")
    g.add_argument("--batch", type=int, help="concurrent sequences per replica")
    g.add_argument("--prompt-len", type=int, help="prompt tokens per sequence")
    g.add_argument("--gen-len", type=int, help="generated tokens per sequence")
    g.add_argument("--replicas", type=int, help="model replicas (data parallel serving)")
    g.add_argument("--kv-dtype", choices=("fp16", "bf16", "fp32", "fp8"), help="KV cache dtype")


def inference_plan_fields(args: argparse.Namespace, cluster: Cluster) -> dict:
    """InferencePlan fields from the flags; replicas default to GPUs / (tp*pp)."""
    fields = {}
    for flag, name in (("--batch", "batch"), ("--prompt-len", "prompt_len"), ("--gen-len", "gen_len")):
        value = getattr(args, name, None)
        if value is None:
            raise PlanError(flag, "missing", f"pass {flag} N with --mode inference")
        fields[name] = value
    for name in ("tp", "pp", "replicas", "kv_dtype"):
        if getattr(args, name, None) is not None:
            fields[name] = getattr(args, name)
    fields["dtype"] = args.dtype or "fp16"
    if "replicas" not in fields:
        per_replica = fields.get("tp", 1) * fields.get("pp", 1)
        if cluster.num_gpus % per_replica:
            raise PlanError("--gpus", f"{cluster.num_gpus} GPUs are not divisible by tp*pp = {per_replica}",
                            "choose tp and pp whose product divides the GPU count")
        fields["replicas"] = cluster.num_gpus // per_replica
    return fields


def user_plan_fields(args: argparse.Namespace) -> dict:
    """The plan fields the user gave, from --plan and then flags (flags win)."""
    fields = load_plan(args.plan).to_dict() if getattr(args, "plan", None) else {}
    for name in PLAN_FLAGS:
        value = getattr(args, name, None)
        if value is None:
            continue
        if name == "placement":
            value = tuple(v.strip() for v in value.split(","))
        elif name == "layer_partition":
            try:
                value = tuple(int(v) for v in value.split(","))
            except ValueError:
                raise PlanError("--layer-partition", f"{value!r} is not a list of integers",
                                "pass e.g. --layer-partition 10,12,12,10")
        fields[name] = value
    return fields


def cluster_from_args(args: argparse.Namespace, default_gpus_per_node: int) -> Cluster:
    if args.gpus is None:
        raise PlanError("--gpus", "missing GPU count", "pass --gpus N (the number of devices)")
    per_node = args.gpus_per_node or min(default_gpus_per_node, args.gpus)
    return Cluster(num_gpus=args.gpus, gpus_per_node=per_node)


def complete_plan(fields: dict, cluster: Cluster) -> Plan:
    """Fill the data-parallel degree from the GPU count when it is the one axis left open."""
    fields = dict(fields)
    for required, flag in (("global_batch", "--global-batch"), ("seq_len", "--seq-len")):
        if required not in fields:
            raise PlanError(flag, "missing", f"pass {flag} N (or a --plan file that has it)")
    if "dp" not in fields:
        other = fields.get("tp", 1) * fields.get("pp", 1) * fields.get("cp", 1)
        if cluster.num_gpus % other:
            raise PlanError("--gpus", f"{cluster.num_gpus} GPUs are not divisible by tp*pp*cp = {other}",
                            "choose tp, pp, cp whose product divides the GPU count")
        fields["dp"] = cluster.num_gpus // other
    if fields.get("schedule") == "interleaved" and "virtual_stages" not in fields:
        fields["virtual_stages"] = 2
    return Plan(**fields)


def load_model_arg(args: argparse.Namespace) -> ModelSpec:
    return load_model(args.model)


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a whole file or nothing: a temp file beside it, renamed at the end."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def dump_json(data: dict) -> str:
    return json.dumps(data, indent=2, sort_keys=False) + "\n"
