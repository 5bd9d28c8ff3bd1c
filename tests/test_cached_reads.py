"""Decode on a device whose caches hold the step's weights: the profile's CachedReads table
against hand computation, the serving simulator's decode (weights, decode attention, the
pipeline's token return) against sums worked out here, the profile file's checks, and the
measurement on this machine."""
import json
from dataclasses import replace

import pytest

from meshplan.calibration.measure.cached_reads import ROWS, measure_cached_reads, median_reading
from meshplan.core.errors import ProfileError
from meshplan.hw_profiles.profile import CachedReads, HardwareProfile, load_profile
from meshplan.simulator.model_spec import ModelSpec
from meshplan.simulator.plan import Cluster
from meshplan.simulator.serve import InferencePlan, kv_elements_per_token, simulate_inference

MIB = 2.0 ** 20
# per-byte seconds: rows (1, 4, 16) x working sets (1, 8 MiB)
TABLE = CachedReads((1 * MIB, 8 * MIB), (1.0, 4.0, 16.0), ((1e-11, 2e-11, 4e-11), (3e-11, 5e-11, 9e-11)),
                    2e-6, "fp32", "test table")
STOCK = load_profile("a100-80gb")
LOCAL = replace(load_profile("local"), cached_reads=TABLE)
TINY = ModelSpec(name="tiny", num_layers=2, hidden_size=128, num_heads=4, num_kv_heads=2,
                 ffn_hidden_size=256, vocab_size=512, max_seq_len=512)


def at(working_set_bytes: float) -> CachedReads:
    return replace(TABLE, step_bytes=working_set_bytes)


def test_table_prices_by_working_set_and_rows():
    kn = 256 * 512 * 4  # a [256, 512] fp32 weight's bytes
    # at or below a measured working set: its row; 1 row exactly as measured
    assert at(0.5 * MIB).gemm_time_s(1, 512, 256, 1, 4) == pytest.approx(2e-6 + kn * 1e-11)
    assert at(1 * MIB).gemm_time_s(1, 512, 256, 1, 4) == pytest.approx(2e-6 + kn * 1e-11)
    # between two: the larger's; beyond the table: the last's
    assert at(2 * MIB).gemm_time_s(4, 512, 256, 1, 4) == pytest.approx(2e-6 + kn * 5e-11)
    assert at(1e12).gemm_time_s(16, 512, 256, 1, 4) == pytest.approx(2e-6 + kn * 9e-11)
    # rows between two measured: linear in the rows (10 rows: half way from 4 to 16)
    assert at(1 * MIB).gemm_time_s(10, 512, 256, 1, 4) == pytest.approx(2e-6 + kn * 3e-11)
    # beyond the last: as the compute grows, with the rows
    assert at(1 * MIB).gemm_time_s(64, 512, 256, 1, 4) == pytest.approx(2e-6 + kn * 4e-11 * 4)
    # a batch of GEMMs (experts) reads each weight
    assert at(1 * MIB).gemm_time_s(1, 512, 256, 3, 4) == pytest.approx(2e-6 + 3 * kn * 1e-11)


def test_cached_view_prices_only_its_dtype_and_unquantized_weights():
    view = LOCAL.cached(4 * MIB)
    assert view.gemm_time_s(4, 512, 256, "fp32") == pytest.approx(2e-6 + 256 * 512 * 4 * 5e-11)
    assert view.gemm_time_s(4, 512, 256, "bf16") == LOCAL.gemm_time_s(4, 512, 256, "bf16")
    assert view.gemm_time_s(4, 512, 256, "fp32", weight_bytes=1) == LOCAL.gemm_time_s(4, 512, 256, "fp32",
                                                                                       weight_bytes=1)
    assert LOCAL.gemm_time_s(4, 512, 256, "fp32") != view.gemm_time_s(4, 512, 256, "fp32")  # not a view
    assert STOCK.cached(4 * MIB) is STOCK  # nothing measured: the GEMM fits' roofline


def test_scaled_bandwidth_and_latency_reach_the_table():
    slow = LOCAL.scaled(hbm_bw=0.5, op_latency_s=1e-6).cached(1 * MIB)
    assert slow.gemm_time_s(1, 512, 256, "fp32") == pytest.approx(3e-6 + 256 * 512 * 4 * 2e-11)
    assert slow.attention.decode_bytes_per_s == pytest.approx(LOCAL.attention.decode_bytes_per_s / 2)


