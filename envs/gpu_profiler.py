"""Measure step times of a transformer of a target model's shape on the local GPU (or CPU).

``deflectlab profile-gpu`` runs :func:`profile` and writes the measurement CSV that ``deflectlab calibrate``
fits (format in :mod:`envs.calibration`). Timing does not need trained weights, so the weights are random and
nothing is downloaded.

What is built
-------------
A stack of transformer layers of the shape (:data:`SHAPES`), bf16 on CUDA, fp32 on CPU, run as one engine
step would run it: all the step's tokens through the linear operators together (RMSNorm, QKV, RoPE, output
projection, MLP), the attention split into the decodes' part (one query token each against its KV cache
tensor) and the prefill chunk's part (causal, via ``torch.nn.functional.scaled_dot_product_attention``,
against its own tokens plus its prior context). Only ``timed_layers`` layers of each kind are built and
timed; the step time is their time scaled by the model's layer count (layers are identical in cost, and a
few layers keep the run short and the memory small). Not measured, by design (``overhead_s`` covers
them): embedding, LM head, sampling, CPU scheduling. The KV cache is a dense tensor per sequence (vLLM's
paged cache reads the same bytes).

Shapes
------
* ``llama-3-8b``: 32 layers, hidden 4096, 32 query heads / 8 KV heads of 128 (GQA), gated MLP 14336.
* ``deepseek-v2-lite``: 27 layers, hidden 2048, the first dense (gated MLP 10944), 26 MoE. MLA is approximated
  as: prefill, attention of 16 heads with q/k head dim 192 (128 + 64 RoPE) and v dim 128 over keys/values
  up-projected from the 512-wide latent (as vLLM's MLA prefill does, prior context included); decode, the
  absorbed form, 16 query heads of dim 576 against the 576-wide compressed KV (512 latent + 64 RoPE) per token
  per layer, values the first 512 of it. MoE is approximated by its active compute and its weight reads: 2
  shared experts run on every token, and the step's n x 6 routed token-expert pairs are spread evenly over the
  expected number of distinct experts a batch activates, ``64 * (1 - (1 - 6/64) ** n)``, each of intermediate
  1408, run as one batched GEMM (a grouped-GEMM MoE kernel reads exactly those experts' weights).
* ``tiny``, ``tiny-mla-moe``: small versions of the two (2 layers, hidden 256) for tests on a CPU.

Timing
------
CUDA: ``torch.cuda.Event`` around each repeat after warm-up, the step captured in a CUDA graph when possible
(vLLM runs decode steps as graphs; it keeps Python launch cost out of the measured GPU time), the median of
the repeats. CPU: ``time.perf_counter`` after warm-up, median of the repeats. Transfer rows time copies of a
KV-sized buffer device -> pinned host -> device (CPU: two memcpys between tensors): a host-staged hand-off,
not an RDMA NIC, so the fitted ``nic_bandwidth_Bps`` describes the host path.
"""

from __future__ import annotations

import math
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from tqdm import tqdm

from deflectlab.envs.calibration import Measurement


@dataclass(frozen=True)
class ModelShape:
    """Shape of a transformer, as far as step time depends on it.

    :param name: shape name.
    :param hidden: model width.
    :param layers: transformer layers in the whole model.
    :param heads: query heads.
    :param kv_heads: KV heads (GQA); ignored for MLA.
    :param head_dim: head dimension (GQA); for MLA the no-RoPE part of q/k.
    :param intermediate: intermediate size of the dense (gated) MLP.
    :param dense_layers: layers with the dense MLP; the rest (``layers - dense_layers``) are MoE.
    :param mla: multi-head latent attention (DeepSeek-V2) instead of GQA.
    :param kv_lora_rank: MLA latent width.
    :param rope_dim: MLA decoupled RoPE width (shared by all heads).
    :param v_head_dim: MLA value head dimension.
    :param experts: routed experts per MoE layer.
    :param experts_per_token: routed experts each token goes to.
    :param shared_experts: experts every token goes to.
    :param expert_intermediate: intermediate size of one expert (gated).
    """

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    dense_layers: int
    mla: bool = False
    kv_lora_rank: int = 0
    rope_dim: int = 0
    v_head_dim: int = 0
    experts: int = 0
    experts_per_token: int = 0
    shared_experts: int = 0
    expert_intermediate: int = 0

    @property
    def kv_width(self) -> int:
        """KV-cache elements per token per layer (K and V for GQA; the compressed latent for MLA)."""
        return self.kv_lora_rank + self.rope_dim if self.mla else 2 * self.kv_heads * self.head_dim

    def kv_bytes_per_token(self, elem_bytes: int = 2) -> int:
        """KV-cache bytes per token, all layers, at ``elem_bytes`` per element (2: 16-bit)."""
        return self.kv_width * self.layers * elem_bytes

    def expected_active_experts(self, tokens: int) -> float:
        """Expected distinct routed experts ``tokens`` tokens activate in one MoE layer (uniform routing)."""
        return self.experts * (1.0 - (1.0 - self.experts_per_token / self.experts) ** tokens)


