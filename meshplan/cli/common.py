"""Arguments shared by the subcommands: model, cluster, hardware and plan flags.

Flag names follow Megatron-LM / torchtitan where they exist (tp, pp, dp, cp, micro-batch,
global-batch, recompute)."""
from __future__ import annotations

import argparse
import dataclasses
import sys

from meshplan.core.errors import MeshplanError, PlanError
from meshplan.executor.options import EXECUTOR_KERNELS, serving_dtype, training_fields
from meshplan.simulator.model_spec import LoadedModel, ModelSpec, read_model
from meshplan.simulator.partition import parse_partition
from meshplan.simulator.plan import Cluster, Plan, count_issue, load_plan_fields
from meshplan.simulator.quantize import QUANTIZATIONS
from meshplan.simulator.serve import InferencePlan

# Errors name fields; these are the fields whose flag is not `--` + the field's name.
FLAG_OF = {"cluster.num_gpus": "--gpus", "cluster.gpus_per_node": "--gpus-per-node",
           "plan_file": "--plan", "model": "--model", "hardware": "--hardware", "emit": "--emit"}
# Inference plan fields that have no training namesake (tp, pp and dtype are shared flags).
SERVING_ONLY = ("batch", "prompt_len", "gen_len", "replicas", "kv_dtype", "quantization", "quant_group_size",
                "expert_parallel")


# Where stdout is a file or a pipe, rich sizes its console at 80 columns (or COLUMNS),
# which cuts a wide table's figures to "-41.…": such output gets this width.
PIPED_WIDTH = 160


def console():
    """A rich Console on stdout: the terminal's width, or PIPED_WIDTH where stdout is not a
    terminal."""
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else PIPED_WIDTH)


def flag(field: str) -> str:
    """The command-line spelling of an error's field: plan.micro_batch -> --micro-batch,
    cluster.num_gpus -> --gpus, emit.megatron -> --emit megatron; other fields (a config
    file's key, a profile's entry) print as they are."""
    if field in FLAG_OF:
        return FLAG_OF[field]
    scope, dot, name = field.partition(".")
    if dot and scope == "emit":
        return f"--emit {name}"
    if dot and scope in ("plan", "run", "search", "whatif", "measure", "serve"):
        return "--" + name.replace("_", "-")
    return field


def add_dataclass_args(group, cls, names: tuple[str, ...] | None = None) -> None:
    """One flag per field of a plan dataclass (or those in `names`), from the field's
    metadata (plan.knob): --name-with-dashes, its aliases, help and choices; booleans get
    --no-... forms; tuples are comma separated. Every flag defaults to None, so a caller can
    tell which ones the user fixed."""
    for f in dataclasses.fields(cls):
        if names is not None and f.name not in names:
            continue
        meta, kind = f.metadata, str(f.type)
        flags = (f"--{f.name.replace('_', '-')}", *meta.get("aliases", ()))
        if kind.startswith("bool"):
            group.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction,
                               default=None, help=meta.get("help"))
        elif kind.startswith("tuple"):
            group.add_argument(*flags, dest=f.name, help=meta.get("help"))
        else:
            types = {"int": int, "float": float}
            group.add_argument(*flags, dest=f.name, type=types.get(kind.split(" ")[0], str),
                               choices=meta.get("choices"), help=meta.get("help"))


def dataclass_fields(args: argparse.Namespace, cls, names: tuple[str, ...] | None = None) -> dict:
    """The fields of `cls` the user gave as flags, parsed (tuples from comma lists)."""
    out = {}
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name, None)
        if value is None or (names is not None and f.name not in names):
            continue
        if str(f.type).startswith("tuple[int"):
            try:
                value = parse_partition(value)
            except ValueError:
                raise PlanError(f"plan.{f.name}", f"{value!r} is not a list of integers",
                                "pass integers separated by commas, a run as count*repeat, e.g. "
                                "10,12,12,10 or 1,2*38,1") from None
        elif str(f.type).startswith("tuple[str"):
            value = tuple(v.strip() for v in value.split(","))
        out[f.name] = value
    return out


