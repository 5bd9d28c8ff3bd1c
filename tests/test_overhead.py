"""Framework overhead: measured per layer by the executor's probe, stored in the profile,
added by the cost model per layer, stretched when ranks share cores."""
import json
from dataclasses import replace

import pytest

from meshplan.hw_profiles.profile import FrameworkOverhead, HardwareProfile, load_profile
from meshplan.core.errors import ProfileError
from meshplan.simulator.cost import (FULL, ep_comm_s, ep_counts_s, layer_times, per_rank_profile,
                                     shard_times)
from meshplan.simulator.serve import InferencePlan, simulate_inference
from meshplan.simulator.model_spec import ZOO
from meshplan.simulator.ops import Shard
from meshplan.simulator.plan import Cluster

A100 = load_profile("a100-80gb")
OVERHEAD = FrameworkOverhead(layer_forward_s=1e-3, layer_backward_s=2e-3, tp_layer_forward_s=4e-3,
                             tp_layer_backward_s=5e-3, sp_layer_forward_s=6e-3,
                             sp_layer_backward_s=7e-3, prefill_layer_s=1.5e-3,
                             decode_layer_s=0.5e-3, moe_forward_s=3e-3, moe_backward_s=8e-3,
                             source="test")


def test_probe_measures_positive_overhead():
    from meshplan.calibration.overhead import (measure_decode_overhead, measure_host_overhead,
                                               measure_recompute_overhead, measure_split_backward)
    measured = measure_host_overhead(repeats=8, warmup=2)
    assert 0 < measured.layer_forward_s < 0.05 and 0 < measured.prefill_layer_s < 0.05
    layer_s, per_byte_s, edge_s = measure_decode_overhead(load_profile("local"), repeats=4, warmup=1)
    assert 0 < layer_s < 0.05 and 0 <= per_byte_s < 1e-8 and 0 <= edge_s < 0.05
    # routing, permutation and the grouped GEMMs' calls: more host work than one MLP
    assert 0 < measured.moe_forward_s < 0.05 and 0 <= measured.moe_backward_s < 0.05
    # a second autograd pass over each layer for the weight gradients (0.65 ms a layer and
    # 0.59 ms a MB of its activations here, 2026-12-05)
    split_layer_s, per_byte_s = measure_split_backward(load_profile("local"), repeats=8, warmup=2)
    assert 0 < split_layer_s < 0.05 and 0 <= per_byte_s < 1e-7
    # the checkpoint's own host work: the per-op policy decides every operator of the
    # forward and of the recompute, which dispatches them all again (2.4 ms a layer here,
    # 2026-12-06, against selective's 0.3)
    recompute = measure_recompute_overhead(load_profile("local"), repeats=8, warmup=2)
    assert all(0 <= v < 0.05 for v in recompute.values())
    assert recompute["op_recompute_layer_s"] > recompute["selective_recompute_layer_s"]


def test_recompute_overhead_is_recovered_from_steps_priced_with_it(monkeypatch):
    """Steps timed as the cost model prices them with a known host time per recompute mode
    give that time back: the added time over recompute none, per layer (1- and 3-layer
    probes), less what the profile without it prices the mode to add."""
    from meshplan.calibration import overhead
    from meshplan.simulator.plan import Plan
    from meshplan.simulator.train import simulate

    hw = load_profile("local")
    truth = {f"{m}_recompute_layer_s": t for m, t in zip(overhead.RECOMPUTE_MODES, (1e-4, 7e-4, 3e-3, 4e-4))}
    known = replace(hw, overhead=replace(hw.overhead, **truth))

    def step_s(layers: int, mode: str | None) -> float:
        plan = Plan(global_batch=1, seq_len=overhead.PROBE_TOKENS, micro_batch=1, dtype="fp32", mlp_kernel="eager",
                    elementwise="eager", recompute=mode or "none")
        return simulate(overhead.probe_model(layers), plan, Cluster(1, 1), known).step_time_s
    monkeypatch.setattr(overhead, "_training", lambda layers, moe=False, recompute=None: (None, (layers, recompute)))
    monkeypatch.setattr(overhead, "_median_added_s", lambda base, variant, repeats, warmup:
                        step_s(*variant) - step_s(*base))
    assert overhead.measure_recompute_overhead(hw) == pytest.approx(truth)


