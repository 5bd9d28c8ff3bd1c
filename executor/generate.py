"""Greedy generation with a KV cache on the executor's decoder (model.py): prefill (one
forward over every prompt token, filling the cache), then decode (one forward per new token,
attending over the cache); each token is the argmax of the last position's full logits.

    tokens = generate(model, prompts, gen_len)            # one process: [batch, gen_len]

On ranks (serve.py runs this under torchrun), a ServingRank holds this rank's part of a
deployment of tp x pp x replicas ranks, and a Generation runs one greedy generation on it:
- tensor parallel: training's apply_tp without sequence parallelism (DTensor; column-parallel
  Q/K/V, MLP up/gate, row-parallel out/down with local outputs, so attention and the KV
  cache hold this rank's heads; vocab-parallel embedding; the head's logits are gathered
  whole, so the argmax sees the full vocabulary; MoE layers route every token on every
  rank through its share of each expert's width, moe.shard_expert_width);
- pipeline parallel: each rank holds a contiguous range of layers (pipeline.split_stage) and
  passes its hidden states to the next stage with point-to-point isend / recv; the last
  stage sends each new token back to the first. torch.distributed.pipelining is not used:
  its schedules run fixed-shape training micro-batches, while a generation changes shape
  from prefill (prompt_len tokens) to decode (1 token) and loops the last stage back to the
  first. As in vLLM's pipeline-parallel engine, the replica's batch streams through the
  stages as min(pp, batch) micro-batches, each with its own cache, so every stage has work;
- replicas: data-parallel copies, replica r generating prompts r*batch .. (r+1)*batch - 1;
- int8 weights (plan.quantization): each stage's decoder weights quantized (quantize.py).
Ranks are placed as simulator/serve.py places them: TP innermost, then pipeline stages,
replicas outermost.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from meshplan.core.mesh import Mesh
from meshplan.executor.measure import local_part
from meshplan.executor.model import Transformer, build_model
from meshplan.executor.parallelize import apply_tp, build_mesh
from meshplan.executor.pipeline import split_stage
from meshplan.executor.quantize import quantize_int8
from meshplan.simulator.serve import InferencePlan
from meshplan.simulator.model_spec import ModelSpec
from meshplan.simulator.partition import even_partition


def prompt_tokens(count: int, prompt_len: int, vocab_size: int, seed: int) -> torch.Tensor:
    """[count, prompt_len] synthetic prompt token ids drawn from the seed."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (count, prompt_len), generator=gen)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """[batch] argmax of the last position's logits [batch, seq, vocab]."""
    return logits[:, -1].argmax(-1)


@torch.no_grad()
def generate(model: Transformer, prompts: torch.Tensor, gen_len: int) -> torch.Tensor:
    """[batch, gen_len] greedy tokens in one process: a prefill forward, then gen_len - 1
    one-token decode forwards over the KV cache."""
    cache = model.new_cache(prompts.shape[1] + gen_len - 1)
    tokens = [greedy(model(prompts, cache))]
    for _ in range(gen_len - 1):
        tokens.append(greedy(model(tokens[-1][:, None], cache)))
    return torch.stack(tokens, dim=1)


def serving_mesh(plan: InferencePlan) -> Mesh:
    """The deployment's ranks as the serving simulator places them: TP innermost, then
    pipeline stages, replicas outermost."""
    return Mesh.of({"tp": plan.tp, "cp": 1, "pp": plan.pp, "dp": plan.replicas}, ("tp", "cp", "pp", "dp"),
                   plan.num_gpus)


