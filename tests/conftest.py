"""Shared test helpers (pytest puts this folder on sys.path, so tests import them as ``from conftest import ...``)."""

from __future__ import annotations

from deflectlab.envs.profile import LatencyModel


def simple_profile(**kw) -> LatencyModel:
    """A synthetic step-time profile with round numbers, for hand computations; ``kw`` overrides any term."""
    base = dict(
        name="test", hardware="test", model="test", tensor_parallel=1,
        overhead_s=0.010, decode_attn_s_per_token=2e-6, decode_attn_s_per_seq=1e-4,
        prefill_attn_sq_s=1e-9, prefill_attn_cross_s=2e-9,
        kv_bytes_per_token=1000, kv_capacity_tokens=10_000_000, kv_block_tokens=1,
        nic_bandwidth_Bps=1e9, kv_transfer_overhead_s=0.0,
        linear_tokens=(1.0, 64.0, 4096.0), linear_s=(0.005, 0.006, 0.100),
        sources={"all": "synthetic test profile"},
    )
    base.update(kw)
    return LatencyModel(**base)


def play(sim, policy, stop: int | None = None) -> None:
    """Route ``sim``'s arrivals with ``policy``; with ``stop``, return once request number ``stop`` is pending
    (unrouted)."""
    while (r := sim.advance()) is not None:
        if stop is not None and len(sim.requests) >= stop:
            return
        sim.route(r, policy.decide(sim.view(), r))


def planner_scores(sim, planner, n: int) -> list[list]:
    """Let ``planner`` (a lookahead policy) route ``sim``'s first ``n`` arrivals; its candidates' scores at each."""
    planner.attach(sim)
    out = []
    while len(out) < n:
        r = sim.advance()
        sim.route(r, planner.decide(sim.view(), r))
        out.append(list(planner.last_scores))
    return out