#: Shapes from the models' ``config.json`` on Hugging Face (``meta-llama/Meta-Llama-3-8B``,
#: ``deepseek-ai/DeepSeek-V2-Lite``); ``tiny`` and ``tiny-mla-moe`` are made-up shapes for CPU runs.
SHAPES: dict[str, ModelShape] = {
    "llama-3-8b": ModelShape(
        "llama-3-8b",
        hidden=4096,
        layers=32,
        heads=32,
        kv_heads=8,
        head_dim=128,
        intermediate=14336,
        dense_layers=32,
    ),
    "deepseek-v2-lite": ModelShape(
        "deepseek-v2-lite",
        hidden=2048,
        layers=27,
        heads=16,
        kv_heads=16,
        head_dim=128,
        intermediate=10944,
        dense_layers=1,
        mla=True,
        kv_lora_rank=512,
        rope_dim=64,
        v_head_dim=128,
        experts=64,
        experts_per_token=6,
        shared_experts=2,
        expert_intermediate=1408,
    ),
    "tiny": ModelShape(
        "tiny", hidden=256, layers=2, heads=4, kv_heads=2, head_dim=64, intermediate=512, dense_layers=2
    ),
    "tiny-mla-moe": ModelShape(
        "tiny-mla-moe",
        hidden=256,
        layers=2,
        heads=4,
        kv_heads=4,
        head_dim=32,
        intermediate=512,
        dense_layers=1,
        mla=True,
        kv_lora_rank=64,
        rope_dim=16,
        v_head_dim=32,
        experts=8,
        experts_per_token=2,
        shared_experts=1,
        expert_intermediate=128,
    ),
}


@dataclass(frozen=True)
class StepSpec:
    """One step to time: ``decode_seqs`` decodes of ``ctx_per_seq`` context each, plus one prefill chunk of
    ``chunk_tokens`` tokens after ``prior_tokens`` of its prompt."""

    kind: str
    decode_seqs: int = 0
    ctx_per_seq: int = 0
    chunk_tokens: int = 0
    prior_tokens: int = 0

    @property
    def num_tokens(self) -> int:
        return self.decode_seqs + self.chunk_tokens


def _geom(lo: int, hi: int, per_octave: int = 1) -> list[int]:
    """Integers from lo to hi, ``per_octave`` per doubling (1, 2, 4, ... for per_octave=1)."""
    out: list[int] = []
    v = float(lo)
    while v <= hi * 1.0001:
        iv = round(v)
        if not out or iv != out[-1]:
            out.append(iv)
        v *= 2 ** (1 / per_octave)
    return out


