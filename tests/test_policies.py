"""Deflection policies: each heuristic's rule on hand-built views, the proactive deflector's TBT-safe chunks and
TTFT estimates, and the errors bad names and parameters get."""

from __future__ import annotations

import math
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from deflectlab.envs.config import ClusterConfig
from deflectlab.envs.estimates import Lane, lane_worst, step_model
from deflectlab.envs.profile import load_profile
from deflectlab.envs.simulator import ClusterSim
from deflectlab.envs.view import ClusterView, Decision, DecodeNodeView, PrefillNodeView
from deflectlab.envs.workloads import make_workload
from deflectlab.policies.proactive import ProactiveDeflector
from deflectlab.policies.registry import make_policy

PROFILE = load_profile("a100-80gb_deepseek-v2-lite")
KV = PROFILE.kv_capacity_tokens
TAU = 0.1


def req(L: int, rid: int = 0) -> SimpleNamespace:
    """A request as a router knows it: no output length at all."""
    return SimpleNamespace(rid=rid, arrival_s=0.0, input_tokens=L)


def pnode(i: int, waiting: int = 0, nreq: int | None = None, busy_for: float = 0.0, now: float = 0.0,
          egress: float = 0.0) -> PrefillNodeView:
    n = nreq if nreq is not None else (0 if waiting == 0 else max(1, waiting // 2000))
    return PrefillNodeView(index=i, profile=PROFILE, max_batched_tokens=8192, waiting_requests=n,
                           waiting_tokens=waiting, busy_until_s=now + busy_for, kv_free_tokens=KV,
                           egress_bytes=egress)


def dnode(i: int, batch: int = 0, ctx: int = 0, kv_free: int = KV, dwait: int = 0, dreq: int = 0,
          inbound: int = 0, step_s: float = 0.0) -> DecodeNodeView:
    return DecodeNodeView(index=i, profile=PROFILE, max_batched_tokens=2048, max_num_seqs=256, batch_size=batch,
                          context_tokens=ctx, kv_free_tokens=kv_free, deflected_waiting_tokens=dwait,
                          deflected_waiting_requests=dreq, inbound_handoffs=inbound, step_s=step_s)


def view(prefill: list[PrefillNodeView], decode: list[DecodeNodeView], now: float = 0.0) -> ClusterView:
    return ClusterView(now, 1.0, TAU, prefill=prefill, decode=decode)


# -- the heuristics -------------------------------------------------------------------------------------------
def test_least_loaded_picks_fewest_waiting_tokens_and_most_kv_free():
    v = view([pnode(0, 9000), pnode(1, 3000), pnode(2, 5000)],
             [dnode(0, kv_free=1000), dnode(1, kv_free=KV), dnode(2, kv_free=5000)])
    d = make_policy("least_loaded").decide(v, req(100))
    assert not d.deflected and d.prefill_node == 1 and d.decode_node == 1
    assert make_policy("least_loaded:decode=balancer").decide(v, req(100)).decode_node is None


def test_length_threshold_deflects_short_prompts_to_least_deflected_work():
    v = view([pnode(0, 4000), pnode(1, 0)], [dnode(0, dwait=3000, dreq=1), dnode(1, dwait=500, dreq=1)])
    pol = make_policy("length_threshold:max_len=1000")
    short = pol.decide(v, req(999))
    assert short.deflected and short.decode_node == 1 and short.chunk_cap is None
    long_ = pol.decide(v, req(1000))  # not shorter than max_len
    assert not long_.deflected and long_.prefill_node == 1
    # no decode node with KV room for the prompt: prefill instead
    full = view([pnode(0)], [dnode(0, kv_free=10), dnode(1, kv_free=10)])
    assert not pol.decide(full, req(500)).deflected


def test_queue_threshold_deflects_only_when_the_best_prefill_node_is_backed_up():
    pol = make_policy("queue_threshold:max_waiting_tokens=10000,chunk=512")
    calm = view([pnode(0, 20000), pnode(1, 9000)], [dnode(0), dnode(1)])
    assert not pol.decide(calm, req(3000)).deflected  # node 1 is under the threshold
    busy = view([pnode(0, 20000), pnode(1, 12000)], [dnode(0, dwait=100, dreq=1), dnode(1)])
    d = pol.decide(busy, req(3000))
    assert d.deflected and d.decode_node == 1 and d.chunk_cap == 512


def test_dynamo_isl_bounding_prefill_load_and_or():
    v_calm = view([pnode(0, 1000), pnode(1, 2000)], [dnode(0), dnode(1)])
    v_busy = view([pnode(0, 20000), pnode(1, 17000)], [dnode(0), dnode(1)])  # 17000 > 2 x 8192
    isl = make_policy("dynamo_isl:isl_bound=2048,isl_ratio=1.01")  # no cache: only a ratio gate off lets it pass
    assert isl.decide(v_calm, req(2047)).deflected
    assert not isl.decide(v_calm, req(2048)).deflected
    assert not isl.decide(v_busy, req(4000)).deflected  # load does not matter to isl_bounding
    load = make_policy("dynamo_load")  # load_frac 2.0: busy above 16384 waiting tokens
    assert not load.decide(v_calm, req(100)).deflected  # length does not matter to prefill_load
    assert load.decide(v_busy, req(4000)).deflected
    either = make_policy("dynamo_isl_or_load:isl_bound=1024,isl_ratio=1.01")
    assert either.decide(v_calm, req(500)).deflected
    assert not either.decide(v_calm, req(1500)).deflected
    assert either.decide(v_busy, req(1500)).deflected


def test_dynamo_decode_busy_veto():
    busy_kv = dnode(0, kv_free=int(0.05 * KV))  # 95 % of KV in use
    busy_batch = dnode(1, batch=240)  # 240 of 256 sequences
    calm = dnode(2)
    pol = make_policy("dynamo_isl:isl_bound=2048,veto_busy=0.9,isl_ratio=1.01")
    assert pol.decide(view([pnode(0)], [busy_kv, busy_batch, calm]), req(100)).decode_node == 2
    vetoed = pol.decide(view([pnode(0)], [busy_kv, busy_batch]), req(100))
    assert not vetoed.deflected and vetoed.prefill_node == 0
    # without the veto the bypass goes ahead
    assert make_policy("dynamo_isl:isl_ratio=1.01").decide(view([pnode(0)], [busy_kv, busy_batch]), req(100)).deflected


def test_dynamo_cached_ratio_gate():
    """Dynamo's isl_bounding (lib/kv-router/src/conditional_disagg.rs): bypass iff eff = L - cached on the
    cache-hot decode node is < eff_isl_threshold AND eff / L < eff_isl_ratio_threshold (0.7); to that node."""
    def v(cached):
        ds = [dnode(0), dnode(1)]
        ds[1].cached_tokens = cached
        return view([pnode(0, 1000)], ds)

    pol = make_policy("dynamo_isl")  # isl_bound 2048, isl_ratio 0.7
    assert not pol.decide(v(0), req(1000)).deflected  # short, but nothing cached: ratio 1.0
    d = pol.decide(v(512), req(1000))  # eff 488, ratio 0.488
    assert d.deflected and d.decode_node == 1
    assert not pol.decide(v(256), req(1000)).deflected  # eff 744: ratio 0.744 >= 0.7
    assert not pol.decide(v(6144), req(8300)).deflected  # ratio 0.26, but eff 2156 >= 2048
    assert pol.decide(v(6656), req(8300)).deflected  # eff 1644, ratio 0.198
    assert make_policy("dynamo_isl_or_load").params()["isl_ratio"] == 0.7


def test_policies_never_need_the_output_length():
    v = view([pnode(0, 30000), pnode(1, 20000)], [dnode(0, batch=10, ctx=20000, step_s=0.03), dnode(1)])
    for spec in ("round_robin", "always_deflect", "least_loaded", "length_threshold", "queue_threshold",
                 "dynamo_isl", "dynamo_load", "dynamo_isl_or_load:veto_busy=0.5", "proactive",
                 "proactive:sharing=serial", "proactive:sharing=queue"):
        pol = make_policy(spec)
        pol.reset()
        pol.decide(v, req(1500))  # SimpleNamespace has no output_tokens: AttributeError if a policy peeks


# -- the proactive deflector ---------------------------------------------------------------------------------
def test_step_model_matches_the_profile():
    m = step_model(PROFILE)
    for n in (0.5, 1, 3, 64, 100, 1000, 2047, 5000, 9000, 40000):
        assert m.lin(n) == pytest.approx(PROFILE.linear(n), rel=1e-12)
    for L, budget in ((100, 8192), (8192, 8192), (20000, 8192)):
        done, want = 0, 0.0
        while done < L:
            c = min(budget, L - done)
            want += PROFILE.prefill_attn_sq_s * c * c + PROFILE.prefill_attn_cross_s * c * done
            done += c
        assert m.prompt_attn(L, budget) == pytest.approx(want, rel=1e-12)


def test_proactive_prefers_the_decode_node_when_the_prefill_queue_is_long():
    pol = make_policy("proactive")
    idle_p = view([pnode(0), pnode(1)], [dnode(0, batch=20, ctx=40000, step_s=0.03), dnode(1)])
    d = pol.decide(idle_p, req(1000))
    est = d.estimates
    assert set(est) == {"ttft_s", "ttft_prefill_s", "ttft_deflect_s"}
    assert est["ttft_s"] == min(est["ttft_prefill_s"], est["ttft_deflect_s"])
    assert d.deflected == (est["ttft_deflect_s"] < est["ttft_prefill_s"])
    # a prefill queue of 100k tokens (several seconds) makes the decode side the better path
    pol.reset()
    backed = view([pnode(0, 100000, busy_for=0.3), pnode(1, 120000, busy_for=0.2)], [dnode(0, batch=20, ctx=40000,
                                                                                           step_s=0.03)])
    d = pol.decide(backed, req(1000))
    assert d.deflected and d.decode_node == 0 and d.chunk_cap >= 512
    assert d.estimates["ttft_prefill_s"] > 3.0 > d.estimates["ttft_deflect_s"]


def test_proactive_margin_and_no_room():
    v = view([pnode(0, 30000, busy_for=0.2)], [dnode(0, step_s=0.02)])
    d = make_policy("proactive").decide(v, req(2000))
    ratio = d.estimates["ttft_deflect_s"] / d.estimates["ttft_prefill_s"]
    assert d.deflected and ratio < 1
    assert not make_policy(f"proactive:margin={min(1 - ratio + 0.01, 0.99):.3f}").decide(v, req(2000)).deflected
    full = view([pnode(0, 30000, busy_for=0.2)], [dnode(0, kv_free=1000), dnode(1, kv_free=2100)])
    d = make_policy("proactive").decide(full, req(2000))  # 2000 + 256 output allowance does not fit
    assert not d.deflected and "ttft_deflect_s" not in d.estimates


def test_proactive_works_on_an_idle_decode_node_and_without_prefill_nodes():
    d = make_policy("proactive").decide(view([], [dnode(0), dnode(1, batch=5, ctx=5000, step_s=0.025)]), req(3000))
    assert d.deflected and d.decode_node == 0 and 512 <= d.chunk_cap <= 2048
    step = PROFILE.step_s(d.chunk_cap, 0, 0, d.chunk_cap ** 2, d.chunk_cap * (3000 - d.chunk_cap))
    assert step <= TAU


def _random_view(rng: random.Random, now: float) -> tuple[ClusterView, int]:
    L = rng.choice([rng.randint(1, 300), rng.randint(300, 3000), rng.randint(3000, 16000)])
    decode = []
    for j in range(rng.randint(1, 4)):
        B = rng.choice([0, rng.randint(1, 20), rng.randint(20, 200)])
        ctx = B * rng.randint(100, 8000)
        dreq = rng.choice([0, 0, rng.randint(1, 6)])
        decode.append(dnode(j, batch=B, ctx=ctx, dwait=dreq * rng.randint(1, 5000), dreq=dreq,
                            inbound=rng.choice([0, rng.randint(0, 10)]), step_s=rng.uniform(0.0, 0.09)))
    prefill = [pnode(i, rng.choice([0, rng.randint(0, 400000)]), busy_for=rng.uniform(0, 0.4), now=now)
               for i in range(rng.randint(0, 3))]
    return view(prefill, decode, now), L


@pytest.mark.parametrize("sharing", ["bounded", "serial", "queue"])
def test_proactive_chunks_never_break_the_tbt_slo_by_its_own_estimate(sharing):
    """Property over random views: a deflection's chunk, at its worst (last) position in its prompt, next to the
    node's running decodes, keeps the step within the TBT SLO by the profile's own step time."""
    rng = random.Random(7)
    pol = make_policy(f"proactive:sharing={sharing}")
    deflected = 0
    for k in range(400):
        v, L = _random_view(rng, now=float(k))
        d = pol.decide(v, req(L, k))
        if not d.deflected or d.chunk_cap is None:
            continue
        deflected += 1
        node = v.decode[d.decode_node]
        c = d.chunk_cap
        assert 1 <= c <= min(L, node.max_batched_tokens - node.batch_size)
        worst = PROFILE.step_s(node.batch_size + c, node.batch_size, node.context_tokens, c * c, c * (L - c))
        assert worst <= TAU * (1 + 1e-9), (sharing, L, c, node)
    assert deflected > 50  # the property was exercised


def test_bounded_chunk_accounts_for_every_lane_sharing_the_step():
    """With lanes already on the node, no step the FCFS fill can form exceeds the SLO."""
    pol = ProactiveDeflector()
    m = step_model(PROFILE)
    rng = random.Random(3)
    for _ in range(300):
        lanes = [Lane(float(rng.randint(64, 2048)), rng.randint(100, 8000), 0.0) for _ in range(rng.randint(0, 6))]
        for ln in lanes:
            ln.rem = float(rng.randint(1, ln.L))
        B, L = rng.randint(0, 60), rng.randint(50, 8000)
        C = B * rng.randint(100, 3000)
        budget = 2048 - B
        c = pol.bounded_chunk(m, B, C, L, budget, TAU, lanes)
        if c == 0:
            continue
        # FCFS fill with the new lane last; each lane at its worst chunk for the tokens it gets
        left, n_tok, attn = budget, 0, 0.0
        for cap, rem, Li in [(ln.cap, ln.rem, ln.L) for ln in lanes] + [(c, L, L)]:
            t = min(cap, rem, left)
            if t <= 0:
                break
            left -= t
            n_tok += t
            attn += lane_worst(m, t, Li)
        step = PROFILE.overhead_s + PROFILE.linear(B + n_tok) + PROFILE.decode_attn_s_per_token * C \
            + PROFILE.decode_attn_s_per_seq * B + attn
        assert step <= TAU * (1 + 1e-9)


def test_proactive_is_deterministic_and_reset_forgets_lanes():
    wl = make_workload("azure_code", start_s=0.0, duration_s=120.0, rate=6.0)
    pol = make_policy("proactive")
    a = ClusterSim(ClusterConfig(), wl).run(pol).records
    b = ClusterSim(ClusterConfig(), wl).run(pol).records  # run() resets the policy first
    assert np.array_equal(a["decode_node"], b["decode_node"]) and np.array_equal(a["chunk_cap"], b["chunk_cap"])
    np.testing.assert_array_equal(a["ttft_s"], b["ttft_s"])


def test_proactive_taken_replaces_its_own_deflection_with_the_one_taken():
    """When another policy decided (DAgger's learner), the proactive deflector tracks that decision's deflection:
    its own lane leaves, the real one is tracked, and its next estimates are those of a policy that had decided
    so itself (the same lanes in the same order)."""
    rng = random.Random(11)
    for k in range(200):
        v, L = _random_view(rng, now=0.0)
        pol = ProactiveDeflector()
        d = pol.decide(v, req(L, k))
        if not d.deflected or d.chunk_cap is None or len(v.decode) < 2 or any(
                n.deflected_waiting_requests for n in v.decode):  # (lanes the view has and the policy did not place)
            continue
        other = (d.decode_node + 1) % len(v.decode)
        pol.taken(v, req(L, k), Decision.deflect(other, 300))
        assert [len(n.lanes) for n in pol._nodes] == [int(j == other) for j in range(len(v.decode))]
        ln = pol._nodes[other].lanes[0]
        assert (ln.cap, ln.L, ln.rem) == (300.0, L, float(L - v.decode[other].cached_tokens))
        pol.taken(v, req(L, k), Decision.prefill(0))  # a second call replaces the first (a planner tells its base
        assert all(not n.lanes for n in pol._nodes)  # what it decided, then DAgger what the learner did)
        pol.taken(v, req(L, k), Decision.deflect(d.decode_node, 200))
        assert [len(n.lanes) for n in pol._nodes] == [int(j == d.decode_node) for j in range(len(v.decode))]
        assert pol._nodes[d.decode_node].lanes[0].cap == 200.0
        pol2 = ProactiveDeflector()
        pol2.decide(v, req(L, k))
        pol2.taken(v, req(L, k), Decision.prefill(0))
        assert all(not n.lanes for n in pol2._nodes)
        return
    raise AssertionError("no random view led to a deflection")


def test_proactive_ttft_estimate_against_the_simulated_outcome():
    """The chosen path's TTFT estimate against the simulated TTFT on a short bursty run (azure_code, first
    300 s at 5 req/s, 2P2D). Measured (the proactive of this commit): median relative error +4 %, median absolute
    13.5 %, P95 absolute 77 %; over other windows and loads (3.21-8 req/s, 3 seeds) the median absolute error
    is 5-15 % and the median signed error within +-10 %. The tail is wide because a request's wait depends on
    what the decode nodes' batches do after the decision (joins, deflections behind it) which the estimate
    cannot know. Bounds: median absolute error under 25 % and median signed error within +-15 %."""
    wl = make_workload("azure_code", start_s=0.0, duration_s=300.0, rate=5.0)
    sim = ClusterSim(ClusterConfig(), wl)
    res = sim.run(make_policy("proactive"))
    err = np.array([(r.estimates["ttft_s"] - r.ttft_s) / r.ttft_s for r in sim.requests
                    if r.estimates and r.t_first_token >= 0])
    print(f"estimate error: median {np.median(err):+.3f}, median abs {np.median(np.abs(err)):.3f}, "
          f"P95 abs {np.percentile(np.abs(err), 95):.3f} over {len(err)} requests")
    assert len(err) == res.summary["completed"]
    assert abs(np.median(err)) < 0.15
    assert np.median(np.abs(err)) < 0.25
    assert res.summary["estimate_error"]["n"] == len(err)


def test_proactive_cuts_tail_ttft_and_keeps_tbt_on_a_bursty_window():
    """Behaviour the study relies on, on a short window (measured: P95 TTFT 1.4 s against 5.9 s for round robin,
    TBT SLO attainment 99.9 % against 100 %)."""
    wl = make_workload("azure_code", start_s=0.0, duration_s=300.0, rate=5.0)
    rr = ClusterSim(ClusterConfig(), wl).run(make_policy("round_robin")).summary
    pro = ClusterSim(ClusterConfig(), wl).run(make_policy("proactive")).summary
    assert pro["ttft_s"]["p95"] < 0.5 * rr["ttft_s"]["p95"]
    assert pro["tbt_slo_attainment"] >= rr["tbt_slo_attainment"] - 0.02
    assert pro["slo_attainment"] > rr["slo_attainment"]


# -- errors ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, words", [
    ("no_such_policy", ["unknown policy", "no_such_policy", "proactive"]),
    ("proactive:margin=1.5", ["margin", "1.5"]),
    ("proactive:tbt_safety=0", ["tbt_safety"]),
    ("proactive:sharing=lanes", ["sharing", "bounded"]),
    ("proactive:min_chunk=0", ["min_chunk"]),
    ("proactive:bogus=1", ["proactive", "bogus"]),
    ("length_threshold:max_len=-5", ["max_len"]),
    ("queue_threshold:max_waiting_tokens=abc", ["max_waiting_tokens"]),
    ("dynamo_isl:veto_busy=2", ["veto_busy"]),
    ("dynamo_load:mode=isl_bounding", ["mode"]),
    ("least_loaded:decode=random", ["decode"]),
    ("proactive:margin", ["key=value"]),
])
def test_bad_policy_names_and_parameters_are_clear_errors(spec, words):
    with pytest.raises(ValueError) as e:
        make_policy(spec)
    for w in words:
        assert w in str(e.value), (spec, str(e.value))


