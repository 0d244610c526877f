"""Derive the bundled latency profiles (``envs/profiles/*.yaml``) from public measurements and model facts.

    python scripts/build_profiles.py [--vidur DIR]

``--vidur`` is the folder of Vidur's A100 profiling CSVs; by default the copies bundled in
``envs/data/vidur-a100/`` (microsoft/vidur @7d47513363ec, MIT; see ``envs/data/README.md``).

Every number written carries its source. What is measured (A100 linear operators and attention, from Vidur's
public A100 profiling) is fitted; what is not (DeepSeek-V2-Lite on A100, anything on H100) is derived from the
measured A100 efficiencies with a roofline (compute time at the achieved FLOP/s, weight and KV reads at the
achieved memory bandwidth), and says so. ``deflectlab calibrate`` replaces any of it with a fit to your own GPU.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from deflectlab.envs.calibration import (
    VIDUR_A100_DIR,
    VIDUR_LLAMA2_7B_DECODE_ATTN_MS,
    VIDUR_LLAMA2_7B_PREFILL_ATTN_MS,
    fit_piecewise_linear,
    vidur_rows,
)
from deflectlab.envs.profile import PROFILE_DIR, LatencyModel

VIDUR = "Vidur A100 profiling (microsoft/vidur @7d47513363ec, MIT)"
# Knots just after 128 and 256 tokens follow the GEMM tile steps visible in the measurements.
KNOTS = [1, 32, 64, 96, 128, 136, 160, 192, 256, 264, 320, 384, 448, 512, 640, 704, 768, 832, 1024, 1536, 2048,
         3072, 4096, 8192, 16384, 32768]
# MoE: the distinct experts a step reads grow fast and concavely at small batches, so knots are denser there.
MOE_KNOTS = [1, 2, 4, 8, 16, 24, 32, 48, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768]

# Vidur's Llama-2-7B A100 TP1 attention rows, ms per layer (microsoft/vidur @7d47513363ec, attention.csv; measured).
PREFILL_ATTN_ROWS = VIDUR_LLAMA2_7B_PREFILL_ATTN_MS
DECODE_ATTN_ROWS = VIDUR_LLAMA2_7B_DECODE_ATTN_MS  # (batch, kv tokens per request, ms per layer)
LLAMA2_KV_BYTES_PER_TOKEN_LAYER = 2 * 32 * 128 * 2  # K and V, 32 heads x 128, fp16

A100_PEAK_FLOPS = 312e12   # NVIDIA A100 datasheet, dense BF16 tensor core
A100_HBM_BPS = 2.039e12    # NVIDIA A100-80GB SXM datasheet
H100_PEAK_FLOPS = 989e12   # NVIDIA H100 SXM datasheet, dense BF16 tensor core
H100_HBM_BPS = 3.35e12     # NVIDIA H100 SXM datasheet
GIB = 1024**3

NIXL = ("fitted: one transfer's rate (the rdma hand-off preset's; envs/handoff.py has the others): vLLM "
        "NixlConnector, 3P1D KV-connector metrics (vLLM RFC #50913): 167 MB in 38.7 ms on average; minus the "
        "fixed per-transfer overhead gives 167e6 / (38.7e-3 - 2e-3) = 4.55e9 B/s")
NIXL_BPS = 167e6 / (38.7e-3 - 2e-3)
OVERHEAD = ("assumed: upper end of the 0.5-2 ms fixed GPUDirect RDMA set-up cost per transfer (Azure ND A100 v4, "
            "200 Gb/s HDR InfiniBand per GPU); the rdma hand-off preset's set-up")
# Hand-off orchestration beyond this (dispatch, decode-side block allocation, step alignment, the recompute
# step) is modelled by the hand-off presets (envs/handoff.py) and the simulator, not folded into these terms.


def vidur_linear_rows(path: Path, layers: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, seconds) of one forward pass's linear operators from a Vidur ``*_mlp.csv`` (TP1 rows)."""
    rows = vidur_rows(path, layers=layers, tp=1)
    return np.array([r.num_tokens for r in rows]), np.array([r.seconds for r in rows])