def test_recompute_adds_its_host_work_per_layer():
    """Each recompute mode's host time joins the step once per layer and micro-batch (one
    rank: nothing overlaps it), in the breakdown's recompute."""
    from meshplan.simulator.plan import Plan
    from meshplan.simulator.train import simulate
    model = replace(ZOO["llama-2-7b"], num_layers=4)
    for mode in ("selective", "full", "op", "norm_act"):
        plan = Plan(global_batch=4, seq_len=512, micro_batch=1, recompute=mode)
        more = replace(A100, overhead=replace(A100.overhead, **{f"{mode}_recompute_layer_s": 2e-3}))
        base, added = (simulate(model, plan, Cluster(1, 1), h) for h in (A100, more))
        assert added.step_time_s - base.step_time_s == pytest.approx(4 * 4 * 2e-3)
        assert added.breakdown_s["recompute"] - base.breakdown_s["recompute"] == pytest.approx(4 * 4 * 2e-3)


def test_split_backward_host_time_goes_to_the_weight_passes():
    """A zero-bubble schedule's B and W ops: the W passes of every stage but the first
    (whose backward torch runs whole) take the split's host time, per layer and per byte of
    its activations, the last's also for the logits the loss keeps, and nothing else
    changes; 1F1B is untouched."""
    from meshplan.simulator.memory import logits_bytes
    from meshplan.simulator.plan import Plan
    from meshplan.simulator.schedule import stage_index
    from meshplan.simulator.train import plans_rows, simulate
    local = load_profile("local")
    hw = replace(local, overhead=replace(local.overhead, split_backward_layer_s=0.0,
                                         split_backward_per_activation_byte_s=0.0))
    model = replace(ZOO["llama-2-7b"], num_layers=8)
    split = replace(hw, overhead=replace(hw.overhead, split_backward_layer_s=2e-3,
                                         split_backward_per_activation_byte_s=1e-12))
    for schedule, v in (("zb-h1", 1), ("zb-v", 2), ("1f1b", 1)):
        plan = Plan(global_batch=8, seq_len=256, pp=2, micro_batch=1, schedule=schedule, virtual_stages=v)
        base, more = (simulate(model, plan, Cluster(2, 2), h).pipeline for h in (hw, split))
        if schedule == "1f1b":
            assert more.step_time_s == base.step_time_s
            continue
        rows = plans_rows(model, [plan], Cluster(2, 2), hw)
        activations = float(rows["act_none"][0])
        head = float(rows["loss_kept"][0] * logits_bytes(rows["tokens"][0], model.vocab_size, 1))
        for rank in (0, 1):
            for chunk in range(v):
                last = stage_index(schedule == "zb-v", 2, rank, chunk) == 2 * v - 1
                w, b = ([[e.end_s - e.start_s for e in res.events
                          if e.kind == kind and e.stage == rank and e.chunk == chunk] for res in (base, more)]
                        for kind in ("W", "B"))
                seen = per_rank_profile(split, 2).overhead  # beside the other rank's busy core
                # the first stage (rank 0's only chunk, or its first in the V) is not split
                added = 0.0 if (rank, chunk) == (0, 0) else (8 // (2 * v) * seen.split_backward_s(activations)
                                                             + last * seen.split_backward_per_activation_byte_s * head)
                assert w[1] == pytest.approx([x + added for x in w[0]])
                assert b[1] == pytest.approx(b[0])


def test_decode_overhead_is_recovered_from_steps_priced_with_it(monkeypatch):
    """Decode steps timed as the serving model prices them with a known host time (per
    layer 150 us plus 40 us a MiB of its weights, 50 us a step beyond the layers) split back
    into those three figures: the two sizes' per-layer times less their priced operators
    make the line, the 1-layer models' remainders the edge."""
    from meshplan.calibration import overhead

    hw = load_profile("local")
    truth = replace(hw.overhead, decode_layer_s=150e-6, decode_layer_per_byte_s=40e-6 / 2 ** 20,
                    decode_edge_s=50e-6)
    plan = InferencePlan(batch=1, prompt_len=overhead.PROBE_TOKENS, gen_len=2, dtype="fp32")
    specs = [overhead.probe_model(n) for n in overhead.LAYERS] + [
        replace(overhead.probe_model(n), **overhead.DECODE_LARGE) for n in overhead.LAYERS]
    timed = [simulate_inference(spec, plan, Cluster(1, 1), replace(hw, overhead=truth)).tpot_s for spec in specs]
    monkeypatch.setattr(overhead, "_decode", lambda spec: None)
    monkeypatch.setattr(overhead, "_median_timed_s", lambda fns, repeats, warmup: timed)
    layer_s, per_byte_s, edge_s = overhead.measure_decode_overhead(hw)
    assert layer_s == pytest.approx(150e-6) and per_byte_s == pytest.approx(40e-6 / 2 ** 20)
    assert edge_s == pytest.approx(50e-6)