def test_params_round_trip_through_the_registry():
    for spec in ("length_threshold:max_len=777", "dynamo_isl_or_load:isl_bound=512,load_frac=0.5,veto_busy=0.8",
                 "proactive:margin=0.2,sharing=serial"):
        pol = make_policy(spec)
        again = make_policy({"name": spec.split(":")[0], **pol.params()})
        assert again.params() == pol.params()
    assert math.isclose(make_policy("dynamo_load:load_frac=0.5").params()["load_frac"], 0.5)


def test_prefix_affinity_scores_cache_against_queue_and_deflects_short_uncached_prompts():
    """llm-d-style scores: 3 x cached share + 2 x queue score ((max - q) / (max - min)); deflect when the chosen
    decode node leaves fewer than pd_threshold uncached tokens."""
    from deflectlab.policies.prefix_affinity import queue_scores

    assert queue_scores([4.0, 2.0, 0.0]) == [0.0, 0.5, 1.0] and queue_scores([3.0, 3.0]) == [1.0, 1.0]
    d0, d1 = dnode(0, batch=4), dnode(1, batch=0)  # loads 4 and 0: queue scores 0 and 1
    p0, p1 = pnode(0, 1000), pnode(1, 3000)
    pol = make_policy("prefix_affinity")  # prefix 3, queue 2, pd_threshold 2048
    d = pol.decide(view([p0, p1], [d0, d1]), req(8000))  # nothing cached: least loaded everywhere
    assert not d.deflected and (d.prefill_node, d.decode_node) == (0, 1)
    d0.cached_tokens, p1.cached_tokens = 5500, 4000  # d0: 3 x 0.6875 + 0 > d1's 2; p1: 1.5 + 0 < p0's 2
    d = pol.decide(view([p0, p1], [d0, d1]), req(8000))
    assert not d.deflected and (d.prefill_node, d.decode_node) == (0, 0)
    p1.cached_tokens = 7000  # p1: 3 x 0.875 = 2.625 > 2
    assert pol.decide(view([p0, p1], [d0, d1]), req(8000)).prefill_node == 1
    d0.cached_tokens = 6500  # 1500 uncached on d0 < 2048: decode-only, on d0
    d = pol.decide(view([p0, p1], [d0, d1]), req(8000))
    assert d.deflected and d.decode_node == 0
    assert make_policy("prefix_affinity:pd_threshold=1024").decide(view([p0, p1], [d0, d1]), req(8000)).kind == 0