def plan_command(subparsers, name: str, help: str, description: str,
                 default_hardware: str = "a100-80gb", gpu_counts: bool = False) -> argparse.ArgumentParser:
    """A subcommand taking a model, a cluster, the plan knobs and the serving knobs;
    `gpu_counts`: --gpus may list or range several counts."""
    parser = subparsers.add_parser(name, help=help, description=description)
    add_model_args(parser)
    add_cluster_args(parser, default_hardware, gpu_counts)
    add_plan_args(parser)
    add_inference_args(parser)
    return parser


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="zoo name (e.g. llama-2-7b, gpt3-175b) or path to an HF config.json")


def add_cluster_args(parser: argparse.ArgumentParser, default_hardware: str = "a100-80gb",
                     gpu_counts: bool = False) -> None:
    parser.add_argument("--hardware", default=default_hardware,
                        help="stock profile name (a100-80gb, h100-80gb, local) or a profile JSON path")
    if gpu_counts:
        parser.add_argument("--gpus", help="number of devices; with --tokens also a list (256,512) or "
                                           "a doubling range (64-4096) of counts to choose from")
    else:
        parser.add_argument("--gpus", type=int, help="number of devices (ranks on a CPU machine)")
    parser.add_argument("--gpus-per-node", type=int,
                        help="devices per node (default: the profile's node size)")


def add_plan_args(parser: argparse.ArgumentParser) -> None:
    """Plan knobs (one per Plan field); all default to None so a caller can tell which ones
    the user fixed."""
    g = parser.add_argument_group("plan")
    g.add_argument("--plan", help="plan JSON file (from simulate --json or plan --emit plan, or "
                   "some plan fields); flags given as well override its fields and fill the rest")
    add_dataclass_args(g, Plan)


def add_inference_args(parser: argparse.ArgumentParser) -> None:
    """Serving knobs (used with --mode inference)."""
    parser.add_argument("--mode", choices=("training", "inference"), default="training",
                        help="plan a training step (default) or serving")
    g = parser.add_argument_group("inference (with --mode inference)")
    add_dataclass_args(g, InferencePlan, SERVING_ONLY)


def mode_only(parser: argparse.ArgumentParser, training: dict[str, str], inference: dict[str, str]) -> None:
    """Records the subcommand's own options that one mode alone reads (dest: why the other
    mode has no use for it) with their defaults, for refuse_other_mode_flags; call it once
    every option is added."""
    parser.set_defaults(mode_only={mode: {dest: (why, parser.get_default(dest)) for dest, why in options.items()}
                                   for mode, options in (("training", training), ("inference", inference))})


def refuse_other_mode_flags(args: argparse.Namespace) -> None:
    """One error naming every flag the mode does not read: a training knob (or a --plan
    file) with --mode inference, a serving knob without it, and the subcommand's options of
    the other mode (mode_only) given other than their defaults; ignoring one would answer a
    question the user did not ask."""
    serving = args.mode == "inference"
    if serving:
        shared = {f.name for f in dataclasses.fields(InferencePlan)}
        issues = [(f"plan.{name}", "is a training knob, which serving does not read", "drop it with --mode inference")
                  for name in dataclass_fields(args, Plan) if name not in shared]
        if getattr(args, "plan", None):
            issues.append(("plan_file", "holds a training plan, which serving does not read",
                           "give the serving flags instead (--tp, --pp, --batch, ...)"))
    else:
        issues = [(f"plan.{name}", "is a serving knob", "add --mode inference, or drop it")
                  for name in dataclass_fields(args, InferencePlan, SERVING_ONLY)]
    other = getattr(args, "mode_only", {}).get("training" if serving else "inference", {})
    issues += [("--" + dest.replace("_", "-"), why, "drop it with --mode inference" if serving
                else "add --mode inference, or drop it")
               for dest, (why, default) in other.items() if getattr(args, dest) != default]
    if issues:
        raise PlanError.of(issues)