@pytest.mark.slow
@pytest.mark.timed
def test_two_rank_probe_sees_dtensor_cost_more():
    from meshplan.calibration.overhead import measure_overhead
    measured = measure_overhead(load_profile("local"), repeats=8, warmup=2)
    # DTensor's sharding propagation and redistribution run on every op of a TP or SP layer
    # (SP's over TP's is within the noise of the collectives subtracted: 1.86 against 1.92 ms
    # in the EPYC's profile, 2.7 against 4.5 ms in the Xeon's)
    assert measured.layer_forward_s < measured.tp_layer_forward_s < 0.05
    assert measured.layer_forward_s < measured.sp_layer_forward_s < 0.05
    assert 0 <= measured.tp_edge_forward_s < 0.05 and 0 <= measured.sp_edge_backward_s < 0.05


def test_parallel_overhead_is_the_probe_less_its_priced_collectives():
    from meshplan.calibration.overhead import LAYERS, PROBE_TOKENS, parallel_overhead, probe_model
    hw = load_profile("local")
    m = probe_model(1)
    ar, rs, ag = (hw.collective_time_s(k, PROBE_TOKENS * m.hidden_size * 4, 2, 2)
                  for k in ("all_reduce", "reduce_scatter", "all_gather"))
    loss = 3 * hw.collective_time_s("all_reduce", PROBE_TOKENS * 4, 2, 2)
    layer = m.layer_params(m.layer_kinds()[0][0]) * 4
    # top-2 of 4 experts: each token's two rows of 64 fp32 out and back, over 2 ranks
    exchange = float(ep_comm_s(probe_model(1, moe=True), PROBE_TOKENS, 4, 1.0, hw, 2, 2, 1, 1))
    counts = float(ep_counts_s(probe_model(1, moe=True), hw, 2, 2))
    # FSDP2's copies at the profile's memory-bound rate (read + write): the half-layer shard into
    # the all-gather's input, the gathered layer out; the fp32 gradients into the reduce-scatter's input
    def copy(nbytes):
        return hw.memory_bound_time_s(nbytes, "fp32")
    fsdp_ag = hw.collective_time_s("all_gather", layer, 2, 2) + copy(layer) + copy(2 * layer)
    fsdp_rs = hw.collective_time_s("reduce_scatter", layer, 2, 2) + copy(2 * layer)
    # Ulysses: Q, K, V (4 + 2 + 2 heads of 16) out in one all-to-all and the output (4 heads) back
    q_kv = hw.collective_time_s("all_to_all", PROBE_TOKENS * 8 * 16 * 4, 2, 2)
    back = hw.collective_time_s("all_to_all", PROBE_TOKENS * 4 * 16 * 4, 2, 2)
    back2 = hw.collective_time_s("all_to_all", 2 * PROBE_TOKENS * 4 * 16 * 4, 2, 2)
    # plain: 1 ms per layer forward, 2 ms backward, 3 / 4 ms the rest; the others add
    # (layer forward, layer backward, rest forward, rest backward) what their calls cost with
    # a known overhead on top: TP 5-8 ms, SP 9-12 ms, FSDP 0.5 ms per gather and 0.25 ms per
    # reduce-scatter, EP 0.3 / 0.2 ms
    extra = {"plain": (0.0, 0.0, 0.0, 0.0), "tp": (2 * ar + 5e-3, 2 * ar + 6e-3, ar + loss + 7e-3, ar + 8e-3),
             "sp": (2 * (rs + ag) + 9e-3, 2 * (rs + ag) + 10e-3, rs + ag + loss + 11e-3, ag + rs + 12e-3),
             "zero2": (fsdp_ag + 0.5e-3, fsdp_rs + 0.25e-3, 0.0, 0.0),
             "zero3": (fsdp_ag + 0.5e-3, fsdp_ag + fsdp_rs + 0.75e-3, 0.0, 0.0),
             "cp": (q_kv + back + 0.4e-3, back2 + q_kv + 0.6e-3, 0.0, 0.0),
             "moe": (0.0, 0.0, 0.0, 0.0), "moe_ep": (exchange + counts + 0.3e-3, exchange + 0.2e-3, 0.0, 0.0)}
    rows = []
    for v, (lf, lb, ef, eb) in extra.items():
        for n in LAYERS:
            fwd = 3e-3 + ef + n * (1e-3 + lf)
            step = fwd + 4e-3 + eb + n * (2e-3 + lb)
            rows.append({"variant": v, "layers": n, "forward_s": fwd, "step_s": step})
    out = parallel_overhead(rows, hw)
    # per layer: two all-reduces each way (SP: two reduce-scatters and two all-gathers)
    assert out["tp_layer_forward_s"] == pytest.approx(1e-3 + 5e-3)
    assert out["tp_layer_backward_s"] == pytest.approx(2e-3 + 6e-3)
    assert out["sp_layer_backward_s"] == pytest.approx(2e-3 + 10e-3)
    # edges: the embedding's all-reduce and the loss's three forward, the head's all-reduce backward
    assert out["tp_edge_forward_s"] == pytest.approx(7e-3)
    assert out["tp_edge_backward_s"] == pytest.approx(8e-3)
    # SP: the embedding's reduce-scatter, the head's all-gather and the loss forward; backward mirrored
    assert out["sp_edge_forward_s"] == pytest.approx(11e-3)
    assert out["sp_edge_backward_s"] == pytest.approx(12e-3)
    assert (out["fsdp_gather_s"], out["fsdp_reduce_s"]) == (pytest.approx(0.5e-3), pytest.approx(0.25e-3))
    assert (out["ep_forward_s"], out["ep_backward_s"]) == (pytest.approx(0.3e-3), pytest.approx(0.2e-3))
    assert (out["cp_a2a_forward_s"], out["cp_a2a_backward_s"]) == (pytest.approx(0.4e-3), pytest.approx(0.6e-3))
    with pytest.raises(ProfileError, match="overhead.parallel"):
        parallel_overhead(rows[:-1], hw)


