"""The cluster model's behaviour: conservation, queueing theory, determinism, monotonicity, the NIC."""

from __future__ import annotations

import dataclasses
import heapq

import numpy as np
import pytest

from deflectlab.envs.config import ClusterConfig, ConfigError, parse_shape
from deflectlab.envs.metrics import COMPONENTS
from deflectlab.envs.network import Network
from deflectlab.envs.profile import ProfileError, load_profile, profile_from_dict
from deflectlab.envs.request import Request
from deflectlab.envs.simulator import ClusterSim, DecisionError
from deflectlab.envs.view import Decision, Policy
from deflectlab.envs.workloads import Trace, Workload, make_workload
from deflectlab.policies.registry import make_policy


def small_workload(n=400, rate=None, trace="azure_code", seed=0) -> Workload:
    return make_workload(trace, num_requests=n, rate=rate, seed=seed)


def run(policy="round_robin", wl=None, **cluster) -> tuple[ClusterSim, dict]:
    sim = ClusterSim(ClusterConfig(**cluster), wl if wl is not None else small_workload())
    res = sim.run(make_policy(policy))
    return sim, res


@pytest.mark.parametrize("policy", ["round_robin", "always_deflect"])
def test_every_request_completes_or_is_rejected(policy):
    sim, res = run(policy, wl=small_workload(1500, rate=12.0))
    s = res.summary
    assert s["completed"] + s["rejected"] == s["requests"] == 1500
    assert s["unfinished"] == 0
    for r in sim.requests:
        assert r.finished != (r.reject_reason is not None)
        if r.finished:
            assert r.arrival_s <= r.t_first_token <= r.t_finish


def test_rejections_carry_a_reason():
    # a decode KV cache too small for the longest code-trace prompts
    prof = load_profile("a100-80gb_deepseek-v2-lite")
    tiny = dataclasses.replace(prof, kv_capacity_tokens=4000, name="tiny-kv")
    wl = small_workload(300)
    sim = ClusterSim(ClusterConfig(), wl, decode_profile=tiny)
    res = sim.run(make_policy("round_robin"))
    s = res.summary
    too_big = int(np.sum(wl.input_tokens + wl.output_tokens > 4000))
    assert too_big > 0
    assert s["rejected"] == too_big
    assert s["completed"] + s["rejected"] == s["requests"]
    assert all("KV capacity" in r.reject_reason for r in sim.requests if r.reject_reason)


EPS = 1e-9  # float rounding of differences of absolute times (about 1e-14 s at t = 50 s)


def _timeline(r: Request) -> dict[str, float]:
    """A finished request's TTFT parts, by hand from its timestamps, after checking that every timestamp of
    its path was set and that they come in order (so every part is >= 0)."""
    if r.deflected:
        stamps = [r.arrival_s, r.t_admit, r.t_d_start, r.t_first_token, r.t_finish]
        unused = [r.t_p_start, r.t_p_end, r.t_xfer_end, r.t_join]
    else:
        stamps = [r.arrival_s, r.t_p_start, r.t_p_end, r.t_admit, r.t_xfer_end, r.t_join, r.t_first_token,
                  r.t_finish]
        unused = [r.t_d_start]
    assert min(stamps) >= 0.0 and all(t == -1.0 for t in unused), r
    assert all(a <= b for a, b in zip(stamps, stamps[1:])), (r, stamps)
    parts = dict.fromkeys(COMPONENTS, 0.0)
    if r.deflected:
        parts["d_queue"] = r.t_d_start - r.arrival_s
        parts["chunked_prefill"] = r.t_first_token - r.t_d_start
    else:
        assert 0.0 < r.xfer_ideal_s <= r.t_xfer_end - r.t_admit + EPS, r  # no transfer beats its ideal time
        parts["p_queue"] = r.t_p_start - r.arrival_s
        parts["prefill_exec"] = r.t_p_end - r.t_p_start
        parts["handoff_wait"] = (r.t_xfer_end - r.t_p_end) - r.xfer_ideal_s
        parts["transfer"] = r.xfer_ideal_s
        parts["decode_wait"] = r.t_join - r.t_xfer_end
        parts["first_step"] = r.t_first_token - r.t_join
    return parts