def test_proactive_estimates_use_the_handoff_preset_and_the_cache():
    """One shared hand-off estimate: under vllm-nixl the prefill-path estimate exceeds the rdma one by exactly the
    difference of envs.handoff.handoff_estimate_s; cached tokens on the decode node shrink both paths."""
    from deflectlab.envs.handoff import RDMA, VLLM_NIXL, handoff_estimate_s

    L = 6000
    est = {}
    for ho in (VLLM_NIXL, RDMA):
        v = view([pnode(0, 0)], [dnode(0)])
        v.handoff = ho
        est[ho.name] = make_policy("proactive").decide(v, req(L)).estimates["ttft_prefill_s"]
    prof = pnode(0).profile
    gap = handoff_estimate_s(VLLM_NIXL, prof, L) - handoff_estimate_s(RDMA, prof, L)
    assert est["vllm-nixl"] - est["rdma"] == pytest.approx(gap, rel=1e-9) and gap > 0.1  # the dispatch, mostly
    cold, warm = view([pnode(0, 0)], [dnode(0)]), view([pnode(0, 0)], [dnode(0)])
    warm.decode[0].cached_tokens = 4096
    e_cold = make_policy("proactive").decide(cold, req(L)).estimates
    e_warm = make_policy("proactive").decide(warm, req(L)).estimates
    assert e_warm["ttft_deflect_s"] < e_cold["ttft_deflect_s"]
    assert e_warm["ttft_prefill_s"] < e_cold["ttft_prefill_s"]  # fewer bytes to move