def test_tp_edge_overhead_is_added_to_the_head_once_per_micro_batch():
    edges = replace(OVERHEAD, tp_edge_forward_s=2e-3, tp_edge_backward_s=3e-3, sp_edge_forward_s=5e-3)
    model = ZOO["llama-2-7b"]
    shards = [Shard(1, 512, tp=1), Shard(1, 512, tp=2), Shard(1, 512, tp=2, sp=True)]
    base, more = (shard_times(model, hw, shards, "bf16") for hw in (A100, replace(A100, overhead=edges)))
    assert list(more.head.fwd_s - base.head.fwd_s) == pytest.approx([0.0, 2e-3, 5e-3])
    assert list(more.head.bwd_input_s - base.head.bwd_input_s) == pytest.approx([0.0, 3e-3, 0.0])
    assert list(more.embedding.fwd_s - base.embedding.fwd_s) == pytest.approx([0.0] * 3)


def test_profile_round_trip_and_corrupt_field(tmp_path):
    hw = replace(A100, overhead=OVERHEAD)
    path = tmp_path / "p.json"
    hw.save(path)
    assert HardwareProfile.from_dict(json.loads(path.read_text())).overhead == OVERHEAD
    data = json.loads(path.read_text())
    data["overhead"]["decode_layer_s"] = "fast"
    with pytest.raises(ProfileError, match="overhead.decode_layer_s"):
        HardwareProfile.from_dict(data)
    del data["overhead"]  # profiles from before the field: zero overhead
    assert HardwareProfile.from_dict(data).overhead == FrameworkOverhead()
    # the CPU facts per_rank_profile reads from `extra`
    for key, bad in (("neighbour_slowdown", "slow"), ("neighbour_slowdown", 0.5), ("cores_per_node", 0),
                     ("cores_per_node", -2)):
        with pytest.raises(ProfileError, match=f"extra.{key}"):
            HardwareProfile.from_dict({**data, "extra": {**data["extra"], key: bad}})
    # emulated nodes may share a core: a fraction of one is a fact, not corruption
    assert HardwareProfile.from_dict({**data, "extra": {"cores_per_node": 0.5}}).extra["cores_per_node"] == 0.5


@pytest.mark.parametrize("tp,sp,expected", [(1, False, (1e-3, 2e-3)), (2, False, (4e-3, 5e-3)),
                                            (2, True, (6e-3, 7e-3))])
