"""What a rank measures: step wall times, and memory.

Memory on CUDA is the allocator's peak (torch.cuda.max_memory_allocated). On CPU torch
keeps no allocator statistics, so it is accounted as the simulator counts it: the bytes of
this rank's parameter, gradient and optimizer-state shards (the gradients the larger of the
shards' after the step and the unsharded ones FSDP2 accumulated during it) plus the peak of
the activations saved for backward (autograd's saved_tensors_hooks, summed over distinct
storages alive at once, and the tensors the executor's own code reports alive beside them
at its peak moments: the fused loss's logits and probabilities). The process's peak RSS is
reported beside it.
"""
from __future__ import annotations

import resource
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def local_part(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a (possibly DTensor) tensor, sharing its storage."""
    return t.to_local() if isinstance(t, DTensor) else t


def _nbytes(t: torch.Tensor) -> int:
    local = local_part(t)
    return local.numel() * local.element_size()


class ActivationMeter:
    """Peak bytes of tensors autograd saves for backward, while active (a context manager).

    Each saved tensor is wrapped in a holder whose release (when autograd frees the graph)
    drops its storage from the live set; storages are deduplicated, and the bytes of the
    live set are re-read at each save, so storages resized to zero (FSDP2 freeing gathered
    weights after forward) stop counting. Parameters' own storages are excluded (counted
    as parameters). Two kinds of tensors activation checkpointing holds outside autograd's
    saved tensors are reported by its contexts (executor/parallelize.py, while a meter is
    active) and count until their storage is freed: the outputs per-op recompute keeps in
    forward (kept_outputs), and those a recompute in backward keeps for the backward that
    follows it, the outputs still alive when it ends (recomputed_outputs)."""

    _active: ActivationMeter | None = None

    def __init__(self, excluded: set[int], gradients: Callable[[], int] = lambda: 0):
        self.excluded = excluded
        self.live: dict[int, list] = {}  # storage id -> [storage, number of holders]
        self.kept: dict[int, tuple] = {}  # storage id -> (weak reference, bytes)
        self.peak_bytes = 0
        # the most bytes `gradients()` reported at a save: gradients held outside the
        # parameters' own (unsharded_gradients)
        self.gradients = gradients
        self.gradients_peak_bytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    @classmethod
    def active(cls) -> ActivationMeter | None:
        """The meter counting now, if any."""
        return cls._active

    def __enter__(self):
        self._hooks.__enter__()
        ActivationMeter._active = self
        return self

    def __exit__(self, *exc):
        ActivationMeter._active = None
        return self._hooks.__exit__(*exc)

    def keep(self, tensor: torch.Tensor) -> None:
        """Count `tensor`, held elsewhere than in autograd's saved tensors, until its
        storage is freed."""
        key, ref, nbytes = _weakly(tensor)
        if key not in self.excluded:
            self.kept[key] = (ref, nbytes)
            self._measure()

    @contextmanager
    def kept_outputs(self, keeps: Callable[[], bool]):
        """Count the outputs of the ops run inside for which `keeps()` says so (a per-op
        checkpoint policy's decision on the op just run), as they come."""
        with _Outputs(lambda t: self.keep(t) if keeps() else None):
            yield

    @contextmanager
    def recomputed_outputs(self):
        """Count the outputs of the ops run inside (a checkpoint's recompute) that are still
        alive when it ends, stopped early or not: what it keeps for backward."""
        made: list = []
        try:
            with _Outputs(lambda t: made.append(_weakly(t))):
                yield
        finally:
            self.kept.update((key, (ref, nbytes)) for key, ref, nbytes in made
                             if key not in self.excluded and not ref.expired())
            self._measure()

    def hold(self, *tensors: torch.Tensor) -> None:
        """Count `tensors`, alive now beside what is saved and kept, at this moment only
        (the fused loss's logits and probabilities, executor/loss.py)."""
        now = {key: nbytes for key, _, nbytes in map(_weakly, tensors)}
        self._measure(sum(b for k, b in now.items() if k not in self.excluded and k not in self.live
                          and k not in self.kept))

    def _measure(self, moment_bytes: int = 0) -> None:
        self.kept = {k: v for k, v in self.kept.items() if not v[0].expired()}
        held = sum(s.nbytes() for s, _ in self.live.values())
        self.peak_bytes = max(self.peak_bytes, moment_bytes + held
                              + sum(b for k, (_, b) in self.kept.items() if k not in self.live))
        self.gradients_peak_bytes = max(self.gradients_peak_bytes, self.gradients())

    def _pack(self, tensor: torch.Tensor):
        # A DTensor's own storage is not its shard's: count the local shard's memory.
        storage = local_part(tensor).untyped_storage()
        key = storage._cdata
        if key in self.excluded:
            return tensor
        self.live.setdefault(key, [storage, 0])[1] += 1
        self._measure()
        # Hold it detached: an op that saves its own output (attention, log-softmax) would
        # otherwise close a cycle holder -> output -> its grad_fn -> holder through C++
        # autograd nodes, which Python's gc cannot see; a graph never run backward (the
        # pipeline's metadata-inference forward on stage 0) then stays alive for good.
        return _Held(self, key, tensor.detach())

    @staticmethod
    def _unpack(held):
        return held.tensor if isinstance(held, _Held) else held

    def release(self, key: int) -> None:
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            del self.live[key]


def unsharded_gradients(modules: list[torch.nn.Module]) -> Callable[[], int]:
    """A function giving the bytes of the gradients FSDP2 holds now on its all-gathered
    parameters: accumulated there over micro-batches when the step reduces once (plan.grad_sync
    last), until reduce-scattered into the shards' gradients. Reads FSDPParam (torch 2.13's
    private fully_shard internals)."""
    held = [fp for module in modules for m in module.modules() if isinstance(m, FSDPModule)
            for group in [m._get_fsdp_state()._fsdp_param_group] if group is not None
            for fp in group.fsdp_params]

    def gradient_bytes() -> int:
        storages = {}
        for fp in held:
            param = getattr(fp, "_unsharded_param", None)  # made at the first all-gather
            for grad in (param.grad if param is not None else None, fp.unsharded_accumulated_grad):
                if grad is not None:
                    key, _, nbytes = _weakly(grad)
                    storages[key] = nbytes
        return sum(storages.values())
    return gradient_bytes


def _weakly(tensor: torch.Tensor) -> tuple[int, StorageWeakRef, int]:
    """(id, weak reference, bytes) of the storage of this rank's part of `tensor`."""
    storage = local_part(tensor).untyped_storage()
    return storage._cdata, StorageWeakRef(storage), storage.nbytes()


class _Outputs(TorchDispatchMode):
    """Hands `seen` each tensor an op run beneath this mode returns."""

    def __init__(self, seen: Callable[[torch.Tensor], None]):
        super().__init__()
        self.seen = seen

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.seen(t)
        return out


class _Held:
    __slots__ = ("meter", "key", "tensor")

    def __init__(self, meter: ActivationMeter, key: int, tensor: torch.Tensor):
        self.meter, self.key, self.tensor = meter, key, tensor

    def __del__(self):
        self.meter.release(self.key)


def parameter_storages(params) -> set[int]:
    return {local_part(p).untyped_storage()._cdata for p in params}


@dataclass(frozen=True)
class RankMemory:
    """One rank's memory, bytes. peak_bytes: allocator peak (CUDA) or the accounted sum."""

    rank: int
    parameters_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    peak_bytes: int
    max_rss_bytes: int

    def to_json(self) -> dict:
        return asdict(self)


def model_state_bytes(params: list[torch.Tensor], optimizer) -> tuple[int, int, int]:
    """(parameter, gradient, optimizer-state) bytes held by this rank (local shards only).
    ZeroRedundancyOptimizer keeps this rank's partition in its inner `optim`."""
    param_bytes = sum(_nbytes(p) for p in params)
    grad_bytes = sum(_nbytes(p.grad) for p in params if p.grad is not None)
    inner = getattr(optimizer, "optim", optimizer)
    opt_bytes = sum(_nbytes(v) for state in inner.state.values() for v in state.values()
                    if isinstance(v, torch.Tensor))
    return param_bytes, grad_bytes, opt_bytes


def rank_memory(rank: int, state_bytes: tuple[int, int, int], meter: ActivationMeter,
                device: torch.device) -> RankMemory:
    """`state_bytes` after the step; the gradients the larger of the shards' and the most the
    meter saw held unsharded during it."""
    params, grads, opt = state_bytes
    grads, activations_bytes = max(grads, meter.gradients_peak_bytes), meter.peak_bytes
    return RankMemory(rank, params, grads, opt, activations_bytes,
                      peak_bytes(params + grads + opt + activations_bytes, device), max_rss_bytes())


def peak_bytes(accounted_bytes: int, device: torch.device) -> int:
    """The allocator's peak on CUDA; on CPU, which has none to ask, the accounted bytes."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else accounted_bytes


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def timed(fn, device: torch.device) -> float:
    """Wall seconds of fn() across all ranks: barrier, run, (device sync), barrier."""
    dist.barrier()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()
    return time.perf_counter() - start