class _ViewWithDead(ClusterView):
    __slots__ = ("dead_prefill", "dead_decode")


@pytest.mark.parametrize("version", [1, 2])
def test_nodes_out_of_rotation_are_invalid_actions(version):
    """A view that lists nodes out of rotation (the router's) masks them for every learned policy, and the mask
    is never all False."""
    from deflectlab.envs.features import FeatureBuilder

    fb = FeatureBuilder(version)
    v = _ViewWithDead(0.0, 1.0, TAU, prefill=[pnode(0), pnode(1)], decode=[dnode(0), dnode(1, kv_free=0)])
    v.dead_prefill, v.dead_decode = (), ()
    fb.build(v, req(500))
    assert fb.mask.tolist() == [True, True, True, False]  # decode 1 has no KV room
    v.dead_prefill, v.dead_decode = (0,), (0,)
    fb.build(v, req(500))
    assert fb.mask.tolist() == [False, True, False, False]
    v.dead_prefill = (0, 1)  # nothing usable: never mask everything
    fb.build(v, req(500))
    assert fb.mask.tolist() == [True, True, True, True]
    assert ClusterView(0.0, 1.0, TAU, prefill=[pnode(0)], decode=[dnode(0)]).dead_prefill == ()


def test_ensemble_takes_the_majority_and_tells_the_members():
    """``ensemble``: one member plays exactly like that member; with three, each decision is the majority kind of
    the members' own votes (ties to ``tie``) and the most chosen decision of that kind, and a member outvoted is told
    the decision taken; bad specs are named."""
    from deflectlab.envs.config import ClusterConfig
    from deflectlab.envs.simulator import ClusterSim
    from deflectlab.envs.workloads import make_workload
    from deflectlab.policies.ensemble import Ensemble

    root = Path(__file__).resolve().parents[1] / "experiments" / "rl_v4_blocked" / "2to3x"
    wl = make_workload("azure_code", start_s=300, num_requests=200, rate=8.0)
    one = ClusterSim(ClusterConfig(), wl).run(make_policy(f"ensemble:paths={root / 's1'}")).summary
    alone = ClusterSim(ClusterConfig(), wl).run(make_policy(f"learned:path={root / 's1'}")).summary
    assert (one["slo_attainment"], one["ttft_s"], one["deflection_rate"]) == (
        alone["slo_attainment"], alone["ttft_s"], alone["deflection_rate"])

    ens = Ensemble("+".join(str(root / f"s{s}") for s in (0, 3, 4)))
    told = []

    def spy(member):
        def taken(view, request, decision):
            told.append((member, decision))
            type(member).taken(member, view, request, decision)
        return taken

    for m in ens.members:  # record what each member is told
        m.taken = spy(m)
    sim = ClusterSim(ClusterConfig(), wl)
    ens.reset()
    split = 0
    while (r := sim.advance()) is not None:
        told.clear()
        d = ens.decide(sim.view(), r)
        votes = ens.last_votes
        n_def = sum(v.deflected for v in votes)
        assert d.deflected == (n_def >= 2)
        same = [v for v in votes if v.deflected == d.deflected]
        assert d in same and same.count(d) == max(same.count(v) for v in same)
        assert [m for m, _ in told] == [m for m, v in zip(ens.members, votes) if v != d]
        assert all(t == d for _, t in told)
        split += 0 < n_def < 3
        sim.route(r, d)
    assert split > 5  # the members disagreed, so the vote decided something
    with pytest.raises(ValueError, match="at least one exported policy"):
        make_policy("ensemble:paths=")
    with pytest.raises(ValueError, match="tie must be one of prefill, deflect"):
        make_policy(f"ensemble:paths={root / 's1'},tie=coin")