def _p95_linear(x: list[float]) -> float:
    """The 95th percentile with linear interpolation between order statistics (numpy's default), by hand."""
    s = sorted(x)
    h = 0.95 * (len(s) - 1)
    lo = int(h)
    return s[lo] + (h - lo) * (s[min(lo + 1, len(s) - 1)] - s[lo])


@pytest.mark.parametrize(("policy", "rate"), [("round_robin", 10.0), ("queue_threshold", 4.0)])
def test_ttft_breakdown_of_the_p95_set_recomputed_from_each_request(policy, rate):
    """The run's P95-set breakdown against one recomputed from every request's own timestamps: parts >= 0,
    parts add up to TTFT, the set is the requests at or above the P95 TTFT, and its means match. The
    queue-threshold policy deflects some requests into that set, so both paths' parts are exercised."""
    sim, res = run(policy, wl=small_workload(800, rate=rate))
    done = [r for r in sim.requests if r.finished]
    assert len(done) == 800
    parts = {r.rid: _timeline(r) for r in done}
    for r in done:
        assert min(parts[r.rid].values()) >= -EPS, (r, parts[r.rid])
        assert sum(parts[r.rid].values()) == pytest.approx(r.t_first_token - r.arrival_s, rel=1e-9, abs=1e-12)
    p95 = _p95_linear([r.t_first_token - r.arrival_s for r in done])
    tail = [r for r in done if r.t_first_token - r.arrival_s >= p95]
    assert len(tail) == 40  # 5 % of 800
    s = res.summary
    for c in COMPONENTS:
        assert s["ttft_breakdown_p95"][c] == pytest.approx(np.mean([parts[r.rid][c] for r in tail]), abs=1e-12), c
    tail_mean = np.mean([r.t_first_token - r.arrival_s for r in tail])
    assert s["p95_set_mean_ttft_s"] == pytest.approx(tail_mean, rel=1e-12)
    assert s["prefill_share_of_p95_ttft"] == pytest.approx(s["ttft_breakdown_p95"]["prefill_exec"] / tail_mean)
    # the records carry the same parts, request by request
    for c in COMPONENTS:
        by_rid = np.array([parts[int(i)][c] for i in res.records["rid"]])
        np.testing.assert_allclose(res.records[f"{c}_s"], by_rid, rtol=1e-12, atol=1e-12)
    paths = {r.deflected for r in tail}
    for c in ("p_queue", "prefill_exec", "transfer", "first_step"):
        assert s["ttft_breakdown_p95"][c] > 0, c
    if policy == "round_robin":
        assert paths == {False}
    else:  # a mixed set: the deflected path's parts are non-zero too
        assert paths == {False, True}
        assert s["ttft_breakdown_p95"]["d_queue"] > 0 and s["ttft_breakdown_p95"]["chunked_prefill"] > 0


def fixed_size_trace(n: int, L: int, out: int = 1) -> Trace:
    return Trace(name="fixed", arrival_s=np.arange(n, dtype=float), input_tokens=np.full(n, L),
                 output_tokens=np.full(n, out), hash_ids=None, source="test")


def test_prefill_queue_matches_md1_pollaczek_khinchine():
    """1P1D, fixed 1024-token prompts, one prompt per step (budget = prompt), Poisson arrivals at rho=0.7:
    the mean wait in the prefill queue is rho*S / (2*(1-rho)) (M/D/1)."""
    L = 1024
    cfg = ClusterConfig(num_prefill=1, num_decode=1, prefill_max_batched_tokens=L)
    service = load_profile(cfg.prefill_profile).prefill_s(L)
    rho = 0.7
    n = 120_000
    wl = make_workload(fixed_size_trace(1000, L), arrival="poisson", rate=rho / service, num_requests=n, seed=3)
    sim = ClusterSim(cfg, wl)
    res = sim.run(make_policy("round_robin"))
    waits = res.records["p_queue_s"]
    expected = rho * service / (2 * (1 - rho))
    # long-run mean within 4 % (batch-means standard error at this length is about 1 %)
    assert np.mean(waits) == pytest.approx(expected, rel=0.04)
    np.testing.assert_allclose(res.records["prefill_exec_s"], service, rtol=1e-9)


