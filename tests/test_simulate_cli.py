"""`meshplan simulate` as a user runs it: JSON keys, trace files, one-line errors."""
from functools import partial
import json
import os
import subprocess
import sys

import pytest

from meshplan.simulator.partition import split_text
from tests import cli

GPT3 = ["--model", "gpt3-175b", "--hardware", "a100-80gb", "--gpus", "1024", "--gpus-per-node", "8",
        "--global-batch", "1536", "--seq-len", "2048", "--tp", "8", "--pp", "8", "--dp", "16",
        "--micro-batch", "1", "--schedule", "1f1b", "--recompute", "full", "--zero", "1"]
KEYS = {"step_time_s", "tokens_per_s", "model_tflops_per_gpu", "mfu", "peak_memory_bytes", "fits",
        "breakdown_s", "stages", "plan"}
BREAKDOWN = {"compute", "recompute", "tp_comm", "pp_comm", "dp_comm", "bubble", "optimizer"}


meshplan = partial(cli.meshplan, timeout=120)  # this file's hang guard, seconds


def test_json_keys_and_consistency(tmp_path):
    trace, html = tmp_path / "t.json", tmp_path / "t.html"
    out = meshplan("simulate", *GPT3, "--json", "--trace", str(trace), "--timeline", str(html))
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert KEYS <= set(result) and BREAKDOWN <= set(result["breakdown_s"])
    assert sum(result["breakdown_s"].values()) == pytest.approx(result["step_time_s"], rel=1e-6)
    assert result["tokens_per_s"] == pytest.approx(1536 * 2048 / result["step_time_s"])
    assert len(result["stages"]) == 8 and sum(s["layers"] for s in result["stages"]) == 96
    assert result["plan"]["tp"] == 8 and result["plan"]["virtual_stages"] == 1  # defaults filled
    assert result["peak_memory_bytes"] == max(s["memory_bytes"]["total"] for s in result["stages"])
    assert 0.0 < result["mfu"] < 1.0
    events = json.loads(trace.read_text())["traceEvents"]
    assert sum(1 for e in events if e.get("ph") == "X" and e["name"].startswith("F")) == 8 * 96
    assert "plotly" in html.read_text()[:200000].lower()