class ServingRank:
    """This rank's part of a deployment: its pipeline stage of the model (TP-sharded over
    its TP group), its neighbours' global ranks, and its replica's prompts split into the
    pipeline's micro-batches."""

    def __init__(self, spec: ModelSpec, plan: InferencePlan, seed: int, device: torch.device,
                 dtype: torch.dtype):
        self.spec, self.plan, self.device, self.dtype = spec, plan, device, dtype
        self.mesh = build_mesh(serving_mesh(plan), device.type)
        stage = self.mesh["pp"].get_local_rank()
        stage_ranks = self.mesh["pp"].mesh.tolist()
        model = build_model(spec, seed).to(device=device, dtype=dtype)
        if plan.pp > 1:
            model = split_stage(model, even_partition(spec.num_layers, plan.pp), stage)
        if plan.quantization == "int8":
            quantize_int8(model, plan.quant_group_size)
        if plan.tp > 1:
            apply_tp(model, self.mesh["tp"], sequence_parallel=False)
        self.module = model.eval()
        self.is_first, self.is_last = stage == 0, stage == plan.pp - 1
        self.prev = None if self.is_first else stage_ranks[stage - 1]
        self.next = None if self.is_last else stage_ranks[stage + 1]
        self.first, self.last = stage_ranks[0], stage_ranks[-1]
        self.replica = self.mesh["dp"].get_local_rank()
        prompts = prompt_tokens(plan.replicas * plan.batch, plan.prompt_len, spec.vocab_size, seed)
        mine = prompts[self.replica * plan.batch:(self.replica + 1) * plan.batch]
        self.microbatches = [rows.to(device) for rows in mine.tensor_split(plan.num_microbatches)]

    @property
    def weights_bytes(self) -> int:
        """Bytes of this rank's weights (its local shards; int8 codes with their scales)."""
        return sum(local_part(p).nbytes
                   for p in (*self.module.parameters(), *self.module.buffers()))

    @property
    def holds_tokens(self) -> bool:
        """Whether this rank reports its replica's tokens (the last stage's first TP rank)."""
        return self.is_last and self.mesh["tp"].get_local_rank() == 0


class Generation:
    """One greedy generation on a ServingRank: prefill() then decode(), timed apart by the
    caller; tokens() on the last stage. Each micro-batch has its own KV cache."""

    def __init__(self, rank: ServingRank):
        self.rank = rank
        plan = rank.plan
        self.caches = [rank.module.new_cache(plan.prompt_len + plan.gen_len - 1)
                       for _ in rank.microbatches]
        self.generated: list[list[torch.Tensor]] = [[] for _ in rank.microbatches]
        self.sends: list[tuple[dist.Work, torch.Tensor]] = []

    @torch.no_grad()
    def prefill(self) -> None:
        """Every micro-batch's prompt through this stage; the last stage takes each
        sequence's first token."""
        for m, prompt in enumerate(self.rank.microbatches):
            self._forward(m, prompt)

    @torch.no_grad()
    def decode(self) -> None:
        """gen_len - 1 steps, each feeding every sequence its latest token."""
        rank = self.rank
        for _ in range(rank.plan.gen_len - 1):
            for m, rows in enumerate(rank.microbatches):
                token = None
                if rank.is_first:
                    token = self.generated[m][-1] if rank.is_last else \
                        self._recv((rows.shape[0],), torch.int64, rank.last)
                self._forward(m, None if token is None else token[:, None])
        for work, _ in self.sends:
            work.wait()
        self.sends.clear()

    def tokens(self) -> torch.Tensor:
        """[batch, gen_len] tokens of this replica (last stage only)."""
        return torch.cat([torch.stack(steps, dim=1) for steps in self.generated]).cpu()

    def _forward(self, m: int, tokens: torch.Tensor | None) -> None:
        """Micro-batch m through this stage: its tokens on the first stage, else the previous
        stage's hidden states; pass the output on, or on the last stage take the next token
        and, if another step follows, send it back to the first stage."""
        rank, cache = self.rank, self.caches[m]
        x = tokens
        if not rank.is_first:
            new = rank.plan.prompt_len if cache.length == 0 else 1
            shape = (rank.microbatches[m].shape[0], new, rank.spec.hidden_size)
            x = self._recv(shape, rank.dtype, rank.prev)
        out = rank.module(x, cache)
        if not rank.is_last:
            self._send(out, rank.next)
            return
        token = greedy(out)
        self.generated[m].append(token)
        more = len(self.generated[m]) < rank.plan.gen_len
        if more and not rank.is_first:
            self._send(token, rank.first)

    def _send(self, tensor: torch.Tensor, dst: int) -> None:
        """Asynchronous, so that a stage never waits for its neighbour to be ready to
        receive (blocking sends both ways between first and last stage would deadlock)."""
        tensor = tensor.contiguous()
        self.sends.append((dist.isend(tensor, dst), tensor))

    def _recv(self, shape: tuple[int, ...], dtype: torch.dtype, src: int) -> torch.Tensor:
        buffer = torch.empty(shape, dtype=dtype, device=self.rank.device)
        dist.recv(buffer, src)
        return buffer
