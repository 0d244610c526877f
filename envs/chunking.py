"""The TBT-safe chunk of a deflected prefill: the one rule the proactive deflector, the RL action layout and the
router share.

A decode node running ``batch`` decodes that read ``ctx`` KV tokens, prefilling an ``L``-token prompt in chunks
of ``c`` tokens, has its slowest step at the prompt's last full chunk, which attends to the ``L - c`` tokens
before it: ``step_s(batch + c, batch, ctx, c**2, c * (L - c))`` by the profile (:meth:`LatencyModel.step_s`).
For ``c <= L`` that grows with ``c`` whenever ``prefill_attn_cross_s <= 2 * prefill_attn_sq_s`` (every bundled
profile: a chunk token attends to each prior token at the cost of two of its own causal pairs), so the largest
chunk within the TBT SLO is found by bisection.
"""

from __future__ import annotations

from deflectlab.envs.profile import LatencyModel


def worst_chunk_step_s(profile: LatencyModel, batch: int, ctx_tokens: float, chunk: int, prompt_tokens: int) -> float:
    """Slowest step, seconds, of a ``prompt_tokens`` prompt chunked by ``chunk`` next to ``batch`` decodes."""
    prior = prompt_tokens - chunk if prompt_tokens > chunk else 0
    return profile.step_s(batch + chunk, batch, ctx_tokens, float(chunk * chunk), float(chunk * prior))


def largest_safe_chunk(profile: LatencyModel, batch: int, ctx_tokens: float, prompt_tokens: int, lo: int, hi: int,
                       tbt_slo_s: float) -> int:
    """Largest chunk in ``[lo, hi]`` tokens whose slowest step keeps the TBT SLO; 0 when none does.

    :param batch: running decodes on the node.
    :param ctx_tokens: KV tokens they read per step.
    :param prompt_tokens: the deflected prompt's length, tokens.
    :param lo: smallest chunk worth deflecting with, tokens.
    :param hi: largest allowed chunk (the node's free token budget, the prompt, any cap), tokens.
    :param tbt_slo_s: time-between-tokens SLO, seconds.
    """
    if hi < lo or hi < 1:
        return 0
    if worst_chunk_step_s(profile, batch, ctx_tokens, hi, prompt_tokens) <= tbt_slo_s:
        return hi
    if worst_chunk_step_s(profile, batch, ctx_tokens, lo, prompt_tokens) > tbt_slo_s:
        return 0
    while hi - lo > 1:  # invariant: lo keeps the SLO, hi breaks it
        mid = (lo + hi) >> 1
        if worst_chunk_step_s(profile, batch, ctx_tokens, mid, prompt_tokens) <= tbt_slo_s:
            lo = mid
        else:
            hi = mid
    return lo