def inference_plan_fields(args: argparse.Namespace, cluster: Cluster) -> dict:
    """InferencePlan fields from the flags; replicas default to GPUs / (tp*pp)."""
    fields = dataclass_fields(args, InferencePlan, SERVING_ONLY + ("tp", "pp", "dtype"))
    missing = [(f"plan.{name}", "missing", "give it with --mode inference")
               for name in ("batch", "prompt_len", "gen_len") if name not in fields]
    if missing:
        raise PlanError.of(missing)
    if "replicas" not in fields:
        per_replica = fields.get("tp", 1) * fields.get("pp", 1)
        if cluster.num_gpus % per_replica:
            raise PlanError("cluster.num_gpus", f"{cluster.num_gpus} GPUs are not divisible by "
                            f"tp*pp = {per_replica}", "choose tp and pp whose product divides the GPU count")
        fields["replicas"] = cluster.num_gpus // per_replica
    return fields


def user_plan_fields(args: argparse.Namespace) -> dict:
    """The plan fields the user gave, from --plan and then flags (flags win). A file's etp
    that only restates its tp (the default) follows a --tp flag."""
    fields = load_plan_fields(args.plan) if getattr(args, "plan", None) else {}
    flags = dataclass_fields(args, Plan)
    if "tp" in flags and "etp" not in flags and fields.get("etp") == fields.get("tp"):
        fields.pop("etp", None)
    return {**fields, **flags}


def gathered(*checks):
    """Each check's result, in order; where some raise, one error naming every issue they
    raised (the first one's kind), so that independent mistakes are all reported at once."""
    results, issues, kind = [], [], None
    for check in checks:
        try:
            results.append(check())
        except MeshplanError as exc:
            issues += exc.issues
            kind = kind or type(exc)
    if issues:
        raise kind.of(issues)
    return results


def model_and_profile(args: argparse.Namespace, serving: bool = False):
    """(--model as the mode reads it, the --hardware profile), one error naming both where
    both are wrong."""
    from meshplan.hw_profiles.profile import load_profile

    return gathered(lambda: (load_serving_model if serving else load_model_arg)(args),
                    lambda: load_profile(args.hardware))


def gpus_per_node(args: argparse.Namespace, default: int) -> int:
    """--gpus-per-node, or `default` where it is not given; a count below 1 is refused."""
    if args.gpus_per_node is None:
        return default
    issue = count_issue("cluster", "gpus_per_node", args.gpus_per_node)
    if issue:
        raise PlanError(*issue)
    return args.gpus_per_node


def cluster_from_args(args: argparse.Namespace, default_gpus_per_node: int) -> Cluster:
    if args.gpus is None:
        raise PlanError("cluster.num_gpus", "missing GPU count", "pass --gpus N (the number of devices)")
    gpus = args.gpus
    if isinstance(gpus, str):
        if not gpus.strip().isdigit():
            raise PlanError("cluster.num_gpus", f"{gpus!r} is not one GPU count",
                            "pass --gpus N, or add --tokens to choose among several counts")
        gpus = int(gpus)
    return Cluster(num_gpus=gpus, gpus_per_node=gpus_per_node(args, min(default_gpus_per_node, max(gpus, 1))))


def load_model_arg(args: argparse.Namespace) -> ModelSpec:
    """The --model of a training command, with notes on stderr naming the config keys it
    ignored (they change no cost) and the checkpoint's stored quantization (training prices
    the plan's --dtype)."""
    loaded = _loaded(args)
    if loaded.stored is not None:
        _note(args, f"{args.model}: its quantization_config stores the weights as {loaded.stored.method}; "
                    "training prices them in the plan's --dtype")
    return loaded.spec


def load_serving_model(args: argparse.Namespace) -> ModelSpec:
    """The --model of a serving command. A checkpoint stored quantized (its
    quantization_config) is served as stored, as vLLM serves it, unless --quantization says
    otherwise: args.quantization (and quant_group_size) are set from it, with a note; a
    storage meshplan does not price needs --quantization to choose what is priced."""
    loaded = _loaded(args)
    stored = loaded.stored
    if stored is None:
        return loaded.spec
    if args.quantization is not None:
        if args.quantization != stored.quantization:
            _note(args, f"{args.model}: its quantization_config stores the weights as {stored.method}; "
                        f"pricing --quantization {args.quantization} (a checkpoint stored so is needed)")
        return loaded.spec
    if stored.quantization is None:
        raise PlanError(f"{args.model}:quantization_config", f"the checkpoint stores its weights as "
                        f"{stored.method}, which meshplan does not price",
                        f"pass --quantization ({', '.join(QUANTIZATIONS)}) to choose the weights priced")
    args.quantization = stored.quantization
    if stored.group_size is not None and args.quant_group_size is None:
        args.quant_group_size = stored.group_size
    _note(args, f"{args.model}: serving the weights as stored, {stored.method} (--quantization "
                f"{stored.quantization}, its quantization_config); --quantization none prices 16-bit weights")
    return loaded.spec