def fit_attention(layers: int) -> tuple[float, float, float]:
    """Whole-model prefill c^2 coefficient and decode per-token / per-sequence terms (Llama-2-7B MHA rows)."""
    c = np.array([r[0] for r in PREFILL_ATTN_ROWS], float)
    t = np.array([r[1] for r in PREFILL_ATTN_ROWS]) * 1e-3 * layers
    sq = float(np.sum(t * c**2 / t**2) / np.sum(c**4 / t**2))  # relative least squares, one coefficient
    rows = np.array(DECODE_ATTN_ROWS, float)
    a = np.stack([rows[:, 0], rows[:, 0] * rows[:, 1]], axis=1)
    y = rows[:, 2] * 1e-3
    # absolute least squares: the large batches, where decode attention matters, dominate the fit
    (per_seq, per_tok), *_ = np.linalg.lstsq(a, y, rcond=None)
    hbm_bps = LLAMA2_KV_BYTES_PER_TOKEN_LAYER / per_tok  # effective bandwidth of decode attention
    return sq * layers / layers, float(per_seq * layers), float(hbm_bps)


def kv_capacity(weights_bytes: float, kv_bytes_per_token: int, hbm_gib: float = 80.0) -> int:
    # vLLM's default gpu_memory_utilization 0.9, minus weights, minus ~3 GB of activations and CUDA graphs.
    return int((hbm_gib * GIB * 0.9 - weights_bytes - 3e9) / kv_bytes_per_token)


