"""The run summary as a typed dataclass: exactly the keys ``--json`` had, plus the hand-off and memory ones."""

from __future__ import annotations

import dataclasses

from deflectlab.envs.config import ClusterConfig
from deflectlab.envs.metrics import HANDOFF_STAGES, RunSummary, collect
from deflectlab.envs.simulator import ClusterSim
from deflectlab.envs.workloads import make_workload
from deflectlab.policies.registry import make_policy

#: the summary keys before issue 10 (envs/metrics.py at commit 1a7dfdf)
OLD_KEYS = {"policy", "cluster", "requests", "completed", "rejected", "unfinished", "rejected_reasons", "duration_s",
            "offered_rate_rps", "ttft_s", "tbt_s", "tbt_samples", "e2e_s", "slo", "slo_attainment",
            "ttft_slo_attainment", "tbt_slo_attainment", "goodput_rps", "throughput_rps", "deflection_rate",
            "ttft_breakdown_p95", "ttft_breakdown_mean", "p95_set_mean_ttft_s", "prefill_share_of_p95_ttft",
            "utilization", "estimate_error", "decision_us_mean", "wall_s", "events", "sim_requests_per_wall_s"}
NEW_KEYS = {"handoff_s", "handoff_stages_mean", "handoff_preset", "preemptions", "kv_usage",
            "prefix_cache", "prefix_hit_rate"}


def test_summary_keys_are_the_old_ones_plus_the_new():
    assert {f.name for f in dataclasses.fields(RunSummary)} == OLD_KEYS | NEW_KEYS


def test_collect_returns_the_typed_summary_and_its_json():
    sim = ClusterSim(ClusterConfig(), make_workload("azure_code", num_requests=300, rate=4.0))
    policy = make_policy("round_robin")
    while (r := sim.advance()) is not None:
        sim.route(r, policy.decide(sim.view(), r))
    res = collect(sim, "round_robin")
    assert isinstance(res.typed, RunSummary)
    assert res.summary == res.typed.to_json()
    s = res.summary
    assert set(s["handoff_s"]) == {"p50", "p95", "p99", "mean"}
    assert set(s["handoff_stages_mean"]) == set(HANDOFF_STAGES)
    assert set(s["kv_usage"]) == {"prefill", "decode"}
    for pool in ("prefill", "decode"):
        u = s["kv_usage"][pool]
        assert 0.0 < u["mean"] <= u["peak"] <= 1.0 and len(u["nodes"]) == 2
    # the hand-off per request is the prefill-path TTFT less queueing and prefill
    rec = res.records
    pp = rec["path"] == "prefill"
    assert (abs(rec["handoff_s"][pp] - (rec["ttft_s"][pp] - rec["p_queue_s"][pp] - rec["prefill_exec_s"][pp]))
            < 1e-9).all()