def test_cost_model_adds_overhead_per_layer(tp, sp, expected):
    model = ZOO["llama-2-7b"]
    shard = Shard(1, 512, tp=tp, sp=sp)
    def costs(hw):
        return layer_times(model, hw, shard_times(model, hw, [shard], "bf16"), shard.tokens, 2,
                           tp, sp, 1, FULL, tp, 1, flash=True, tp_overlap=False)
    base, more = costs(A100), costs(replace(A100, overhead=OVERHEAD))
    assert more.fwd_compute_s - base.fwd_compute_s == pytest.approx(expected[0])
    assert more.bwd_input_s - base.bwd_input_s == pytest.approx(expected[1])
    assert more.recompute_s - base.recompute_s == pytest.approx(expected[0])  # full recompute redoes it


def test_moe_layers_add_the_moe_block_overhead():
    # DeepSeek-V3-style: the first 3 of 6 layers dense, so half the layers carry the MoE
    # block's surcharge (1.5 ms forward, 4 ms backward per average layer)
    moe = replace(ZOO["llama-2-7b"], name="half-moe", num_layers=6, num_experts=8,
                  experts_per_token=2, moe_ffn_hidden_size=1024, dense_layers=(0, 1, 2))
    shard = Shard(1, 512)
    def costs(hw):
        return layer_times(moe, hw, shard_times(moe, hw, [shard], "bf16"), shard.tokens, 2,
                           1, False, 1, FULL, 1, 1, flash=True, tp_overlap=False)
    base, more = costs(A100), costs(replace(A100, overhead=OVERHEAD))
    assert more.fwd_compute_s - base.fwd_compute_s == pytest.approx(1e-3 + 0.5 * 3e-3)
    assert more.bwd_input_s - base.bwd_input_s == pytest.approx(2e-3 + 0.5 * 8e-3)
    # with the experts over 2 ranks, the exchange's host work on top in those layers
    ep = replace(OVERHEAD, ep_forward_s=1e-3, ep_backward_s=2e-3)
    split = Shard(1, 512, ep=2, etp=1)
    base, more = (shard_times(moe, replace(A100, overhead=o), [split], "bf16").layer for o in (OVERHEAD, ep))
    assert more.fwd_s - base.fwd_s == pytest.approx(0.5 * 1e-3)
    assert more.bwd_input_s - base.bwd_input_s == pytest.approx(0.5 * 2e-3)


def test_decode_step_adds_decode_overhead_per_layer():
    model = ZOO["llama-2-7b"]
    plan = InferencePlan(batch=1, prompt_len=128, gen_len=8)
    base = simulate_inference(model, plan, Cluster(1, 1), A100)
    more = simulate_inference(model, plan, Cluster(1, 1), replace(A100, overhead=OVERHEAD))
    assert more.tpot_s - base.tpot_s == pytest.approx(model.num_layers * 0.5e-3, rel=1e-6)
    assert more.ttft_s - base.ttft_s == pytest.approx(model.num_layers * 1.5e-3, rel=1e-6)
    # MoE layers add the MoE block's forward surcharge (3 ms) to both
    moe = replace(model, name="all-moe", num_experts=8, experts_per_token=2, moe_ffn_hidden_size=5504)
    base = simulate_inference(moe, plan, Cluster(1, 1), A100)
    more = simulate_inference(moe, plan, Cluster(1, 1), replace(A100, overhead=OVERHEAD))
    assert more.tpot_s - base.tpot_s == pytest.approx(moe.num_layers * 3.5e-3, rel=1e-6)
    assert more.ttft_s - base.ttft_s == pytest.approx(moe.num_layers * 4.5e-3, rel=1e-6)


def test_ranks_beyond_cores_stretch_overhead_and_small_group_collectives():
    cpu = replace(A100, overhead=OVERHEAD, extra={**A100.extra, "cores_per_node": 2})
    shared = per_rank_profile(cpu, Cluster(4, 4).ranks_per_node)
    assert shared.overhead.layer_forward_s == pytest.approx(2e-3)
    # a 2-rank group was measured with a core per rank; among 4 ranks it gets half a core
    assert shared.collective_time_s("all_reduce", 2 ** 20, 2, 2) == pytest.approx(
        2 * cpu.collective_time_s("all_reduce", 2 ** 20, 2, 2), rel=1e-6)
    # a 4-rank group was measured with the same sharing: unchanged
    assert shared.collective_time_s("all_reduce", 2 ** 20, 4, 4) == pytest.approx(
        cpu.collective_time_s("all_reduce", 2 ** 20, 4, 4), rel=1e-6)