def _loaded(args: argparse.Namespace) -> LoadedModel:
    """read_model of --model, with notes naming the config keys it ignored and the sizes its
    architecture's defaults gave."""
    loaded = read_model(args.model)
    if loaded.ignored_keys:
        _note(args, f"{args.model}: ignored keys (they change no cost): {', '.join(loaded.ignored_keys)}")
    if loaded.defaulted:
        _note(args, f"{args.model}: sizes it leaves out, read as its model_type's defaults (as transformers "
                    f"reads them): {', '.join(f'{k} {v}' for k, v in loaded.defaulted)}")
    return loaded


def _note(args: argparse.Namespace, text: str) -> None:
    print(f"meshplan {args.command}: note: {text}", file=sys.stderr)


def add_probe_args(parser: argparse.ArgumentParser) -> None:
    """--no-probe and --rescale: the few seconds' probe of this machine before running."""
    parser.add_argument("--no-probe", dest="probe", action="store_false",
                        help="skip the few seconds' probe of this machine against the profile")
    parser.add_argument("--rescale", action="store_true",
                        help="also predict with the profile's speed terms rescaled by the probe, and "
                             "report both")


def probe_machine(args: argparse.Namespace, hw, collective: bool, decode: bool = False):
    """calibration.probe.check_drift of this machine against `hw` (the decode step too for a
    serving run, `decode`) unless --no-probe (and no --rescale), its verdict on stderr; None
    when not probed."""
    if not (args.probe or args.rescale):
        return None
    from meshplan.calibration.probe import check_drift
    from meshplan.executor.launch import device_type

    drift = check_drift(hw, device_type(), args.rescale, collective, decode=decode)
    print(f"meshplan {args.command}: {drift.text()}", file=sys.stderr)
    return drift


def probe_again(args: argparse.Namespace, hw, drift, later: list[float], after: str,
                later_decode: list[float] = ()):
    """The drift with the one-rank step (and decode step) read again `later` (`later_decode`;
    Drift.with_step_readings), its verdict on stderr, said to come `after` what ran; as it
    is where nothing was read."""
    if not later:
        return drift
    drift = drift.with_step_readings(hw, later, later_decode)
    print(f"meshplan {args.command}: after {after}, {drift.text()}", file=sys.stderr)
    return drift


def held_fields(fixed: dict, hw) -> dict:
    """The user's plan fields, and on a profile measured on CPU ranks, where meshplan's
    executor is what trains, what it runs whatever the plan says (its eager kernels, the
    dtype it computes in there) unless the user gave them: plans are then priced as
    `meshplan run` will run them."""
    if hw.measured_on != "cpu":
        return fixed
    given = {k: v for k, v in fixed.items() if k != "dtype"}
    return {**training_fields(fixed.get("dtype", "bf16"), "cpu", fixed.get("cross_entropy", "fused")), **given}


def held_note(verb: str, fixed: dict) -> str:
    """The line under a training result on a CPU profile naming the fields held_fields held."""
    return (f"{verb} as `meshplan run` trains on these CPU ranks: "
            + ", ".join(f"{k} {fixed[k]}" for k in sorted((*EXECUTOR_KERNELS, "dtype"))))


def held_serving_fields(fields: dict, hw) -> dict:
    """Serving plan fields, on a profile measured on CPU ranks with the dtype meshplan's
    executor serves in there (weights and KV cache: executor.options.serving_dtype)."""
    if hw.measured_on != "cpu":
        return fields
    dtype = serving_dtype(fields.get("dtype", "fp16"), "cpu")
    return {**fields, "dtype": dtype, "kv_dtype": dtype}