def test_plan_file_round_trip(tmp_path):
    first = json.loads(meshplan("simulate", *GPT3, "--json").stdout)
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(first["plan"]))
    again = meshplan("simulate", "--model", "gpt3-175b", "--gpus", "1024", "--plan", str(plan), "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["step_time_s"] == first["step_time_s"]
    # flags win over the file; its etp, which only restated tp 8, follows --tp
    tweaked = meshplan("simulate", "--model", "gpt3-175b", "--gpus", "1024", "--plan", str(plan), "--tp", "4",
                       "--dp", "32", "--json")
    assert tweaked.returncode == 0, tweaked.stderr
    assert {k: json.loads(tweaked.stdout)["plan"][k] for k in ("tp", "etp", "dp")} == {"tp": 4, "etp": 4, "dp": 32}


def test_human_summary():
    out = meshplan("simulate", *GPT3)
    assert out.returncode == 0, out.stderr
    assert "step time" in out.stdout and "bubble" in out.stdout


@pytest.mark.parametrize("args,field", [
    (["--model", "llama-2-70b", "--gpus", "6", "--tp", "3", "--global-batch", "8", "--seq-len", "512"], "--tp"),
    (["--model", "llama-2-70b", "--tp", "8", "--global-batch", "8", "--seq-len", "512"], "--gpus"),
    (["--model", "nope", "--gpus", "8", "--global-batch", "8", "--seq-len", "512"], "--model"),
    (["--model", "llama-2-7b", "--hardware", "tpu-v9", "--gpus", "8", "--global-batch", "8",
      "--seq-len", "512"], "tpu-v9"),
    (["--model", "llama-2-7b", "--gpus", "8", "--global-batch", "9", "--seq-len", "512"], "--global-batch"),
])
def test_bad_input_is_one_line_exit_2(args, field, tmp_path):
    trace = tmp_path / "trace.json"
    out = meshplan("simulate", *args, "--trace", str(trace))
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and field in lines[0] and "Traceback" not in out.stderr
    assert not trace.exists()


def test_every_offending_field_is_named_at_once():
    """Three kinds of mistake in one command: the GPU count tp*pp does not divide (which leaves
    dp undefined), a plan field that contradicts another (resharding after forward without
    ZeRO-3), and a degree the model refuses (TP 3 of 32 heads): one line names all three."""
    out = meshplan("simulate", "--model", "llama-3-8b", "--hardware", "h100-80gb", "--gpus", "8", "--tp", "3",
                   "--pp", "5", "--zero", "1", "--no-reshard-after-forward", "--global-batch", "8",
                   "--seq-len", "512")
    assert out.returncode == 2 and out.stdout == "" and "Traceback" not in out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert "--gpus: 8 GPUs are not divisible by tp*pp*cp = 15" in line
    assert "--reshard-after-forward: resharding after forward is a ZeRO-3 choice" in line
    assert "--tp: 3 does not divide the 32 attention heads" in line


def test_a_plan_over_memory_is_refused_with_its_parts(tmp_path):
    """Llama 3 70B replicated on 8 H100s (ZeRO 0): bf16 weights (2 bytes), fp32 gradients (4,
    the default fp32 reduce) and fp32 master weights with Adam's two moments (12) are 18 bytes
    x 70.6B parameters = 1183 GiB per device (Megatron-LM's distributed optimizer guide counts
    the same 18). One line, exit 2, the parts as the library prices them, the knobs that
    shrink them, no trace written."""
    from meshplan.hw_profiles.profile import load_profile
    from meshplan.simulator.model_spec import ZOO
    from meshplan.simulator.plan import Cluster, Plan
    from meshplan.simulator.train import simulate

    trace = tmp_path / "trace.json"
    out = meshplan("simulate", "--model", "llama-3-70b", "--hardware", "h100-80gb", "--gpus", "8", "--dp", "8",
                   "--zero", "0", "--global-batch", "8", "--seq-len", "8192", "--trace", str(trace))
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
    assert not trace.exists()
    result = simulate(ZOO["llama-3-70b"], Plan(global_batch=8, seq_len=8192, dp=8, zero=0), Cluster(8, 8),
                      load_profile("h100-80gb"))
    mem = result.stages[0].memory
    states = (mem.weights_bytes + mem.gradients_bytes + mem.optimizer_bytes) / 2 ** 30
    assert states == pytest.approx(18 * ZOO["llama-3-70b"].num_params() / 2 ** 30, rel=0.001)
    assert f"needs {result.peak_memory_bytes / 2 ** 30:.1f} GiB" in out.stderr
    assert f"optimizer {mem.optimizer_bytes / 2 ** 30:.1f}" in out.stderr
    assert "--zero 3" in out.stderr and "--recompute full" in out.stderr


def test_a_serving_plan_over_memory_names_the_largest_batch_that_fits():
    from meshplan.hw_profiles.profile import load_profile
    from meshplan.simulator.model_spec import ZOO
    from meshplan.simulator.plan import Cluster
    from meshplan.simulator.serve import InferencePlan, simulate_inference

    out = meshplan("simulate", "--mode", "inference", "--model", "llama-3-8b", "--hardware", "h100-80gb",
                   "--gpus", "1", "--batch", "400", "--prompt-len", "4096", "--gen-len", "4096", "--json")
    assert out.returncode == 2 and out.stdout == "" and len(out.stderr.strip().splitlines()) == 1
    fits = simulate_inference(ZOO["llama-3-8b"], InferencePlan(batch=400, prompt_len=4096, gen_len=4096),
                              Cluster(1, 8), load_profile("h100-80gb"))
    assert 0 < fits.max_batch < 400 and f"--batch {fits.max_batch} (the largest that fits)" in out.stderr
    # 8B weights in bf16 (~15 GiB) and 400 x 8K tokens (the model's positions) of KV cache
    # (128 KiB each: 32 layers x 8 KV heads x 128 x 2 tensors x 2 bytes) = 400 GiB
    assert "KV cache 400.0 GiB" in out.stderr


def test_corrupt_model_file(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text('{"n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 100, "moe": 1}')
    out = meshplan("simulate", "--model", str(bad), "--gpus", "1", "--global-batch", "1", "--seq-len", "8")
    assert out.returncode == 2 and "moe" in out.stderr


def test_inference_mode_json_keys():
    out = meshplan("simulate", "--mode", "inference", "--model", "llama-2-70b", "--hardware", "a100-80gb",
                   "--gpus", "4", "--tp", "4", "--batch", "1", "--prompt-len", "2048", "--gen-len", "128",
                   "--dtype", "fp16", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert {"ttft_s", "tpot_s", "latency_s", "throughput_tokens_per_s", "kv_cache_bytes",
            "peak_memory_bytes", "max_batch", "fits", "plan"} <= set(data)
    assert data["latency_s"] == pytest.approx(data["ttft_s"] + 127 * data["tpot_s"])
    # one replica of batch 1: generated tokens over the whole request's latency
    assert data["throughput_tokens_per_s"] == pytest.approx(128 / data["latency_s"])


def test_inference_mode_missing_flag():
    out = meshplan("simulate", "--mode", "inference", "--model", "llama-2-70b", "--gpus", "4", "--tp", "4",
                   "--prompt-len", "128", "--gen-len", "8")
    assert out.returncode == 2 and "--batch" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_plan_inference_meets_slos_and_emits_vllm():
    args = ["plan", "--mode", "inference", "--model", "llama-3-70b", "--hardware", "h100-80gb",
            "--gpus", "8", "--prompt-len", "1024", "--gen-len", "256", "--slo-ttft-ms", "500",
            "--slo-tpot-ms", "50"]
    out = meshplan(*args, "--json")
    assert out.returncode == 0, out.stderr
    plans = json.loads(out.stdout)["plans"]
    assert plans and all(p["ttft_s"] <= 0.5 and p["tpot_s"] <= 0.05 for p in plans)
    per_gpu = [p["throughput_tokens_per_s"] for p in plans]
    assert per_gpu == sorted(per_gpu, reverse=True)  # all plans use the 8 GPUs
    vllm = meshplan(*args, "--emit", "vllm")
    assert vllm.returncode == 0 and vllm.stdout.startswith("#!/usr/bin/env bash")
    assert 'exec vllm serve "${ARGS[@]}"' in vllm.stdout
    assert f"--tensor-parallel-size {plans[0]['plan']['tp']}\n" in vllm.stdout
    assert meshplan("plan", "--model", "llama-3-70b", "--gpus", "8", "--global-batch", "8",
                    "--seq-len", "512", "--emit", "vllm").returncode == 2


def test_sequence_parallel_is_megatrons_spelling_of_sp():
    """--sequence-parallel (Megatron-LM) and --sp set the same field, on every command that
    takes plan flags."""
    from meshplan.cli import build_parser
    parser = build_parser()
    base = ["--model", "llama-2-7b", "--gpus", "8", "--global-batch", "8", "--seq-len", "2048",
            "--tp", "8"]
    for command in ("simulate", "plan", "whatif", "run"):
        for flag, value in (("--sp", True), ("--sequence-parallel", True),
                            ("--no-sequence-parallel", False)):
            extra = ["--out", "report.html"] if command == "whatif" else []
            assert parser.parse_args([command, *base, *extra, flag]).sp is value
    longhand = json.loads(meshplan("simulate", *base, "--sequence-parallel", "--json").stdout)
    shorthand = json.loads(meshplan("simulate", *base, "--sp", "--json").stdout)
    assert longhand["plan"]["sp"] is True and longhand == shorthand


def test_flags_are_never_abbreviated():
    """whatif has no --mode: argparse's prefix matching would have read `--mode inference`
    as `--model inference`, and dropped the mode where a later --model overrode it."""
    from meshplan.cli import build_parser
    parser = build_parser()
    base = ["--model", "llama-2-7b", "--gpus", "8", "--global-batch", "8", "--seq-len", "2048"]
    for command, extra in (("whatif", ["--out", "report.html", "--mode", "inference"]),
                           ("plan", ["--virtual", "2"]), ("simulate", ["--gpus-per", "4"])):
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args([command, *base, *extra])
        assert exit_.value.code == 2
    out = meshplan("whatif", "--mode", "inference", *base, "--out", "report.html")
    assert out.returncode == 2 and "unrecognized arguments: --mode inference" in out.stderr


def test_an_unknown_flag_is_one_line_naming_the_flags_meant():
    out = meshplan("plan", "--model", "llama-2-7b", "--gpu", "h100-80gb", "--nodes", "2", "--global-batch", "8",
                   "--virtual=2", "--zzz")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.splitlines() == [
        "meshplan plan: error: unrecognized arguments: --gpu h100-80gb --nodes 2 --virtual=2 --zzz "
        "(--gpu: did you mean --gpus or --gpus-per-node or --gpu-hour-price?; --nodes: did you mean "
        "--gpus-per-node?; --virtual: did you mean --virtual-stages?; --zzz: no such flag); "
        "see meshplan plan --help"]


def test_a_missing_or_malformed_argument_is_one_line_not_the_usage():
    for args, error in ((("plan", "--gpus", "8"), "meshplan plan: error: the following arguments are "
                                                  "required: --model; see meshplan plan --help"),
                        (("simulate", "--model", "llama-2-7b", "--zero", "7"),
                         "meshplan simulate: error: argument --zero: invalid choice: 7 (choose from 0, 1, 2, 3); "
                         "see meshplan simulate --help"),
                        (("frob",), "meshplan: error: argument COMMAND: invalid choice: 'frob' (choose from "
                                    "'simulate', 'plan', 'whatif', 'profile', 'run', 'validate'); see meshplan --help")):
        out = meshplan(*args)
        assert (out.returncode, out.stdout, out.stderr.splitlines()) == (2, "", [error])


def test_flags_of_the_other_mode_are_refused_not_ignored(tmp_path):
    train = ["--model", "llama-2-7b", "--gpus", "8", "--global-batch", "8", "--seq-len", "1024"]
    out = meshplan("simulate", *train, "--batch", "4", "--kv-dtype", "fp8")
    assert out.returncode == 2 and "--batch: is a serving knob" in out.stderr and "--kv-dtype" in out.stderr
    serve = ["--mode", "inference", "--model", "llama-2-7b", "--gpus", "8", "--batch", "4", "--prompt-len", "64",
             "--gen-len", "8"]
    for command in ("simulate", "plan"):
        out = meshplan(command, *serve, "--tp", "2", "--cp", "2", "--zero", "3")
        assert out.returncode == 2 and out.stdout == ""
        assert "--cp: is a training knob" in out.stderr and "--zero" in out.stderr and "--tp" not in out.stderr
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(meshplan("plan", *train, "--emit", "plan").stdout)
    out = meshplan("simulate", *serve, "--plan", str(plan_file))
    assert out.returncode == 2 and "--plan: holds a training plan" in out.stderr


def test_options_of_the_other_mode_and_independent_mistakes_are_named_at_once(tmp_path):
    """A subcommand's own options that one mode alone reads (capacity, SLOs, traces, export
    versions) are refused in the other, all in one line; so are a wrong model and a wrong
    profile together, each budget figure, and a node size below one."""
    serve = ["--mode", "inference", "--model", "llama-3-8b", "--hardware", "h100-80gb", "--gpus", "8",
             "--prompt-len", "1000", "--gen-len", "100"]
    out = meshplan("plan", *serve, "--tokens", "1e9", "--gpu-hour-price", "2", "--target-version", "0.2")
    assert out.returncode == 2 and out.stdout == ""
    (line,) = out.stderr.strip().splitlines()
    assert "--tokens: " in line and "--gpu-hour-price: " in line and "--target-version: " in line
    trace = tmp_path / "t.json"
    out = meshplan("simulate", *serve, "--batch", "4", "--trace", str(trace))
    assert out.returncode == 2 and "--trace: a serving plan has no pipeline schedule" in out.stderr
    assert not trace.exists()
    train = ["--model", "llama-3-8b", "--hardware", "h100-80gb", "--gpus", "8", "--global-batch", "64",
             "--seq-len", "4096"]
    out = meshplan("plan", *train, "--slo-ttft-ms", "100", "--objective", "latency")
    assert out.returncode == 2 and "--slo-ttft-ms: is for serving plans" in out.stderr and "--objective" in out.stderr
    out = meshplan("plan", "--model", "nosuch", "--hardware", "nosuch", "--gpus", "8", "--global-batch", "8",
                   "--seq-len", "512")
    assert out.returncode == 2 and "--model: " in out.stderr and "--hardware: " in out.stderr
    out = meshplan("plan", *train[:4], "--global-batch", "64", "--seq-len", "4096", "--tokens", "1e11",
                   "--days", "-1", "--gpu-hour-price", "-2")
    assert out.returncode == 2 and "--days: " in out.stderr and "--gpu-hour-price: " in out.stderr
    out = meshplan("simulate", *train, "--gpus-per-node", "0")
    assert out.returncode == 2 and "--gpus-per-node: must be a positive integer" in out.stderr


def test_a_held_schedule_asks_for_a_pipeline_and_plan_json_feeds_simulate(tmp_path):
    train = ["--model", "llama-3-8b", "--hardware", "h100-80gb", "--gpus", "64", "--global-batch", "512",
             "--seq-len", "8192"]
    out = meshplan("plan", *train, "--schedule", "zb-v", "--json")
    assert out.returncode == 0, out.stderr
    ranked = json.loads(out.stdout)["plans"]
    assert all(r["plan"]["pp"] >= 2 and r["plan"]["schedule"] == "zb-v" for r in ranked)
    (tmp_path / "ranked.json").write_text(out.stdout)  # plan --json: simulate reads its winner
    sim = meshplan("simulate", "--model", "llama-3-8b", "--hardware", "h100-80gb", "--gpus", "64",
                   "--plan", str(tmp_path / "ranked.json"), "--json")
    assert sim.returncode == 0, sim.stderr
    assert json.loads(sim.stdout)["step_time_s"] == pytest.approx(ranked[0]["step_time_s"], rel=1e-9)
    out = meshplan("simulate", *train, "--dp", "32", "--cp", "2", "--schedule", "zb-v")
    assert out.returncode == 2 and "--schedule: schedule zb-v interleaves the stages of a pipeline" in out.stderr
    # so does a held CP exchange ask for context parallelism
    out = meshplan("plan", *train, "--cp-comm", "a2a", "--json")
    assert out.returncode == 0, out.stderr
    assert all(r["plan"]["cp"] > 1 and r["plan"]["cp_comm"] == "a2a" for r in json.loads(out.stdout)["plans"])


def test_version():
    from importlib.metadata import version
    out = meshplan("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"meshplan {version('meshplan')}"


def test_console_script_turns_off_numpy_huge_page_advice():
    # set before numpy's import (which reads it once); a user's own setting wins
    code = "import meshplan.cli, numpy; print(numpy._core.multiarray._get_madvise_hugepage())"
    env = {k: v for k, v in os.environ.items() if k != "NUMPY_MADVISE_HUGEPAGE"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**env, "NUMPY_MADVISE_HUGEPAGE": "1"})
    assert out.stdout.strip() == "True", out.stderr


def test_the_split_simulate_prices_is_printed_and_in_the_json():
    """Llama-3 8B's head (a 128K vocabulary: about 2.4 layers of work) on 32 virtual stages
    of 32 layers gets a stage of its own; the JSON's per-rank chunks rebuild that split."""
    args = ["--model", "llama-3-8b", "--hardware", "h100-80gb", "--gpus", "8", "--dp", "2", "--pp", "4",
            "--schedule", "interleaved", "--virtual-stages", "8", "--global-batch", "64", "--seq-len", "4096"]
    stages = json.loads(meshplan("simulate", *args, "--json").stdout)["stages"]
    split = [stages[j % 4]["chunk_layers"][j // 4] for j in range(32)]
    assert sum(split) == 32 and split[-1] == 0 and min(split[1:-1]) >= 1
    assert [s["layers"] for s in stages] == [sum(s["chunk_layers"]) for s in stages]
    text = " ".join(meshplan("simulate", *args).stdout.split())
    assert f"layers per (virtual) stage in pipeline order: {split_text(tuple(split))} (the head alone" in text


def test_a_partial_plan_file_takes_the_rest_from_flags(tmp_path):
    """A hand-written plan file holding some fields: flags give the rest and override it;
    a key that is no plan field is named as the file's key."""
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"tp": 2, "zero": 1, "micro_batch": 2}))
    run = partial(meshplan, "simulate", "--model", "llama-2-7b", "--hardware", "a100-80gb", "--gpus", "8",
                  "--plan", str(path), "--global-batch", "16", "--seq-len", "2048", "--json")
    plans = [json.loads(out.stdout)["plan"] for out in (run(), run("--tp", "4"))]
    assert [(p["tp"], p["dp"], p["zero"], p["micro_batch"], p["global_batch"]) for p in plans] == [
        (2, 4, 1, 2, 16), (4, 2, 1, 2, 16)]
    path.write_text(json.dumps({"tp": None, "zero": 1, "schedule": None}))  # null: the default
    assert json.loads(run().stdout)["plan"]["tp"] == 1
    path.write_text(json.dumps({"tp": 2, "tensor_parallel": 2}))
    out = run()
    assert out.returncode == 2 and f"{path}:tensor_parallel: unknown plan key" in out.stderr


def test_plan_on_a_cpu_profile_ranks_the_plans_as_meshplan_run_runs_them():
    """A profile measured on CPU ranks is trained on by meshplan's executor alone, which
    runs eager kernels, fp32 there and ZeRO-1 by all-reduce whatever the plan says
    (executor.options.training_fields): the search holds those, but not what the user
    gave; a GPU profile's search is left alone."""
    from meshplan.executor.options import training_fields
    from meshplan.simulator.model_spec import load_model
    from meshplan.simulator.plan import Cluster, Plan
    from meshplan.simulator.train import simulate
    from meshplan.hw_profiles.profile import load_profile

    flags = ("--model", "examples/tiny-llama/config.json", "--gpus", 2, "--global-batch", 8, "--seq-len", 128,
             "--json", "--top", 1)
    held = training_fields("bf16", "cpu", "fused")
    assert held["dtype"] == "fp32" and held["mlp_kernel"] == "eager"
    out = meshplan("plan", *flags, "--hardware", "local")
    assert out.returncode == 0, out.stderr
    winner = json.loads(out.stdout)["plans"][0]
    assert {k: winner["plan"][k] for k in held} == held
    plan = Plan(**{k: tuple(v) if isinstance(v, list) else v for k, v in winner["plan"].items()})
    sim = simulate(load_model("examples/tiny-llama/config.json"), plan, Cluster(2, 2), load_profile("local"))
    assert winner["step_time_s"] == pytest.approx(sim.step_time_s, rel=1e-9)
    given = json.loads(meshplan("plan", *flags, "--hardware", "local", "--zero1-sync", "reduce_scatter").stdout)
    assert given["plans"][0]["plan"]["zero1_sync"] == "reduce_scatter"
    gpu = json.loads(meshplan("plan", *flags, "--hardware", "a100-80gb").stdout)["plans"][0]["plan"]
    assert gpu["dtype"] == "bf16" and gpu["mlp_kernel"] == "fused"


def test_serving_plan_on_a_cpu_profile_holds_the_dtype_the_executor_serves_in():
    """On CPU ranks the executor serves weights and KV cache in fp32 whatever the plan asks
    (executor.options.serving_dtype): the serving search holds that there."""
    flags = ("plan", "--mode", "inference", "--model", "examples/tiny-llama/config.json", "--gpus", 2,
             "--prompt-len", 64, "--gen-len", 32, "--json", "--top", 1)
    for extra in ((), ("--dtype", "bf16")):
        out = meshplan(*flags, "--hardware", "local", *extra)
        assert out.returncode == 0, out.stderr
        plan = json.loads(out.stdout)["plans"][0]["plan"]
        assert (plan["dtype"], plan["kv_dtype"]) == ("fp32", "fp32")
    gpu = json.loads(meshplan(*flags, "--hardware", "a100-80gb").stdout)["plans"][0]["plan"]
    assert gpu["dtype"] != "fp32"


def test_simulate_on_a_cpu_profile_prices_the_plan_as_meshplan_run_runs_it():
    """`meshplan simulate` on a profile measured on CPU ranks holds what the executor runs
    there (executor.options.training_fields, serving_dtype) unless the user gave it, as
    `meshplan plan` and `meshplan run` do, and says so; a GPU profile prices the plan given."""
    from meshplan.executor.options import training_fields

    flags = ("simulate", "--model", "examples/tiny-llama/config.json", "--gpus", 2, "--global-batch", 8,
             "--seq-len", 128, "--pp", 2, "--json")
    held = training_fields("bf16", "cpu", "fused")
    plan = json.loads(meshplan(*flags, "--hardware", "local").stdout)["plan"]
    assert {k: plan[k] for k in held} == held
    given = json.loads(meshplan(*flags, "--hardware", "local", "--mlp-kernel", "fused",
                                "--elementwise", "fused").stdout)["plan"]
    assert (given["mlp_kernel"], given["elementwise"], given["dtype"]) == ("fused", "fused", "fp32")
    gpu = json.loads(meshplan(*flags, "--hardware", "a100-80gb").stdout)["plan"]
    assert (gpu["dtype"], gpu["mlp_kernel"]) == ("bf16", "fused")
    text = meshplan(*flags[:-1], "--hardware", "local")
    assert text.returncode == 0 and "priced as `meshplan run` trains on these CPU ranks" in text.stdout
    serving = ("simulate", "--mode", "inference", "--model", "examples/tiny-llama/config.json", "--gpus", 2,
               "--batch", 4, "--prompt-len", 64, "--gen-len", 32, "--json")
    served = json.loads(meshplan(*serving, "--hardware", "local", "--dtype", "bf16").stdout)["plan"]
    assert (served["dtype"], served["kv_dtype"]) == ("fp32", "fp32")
