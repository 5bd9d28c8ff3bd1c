"""Turn Vidur's measured operator and collective CSVs into `Samples`.

Source: microsoft/vidur `data/profiling/` (MIT), copied under shared/data/vidur-profiles;
compute/<gpu>/<model>/mlp.csv holds fp16 forward timings (ms) of one transformer layer's
operators per (num_tokens, tensor-parallel degree); network/<system>/*.csv holds NCCL
all_reduce / send_recv timings (ms) per (num_workers, size in bytes, devices_per_node).
"""
from pathlib import Path

import numpy as np
import pandas as pd

from meshplan.calibration.samples import COLLECTIVE_COLUMNS, GEMM_COLUMNS, MEMORY_BOUND_COLUMNS, Samples

MS_TO_S = 1e-3
FP16_BYTES = 2
# vidur/profiling/mlp/mlp_wrapper.py: ACTIVE_STEPS = 20 timed repeats per configuration.
MLP_REPEATS = 20
# vidur/profiling/collectives/collective_wrapper.py: ACTIVE_STEPS = 3 timed repeats.
COLLECTIVE_REPEATS = 3
GEMM_OPS = ("attn_pre_proj", "attn_post_proj", "mlp_up_proj", "mlp_down_proj")
MEMORY_BOUND_OPS = ("input_layernorm", "post_attention_layernorm", "attn_rope", "mlp_act", "add")


def _gemm_shapes(df: pd.DataFrame, op: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(m, n, k) of one GPU's share of `op` under Megatron tensor parallelism (Shoeybi et al.
    2019, sec. 3): QKV and up projections split columns (n), output and down split rows (k)."""
    tp = df["num_tensor_parallel_workers"].to_numpy()
    h = df["n_embd"].to_numpy()
    head_dim = h // df["n_head"].to_numpy()
    qkv = (df["n_head"].to_numpy() + 2 * df["n_kv_head"].to_numpy()) * head_dim
    ffn = df["n_expanded_embd"].to_numpy()
    up = np.where(df["use_gated_mlp"].astype(bool).to_numpy(), 2 * ffn, ffn)
    m = df["num_tokens"].to_numpy()
    n, k = {"attn_pre_proj": (qkv // tp, h),
            "attn_post_proj": (h, df["n_head"].to_numpy() * head_dim // tp),
            "mlp_up_proj": (up // tp, h),
            "mlp_down_proj": (h, ffn // tp)}[op]
    return m, n, k


def _memory_bound_bytes(df: pd.DataFrame, op: str) -> np.ndarray:
    """Bytes read + written by one call, counting each fp16 activation tensor once."""
    t = df["num_tokens"].to_numpy()
    tp = df["num_tensor_parallel_workers"].to_numpy()
    h = df["n_embd"].to_numpy()
    head_dim = h // df["n_head"].to_numpy()
    ffn = df["n_expanded_embd"].to_numpy() // tp
    gated = df["use_gated_mlp"].astype(bool).to_numpy()
    elements = {
        # RMSNorm/LayerNorm: read x [T,h], write y [T,h] (weights are h elements, ignored).
        "input_layernorm": 2 * t * h,
        "post_attention_layernorm": 2 * t * h,
        # RoPE rotates q and k in place: read + write [T, (heads + kv_heads)/tp * head_dim].
        "attn_rope": 2 * t * (df["n_head"].to_numpy() + df["n_kv_head"].to_numpy()) // tp * head_dim,
        # Gated act (SiLU(gate) * up): read 2*[T,f/tp], write [T,f/tp]; plain act: read 1, write 1.
        "mlp_act": np.where(gated, 3, 2) * t * ffn,
        # Residual add: read two [T,h], write one.
        "add": 3 * t * h,
    }[op]
    return elements * FP16_BYTES


def _dedupe(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """One row per configuration: Vidur repeats some configurations (and models share shapes)."""
    return (df.groupby(keys, as_index=False)
              .agg(time_s=("time_s", "mean"), time_std_s=("time_std_s", "mean"), repeats=("repeats", "sum")))


def _compute_tables(root: Path, gpu: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    gemm_parts, mem_parts = [], []
    for csv in sorted((root / "compute" / gpu).glob("*/mlp.csv")):
        df = pd.read_csv(csv)
        for op in GEMM_OPS:
            m, n, k = _gemm_shapes(df, op)
            gemm_parts.append(pd.DataFrame({
                "op": op, "m": m, "n": n, "k": k, "batch": 1, "dtype": "fp16",
                "time_s": df[f"time_stats.{op}.median"] * MS_TO_S,
                "time_std_s": df[f"time_stats.{op}.std"] * MS_TO_S, "repeats": MLP_REPEATS}))
        for op in (op for op in MEMORY_BOUND_OPS if f"time_stats.{op}.median" in df):
            mem_parts.append(pd.DataFrame({
                "op": op, "bytes": _memory_bound_bytes(df, op), "dtype": "fp16",
                "time_s": df[f"time_stats.{op}.median"] * MS_TO_S,
                "time_std_s": df[f"time_stats.{op}.std"] * MS_TO_S, "repeats": MLP_REPEATS}))
    if not gemm_parts:
        raise FileNotFoundError(f"no compute/{gpu}/*/mlp.csv under {root}")
    gemm = _dedupe(pd.concat(gemm_parts, ignore_index=True), ["op", "m", "n", "k", "batch", "dtype"])
    mem = _dedupe(pd.concat(mem_parts, ignore_index=True).dropna(subset=["time_s"]),
                  ["op", "bytes", "dtype"])
    return gemm[list(GEMM_COLUMNS)], mem[list(MEMORY_BOUND_COLUMNS)]


def _network_table(root: Path, system: str) -> pd.DataFrame:
    parts = []
    for csv in sorted((root / "network" / system).glob("*.csv")):
        df = pd.read_csv(csv)
        kind = str(df["collective"].iloc[0])
        parts.append(pd.DataFrame({
            "collective": kind, "group_size": df["num_workers"],
            "ranks_per_node": df["devices_per_node"], "message_bytes": df["size"],
            "time_s": df[f"time_stats.{kind}.median"] * MS_TO_S,
            "time_std_s": df[f"time_stats.{kind}.std"] * MS_TO_S, "repeats": COLLECTIVE_REPEATS}))
    if not parts:
        raise FileNotFoundError(f"no network/{system}/*.csv under {root}")
    table = _dedupe(pd.concat(parts, ignore_index=True),
                    ["collective", "group_size", "ranks_per_node", "message_bytes"])
    return table[list(COLLECTIVE_COLUMNS)]


def load_vidur_samples(root: Path, gpu: str, system: str) -> Samples:
    """Samples of one GPU (`a100`, `h100`) and one network system (`a100_dgx`, ...)."""
    root = Path(root)
    gemm, mem = _compute_tables(root, gpu)
    return Samples(gemm=gemm, memory_bound=mem, collectives=_network_table(root, system))