def test_busy_neighbours_slow_a_rank_by_the_measured_factor():
    cpu = replace(A100, overhead=OVERHEAD,
                  extra={**A100.extra, "cores_per_node": 2, "neighbour_slowdown": 1.1})
    assert per_rank_profile(cpu, 1) is cpu
    # two ranks, every core busy: the whole measured slowdown
    assert per_rank_profile(cpu, 2).overhead.layer_forward_s == pytest.approx(1.1e-3)
    gemm = (hw.gemm_time_s(4096, 4096, 4096, "bf16") for hw in (cpu, per_rank_profile(cpu, 2)))
    assert next(gemm) < next(gemm)
    # four ranks on two cores: half a core each, beside busy neighbours
    assert per_rank_profile(cpu, 4).overhead.layer_forward_s == pytest.approx(2 * 1.1e-3)


@pytest.mark.parametrize("zero,gathers,reduces", [(2, 4, 4), (3, 2 * 4 + 2, 4)])
def test_fsdp_calls_add_their_host_work(zero, gathers, reduces):
    # the 4-layer validation model, dp 2, one micro-batch on CPU ranks (every call exposed):
    # ZeRO-2 gathers each layer's weights once and reduce-scatters each layer's gradients;
    # ZeRO-3 gathers each layer before its forward and its backward, and the root module
    # (embedding, head) once
    from meshplan.validation.suite import VALIDATION_MODEL
    from meshplan.simulator.train import simulate
    from meshplan.simulator.plan import Plan
    local = load_profile("local")
    hw = replace(local, extra={k: v for k, v in local.extra.items() if k != "neighbour_slowdown"})
    plan = Plan(global_batch=2, seq_len=128, micro_batch=1, dp=2, zero=zero, dtype="fp32")
    def step_s(gather, reduce):
        over = replace(hw.overhead, fsdp_gather_s=gather, fsdp_reduce_s=reduce)
        return simulate(VALIDATION_MODEL, plan, Cluster(2, 2), replace(hw, overhead=over)).step_time_s
    base = step_s(0.0, 0.0)
    assert step_s(1e-3, 0.0) - base == pytest.approx(gathers * 1e-3)
    assert step_s(0.0, 1e-3) - base == pytest.approx(reduces * 1e-3)


@pytest.mark.parametrize("zero", [2, 3])
def test_fsdp2_copies_move_each_layers_bytes(zero):
    # the 4-layer validation model, dp 2, one micro-batch on CPU ranks (every call exposed):
    # per-parameter shards (FSDP2) against flat buffers is FSDP2's copies alone, each at the
    # memory-bound rate over the bytes it reads and writes. A ZeRO-3 gather copies the half
    # shard in (2 x bytes / 2) and the whole layer out (2 x bytes), each layer's before its
    # forward and its backward, the embedding's and the norm and head's once; ZeRO-2 gathers
    # each layer once, in and out in one call; each reduce-scatter first copies its share of
    # the fp32 gradients in (read 4 bytes a parameter, write 4)
    from meshplan.validation.suite import VALIDATION_MODEL as model
    from meshplan.simulator.train import simulate
    from meshplan.simulator.plan import Plan
    local = load_profile("local")
    hw = replace(local, extra={k: v for k, v in local.extra.items() if k != "neighbour_slowdown"})

    def step_s(layout):
        plan = Plan(global_batch=2, seq_len=128, micro_batch=1, dp=2, zero=zero, dtype="fp32", fsdp_layout=layout)
        return simulate(model, plan, Cluster(2, 2), hw).step_time_s

    def copy(nbytes):
        return hw.memory_bound_time_s(nbytes, "fp32")
    n = model.num_layers
    layer = model.layer_params(model.layer_kinds()[0][0]) * 4
    embedding = model.embedding_params() * 4
    head = (model.vocab_size + 1) * model.hidden_size * 4  # the LM head and the final norm
    total = n * layer + embedding + head
    scatters = n * copy(2 * total / n)  # the root's gradients ride in the layers' buckets
    gathers = (sum(k * (copy(b) + copy(2 * b)) for k, b in ((2 * n, layer), (1, embedding), (1, head)))
               if zero == 3 else n * copy(total / n + 2 * total / n))
    assert step_s("per_param") - step_s("flat") == pytest.approx(gathers + scatters, rel=1e-9)