def build(vidur_dir: Path = VIDUR_A100_DIR) -> list[Path]:
    llama_mlp = vidur_dir / "Meta-Llama-3-8B_mlp.csv"
    toks, secs = vidur_linear_rows(llama_mlp)
    knots_s = fit_piecewise_linear(toks, secs, KNOTS)
    sq, decode_per_seq, hbm_bps = fit_attention(32)
    src_attn = f"{VIDUR}: Llama-2-7B TP1 attention rows; same query heads and head dim as Llama-3-8B"
    # Achieved efficiencies of the A100 from the Llama-3-8B fit: 6.98e9 linear parameters.
    llama_params = 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336)
    dense_flops = 2 * llama_params * 16384 / float(np.interp(16384, KNOTS, knots_s))
    flat_bps = 2 * llama_params / float(knots_s[0])

    common = {
        "kv_block_tokens": (16, "vLLM default block size"),
        "nic_bandwidth_Bps": (NIXL_BPS, NIXL),
        "kv_transfer_overhead_s": (2e-3, OVERHEAD),
    }
    out = []

    # ---- A100-80GB, Llama-3-8B: measured.
    llama_kv = 131072
    a100_llama = LatencyModel(
        name="a100-80gb_llama-3-8b", hardware="A100-80GB SXM", model="Meta-Llama-3-8B", tensor_parallel=1,
        overhead_s=2.5e-3,
        decode_attn_s_per_token=llama_kv / hbm_bps, decode_attn_s_per_seq=decode_per_seq,
        prefill_attn_sq_s=sq, prefill_attn_cross_s=2 * sq,
        kv_bytes_per_token=llama_kv, kv_capacity_tokens=kv_capacity(8.03e9 * 2, llama_kv),
        kv_block_tokens=16, nic_bandwidth_Bps=NIXL_BPS, kv_transfer_overhead_s=2e-3,
        linear_tokens=tuple(float(k) for k in KNOTS), linear_s=tuple(float(s) for s in knots_s),
        sources={
            "overhead_s": "LM head (128256 x 4096 bf16 = 1.05 GB read at ~2 TB/s, 0.5 ms) plus CPU scheduling "
                          "and sampling (assumed: about 1-3 ms per vLLM step; vLLM's v0.6.0 performance blog, "
                          "blog.vllm.ai 2024-09-05, profiles scheduling at 29 % of a Llama-3-8B H100 run): 2.5 ms",
            "linear": f"{VIDUR}: Meta-Llama-3-8B mlp.csv TP1, sum of per-layer operator medians x 32 + emb, "
                      f"least-squares (relative) piecewise-linear fit at knots {KNOTS}",
            "decode_attn_s_per_token": f"{src_attn}; decode rows fit to an effective HBM bandwidth of "
                                       f"{hbm_bps / 1e12:.2f} TB/s, times 131,072 KV bytes per token",
            "decode_attn_s_per_seq": f"{src_attn}; per-sequence term of the decode-row fit x 32 layers",
            "prefill_attn_sq_s": f"{src_attn}; prefill rows (c=480..3776) fit t = k c^2 x 32 layers",
            "prefill_attn_cross_s": "2 x prefill_attn_sq_s: a chunk token attends to every prior token, "
                                    "but on average to half of its own chunk under the causal mask",
            "kv_bytes_per_token": "32 layers x 8 KV heads x 128 x 2 (K,V) x 2 bytes (meta-llama/Meta-Llama-3-8B "
                                  "config.json on Hugging Face)",
            "kv_capacity_tokens": "(80 GiB x 0.9 vLLM gpu_memory_utilization - 16.1 GB weights - 3 GB "
                                  "activations/graphs) / 131,072 B",
            **{k: v[1] for k, v in common.items()},
        },
        meta={"achieved_dense_flops": dense_flops, "flat_region_weight_bps": flat_bps,
              "decode_attn_hbm_bps": hbm_bps},
    )
    out.append(a100_llama.save(PROFILE_DIR / f"{a100_llama.name}.yaml"))

    # ---- A100-80GB, DeepSeek-V2-Lite: roofline from the A100 efficiencies above.
    ds = deepseek_v2_lite_linear(dense_flops, flat_bps)
    ds_kv = 31104
    mla_ratio = (16 * (192 + 128)) / (32 * (128 + 128)) * 27 / 32  # attention FLOPs vs Llama, per token pair
    a100_ds = LatencyModel(
        name="a100-80gb_deepseek-v2-lite", hardware="A100-80GB SXM", model="DeepSeek-V2-Lite", tensor_parallel=1,
        overhead_s=2.5e-3,
        decode_attn_s_per_token=ds_kv / hbm_bps, decode_attn_s_per_seq=decode_per_seq * 27 / 32,
        prefill_attn_sq_s=sq * mla_ratio, prefill_attn_cross_s=2 * sq * mla_ratio,
        kv_bytes_per_token=ds_kv, kv_capacity_tokens=kv_capacity(15.7e9 * 2, ds_kv),
        kv_block_tokens=16, nic_bandwidth_Bps=NIXL_BPS, kv_transfer_overhead_s=2e-3,
        linear_tokens=tuple(float(k) for k in MOE_KNOTS), linear_s=tuple(ds),
        sources={
            "overhead_s": "as the A100 Llama-3-8B profile: LM head (102400 x 2048, 0.4 GB) plus CPU scheduling and "
                          "sampling (assumed: 1-3 ms per vLLM step, as there): 2.5 ms",
            "linear": "roofline derivation (scripts/build_profiles.py, deepseek_v2_lite_linear): DeepSeek-V2-Lite "
                      "shapes (deepseek-ai/DeepSeek-V2-Lite config.json on Hugging Face) at the A100 dense FLOP/s and "
                      "weight-read "
                      f"bandwidth achieved in the Llama-3-8B fit ({dense_flops / 1e12:.0f} TFLOP/s, "
                      f"{flat_bps / 1e12:.2f} TB/s); expert GEMMs at half the dense efficiency and 30 us of "
                      "routing/permute per MoE layer (assumptions: no public DeepSeek-V2-Lite A100 step "
                      "profile; recalibrate with deflectlab profile-gpu)",
            "decode_attn_s_per_token": f"MLA compressed KV (576 x 2 B x 27 layers = 31,104 B per token) read at "
                                       f"the {hbm_bps / 1e12:.2f} TB/s fitted from {VIDUR} decode rows",
            "decode_attn_s_per_seq": f"{VIDUR} decode-row per-sequence term, scaled by 27/32 layers",
            "prefill_attn_sq_s": f"{VIDUR} Llama-2-7B prefill fit x {mla_ratio:.3f}: 16 heads of q.k dim 192 "
                                 "and v dim 128 (MLA expanded for prefill) vs 32 x (128 + 128), 27 vs 32 layers",
            "prefill_attn_cross_s": "2 x prefill_attn_sq_s (see the Llama-3-8B profile)",
            "kv_bytes_per_token": "MLA kv_lora_rank 512 + rope 64 = 576 x 2 B x 27 layers "
                                  "(deepseek-ai/DeepSeek-V2-Lite config.json; the model of the reference paper, "
                                  "arXiv 2607.02043)",
            "kv_capacity_tokens": "(80 GiB x 0.9 - 31.4 GB weights (15.7B params) - 3 GB) / 31,104 B",
            **{k: v[1] for k, v in common.items()},
        },
    )
    out.append(a100_ds.save(PROFILE_DIR / f"{a100_ds.name}.yaml"))

    # ---- H100-80GB SXM, Llama-3-8B: the A100 fit scaled by datasheet compute and bandwidth ratios.
    fr, br = H100_PEAK_FLOPS / A100_PEAK_FLOPS, H100_HBM_BPS / A100_HBM_BPS
    flat = float(knots_s[0])
    h100_lin = [max(flat / br, s / fr) for s in knots_s]
    h100 = LatencyModel(
        name="h100-80gb_llama-3-8b", hardware="H100-80GB SXM", model="Meta-Llama-3-8B", tensor_parallel=1,
        overhead_s=2.0e-3,
        decode_attn_s_per_token=a100_llama.decode_attn_s_per_token / br,
        decode_attn_s_per_seq=decode_per_seq / br,
        prefill_attn_sq_s=sq / fr, prefill_attn_cross_s=2 * sq / fr,
        kv_bytes_per_token=llama_kv, kv_capacity_tokens=a100_llama.kv_capacity_tokens,
        kv_block_tokens=16, nic_bandwidth_Bps=NIXL_BPS, kv_transfer_overhead_s=2e-3,
        linear_tokens=tuple(float(k) for k in KNOTS), linear_s=tuple(h100_lin),
        sources={
            "overhead_s": "A100 value less the faster LM head read: 2.0 ms (CPU scheduling dominates)",
            "linear": f"A100 Llama-3-8B fit ({VIDUR}) scaled: compute-bound region / {fr:.2f} (dense BF16 "
                      f"989 vs 312 TFLOP/s, datasheets), flat weight-read region / {br:.2f} (HBM 3.35 vs 2.04 "
                      "TB/s); roofline max of the two",
            "decode_attn_s_per_token": f"A100 value / {br:.2f} (HBM bandwidth ratio, datasheets)",
            "decode_attn_s_per_seq": f"A100 value / {br:.2f}",
            "prefill_attn_sq_s": f"A100 value / {fr:.2f} (tensor-core peak ratio, datasheets)",
            "prefill_attn_cross_s": "2 x prefill_attn_sq_s",
            "kv_bytes_per_token": "as the A100 Llama-3-8B profile",
            "kv_capacity_tokens": "as the A100 Llama-3-8B profile (both 80 GB)",
            "kv_block_tokens": common["kv_block_tokens"][1],
            "nic_bandwidth_Bps": NIXL + "; kept for H100 (the software path, not the 400 Gb/s NIC, limits it: "
                                        "assumption)",
            "kv_transfer_overhead_s": OVERHEAD,
        },
    )
    out.append(h100.save(PROFILE_DIR / f"{h100.name}.yaml"))
    return out


