"""Quantized serving weights: what weight-only INT8 / INT4 (AWQ or GPTQ style: a 16-bit
scale and zero point per group of weights) and FP8 weights with FP8 activations change in
a decoder layer's operators: the bytes its weight GEMMs read, the dequantisation work, the
activations' casts, and the weights' memory.

Which weights: every weight GEMM of the decoder layers but the MoE router and the shared
experts' gate, which vLLM keeps in 16 bits (their layers are built with quant_config=None);
the embedding and the LM head stay 16-bit too (vLLM's AWQ, GPTQ and FP8 methods quantize
the decoder's linear layers only).
"""
from __future__ import annotations

from dataclasses import replace

from meshplan.simulator.model_spec import ModelSpec
from meshplan.simulator.ops import GEMM, MEMORY, Op, Shard, layer_ops

QUANTIZATIONS = ("none", "int8", "int4", "fp8")
BITS = {"int8": 8, "int4": 4}
UNQUANTIZED = ("router", "shared_gate")
# Weight-only kernels dequantize in registers inside the GEMM (Frantar et al. 2024, MARLIN,
# sec 3): per weight an unpack and convert, then a multiply by the scale and the zero point's
# subtraction: 2 FLOPs on the CUDA cores, once per weight per GEMM.
DEQUANT_FLOPS_PER_WEIGHT = 2.0
# FP8 activations are quantized per token on the fly (vLLM's dynamic scaled_fp8_quant): one
# pass for the amax (read 2 bytes), one casting (read 2, write 1).
ACT_QUANT_BYTES = 5.0


def weight_bytes(quantization: str, group_size: int, dtype_bytes: int) -> float:
    """Bytes per weight element as stored: bits / 8 plus a 16-bit scale and zero point per
    group (AWQ, Lin et al. 2024 sec 3; GPTQ, Frantar et al. 2023 sec 4 "grouping"); FP8
    weights carry one scale per channel or tensor (negligible)."""
    if quantization == "none":
        return float(dtype_bytes)
    if quantization == "fp8":
        return 1.0
    return BITS[quantization] / 8 + 2 * 2 / group_size


def quantized(ops: tuple[Op, ...], quantization: str, group_size: int, dtype_bytes: int) -> list[Op]:
    """The layer's operators with its weight GEMMs reading quantized weights: weight-only
    ones in the activations' dtype with narrower weights and the dequantisation work; FP8
    ones as FP8 GEMMs behind a cast of their inputs."""
    if quantization == "none":
        return list(ops)
    mine = [op.kind == GEMM and op.weight and op.name not in UNQUANTIZED for op in ops]
    if quantization == "fp8":
        out = [replace(op, fp8=True) if q else op for op, q in zip(ops, mine)]
        elements = sum(op.batch * op.m * op.k * op.count for op, q in zip(ops, mine) if q)
        return out + [Op("act_quant", MEMORY, elements, bytes_moved=elements * ACT_QUANT_BYTES)]
    wb = weight_bytes(quantization, group_size, dtype_bytes)
    return [replace(op, weight_bytes=wb, dequant_flops=DEQUANT_FLOPS_PER_WEIGHT * op.batch * op.k * op.n)
            if q else op for op, q in zip(ops, mine)]


def quantized_weights(model: ModelSpec, tp: int, ep: int = 1, etp: int | None = None) -> float:
    """Weights of the mean layer on one TP rank that quantization narrows: those its weight
    GEMMs read, every expert it holds active (a long sequence routes to all of them): the
    routed experts num_experts / ep, each sharded over etp (default tp)."""
    ops = layer_ops(model, Shard(1, 1 << 20, tp=tp, ep=ep, etp=etp))
    return sum(op.batch * op.k * op.n * op.count for op in ops
               if op.kind == GEMM and op.weight and op.name not in UNQUANTIZED)