def plan_steps(shape: ModelShape, device: str, quick: bool) -> list[StepSpec]:
    """The steps to time: a design that lets the fit separate every term (see envs.calibration).

    Prefill chunks over a range of sizes (pin the linear curve and the chunk^2 attention); chunks with prior
    context (the chunk x prior term); decode batches x context lengths (per KV token and per sequence);
    mixed steps splitting one token count between decodes and a chunk (separates chunk^2 from the linear
    curve).
    """
    small = device == "cpu"  # a CPU only gets small steps, whatever the shape
    if small:
        max_chunk, max_kv = (512, 1 << 14) if quick else (2048, 1 << 16)
    else:
        max_chunk, max_kv = (8192, 1 << 18) if quick else (16384, 1 << 19)
    steps = [StepSpec("prefill", chunk_tokens=c) for c in _geom(1, max_chunk, 1 if quick else 2)]
    chunks = [max_chunk // 32, max_chunk // 8, max_chunk // 2] if not quick else [max_chunk // 16, max_chunk // 4]
    priors = [max_chunk // 8, max_chunk // 2, max_chunk] if not quick else [max_chunk // 4, max_chunk]
    steps += [StepSpec("prefill", chunk_tokens=c, prior_tokens=p) for c in chunks for p in priors]
    batches = _geom(1, 64 if small else 256)[:: 2 if quick else 1]
    ctxs = [128, 512, 2048, 8192] if not quick else [128, 1024]
    if small:
        ctxs = [64, 256, 1024] if quick else [64, 256, 1024, 4096]
    steps += [StepSpec("decode", decode_seqs=b, ctx_per_seq=L) for b in batches for L in ctxs if b * L <= max_kv]
    # Mixed: one token count split between short-context decodes and a chunk (varies chunk^2 at fixed
    # num_tokens), and typical deflection steps: a chunk riding on a decode batch of moderate context.
    totals = [max_chunk // 16, max_chunk // 4, max_chunk] if not quick else [max_chunk // 8, max_chunk // 2]
    fracs = [1 / 8, 1 / 4, 1 / 2, 3 / 4, 7 / 8] if not quick else [1 / 8, 1 / 2, 7 / 8]
    splits = [(max(1, int(n * f)), n) for n in totals for f in fracs]
    steps += [
        StepSpec("mixed", decode_seqs=b, ctx_per_seq=ctxs[0], chunk_tokens=n - b)
        for b, n in splits
        if b < n and b * ctxs[0] <= max_kv
    ]
    riders = [8, 32, 64] if not quick else [8, 32]
    chunks = [64, 512, 2048] if not quick else [64, 512]
    steps += [
        StepSpec("mixed", decode_seqs=b, ctx_per_seq=ctxs[1], chunk_tokens=min(c, max_chunk))
        for b in riders
        for c in chunks
    ]
    return steps


def plan_transfers(shape: ModelShape, quick: bool, elem_bytes: int, device: str) -> list[int]:
    """Buffer sizes (bytes) of the transfer rows: the KV of prompts from 16 tokens up."""
    max_tokens = 8192 if device == "cuda" else 4096
    toks = _geom(16, max_tokens, 1)[:: 2 if quick else 1]
    return [t * shape.kv_bytes_per_token(elem_bytes) for t in toks]


# --------------------------------------------------------------------------------------------------------
# The layers (plain tensors, no nn.Module: the weights are random and never trained)
# --------------------------------------------------------------------------------------------------------
class _Layer:
    """Weights of one transformer layer of ``shape``; ``moe`` selects the MoE MLP."""

    def __init__(self, shape: ModelShape, moe: bool, dtype: torch.dtype, device: str, gen: torch.Generator):
        self.shape, self.moe = shape, moe
        h = shape.hidden

        def w(*size: int) -> torch.Tensor:
            return torch.randn(*size, generator=gen, device=device, dtype=dtype) * 0.02

        self.norm1 = torch.ones(h, dtype=dtype, device=device)
        self.norm2 = torch.ones(h, dtype=dtype, device=device)
        if shape.mla:
            qk = shape.head_dim + shape.rope_dim
            self.wq = w(h, shape.heads * qk)
            self.wkv_a = w(h, shape.kv_lora_rank + shape.rope_dim)
            self.kv_norm = torch.ones(shape.kv_lora_rank, dtype=dtype, device=device)
            self.wkv_b = w(shape.kv_lora_rank, shape.heads * (shape.head_dim + shape.v_head_dim))
            # The same up-projection, per head, for the absorbed decode form.
            wkv_b = self.wkv_b.view(shape.kv_lora_rank, shape.heads, shape.head_dim + shape.v_head_dim)
            self.w_uk = wkv_b[:, :, : shape.head_dim].permute(1, 2, 0).contiguous()  # (H, d_nope, r)
            self.w_uv = wkv_b[:, :, shape.head_dim :].permute(1, 0, 2).contiguous()  # (H, r, d_v)
            self.wo = w(shape.heads * shape.v_head_dim, h)
        else:
            self.wqkv = w(h, (shape.heads + 2 * shape.kv_heads) * shape.head_dim)
            self.wo = w(shape.heads * shape.head_dim, h)
        if moe:
            e, ei = shape.experts, shape.expert_intermediate
            self.w_shared_gu = w(h, 2 * shape.shared_experts * ei)
            self.w_shared_d = w(shape.shared_experts * ei, h)
            self.w_router = w(h, e)
            self.w_exp_gu = w(e, h, 2 * ei)
            self.w_exp_d = w(e, ei, h)
        else:
            self.w_gu = w(h, 2 * shape.intermediate)
            self.w_d = w(shape.intermediate, h)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (rotate-half form) of x (n, heads, d) with cos/sin (n, 1, d)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def _gated(x: torch.Tensor) -> torch.Tensor:
    g, u = x.chunk(2, dim=-1)
    return F.silu(g) * u


class _StepInputs:
    """Activations and KV caches of one step for a stack of layers (allocated once, reused by repeats)."""

    def __init__(
        self,
        shape: ModelShape,
        spec: StepSpec,
        n_layers: int,
        dtype: torch.dtype,
        device: str,
        gen: torch.Generator,
    ):
        def r(*size: int) -> torch.Tensor:  # made on the device: multi-GB caches would crawl through the host
            return torch.randn(*size, generator=gen, device=device, dtype=dtype)

        n, b, c, p, L = (
            spec.num_tokens,
            spec.decode_seqs,
            spec.chunk_tokens,
            spec.prior_tokens,
            spec.ctx_per_seq,
        )
        self.x = r(n, shape.hidden)
        rd = shape.rope_dim if shape.mla else shape.head_dim
        ang = r(n, 1, rd)
        self.cos, self.sin = ang.cos(), ang.sin()
        self.decode_cache: list[tuple[torch.Tensor, ...]] = []
        self.prefill_cache: list[tuple[torch.Tensor, ...]] = []
        for _ in range(n_layers):  # one cache per layer: a shared one would sit in L2 and read too fast
            if b:
                if shape.mla:  # compressed KV (latent + RoPE key), one "head" shared by all query heads
                    self.decode_cache.append((r(b, 1, L, shape.kv_width),))
                else:
                    self.decode_cache.append(
                        (r(b, shape.kv_heads, L, shape.head_dim), r(b, shape.kv_heads, L, shape.head_dim))
                    )
            if c:
                if shape.mla:  # latent of prior + chunk tokens, up-projected every step
                    self.prefill_cache.append((r(p + c, shape.kv_width),))
                else:
                    self.prefill_cache.append(
                        (
                            r(1, shape.kv_heads, p + c, shape.head_dim),
                            r(1, shape.kv_heads, p + c, shape.head_dim),
                        )
                    )
        if shape.experts:
            # Routed token-expert pairs spread evenly over the expected number of distinct experts.
            pairs = n * shape.experts_per_token
            self.active = max(1, min(shape.experts, round(shape.expected_active_experts(n))))
            self.per_expert = math.ceil(pairs / self.active)
            self.route_idx = torch.arange(self.active * self.per_expert, device=device) % n
            self.pairs = pairs


def _attention_gqa(layer: _Layer, h: torch.Tensor, spec: StepSpec, inp: _StepInputs, li: int) -> torch.Tensor:
    s = layer.shape
    n, b, c, p = spec.num_tokens, spec.decode_seqs, spec.chunk_tokens, spec.prior_tokens
    d, kvh, g = s.head_dim, s.kv_heads, s.heads // s.kv_heads
    qkv = h @ layer.wqkv
    q, k, v = qkv.split([s.heads * d, kvh * d, kvh * d], dim=-1)
    q = _rope(q.view(n, s.heads, d), inp.cos, inp.sin)
    k = _rope(k.view(n, kvh, d), inp.cos, inp.sin)
    v = v.view(n, kvh, d)
    outs = []
    if b:
        kc, vc = inp.decode_cache[li]
        kc[:, :, -1].copy_(k[:b])  # the new token's KV joins the cache
        vc[:, :, -1].copy_(v[:b])
        # GQA decode: the g query heads of one KV head act as g query rows (reads each KV head once).
        od = F.scaled_dot_product_attention(q[:b].view(b, kvh, g, d), kc, vc)
        outs.append(od.reshape(b, s.heads * d))
    if c:
        kb, vb = inp.prefill_cache[li]
        kb[0, :, p:].copy_(k[b:].transpose(0, 1))
        vb[0, :, p:].copy_(v[b:].transpose(0, 1))
        qc = q[b:].transpose(0, 1).unsqueeze(0)
        if p:
            oc = F.scaled_dot_product_attention(qc, kb, vb, attn_mask=causal_lower_right(c, p + c), enable_gqa=True)
        else:
            oc = F.scaled_dot_product_attention(qc, kb, vb, is_causal=True, enable_gqa=True)
        outs.append(oc[0].transpose(0, 1).reshape(c, s.heads * d))
    return torch.cat(outs) if len(outs) > 1 else outs[0]


def _attention_mla(layer: _Layer, h: torch.Tensor, spec: StepSpec, inp: _StepInputs, li: int) -> torch.Tensor:
    s = layer.shape
    n, b, c, p = spec.num_tokens, spec.decode_seqs, spec.chunk_tokens, spec.prior_tokens
    dn, dr, dv, r, nh = s.head_dim, s.rope_dim, s.v_head_dim, s.kv_lora_rank, s.heads
    scale = 1.0 / math.sqrt(dn + dr)
    q = (h @ layer.wq).view(n, nh, dn + dr)
    q_nope, q_rope = q.split([dn, dr], dim=-1)
    q_rope = _rope(q_rope, inp.cos, inp.sin)
    lat = h @ layer.wkv_a
    c_kv = F.rms_norm(lat[:, :r], (r,), layer.kv_norm)
    k_rope = _rope(lat[:, None, r:], inp.cos, inp.sin)[:, 0]
    outs = []
    if b:
        (cache,) = inp.decode_cache[li]
        cache[:, 0, -1, :r].copy_(c_kv[:b])
        cache[:, 0, -1, r:].copy_(k_rope[:b])
        # Absorbed MLA: q_nope through W_UK into the latent space; attend over the 576-wide cache.
        q_abs = torch.bmm(q_nope[:b].transpose(0, 1), layer.w_uk).transpose(0, 1)  # (b, H, r)
        qd = torch.cat([q_abs, q_rope[:b]], dim=-1).unsqueeze(1)  # (b, 1, H, r + dr)
        od = F.scaled_dot_product_attention(qd, cache, cache[..., :r], scale=scale)  # (b, 1, H, r)
        od = torch.bmm(od[:, 0].transpose(0, 1), layer.w_uv).transpose(0, 1)  # (b, H, dv)
        outs.append(od.reshape(b, nh * dv))
    if c:
        (lbuf,) = inp.prefill_cache[li]
        lbuf[p:, :r].copy_(c_kv[b:])
        lbuf[p:, r:].copy_(k_rope[b:])
        kv = (lbuf[:, :r] @ layer.wkv_b).view(p + c, nh, dn + dv)  # up-project prior + chunk
        k_nope, v = kv.split([dn, dv], dim=-1)
        k = torch.cat([k_nope, lbuf[:, None, r:].expand(p + c, nh, dr)], dim=-1)
        qc = torch.cat([q_nope[b:], q_rope[b:]], dim=-1).transpose(0, 1).unsqueeze(0)
        kk, vv = k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)
        if p:
            oc = F.scaled_dot_product_attention(qc, kk, vv, attn_mask=causal_lower_right(c, p + c), scale=scale)
        else:
            oc = F.scaled_dot_product_attention(qc, kk, vv, is_causal=True, scale=scale)
        outs.append(oc[0].transpose(0, 1).reshape(c, nh * dv))
    return torch.cat(outs) if len(outs) > 1 else outs[0]


def _mlp(layer: _Layer, h: torch.Tensor, inp: _StepInputs) -> torch.Tensor:
    if not layer.moe:
        return _gated(h @ layer.w_gu) @ layer.w_d
    s = layer.shape
    out = _gated(h @ layer.w_shared_gu) @ layer.w_shared_d
    logits = h @ layer.w_router
    weights, _ = torch.topk(torch.softmax(logits.float(), dim=-1), s.experts_per_token, dim=-1)
    e, t = inp.active, inp.per_expert
    xin = h.index_select(0, inp.route_idx).view(e, t, s.hidden)
    y = torch.bmm(_gated(torch.bmm(xin, layer.w_exp_gu[:e])), layer.w_exp_d[:e]).view(e * t, s.hidden)
    w = weights.reshape(-1)[: inp.pairs].to(h.dtype)
    return out.index_add(0, inp.route_idx[: inp.pairs], y[: inp.pairs] * w[:, None])


def _forward(layers: list[_Layer], spec: StepSpec, inp: _StepInputs) -> torch.Tensor:
    x = inp.x
    hidden = x.shape[-1]
    for li, layer in enumerate(layers):
        h = F.rms_norm(x, (hidden,), layer.norm1)
        attn = _attention_mla if layer.shape.mla else _attention_gqa
        x = x + attn(layer, h, spec, inp, li) @ layer.wo
        h = F.rms_norm(x, (hidden,), layer.norm2)
        x = x + _mlp(layer, h, inp)
    return x


# --------------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------------
class _Timer:
    """Median time of a callable: CUDA events (optionally replaying a CUDA graph) or perf_counter."""

    def __init__(self, device: str, warmup: int, repeats: int, cuda_graph: bool):
        self.device, self.warmup, self.repeats = device, warmup, repeats
        self.cuda_graph = cuda_graph and device == "cuda"

    def __call__(self, fn: Callable[[], object]) -> float:
        """Median seconds of ``fn`` over the repeats."""
        for _ in range(self.warmup):
            fn()
        if self.device != "cuda":
            times = []
            for _ in range(self.repeats):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return statistics.median(times)
        run: Callable[[], object] = fn
        graph = None
        if self.cuda_graph:
            try:
                graph = torch.cuda.CUDAGraph()
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    fn()
                torch.cuda.current_stream().wait_stream(side)
                with torch.cuda.graph(graph):
                    fn()
                run = graph.replay
                run()
            except RuntimeError as e:  # an op that cannot be captured: time eagerly from now on
                tqdm.write(f"profile-gpu: CUDA graph capture failed ({type(e).__name__}: {e}); timing eagerly")
                self.cuda_graph, graph, run = False, None, fn
                torch.cuda.synchronize()
        torch.cuda.synchronize()
        times = []
        for _ in range(self.repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        del graph
        return statistics.median(times)


def device_name(device: str) -> str:
    """A readable name of the device the rows are measured on."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu} ({torch.get_num_threads()} threads)"


def profile(
    shape_name: str,
    device: str = "cuda",
    quick: bool = False,
    timed_layers: int | None = None,
    warmup: int | None = None,
    repeats: int | None = None,
    cuda_graph: bool = True,
    seed: int = 0,
    progress: bool = True,
    threads: int | None = None,
) -> list[Measurement]:
    """Time steps and transfers of ``shape_name`` on ``device`` and return them as measurement rows.

    :param shape_name: a key of :data:`SHAPES`.
    :param device: ``cuda`` (bf16) or ``cpu`` (fp32).
    :param quick: fewer, smaller steps and repeats (a smoke run).
    :param timed_layers: layers of each kind (dense, MoE) built and timed, the time scaled to the model's
        layer count; default 4 on CUDA (all, up to 4, on CPU).
    :param warmup: untimed runs before each measurement (default 3 on CUDA, 1 on CPU).
    :param repeats: timed runs per measurement, the median is kept (default 10 / 5 quick on CUDA, 3 on CPU).
    :param cuda_graph: replay each step as a CUDA graph (keeps Python launch cost out of GPU time).
    :param seed: seed of the random weights and activations.
    :param progress: show a tqdm progress bar.
    :param threads: CPU threads of PyTorch during the run (default: as PyTorch sets them); 1 keeps a CPU run
        steady on a machine that is busy with other work.
    """
    if shape_name not in SHAPES:
        raise ValueError(f"unknown shape {shape_name!r}; known: {', '.join(SHAPES)}")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be cuda or cpu, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA GPU is visible to PyTorch; use --device cpu")
    shape = SHAPES[shape_name]
    threads_before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _profile(shape, device, quick, timed_layers, warmup, repeats, cuda_graph, seed, progress)
    finally:
        torch.set_num_threads(threads_before)


def _profile(
    shape: ModelShape,
    device: str,
    quick: bool,
    timed_layers: int | None,
    warmup: int | None,
    repeats: int | None,
    cuda_graph: bool,
    seed: int,
    progress: bool,
) -> list[Measurement]:
    shape_name = shape.name
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    elem = 2 if dtype == torch.bfloat16 else 4
    warmup = warmup if warmup is not None else (3 if device == "cuda" else 1)
    repeats = repeats if repeats is not None else ((5 if quick else 10) if device == "cuda" else 3)
    timed = timed_layers or 4
    gen = torch.Generator(device=device).manual_seed(seed)
    groups = [(False, shape.dense_layers), (True, shape.layers - shape.dense_layers)]
    stacks = [
        ([_Layer(shape, moe, dtype, device, gen) for _ in range(min(timed, count))], count)
        for moe, count in groups
        if count > 0
    ]
    timer = _Timer(device, warmup, repeats, cuda_graph)
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    scaled = ", ".join(f"{len(st)} of {count} {'MoE' if st[0].moe else 'dense'} layers" for st, count in stacks)
    source = (
        f"deflectlab profile-gpu --shape {shape_name} on {device_name(device)}, {stamp}; "
        f"{'bf16' if elem == 2 else 'fp32'}, {scaled} timed and scaled, median of {repeats}"
    )
    steps = plan_steps(shape, device, quick)
    sizes = plan_transfers(shape, quick, elem, device)
    rows: list[Measurement] = []
    bar = tqdm(
        total=len(steps) + len(sizes),
        desc=f"profile-gpu {shape_name} on {device}",
        unit="row",
        disable=not progress,
    )
    with torch.inference_mode():
        # Process warm-up: the first steps of a process run slowly (thread pools, kernel selection and
        # caches starting up), longer than one step's warm-up covers.
        for spec in {s.kind: s for s in reversed(steps)}.values():
            for layers, _ in stacks:
                inp = _StepInputs(shape, spec, len(layers), dtype, device, gen)
                for _ in range(3 * warmup + 2):
                    _forward(layers, spec, inp)
                del inp
        for spec in steps:
            seconds = 0.0
            for layers, count in stacks:
                inp = _StepInputs(shape, spec, len(layers), dtype, device, gen)
                seconds += timer(partial(_forward, layers, spec, inp)) * count / len(layers)
                del inp
            rows.append(
                Measurement(
                    kind=spec.kind,
                    num_tokens=spec.num_tokens,
                    decode_seqs=spec.decode_seqs,
                    decode_ctx_tokens=spec.decode_seqs * spec.ctx_per_seq,
                    chunk_tokens=spec.chunk_tokens,
                    prior_tokens=spec.prior_tokens,
                    seconds=seconds,
                    source=source,
                )
            )
            bar.update()
        for nbytes, seconds in _time_transfers(sizes, device, timer):
            rows.append(Measurement(kind="transfer", bytes=nbytes, seconds=seconds, source=source))
            bar.update()
    bar.close()
    return rows


def _time_transfers(sizes: list[int], device: str, timer: _Timer) -> Iterator[tuple[int, float]]:
    """(bytes, median seconds) of a device -> host -> device copy of each buffer size (CPU: two memcpys)."""
    for nbytes in sizes:
        src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
        dst = torch.empty_like(src)
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device == "cuda")

        def copy(src: torch.Tensor = src, host: torch.Tensor = host, dst: torch.Tensor = dst) -> None:
            host.copy_(src, non_blocking=True)
            dst.copy_(host, non_blocking=True)

        # Host copies cannot be captured in a CUDA graph: time them eagerly with events.
        eager = _Timer(device, timer.warmup, timer.repeats, cuda_graph=False)
        yield nbytes, eager(copy)
        del src, dst, host