def deepseek_v2_lite_linear(dense_flops: float, weight_bps: float) -> list[float]:
    """Linear-operator seconds of DeepSeek-V2-Lite on one A100 at each of :data:`MOE_KNOTS` (roofline).

    Shapes (deepseek-ai/DeepSeek-V2-Lite config.json on Hugging Face): hidden 2048, 27 layers, the first
    dense (intermediate 10944), 26 MoE layers of 2 shared + 64 routed experts (6 per token), expert
    intermediate 1408; MLA projections q 2048->16x192, kv_a 2048->576, kv_b 512->16x256, o 16x128->2048.
    """
    hidden, layers, moe_layers = 2048, 27, 26
    attn = hidden * 16 * 192 + hidden * 576 + 512 * 16 * 256 + 16 * 128 * hidden
    expert = 3 * hidden * 1408
    dense_params = layers * attn + 3 * hidden * 10944 + moe_layers * 2 * expert  # always read, always run
    out = []
    for n in MOE_KNOTS:
        active = 64 * (1 - (1 - 6 / 64) ** n)  # expected distinct routed experts hit by n tokens, per layer
        t_dense = max(2 * dense_params * n / dense_flops, 2 * dense_params / weight_bps)
        t_moe = max(2 * moe_layers * 6 * expert * n / (0.5 * dense_flops),
                    2 * moe_layers * active * expert / weight_bps)
        out.append(t_dense + t_moe + moe_layers * 30e-6)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vidur", type=Path, default=VIDUR_A100_DIR,
                    help="folder of Vidur's A100 profiling CSVs (default: the bundled copies)")
    args = ap.parse_args()
    for p in build(args.vidur):
        print("wrote", p)


if __name__ == "__main__":
    main()
