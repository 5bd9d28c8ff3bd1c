"""Plan legality rules, JSON round trip, and the balanced partition."""
import json

import pytest
from hypothesis import given, strategies as st

from meshplan.core.errors import PlanError
from meshplan.simulator.model_spec import ZOO
from meshplan.simulator.partition import balanced_partition
from meshplan.simulator.plan import Cluster, Plan, load_plan_fields

LLAMA70 = ZOO["llama-2-70b"]


def _plan(**kw):
    base = dict(global_batch=64, seq_len=4096, dp=2, tp=8, pp=4)
    base.update(kw)
    return Plan(**base)


def test_legal_plan_validates():
    _plan().validate(LLAMA70, Cluster(64, 8))


@pytest.mark.parametrize("kw,cluster,field", [
    (dict(tp=3, dp=1, pp=1, global_batch=3), Cluster(3, 8), "plan.tp"),          # 64 heads
    (dict(tp=16, dp=1, pp=4), Cluster(64, 8), "plan.tp"),                         # 8 KV heads
    (dict(dp=4), Cluster(64, 8), "cluster.num_gpus"),                                    # product != GPUs
    (dict(pp=80, tp=1, dp=1, global_batch=80, schedule="interleaved", virtual_stages=2),
     Cluster(80, 8), "plan.pp"),                                                  # 160 > 80 layers
    (dict(layer_partition=(20, 20, 20, 19)), Cluster(64, 8), "layer_partition"),
    (dict(schedule="interleaved", virtual_stages=2, global_batch=6), Cluster(64, 8), "plan.global_batch"),
    # Ulysses' all-to-all: cp 16 does not divide a TP 8 rank's 8 query heads (nor its one KV head)
    (dict(dp=1, cp=16, pp=1, global_batch=16, cp_comm="a2a"), Cluster(128, 8), "plan.cp_comm"),
])
def test_illegal_plans_name_the_field(kw, cluster, field):
    with pytest.raises(PlanError, match=field):
        _plan(**kw).validate(LLAMA70, cluster)


@pytest.mark.parametrize("kw,field", [
    (dict(global_batch=63), "global_batch"), (dict(sp=True, tp=1, dp=16), "sp"),
    (dict(zero=4), "zero"), (dict(schedule="pipedream"), "schedule"),
    (dict(virtual_stages=2), "virtual_stages"), (dict(placement=("tp", "dp", "pp")), "placement"),
    (dict(pp=1, dp=64, schedule="zb-v"), "schedule"),  # an interleaving schedule needs a pipeline
    (dict(micro_batch=0), "micro_batch")])
def test_malformed_plans(kw, field):
    with pytest.raises(PlanError, match=field):
        _plan(**kw)


def test_a_plan_file_names_unknown_keys_and_bad_values_at_once():
    data = {**_plan().to_dict(), "tpp": 2, "dp": "x", "zero": 4}
    with pytest.raises(PlanError) as exc:
        Plan.from_dict(data)
    assert [issue[0] for issue in exc.value.issues] == ["plan.tpp", "plan.dp", "plan.zero"]


def test_cluster_checks():
    with pytest.raises(PlanError, match="cluster.num_gpus"):
        Cluster(12, 8)
    assert Cluster(4, 8).num_nodes == 1 and Cluster(1024, 8).num_nodes == 128


def test_plan_json_round_trip(tmp_path):
    plan = _plan(sp=True, zero=1, recompute="selective", schedule="interleaved", virtual_stages=2,
                 layer_partition=(10,) * 8)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan.to_dict()))
    assert Plan.from_dict(load_plan_fields(str(path))) == plan
    path.write_text(json.dumps({"plan": plan.to_dict(), "step_time_s": 1.0}))
    assert Plan.from_dict(load_plan_fields(str(path))) == plan
    with pytest.raises(PlanError, match="plan.bogus"):
        Plan.from_dict({**plan.to_dict(), "bogus": 1})
    path.write_text(json.dumps({"tp": 2, "bogus": 1, "tpp": 2}))
    with pytest.raises(PlanError) as err:
        load_plan_fields(str(path))
    assert [field for field, _, _ in err.value.issues] == [f"{path}:bogus", f"{path}:tpp"]
    path.write_text("{not json")
    with pytest.raises(PlanError, match="plan_file"):
        load_plan_fields(str(path))


def test_partition_hand_checked():
    assert balanced_partition(96, 8, 1.0) == (12,) * 8
    # embedding costs 3 layers, head 5: the end stages take fewer layers (max stage time 11)
    assert balanced_partition(80, 8, 1.0, 3.0, 5.0) == (8, 11, 11, 11, 11, 11, 11, 6)
    # a head (embedding) of 3.5 layers takes a stage of its own: max stage time 3.5, not 4.5
    assert balanced_partition(6, 4, 1.0, 0.0, 3.5) == (2, 2, 2, 0)
    assert balanced_partition(6, 4, 1.0, 3.5, 0.0) == (0, 2, 2, 2)
    # ... and both, with the layers between them: 4 layers in 6 stages
    assert balanced_partition(4, 6, 1.0, 2.0, 2.0) == (0, 1, 1, 1, 1, 0)


@given(st.integers(1, 40), st.integers(1, 12), st.floats(0.0, 10.0), st.floats(0.0, 10.0))
def test_partition_is_optimal(layers, parts, first, last):
    parts = min(parts, layers + 2)
    split = balanced_partition(layers, parts, 1.0, first, last)
    assert sum(split) == layers and min(split[1:-1], default=1) >= 1 and min(split) >= 0
    assert len(split) == parts
    cost = max(n + (first if i == 0 else 0) + (last if i == parts - 1 else 0)
               for i, n in enumerate(split))
    # brute force lower bound: no split can beat the optimum of this tiny DP
    best = _brute(layers, parts, first, last)
    assert cost == pytest.approx(best)


def _brute(layers, parts, first, last):
    from functools import lru_cache

    @lru_cache(None)
    def go(i, left):  # part i onward with `left` layers
        if i == parts - 1:
            return left + last + (first if i == 0 else 0)
        # the first part may hold no layer; the middle ones one at least, the last none
        extra, least = (first, 0) if i == 0 else (0, 1)
        return min(max(n + extra, go(i + 1, left - n))
                   for n in range(least, left - max(parts - i - 2, 0) + 1))
    return go(0, layers)
