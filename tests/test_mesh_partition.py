"""The device mesh against torch DeviceMesh's own construction (ranks laid out as a grid,
outermost axis first), and the balanced layer partition against a brute-force search over
split points."""
import itertools

import numpy as np
import pytest

from meshplan.core.mesh import Group, Mesh
from meshplan.simulator.partition import (balanced_partition, balanced_shape, even_partition, parse_partition,
                                          rank_chunks)
from meshplan.validation.published import load_runs

AXES = ("tp", "cp", "dp", "pp")


def grid_group(sizes: dict, placement: tuple, axes: tuple, origin: int) -> list[int]:
    """init_device_mesh lays ranks out as np.arange(world).reshape(outermost, ..., innermost);
    a group is the sub-grid through `origin` along `axes`."""
    outer_first = placement[::-1]
    grid = np.arange(int(np.prod([sizes[a] for a in placement]))).reshape([sizes[a] for a in outer_first])
    at = np.argwhere(grid == origin)[0]
    index = tuple(slice(None) if a in axes else int(c) for a, c in zip(outer_first, at))
    return sorted(grid[index].ravel().tolist())


def test_mesh_groups_are_device_mesh_sub_grids():
    rng = np.random.default_rng(0)
    for _ in range(80):
        sizes = {a: int(x) for a, x in zip(AXES, 2 ** rng.integers(0, 3, 4))}
        placement = tuple(rng.permutation(AXES))
        mesh = Mesh.of(sizes, placement, gpus_per_node=8)
        origin = int(rng.integers(mesh.world_size))
        for k in (1, 2):
            for axes in itertools.combinations(AXES, k):
                assert mesh.ranks(axes, origin).tolist() == grid_group(sizes, placement, axes, origin)


def test_group_link_level():
    mesh = Mesh.of({"tp": 8, "cp": 1, "dp": 4, "pp": 2}, AXES, gpus_per_node=8)
    assert mesh.group(("tp",)) == Group(8, 8)            # one node
    assert mesh.group(("dp",)) == Group(4, 1)            # stride 8: a node each
    assert mesh.group(("tp", "dp")) == Group(32, 8)      # four nodes, eight ranks each
    assert mesh.neighbour_pair("pp") == Group(2, 1)


def _bottleneck(parts, layer_s, first_s, last_s):
    return max(n * layer_s + (first_s if i == 0 else 0) + (last_s if i == len(parts) - 1 else 0)
               for i, n in enumerate(parts))


def _brute_force_optimum(layers, k, layer_s, first_s, last_s):
    """Least bottleneck over every contiguous split into k parts, the middle ones of >= 1
    layer, the first and last of >= 0 (for k > 1): the splits of layers + 2 into k parts of
    >= 1, less one layer at each end."""
    if k == 1:
        return _bottleneck((layers,), layer_s, first_s, last_s)
    best = np.inf
    for cuts in itertools.combinations(range(1, layers + 2), k - 1):
        parts = np.diff((0, *cuts, layers + 2)) - np.eye(k, dtype=int)[[0, -1]].sum(axis=0)
        best = min(best, _bottleneck(parts, layer_s, first_s, last_s))
    return best


@pytest.mark.parametrize("layers", [3, 7, 12])
def test_balanced_partition_is_optimal(layers):
    rng = np.random.default_rng(layers)
    for _ in range(60):
        k = int(rng.integers(1, layers + 3))
        layer_s, first_s, last_s = rng.uniform(0.5, 2), rng.choice([0, rng.uniform(0, 5)]), rng.uniform(0, 6)
        parts = balanced_partition(layers, k, layer_s, first_s, last_s)
        assert len(parts) == k and sum(parts) == layers and min(parts[1:-1], default=1) >= 1
        assert min(parts) >= 0 and (k > 1 or parts == (layers,))
        assert _bottleneck(parts, layer_s, first_s, last_s) == pytest.approx(
            _brute_force_optimum(layers, k, layer_s, first_s, last_s))


def test_balanced_shape_is_vectorised_over_pipelines():
    parts, layer_s = np.array([1, 2, 4, 8]), np.array([1.0, 1.0, 2.0, 0.5])
    shape = balanced_shape(32, parts, layer_s, 1.5, 3.0)
    for i in range(4):
        assert shape.layers(i) == balanced_partition(32, int(parts[i]), layer_s[i], 1.5, 3.0)


def test_even_partition_and_chunks():
    assert even_partition(10, 4) == (3, 3, 2, 2)        # vLLM: remainder to the first stages
    # virtual stage j is chunk j // pp of rank j % pp
    assert rank_chunks((1, 2, 3, 4, 5, 6), 2).tolist() == [[1, 3, 5], [2, 4, 6]]


def torchtitan_split(layers: int, stages: int) -> tuple[int, ...]:
    """torchtitan's generate_split_points (Dec 2024), by its rule: the first and the last
    stage take layers // stages, the middle ones one more while the remainder lasts."""
    base, extra = divmod(layers, stages)
    middle = [base + 1 if i < extra else base for i in range(stages - 2)]
    return (base, *middle, layers - base - sum(middle))


def megatron_split(layers: int, chunks: int, account_for_ends: bool) -> tuple[int, ...]:
    """Megatron-Core's split: decoder layers evenly over the chunks, or with
    account_for_embedding/loss_in_pipeline_split the embedding and the loss counted as one
    layer each on the first and last chunk."""
    per = (layers + 2 * account_for_ends) // chunks
    return (per - account_for_ends, *[per] * (chunks - 2), per - account_for_ends)


def automodel_split(layers: int, stages: int) -> tuple[int, ...]:
    """Automodel's generate_hf_model_split (Oct 2025): the first layers % stages stages take
    one layer more than layers // stages."""
    base, extra = divmod(layers, stages)
    return tuple(base + (i < extra) for i in range(stages))


def test_published_rows_record_their_frameworks_pipeline_split():
    assert parse_partition("2,3*30,2") == (2, *[3] * 30, 2) and parse_partition("9*4") == (9,) * 4
    assert parse_partition("10,12,12,10") == (10, 12, 12, 10)
    for bad in ("2*", "a", "2,,3", "1.5"):
        with pytest.raises(ValueError):
            parse_partition(bad)
    runs = {run.id: run for run in load_runs()}
    split = {i: r.fixed["layer_partition"] for i, r in runs.items() if "layer_partition" in r.fixed}
    for i, parts in split.items():  # one count per virtual stage, every decoder layer once
        run = runs[i]
        assert len(parts) == run.fixed["pp"] * run.fixed.get("virtual_stages", 1) and sum(parts) == run.model.num_layers, i
    assert split["tt24-405b-512gpu-3d-1f1b"] == torchtitan_split(126, 8)
    assert split["tt24-405b-512gpu-3d-interleaved"] == torchtitan_split(126, 16)
    assert split["mbridge2604-gptoss-120b-64"] == megatron_split(36, 4, False)
    assert split["mbridge2604-llama3-70b-64"] == megatron_split(80, 40, False)
    assert split["mbridge2604-qwen3-235b-256"] == megatron_split(94, 32, True)
    assert split["mbridge2604-llama31-405b-1024"] == megatron_split(126, 64, True)
    assert split["mz-qwen3-235b-256-ep8-pp32-a2a"] == megatron_split(94, 96, True)
    assert split["automodel-dsv3-256"] == automodel_split(61, 32)