def test_same_seed_same_run_different_seed_different():
    a = run("always_deflect", wl=make_workload("azure_conv", num_requests=600, arrival="poisson", rate=8, seed=1))[1]
    b = run("always_deflect", wl=make_workload("azure_conv", num_requests=600, arrival="poisson", rate=8, seed=1))[1]
    c = run("always_deflect", wl=make_workload("azure_conv", num_requests=600, arrival="poisson", rate=8, seed=2))[1]
    np.testing.assert_array_equal(a.tbt_p95_per_request(), b.tbt_p95_per_request())
    for k in ("ttft_s", "e2e_s", "tbt_mean_s"):
        np.testing.assert_array_equal(a.records[k], b.records[k])
    assert not np.array_equal(a.records["ttft_s"], c.records["ttft_s"])
    assert a.summary["ttft_s"] == b.summary["ttft_s"]


def test_more_load_never_lowers_mean_queueing():
    base = make_workload("azure_code", num_requests=1500)
    means = []
    for rate in (1.0, 2.0, 4.0, 8.0, 16.0):
        wl = make_workload("azure_code", num_requests=1500, rate=rate)
        assert len(wl) == len(base)
        _, res = run("round_robin", wl=wl)
        means.append(float(np.nanmean(res.records["p_queue_s"] + res.records["handoff_wait_s"])))
    assert all(b >= a - 1e-12 for a, b in zip(means, means[1:])), means
    assert means[-1] > means[0]


class _Loop:
    def __init__(self):
        self.heap, self.seq, self.done = [], 0, {}

    def schedule(self, t, fn, arg):
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, fn, arg))

    def on_done(self, flow, t):
        self.done[flow.req.rid] = t

    def run(self):
        while self.heap:
            t, _, fn, arg = heapq.heappop(self.heap)
            fn(t, arg)


def _transfers(specs, egress=(1e9,), ingress=(1e9,)):
    loop = _Loop()
    net = Network(list(egress), list(ingress), loop.schedule, loop.on_done)
    for i, (t, src, dst, nbytes) in enumerate(specs):
        loop.schedule(t, lambda tt, a: net.start(Request(a[0], tt, 1, 1), a[1], a[2], a[3], tt), (i, src, dst, nbytes))
    loop.run()
    return loop.done


def test_two_equal_simultaneous_transfers_take_twice_as_long():
    one = _transfers([(0.0, 0, 0, 1e8)])
    two = _transfers([(0.0, 0, 0, 1e8), (0.0, 0, 0, 1e8)])
    assert one[0] == pytest.approx(0.1)
    assert two[0] == pytest.approx(0.2) and two[1] == pytest.approx(0.2)


def test_nic_sharing_is_max_min_fair():
    # flows A: P0->D0, B: P0->D1, C: P1->D1, all 1 GB/s NICs: P0 and D1 are shared by two flows each,
    # so every flow runs at 0.5 GB/s
    done = _transfers([(0.0, 0, 0, 1e8), (0.0, 0, 1, 1e8), (0.0, 1, 1, 1e8)],
                      egress=(1e9, 1e9), ingress=(1e9, 1e9))
    assert done[0] == pytest.approx(0.2) and done[1] == pytest.approx(0.2) and done[2] == pytest.approx(0.2)
    # a flow that starts later gets the freed bandwidth: second flow joins at 0.05 s
    done = _transfers([(0.0, 0, 0, 1e8), (0.05, 0, 0, 1e8)])
    # first: 0.05 s alone (5e7 B), then 0.5 GB/s for the remaining 5e7 B -> 0.15 s
    assert done[0] == pytest.approx(0.15)
    assert done[1] == pytest.approx(0.2)


