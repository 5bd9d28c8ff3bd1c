"""Pipeline layer partition: contiguous layer counts per (virtual) stage that minimise the
slowest stage, with the embedding counted on the first stage and the LM head on the last
(as Narayanan et al. 2021 sec 3.3 balance stages; Megatron-LM's
--decoder-first/last-pipeline-num-layers exposes the same knob by hand).
"""
from __future__ import annotations

def _capacity(budget_s: float, layer_s: float, extra_s: float) -> int:
    """Most layers a stage with `extra_s` of fixed work can take within `budget_s`."""
    return int((budget_s - extra_s) // layer_s + 1e-9) if budget_s >= extra_s else 0


def balanced_partition(num_layers: int, num_parts: int, layer_s: float,
                       first_extra_s: float = 0.0, last_extra_s: float = 0.0) -> tuple[int, ...]:
    """Layers per part (each >= 1, summing to num_layers) minimising the largest part time
    n_i * layer_s + extra_i. With identical layers the optimal contiguous split is found
    exactly by bisecting on the bottleneck time over its few candidate values (the same
    optimum a dynamic program over split points finds, in O(parts * log layers))."""
    if num_parts > num_layers:
        raise ValueError(f"{num_layers} layers cannot fill {num_parts} stages")
    if num_parts == 1:
        return (num_layers,)
    layer_s = max(layer_s, 1e-30)
    extras = [0.0] * num_parts
    extras[0] += first_extra_s
    extras[-1] += last_extra_s
    candidates = sorted({n * layer_s + e for n in range(1, num_layers + 1) for e in set(extras)})

    def feasible(budget: float) -> bool:
        caps = [_capacity(budget, layer_s, e) for e in extras]
        return min(caps) >= 1 and sum(caps) >= num_layers

    lo = _first_true(candidates, feasible)
    caps = [_capacity(candidates[lo], layer_s, e) for e in extras]
    excess = sum(caps) - num_layers
    # Trim the excess from the most loaded parts first, keeping every part >= 1 layer.
    while excess > 0:
        i = max(range(num_parts), key=lambda j: (caps[j] * layer_s + extras[j] if caps[j] > 1 else -1, -j))
        caps[i] -= 1
        excess -= 1
    return tuple(caps)


def _first_true(values: list[float], predicate) -> int:
    lo, hi = 0, len(values) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if predicate(values[mid]):
            hi = mid
        else:
            lo = mid + 1
    return lo
