"""Bad and edge-case input never ends in a traceback, a hang or a nonsense answer: property
tests that call the CLI in-process with generated flags, config files and profiles, and
require exit code 0 with finite JSON, or exit code 2 with one `error:` line.

Classes of input covered: numeric flags (zero, negative, huge, non-integer, NaN, inf, -0),
parallel degrees that do not divide, unknown placements, plan JSON with wrong types or deep
nesting, model configs with NaN/inf/huge/negative/wrong-typed fields or non-UTF-8 bytes,
corrupt profiles (missing or mistyped sections, zero / 1e-300 / above-one efficiencies),
and unwritable output paths."""
from __future__ import annotations

import contextlib
import io
import json
import signal
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshplan.cli import main

NUMBERS = st.one_of(st.integers(-3, 70), st.sampled_from(["0", "-0", "-1", "2147483648", "9" * 40, "1e300",
                                                         "nan", "inf", "-inf", "1.5", "x", ""]))
SMALL_MODEL = {"num_hidden_layers": 4, "hidden_size": 256, "num_attention_heads": 8,
               "num_key_value_heads": 4, "intermediate_size": 704, "vocab_size": 4096,
               "max_position_embeddings": 2048, "model_type": "llama"}
BAD_VALUES = [0, -1, 1.5, float("nan"), float("inf"), 10 ** 30, "12", None, True, [], {}]
MAX_CASE_S = 10.0
MIXTRAL = Path(__file__).parent / "data/hf_configs/mixtral-8x7b.json"


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    start = time.monotonic()

    def too_long(signum, frame):
        raise TimeoutError(f"{argv} still running after {MAX_CASE_S} s")

    previous = signal.signal(signal.SIGALRM, too_long)
    signal.setitimer(signal.ITIMER_REAL, MAX_CASE_S)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exc:   # argparse's own usage errors exit 2 with a usage line
                code = exc.code
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert time.monotonic() - start < MAX_CASE_S, f"{argv} took too long"
    return code, out.getvalue(), err.getvalue()


def check(argv: list[str]) -> None:
    code, out, err = run_cli(argv)
    assert "Traceback" not in err, f"{argv}:\n{err}"
    assert code in (0, 2), f"{argv}: exit {code}\n{err[-2000:]}"
    if code == 2:
        lines = [line for line in err.splitlines() if "error:" in line]
        assert len(lines) == 1, f"{argv}: {err}"
    elif "--json" in argv:
        data = json.loads(out, parse_constant=lambda c: pytest.fail(f"{argv}: {c} in JSON"))
        assert data is not None


def _flags(draw, names):
    argv = []
    for name in names:
        if draw(st.booleans()):
            argv += [f"--{name}", str(draw(NUMBERS))]
    return argv


@settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_simulate_with_generated_flags(data, tmp_path_factory):
    argv = ["simulate", "--model", data.draw(st.sampled_from(["llama-2-7b", "gpt3-175b", str(MIXTRAL), "nope"])),
            "--hardware", data.draw(st.sampled_from(["a100-80gb", "h100-80gb", "tpu"])), "--json"]
    argv += _flags(data.draw, ["gpus", "gpus-per-node", "tp", "pp", "cp", "dp", "micro-batch",
                               "global-batch", "seq-len", "virtual-stages", "zero", "ep", "etp"])
    if data.draw(st.booleans()):
        argv += ["--moe-capacity-factor", data.draw(st.sampled_from(["1", "0.5", "nan", "inf", "1e308", "2"]))]
    if data.draw(st.booleans()):
        argv += ["--placement", data.draw(st.sampled_from(["tp,cp,dp,pp", "TP,CP,DP,PP", "tp,tp,dp,pp", "x"]))]
    if data.draw(st.booleans()):
        argv += ["--schedule", data.draw(st.sampled_from(["1f1b", "interleaved", "zb-h1", "bogus"]))]
    if data.draw(st.booleans()):
        argv.append(data.draw(st.sampled_from(["--moe-a2a-overlap", "--no-moe-a2a-overlap"])))
    check(argv)


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_plan_and_whatif_with_generated_flags(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("w") / "r.html"
    command = data.draw(st.sampled_from(["plan", "whatif"]))
    argv = [command, "--model", "llama-2-7b", "--hardware", "a100-80gb"]
    argv += ["--gpus", data.draw(st.sampled_from(["8", "0", "-8", "16", "8,16", "x", "2147483648"]))]
    argv += _flags(data.draw, ["global-batch", "seq-len", "tp", "pp", "top"])
    if command == "whatif":
        argv += ["--out", str(out)]
        if data.draw(st.booleans()):
            argv += ["--scale-memory", data.draw(st.sampled_from(["inf", "nan", "0", "-1", "2", "1e300"]))]
        if data.draw(st.booleans()):
            argv += ["--fabric", data.draw(st.sampled_from(["rail", "fat-tree:0", "fat-tree:nan", "fat-tree:2:0",
                                                            "fat-tree:1e9", "mesh", "fat-tree:2:x", ","]))]
    else:
        argv.append("--json")
        if data.draw(st.booleans()):
            argv += ["--tokens", data.draw(st.sampled_from(["1e12", "0", "-1", "nan", "inf", "1e300", "x"])),
                     "--gpu-hour-price", data.draw(st.sampled_from(["2", "0", "-1", "nan", "inf"]))]
    check(argv)


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_serving_with_generated_flags(data):
    argv = ["plan", "--mode", "inference", "--model", data.draw(st.sampled_from(["llama-2-7b", str(MIXTRAL)])),
            "--hardware", data.draw(st.sampled_from(["a100-80gb", "h100-80gb"])),
            "--gpus", data.draw(st.sampled_from(["8", "0", "3", "16"])), "--json", "--top", "3"]
    argv += _flags(data.draw, ["batch", "prompt-len", "gen-len", "tp", "pp", "slo-ttft-ms", "slo-tpot-ms"])
    if data.draw(st.booleans()):
        argv += ["--quantization", data.draw(st.sampled_from(["int8", "int4", "fp8", "awq", "none"]))]
    if data.draw(st.booleans()):
        argv += [data.draw(st.sampled_from(["--expert-parallel", "--no-expert-parallel",
                                            "--enable-expert-parallel"]))]
    check(argv)


CONFIG_KEYS = sorted(SMALL_MODEL) + ["num_local_experts", "num_experts_per_tok", "head_dim",
                                     "tie_word_embeddings", "rope_scaling", "sliding_window"]


# gpt-oss's own keys, on its real config: a clamp, per-layer attention kinds, biases
GPT_OSS = json.loads((Path(__file__).parent / "data/hf_configs/gpt-oss-20b.json").read_text())
GPT_OSS_KEYS = ["swiglu_limit", "layer_types", "sliding_window", "attention_bias", "num_local_experts",
                "num_experts_per_tok", "experts_per_token", "head_dim"]


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_model_configs_with_bad_fields(data, tmp_path_factory):
    base, keys = data.draw(st.sampled_from([(SMALL_MODEL, CONFIG_KEYS), (GPT_OSS, GPT_OSS_KEYS)]))
    edits = data.draw(st.dictionaries(st.sampled_from(keys), st.sampled_from(BAD_VALUES), min_size=1, max_size=3))
    path = tmp_path_factory.mktemp("m") / "config.json"
    path.write_text(json.dumps({**base, **edits}))
    check(["simulate", "--model", str(path), "--gpus", "8", "--global-batch", "8", "--seq-len", "512",
           "--json"])


@pytest.mark.parametrize("content", [b"\xff\xfe not utf-8", b"[" * 5000 + b"]" * 5000, b"{}", b"[]",
                                     b'{"num_hidden_layers": NaN}', b"null"])
def test_unreadable_model_and_plan_files(content, tmp_path):
    path = tmp_path / "f.json"
    path.write_bytes(content)
    check(["simulate", "--model", str(path), "--gpus", "8", "--global-batch", "8", "--seq-len", "512"])
    check(["simulate", "--model", "llama-2-7b", "--plan", str(path), "--gpus", "8"])


PROFILE_EDITS = [("memory_bytes", 0), ("memory_bytes", -1), ("hbm_bytes_per_s", 0),
                 ("hbm_bytes_per_s", 1e-300), ("peak_flops", {"bf16": 0}), ("fit_report", {}),
                 ("gemm", {"bf16": {"eff_max": 2.0}}), ("collectives", None), ("name", 5),
                 ("gemm.bf16.eff_max", 1.5), ("gemm.bf16.eff_max", 0), ("gemm.bf16.m_half", -1),
                 ("memory_bound.bf16.hbm_eff", 1e-300), ("fit_report.error_band", "x")]


def _edited_profile(path, key: str, value) -> None:
    from meshplan.hw_profiles.profile import profile_path
    data = json.loads(profile_path("a100-80gb").read_text())
    target = data
    *parents, last = key.split(".")
    for part in parents:
        target = target[part]
    target[last] = value
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("edit", PROFILE_EDITS, ids=lambda e: f"{e[0]}={e[1]!r}")
def test_corrupt_profiles_are_refused(edit, tmp_path):
    path = tmp_path / "p.json"
    _edited_profile(path, *edit)
    check(["simulate", "--model", "llama-2-7b", "--hardware", str(path), "--gpus", "8",
           "--global-batch", "8", "--seq-len", "512", "--json"])


def _numeric_leaves(data, prefix=""):
    """Dotted paths of every number in a profile (the fields a corrupt profile can break)."""
    if isinstance(data, dict):
        return [p for k, v in data.items() for p in _numeric_leaves(v, f"{prefix}{k}.")]
    return [prefix[:-1]] if isinstance(data, (int, float)) and not isinstance(data, bool) else []


def _profile_leaves():
    from meshplan.hw_profiles.profile import profile_path
    return sorted(_numeric_leaves(json.loads(profile_path("a100-80gb").read_text())))


@settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
@given(key=st.sampled_from(_profile_leaves()),
       value=st.sampled_from([0, -1, 1e-300, 1e300, 2.0, 0.5, "1", None, [], 10 ** 30]))
def test_profile_numbers_out_of_range(key, value, tmp_path_factory):
    path = tmp_path_factory.mktemp("p") / "p.json"
    _edited_profile(path, key, value)
    check(["simulate", "--model", "llama-2-7b", "--hardware", str(path), "--gpus", "8",
           "--global-batch", "8", "--seq-len", "512", "--json"])


@pytest.mark.parametrize("where", ["file", "dir", "readonly"])
def test_unwritable_outputs(where, tmp_path):
    blocker = tmp_path / "blocker"
    if where == "file":
        blocker.write_text("x")
        target = blocker / "trace.json"
    elif where == "dir":
        blocker.mkdir()
        target = blocker
    else:
        blocker.mkdir()
        blocker.chmod(0o500)
        target = blocker / "trace.json"
    check(["simulate", "--model", "llama-2-7b", "--gpus", "8", "--global-batch", "8", "--seq-len", "512",
           "--trace", str(target)])


@pytest.mark.parametrize("case", ["holdout", "not-utf8-log", "gen-len", "busy-out"])
def test_profile_and_serving_edges(case, tmp_path):
    """--holdout beyond half, a non-UTF-8 nccl-tests log, a generation too long to bound, and a
    second writer of one profile: each one error line, nothing written."""
    log = tmp_path / "all_reduce_perf.txt"
    log.write_bytes(b"\xff\xfe not a log")
    out = tmp_path / "p.json"
    if case == "holdout":
        argv = ["profile", "--holdout", "0.999", "--out", str(out)]
    elif case == "not-utf8-log":
        argv = ["profile", "--import-nccl-tests", str(log), "--base", "a100-80gb", "--out", str(out)]
    elif case == "gen-len":
        argv = ["simulate", "--mode", "inference", "--model", "llama-2-7b", "--gpus", "1", "--batch", "1",
                "--prompt-len", "128", "--gen-len", "2147483648", "--json"]
    else:
        import os
        (tmp_path / ".p.json.lock").write_text(str(os.getpid()))  # a live process holds it
        argv = ["profile", "--import-nccl-tests", str(Path(__file__).parent / "data/nccl/all_reduce_perf_8xA100.txt"),
                "--base", "a100-80gb", "--out", str(out)]
    code, _, err = run_cli(argv)
    assert code == 2 and len([line for line in err.splitlines() if "error:" in line]) == 1, err
    assert not out.exists()