def test_prefill_path_handoff_uses_profile_constants():
    """The rdma preset takes set-up and rate from the profile, with no dispatch delay or step alignment."""
    prof = load_profile("a100-80gb_deepseek-v2-lite")
    tr = Trace(name="one", arrival_s=np.array([0.0]), input_tokens=np.array([4000]), output_tokens=np.array([3]),
               hash_ids=None, source="test")
    sim = ClusterSim(ClusterConfig(num_prefill=1, num_decode=1, handoff="rdma"), make_workload(tr))
    res = sim.run(make_policy("round_robin"))
    r = sim.requests[0]
    assert r.t_p_end == pytest.approx(prof.prefill_s(4000))
    assert res.records["transfer_s"][0] == pytest.approx(prof.transfer_s(4000))
    assert res.records["handoff_wait_s"][0] == pytest.approx(0.0, abs=1e-12)
    # joined an idle decode node at once; first step recomputes the last prompt token
    assert r.t_first_token - r.t_join == pytest.approx(prof.decode_step_s(1, 4000))


class _BadPolicy(Policy):
    name = "bad"

    def __init__(self, decision):
        self.decision = decision

    def decide(self, view, request):
        return self.decision


@pytest.mark.parametrize("decision, msg", [
    (Decision.prefill(5), "prefill node 5 out of range"),
    (Decision.deflect(9), "decode node 9 out of range"),
    (Decision.prefill(0, 7), "decode node 7 out of range"),
    (Decision.deflect(0, 0), "chunk cap must be >= 1"),
])
def test_bad_decisions_are_clear_errors(decision, msg):
    sim = ClusterSim(ClusterConfig(), small_workload(5))
    with pytest.raises(DecisionError, match=msg):
        sim.run(_BadPolicy(decision))