def test_file_round_trip_and_checks(tmp_path):
    path = tmp_path / "p.json"
    LOCAL.cached(4 * MIB).save(path)  # the step's working set is not part of the file
    data = json.loads(path.read_text())
    assert "step_bytes" not in data["cached_reads"]
    assert HardwareProfile.from_dict(data).cached_reads == TABLE
    bad = [({"seconds_per_byte": [[1e-11, 2e-11]]}, "cached_reads.seconds_per_byte"),
           ({"working_set_bytes": [8 * MIB, 1 * MIB]}, "cached_reads.working_set_bytes"),
           ({"rows": []}, "cached_reads.rows"),
           ({"dtype": "int3"}, "cached_reads.dtype"),
           ({"rate": 1}, "cached_reads.rate")]
    for change, field in bad:
        broken = json.loads(path.read_text())
        broken["cached_reads"].update(change)
        with pytest.raises(ProfileError) as err:
            HardwareProfile.from_dict(broken, "p.json")
        assert err.value.field == field


def simulate(hw, **kw):
    plan = InferencePlan(**{"batch": 2, "prompt_len": 16, "gen_len": 5, "dtype": "fp32", **kw})
    return simulate_inference(TINY, plan, Cluster(plan.num_gpus, plan.num_gpus), hw)


def test_decode_reads_weights_at_the_cached_rate():
    flat = CachedReads((1e15,), (1.0, 64.0), ((7e-11, 7e-11),), 0.0, "fp32", "flat")
    parts = simulate(replace(LOCAL, cached_reads=flat)).breakdown["decode_step_s"]
    h, kv, ffn = 128, 2 * 32, 256
    layer = h * (h + 2 * kv) + h * h + 3 * h * ffn  # Q, K, V, out; gate, up, down
    assert parts["weights_read"] == pytest.approx(7e-11 * 4 * (2 * layer + h * 512))  # + LM head
    assert parts["compute"] == 0.0


def test_decode_attention_at_the_measured_kernel_rate():
    kernel = replace(LOCAL.attention, decode_latency_s=5e-6, decode_bytes_per_s=1e10)
    r = simulate(replace(LOCAL, attention=kernel))
    contexts = [16 + j for j in range(1, 5)]  # the 4 decode steps attend over 17..20 tokens
    cache_bytes = [2 * c * kv_elements_per_token(TINY) * 4 for c in contexts]
    expected = 2 * sum(5e-6 + b / 1e10 for b in cache_bytes) / 4  # 2 layers, mean over steps
    assert r.breakdown["decode_step_s"]["kv_read"] == pytest.approx(expected)


def test_pipeline_decode_returns_each_token_to_the_first_stage():
    r = simulate(LOCAL, pp=2, batch=2)
    hidden = LOCAL.collective_time_s("send_recv", 2 * 1 * 128 * 4, 2, 2)  # hidden + residual, 1 sequence
    token = LOCAL.collective_time_s("send_recv", 8 * 1, 2, 2)
    assert r.breakdown["decode_step_s"]["pp_handoff"] == pytest.approx(hidden + token)
    assert simulate(LOCAL).breakdown["decode_step_s"]["pp_handoff"] == 0.0


def test_measurement_on_this_machine():
    reads = measure_cached_reads("cpu", "fp32", max_working_set_bytes=4 * 2 ** 20)
    assert reads.working_set_bytes == (1 * MIB, 2 * MIB, 4 * MIB)
    assert reads.rows == tuple(float(r) for r in ROWS)
    for row in reads.seconds_per_byte:
        assert all(t > 0 for t in row)
        assert row[-1] > row[0]  # 64 rows do 64x the multiply-adds of one over the same bytes
    HardwareProfile.from_dict({**LOCAL.to_dict(), "cached_reads": reads.to_dict()})  # a valid section


def test_readings_minutes_apart_keep_each_points_median():
    fast = replace(TABLE, seconds_per_byte=((0.5e-11, 1e-11, 2e-11), (1e-11, 2e-11, 3e-11)), latency_s=1e-6)
    slow = replace(TABLE, seconds_per_byte=((2e-11, 3e-11, 5e-11), (6e-11, 4e-11, 8e-11)), latency_s=5e-6)
    kept = median_reading([fast, TABLE, slow])
    # per point, not the reading with the median mean: (1, 8 MiB) x (1, 4, 16 rows)
    assert kept.seconds_per_byte == ((1e-11, 2e-11, 4e-11), (3e-11, 4e-11, 8e-11))
    assert kept.latency_s == 2e-6 and kept.working_set_bytes == TABLE.working_set_bytes
    assert "median of 3 readings" in kept.source
    assert median_reading([TABLE]) == TABLE


def test_result_says_when_decode_was_priced_from_cached_reads():
    r = simulate(LOCAL)
    assert r.decode_cached and r.decode_working_set_bytes == pytest.approx(r.weights_bytes + r.kv_cache_bytes)
    assert not simulate(LOCAL, dtype="bf16").decode_cached  # measured in fp32 only
    assert not simulate(LOCAL, quantization="int8").decode_cached  # narrower weights: the GEMM fits
    assert not simulate(STOCK).decode_cached
