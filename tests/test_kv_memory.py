"""Decode memory without clairvoyance: prompt blocks at admission, growth, preemption, and what the view shows."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from deflectlab.envs.config import ClusterConfig
from deflectlab.envs.profile import load_profile
from deflectlab.envs.simulator import ClusterSim
from deflectlab.envs.workloads import Workload, make_workload
from deflectlab.policies.registry import make_policy

PROFILE = "a100-80gb_deepseek-v2-lite"


def _small(kv_tokens: int):
    return dataclasses.replace(load_profile(PROFILE), kv_capacity_tokens=kv_tokens)


def _sim(wl, kv_tokens=20_000, **cluster) -> ClusterSim:
    small = _small(kv_tokens)
    return ClusterSim(ClusterConfig(**cluster), wl, prefill_profile=load_profile(PROFILE), decode_profile=small)


def _drive(sim: ClusterSim, policy, until: float | None = None):
    """Route every arrival (before ``until``) with ``policy``; returns the decisions in arrival order."""
    policy.reset()
    decisions = []
    while (req := sim.advance()) is not None:
        if until is not None and req.arrival_s >= until:
            break
        d = policy.decide(sim.view(), req)
        decisions.append((d.kind, d.prefill_node, d.decode_node, d.chunk_cap))
        sim.route(req, d)
    return decisions


TIMES = ("t_p_start", "t_p_end", "t_dispatch", "t_admit", "t_read", "t_xfer_end", "t_join", "t_d_start",
         "t_first_token", "t_finish")


@pytest.mark.parametrize("policy", ["proactive", "queue_threshold:max_waiting_tokens=4096"])
def test_no_clairvoyance(policy):
    """Two workloads identical except the output lengths of requests not finished by time T: identical
    decisions and identical timelines up to T (a small decode pool, so admission waits and preemptions)."""
    base = make_workload("azure_code", rate=6.0, num_requests=600, seed=3)
    t_cut = float(base.arrival_s[400])
    sim_a = _sim(base, kv_tokens=12_000)  # tight enough that both policies preempt before T
    dec_a = _drive(sim_a, make_policy(policy))
    # the pool is tight: requests wait for blocks and decodes are preempted before T
    assert any(0 <= r.t_preempt < t_cut for r in sim_a.requests)
    assert any(max(r.t_dispatch, r.arrival_s) < r.t_admit < t_cut for r in sim_a.requests)
    unfinished = np.array([not (r.t_finish >= 0 and r.t_finish < t_cut) for r in sim_a.requests])
    assert unfinished.sum() > 50
    out_b = base.output_tokens.copy()
    out_b[unfinished] = out_b[unfinished] * 3 + 7
    wl_b = Workload(arrival_s=base.arrival_s, input_tokens=base.input_tokens, output_tokens=out_b)
    sim_b = _sim(wl_b, kv_tokens=12_000)
    dec_b = _drive(sim_b, make_policy(policy))
    n_before = int(np.searchsorted(base.arrival_s, t_cut))
    assert dec_a[:n_before] == dec_b[:n_before]
    for ra, rb in zip(sim_a.requests, sim_b.requests):
        for name in TIMES:
            ta, tb = getattr(ra, name), getattr(rb, name)
            reached = [x for x in (ta, tb) if x >= 0]
            if reached and min(reached) < t_cut:  # either run reached it before T: both did, at the same time
                assert ta == pytest.approx(tb, rel=1e-9, abs=1e-9), (ra.rid, name)
    # and the outputs did matter afterwards: the runs differ once those requests run longer
    assert any(ra.t_finish != rb.t_finish for ra, rb in zip(sim_a.requests, sim_b.requests))


@pytest.mark.parametrize("policy", ["round_robin", "always_deflect"])
def test_preemption_under_a_small_pool_loses_nothing(policy):
    wl = make_workload("azure_conv", rate=8.0, num_requests=500, seed=1)
    sim = _sim(wl, kv_tokens=20_000)
    res = sim.run(make_policy(policy))
    s = res.summary
    assert s["preemptions"] > 50
    assert s["preemptions"] == sum(r.preemptions for r in sim.requests)
    assert s["completed"] == s["requests"] == 500 and s["unfinished"] == 0
    for r in sim.requests:
        # every output token exactly once: the runs before each preemption plus the last run
        before = sum(last - first + 1 for first, last in (r.tbt_runs or []))
        assert before == r.generated
        assert r.generated + (r.last_step - r.first_step + 1) == r.output_tokens
        assert len(r.stalls or []) == r.preemptions
    # one TBT sample per gap between consecutive tokens, preemption gaps included
    assert s["tbt_samples"] == int(np.sum(wl.output_tokens - 1))
    for d in sim.decode:
        assert d.used_blocks == 0 and d.admitted == 0
        assert d.peak_blocks <= d.total_blocks
    assert 0 < s["kv_usage"]["decode"]["mean"] <= s["kv_usage"]["decode"]["peak"] <= 1.0


def test_admission_waits_for_blocks_and_takes_the_prompt_only():
    """A decode pool of 64 blocks of 16 tokens: a 600-token prompt takes 38 blocks at admission (nothing for
    its 500 output tokens); a second 600-token prompt must wait until the first finishes."""
    wl = Workload(arrival_s=np.array([0.0, 0.01]), input_tokens=np.array([600, 600]),
                  output_tokens=np.array([20, 20]))
    sim = _sim(wl, kv_tokens=64 * 16, num_prefill=1, num_decode=1)
    pol = make_policy("always_deflect")
    req = sim.advance()
    sim.route(req, pol.decide(sim.view(), req))
    node = sim.decode[0]
    assert node.used_blocks == 38  # ceil(600 / 16): the prompt's blocks only
    req2 = sim.advance()
    assert req2.rid == 1
    sim.route(req2, pol.decide(sim.view(), req2))
    assert req2.t_admit < 0 and len(node.admit_queue) == 1  # 38 + 38 > 64: waits
    while sim.advance() is not None:
        pass
    r0, r1 = sim.requests
    assert r1.t_admit == pytest.approx(r0.t_finish)
    assert r1.t_finish > r0.t_finish


def test_view_reports_kv_usage_as_allocated_blocks():
    """kv_free_tokens = (total - allocated blocks) x block size, the step in progress's new block included."""
    wl = Workload(arrival_s=np.array([0.0, 1.0]), input_tokens=np.array([100, 10]),
                  output_tokens=np.array([2000, 1]))
    sim = _sim(wl, kv_tokens=1000 * 16, num_prefill=1, num_decode=1)
    prof = sim.decode_profile
    pol = make_policy("always_deflect")
    req = sim.advance()
    sim.route(req, pol.decide(sim.view(), req))
    assert sim.view().decode[0].kv_free_tokens == (1000 - 7) * 16  # the prompt's ceil(100 / 16) blocks
    sim.advance()  # to t = 1.0, the first request decoding
    # independently: step 1 prefills the 100-token prompt (token 1); step 1 + j decodes with context 100 + j
    t, steps = prof.step_s(100, 0, 0, 100 * 100, 0), 1
    while t + prof.step_s(1, 1, 100 + steps) <= 1.0:
        t += prof.step_s(1, 1, 100 + steps)
        steps += 1
    kv_tokens = 100 + steps  # during step steps + 1, which writes the KV of token `steps`
    blocks = -(-kv_tokens // 16)
    assert blocks > 7
    assert sim.view().decode[0].kv_free_tokens == (1000 - blocks) * 16


def test_prefill_node_holds_kv_until_pulled():
    """The prefill node keeps a finished prefill's blocks until the read is done (dispatch and step
    alignment included), then frees them."""
    wl = Workload(arrival_s=np.array([0.0]), input_tokens=np.array([1000]), output_tokens=np.array([3]))
    sim = ClusterSim(ClusterConfig(num_prefill=1, num_decode=1), wl)
    pol = make_policy("round_robin")
    req = sim.advance()
    sim.route(req, pol.decide(sim.view(), req))
    p = sim.prefill[0]
    held = []
    orig = p.release

    def spy(r, t):
        held.append((t, p.kv_used_tokens))
        orig(r, t)

    p.release = spy
    while sim.advance() is not None:
        pass
    (r,) = sim.requests
    (t_rel, used_before), = held
    assert used_before == 1008  # 63 blocks of 16
    # freed when the read's last byte is in: set-up (posting the read) first, then the bytes
    assert t_rel == pytest.approx(r.t_xfer_end)
    assert t_rel == pytest.approx(r.t_read + 6.7e-3 + 1000 * sim._kv_bytes / 7.5e9)
    assert t_rel > r.t_p_end + sim.handoff.dispatch_s
    assert p.kv_used_tokens == 0


def test_max_num_seqs_limits_admission():
    """max_num_seqs=2 on the decode node: a third deflected prompt waits until one of the two finishes."""
    wl = Workload(arrival_s=np.array([0.0, 0.001, 0.002]), input_tokens=np.array([50, 50, 50]),
                  output_tokens=np.array([30, 60, 5]))
    cfg = ClusterConfig(num_prefill=1, num_decode=1, max_num_seqs=2)
    sim = ClusterSim(cfg, wl)
    sim.run(make_policy("always_deflect"))
    r0, r1, r2 = sim.requests
    assert r0.t_admit == 0.0 and r1.t_admit == pytest.approx(0.001)
    assert r2.t_admit == pytest.approx(r0.t_finish)
    assert r2.t_finish > r0.t_finish


def test_per_request_p95_tbt_counts_every_run_and_preemption_gap():
    wl = make_workload("azure_conv", rate=8.0, num_requests=300, seed=2)
    sim = _sim(wl, kv_tokens=20_000)
    res = sim.run(make_policy("round_robin"))
    p95 = res.tbt_p95_per_request()
    pre = [r for r in sim.requests if r.preemptions and r.output_tokens > 20]
    assert pre
    for r in pre[:5]:
        # independently: each step's duration from the node's segment log, step by step
        node = sim.decode[r.d_node]
        dur = {}
        for n0, k, a, b in zip(node.log_n0, node.log_k, node.log_a, node.log_b):
            for j in range(k):
                dur[n0 + j + 1] = a + b * j
        samples = [dur[m] for first, last in list(r.tbt_runs) + [(r.first_step, r.last_step)]
                   for m in range(first + 1, last + 1)] + list(r.stalls)
        assert len(samples) == r.output_tokens - 1
        x = sorted(samples)
        assert p95[r.rid] == pytest.approx(x[int(np.ceil(0.95 * len(x))) - 1], rel=1e-12)