@pytest.mark.parametrize("kw, msg", [
    ({"num_decode": 0}, "num_decode must be >= 1"),
    ({"num_prefill": -1}, "num_prefill must be an integer >= 0"),
    ({"decode_max_batched_tokens": 100}, "must exceed max_num_seqs"),
    ({"ttft_slo_s": 0}, "ttft_slo_s must be a number > 0"),
    ({"decode_balancer": "random"}, "decode_balancer must be"),
])
def test_bad_cluster_config_names_the_problem(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        ClusterConfig(**kw)


def test_config_unknown_key_and_shape():
    with pytest.raises(ConfigError, match="unknown cluster key"):
        ClusterConfig.from_dict({"num_prefil": 2})
    assert parse_shape("4p12d") == (4, 12)
    with pytest.raises(ConfigError, match="not of the form"):
        parse_shape("2x2")


def test_profiles_load_and_bad_profiles_are_refused(tmp_path):
    for name in ("a100-80gb_llama-3-8b", "a100-80gb_deepseek-v2-lite", "h100-80gb_llama-3-8b"):
        p = load_profile(name)
        assert all(p.sources.get(k) for k in ("linear", "overhead_s", "kv_bytes_per_token"))
    assert load_profile("a100-80gb_deepseek-v2-lite").kv_bytes_per_token == 31104
    doc = load_profile("a100-80gb_llama-3-8b").to_dict()
    doc["terms"]["overhead_s"]["source"] = ""
    with pytest.raises(ProfileError, match="overhead_s' has no source"):
        profile_from_dict(doc)
    doc = load_profile("a100-80gb_llama-3-8b").to_dict()
    doc["terms"]["warp_drive"] = {"value": 1, "source": "x"}
    with pytest.raises(ProfileError, match="unknown term"):
        profile_from_dict(doc)
    with pytest.raises(ProfileError, match="unknown profile 'nope'"):
        load_profile("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ProfileError, match="not valid YAML"):
        load_profile(bad)


def test_heterogeneous_pools_and_other_shapes():
    wl = small_workload(300, rate=6.0)
    sim = ClusterSim(ClusterConfig(num_prefill=3, num_decode=5, prefill_profile="h100-80gb_llama-3-8b",
                                   decode_profile="a100-80gb_llama-3-8b"), wl)
    res = sim.run(make_policy("round_robin"))
    assert res.summary["completed"] == 300
    assert {r.p_node for r in sim.requests} == {0, 1, 2}
    with pytest.raises(ValueError, match="disagree on KV bytes per token"):
        ClusterSim(ClusterConfig(prefill_profile="h100-80gb_llama-3-8b"), wl)


@pytest.mark.parametrize("policy", ["round_robin", "always_deflect"])
def test_tbt_statistics_from_prefix_sums_equal_the_samples(policy):
    """Per-request TBT mean/max and SLO counts (prefix sums over segments) against every sample expanded."""
    from deflectlab.envs.metrics import tbt_pieces

    sim, res = run(policy, wl=make_workload("azure_conv", num_requests=500, rate=12.0, arrival="poisson", seed=4),
                   tbt_slo_s=0.02)
    reqs = sim.requests
    d = np.array([r.d_node for r in reqs])
    first = np.array([r.first_step for r in reqs])
    last = np.array([r.last_step for r in reqs])
    owner, a, b, j0, j1 = tbt_pieces(sim, d, first, last)
    p95 = res.tbt_p95_per_request()
    n_over_slo = 0
    total = 0
    everything = []
    for r in reqs:
        m = np.flatnonzero(owner == r.rid)
        samples = np.concatenate([a[i] + b[i] * np.arange(j0[i], j1[i] + 1) for i in m]) if len(m) else []
        assert len(samples) == r.output_tokens - 1
        total += len(samples)
        everything.extend(samples)
        if len(samples):
            assert res.records["tbt_mean_s"][r.rid] == pytest.approx(np.mean(samples), rel=1e-9)
            assert res.records["tbt_max_s"][r.rid] == pytest.approx(np.max(samples), rel=1e-12)
            exact = np.sort(samples)[int(np.ceil(0.95 * len(samples))) - 1]
            assert p95[r.rid] == pytest.approx(exact, rel=1e-5)
            n_over_slo += exact > 0.02
    assert res.summary["tbt_samples"] == total
    everything = np.sort(everything)
    for q in (50, 95, 99):  # run-level percentiles: nearest rank over every inter-token gap
        assert res.summary["tbt_s"][f"p{q}"] == pytest.approx(everything[int(np.ceil(q / 100 * total)) - 1], rel=1e-9)
    met_tbt = res.summary["tbt_slo_attainment"] * len(reqs)
    assert met_tbt == pytest.approx(len(reqs) - n_over_slo)


def test_max_min_fairness_with_unequal_nics():
    # P0 (1 GB/s) carries A and B: 0.5 GB/s each; C (P1 -> D1) takes what D1 has left: 3 - 0.5 = 2.5 GB/s
    done = _transfers([(0.0, 0, 0, 1e8), (0.0, 0, 1, 1e8), (0.0, 1, 1, 1e8)],
                      egress=(1e9, 3e9), ingress=(3e9, 3e9))
    assert done[2] == pytest.approx(1e8 / 2.5e9)
    assert done[0] == pytest.approx(0.2) and done[1] == pytest.approx(0.2)


def test_cluster_without_prefill_nodes():
    """0PxD is aggregated serving: deflecting policies run, prefill-routing ones are refused by name."""
    wl = small_workload(200, rate=2.0)
    for ok in ("always_deflect", "proactive"):
        res = ClusterSim(ClusterConfig(num_prefill=0), wl).run(make_policy(ok))
        assert res.summary["completed"] == 200 and res.summary["deflection_rate"] == 1.0
    with pytest.raises(DecisionError, match="'round_robin' routes requests to prefill nodes"):
        ClusterSim(ClusterConfig(num_prefill=0), wl).run(make_policy("round_robin"))
