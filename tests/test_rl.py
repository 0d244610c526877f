"""Issue 12's RL pieces: the per-request reward, the two-way action space, the RL report's aggregation."""

from __future__ import annotations

import json
import os

os.environ.setdefault("WANDB_MODE", "offline")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from deflectlab.envs.actions import TwoWay, est_ttft_columns  # noqa: E402
from deflectlab.envs.config import ConfigError  # noqa: E402
from deflectlab.envs.gym_env import DeflectionEnv  # noqa: E402
from deflectlab.envs.metrics import collect  # noqa: E402
from deflectlab.envs.rewards import Composite, RequestOutcome, StepStats, TBTViolation, make_reward  # noqa: E402
from deflectlab.policies.registry import make_policy  # noqa: E402

SMALL = dict(window_s=60.0, load=(2.0, 3.0))


def test_request_reward_by_hand():
    # one decision estimated late; two deadlines passed, one of them estimated late; nothing rejected
    s = StepStats(decision_est_miss=1.0, deadline_misses=2, deadline_est_misses=1.0)
    assert RequestOutcome()(s) == -2.0  # 1 (estimate now) + 1 x (2 actual - 1 estimated)
    assert RequestOutcome(correction=0.5)(s) == -1.5  # 1 + 0.5 x 1
    assert RequestOutcome(correction=0.0)(s) == -1.0  # the estimate alone
    assert RequestOutcome(miss=2.0)(s) == -4.0
    # an estimate that was too pessimistic is paid back at the deadline
    s2 = StepStats(decision_est_miss=0.0, deadline_misses=0, deadline_est_misses=1.0, rejected=1)
    assert RequestOutcome()(s2) == 0.0  # -(1 rejected + 0 + (0 - 1))
    r = make_reward("per_request")
    assert isinstance(r, Composite) and r.needs_estimates and r.needs_deadlines and r.needs_tbt
    s3 = StepStats(decision_est_miss=1.0, tbt_violation_gaps=5.0)
    assert r(s3) == pytest.approx(-1.0 - 0.2 * 5.0)
    assert not make_reward("composite").needs_estimates and not TBTViolation().needs_estimates
    assert make_reward(RequestOutcome(correction=0.25).spec())(s) == RequestOutcome(correction=0.25)(s)
    with pytest.raises(ConfigError, match="correction"):
        RequestOutcome(correction=2.0)
    with pytest.raises(ValueError, match="request"):
        make_reward({"name": "request", "mis": 1})


def _episode(env: DeflectionEnv, seed: int, choose):
    obs, _ = env.reset(seed=seed)
    seen, acts, rewards = [], [], []
    done = False
    k = 0
    while not done:
        a = choose(env, k)
        seen.append(obs.copy())
        acts.append(a)
        obs, r, done, _, _ = env.step(a)
        rewards.append(r)
        k += 1
    return seen, acts, np.array(rewards)


def test_request_reward_episode_totals():
    """correction=1: the episode total is minus the requests that missed the TTFT SLO (as slo at the deadline);
    correction=0: minus the decisions whose chosen path's est_ttft feature was over one SLO (> 0.5 squashed)."""
    cycle = lambda e, k: e.expert_action() if k % 3 else 2 + k % 2  # noqa: E731 - mixes both paths
    env = DeflectionEnv(reward=[{"name": "request"}], **SMALL)
    env.set_expert(make_policy("round_robin"))
    _, _, rewards = _episode(env, 5, cycle)
    ttft = collect(env.sim).records["ttft_s"]
    assert rewards.sum() == -np.sum(~(ttft <= env.config.ttft_slo_s))
    assert np.count_nonzero(rewards) > 0

    env0 = DeflectionEnv(reward=[{"name": "request", "correction": 0}], **SMALL)
    env0.set_expert(make_policy("round_robin"))
    seen, acts, rewards0 = _episode(env0, 5, cycle)
    cols = [c for cs in est_ttft_columns(2, 2) for c in cs]
    expected = [-1.0 if o[cols[a]] > 0.5 else 0.0 for o, a in zip(seen, acts, strict=True)]
    assert rewards0.tolist() == expected


def test_two_way_actions_pick_the_lowest_estimate():
    env = DeflectionEnv(actions="two_way", **SMALL)
    assert env.action_space.n == 2
    obs, _ = env.reset(seed=2)
    p_cols, d_cols = est_ttft_columns(2, 2)
    rng = np.random.default_rng(0)
    checked = {0: 0, 1: 0}
    done = False
    while not done:
        m = env.action_masks()
        node_mask = env._fb.mask  # noqa: SLF001 - the node mask the two-way mask is built from
        assert m[0] and m[1] == bool(node_mask[2:].any())
        a = int(rng.integers(0, 2)) if m[1] else 0
        req = env.current_request
        if a == 0:
            want_p = int(np.argmin([obs[c] for c in p_cols]))  # argmin: ties to the lowest index
        else:
            valid = [j for j in range(2) if node_mask[2 + j]]
            want_d = valid[int(np.argmin([obs[d_cols[j]] for j in valid]))]
        obs, _, done, _, _ = env.step(a)
        if a == 0:
            assert not req.deflected and req.p_node == want_p
        else:
            assert req.deflected and req.d_node == want_d
        checked[a] += 1
    assert checked[0] > 5 and checked[1] > 5
    tw = TwoWay(2, 2)
    assert tw.mask(np.array([True, True, False, False])).tolist() == [True, False]
    o = np.zeros(len(env.feature_names), np.float32)
    o[d_cols[0]], o[d_cols[1]] = 0.9, 0.2
    assert tw.node_action(1, o, np.array([True, True, True, True])) == 3
    assert tw.node_action(1, o, np.array([True, True, True, False])) == 2  # node 1 has no KV room
    assert tw.node_action(1, o, np.array([True, True, False, False])) == 0  # none valid: prefill
    with pytest.raises(ValueError, match="two_way"):
        tw.node_action(2, o, np.ones(4, bool))
    with pytest.raises(ConfigError, match="actions"):
        DeflectionEnv(actions="three_way", **SMALL)


def test_two_way_expert_action_maps_deflections():
    env = DeflectionEnv(actions="two_way", **SMALL)
    env.reset(seed=1)
    env.set_expert(make_policy("always_deflect"))
    assert env.expert_action() == 1
    env.set_expert(make_policy("round_robin"))
    assert env.expert_action() == 0


def _fake_run(root, name, seed, curve, base, final):
    d = root / f"{name}-s{seed}"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"name": name, "seed": seed, "algo_params": {"gamma": 0.9},
                                               "env": {"reward": "per_request", "actions": "two_way"},
                                               "pretrain": {"expert": None}}))
    (d / "evaluations.json").write_text(json.dumps([{"timesteps": t, "slo_attainment": v} for t, v in curve]))
    (d / "result.json").write_text(json.dumps({"timesteps": curve[-1][0], "wall_s": 10.0 + seed,
                                               "steps_per_s": 100.0, "objective": final}))
    (d / "evaluation.json").write_text(json.dumps({"policies": {
        "learned": {"pooled": {"slo_attainment": final}},
        **{k: {"pooled": {"slo_attainment": v}} for k, v in base.items()}}}))
    return d


def test_rl_report_groups_curves_over_seeds(tmp_path):
    from deflectlab.experiments.rl_report import ablation_markdown, group_curves, plot_curves, read_run

    base = {"round_robin": 0.3, "threshold": 0.9}
    dirs = [_fake_run(tmp_path, "a", 0, [(0, 0.2), (10, 0.5), (20, 0.8)], base, 0.8),
            _fake_run(tmp_path, "a", 1, [(0, 0.4), (10, 0.7), (20, 0.6), (30, 0.9)], base, 0.9),
            _fake_run(tmp_path, "b", 0, [(0, 0.1), (10, 0.2)], base, 0.2)]
    runs = [read_run(d) for d in dirs]
    g = group_curves(runs)
    assert g["a"]["steps"] == [0, 10, 20]  # the steps every seed evaluated at
    assert g["a"]["mean"] == pytest.approx([0.3, 0.6, 0.7])
    assert g["a"]["min"] == pytest.approx([0.2, 0.5, 0.6]) and g["a"]["max"] == pytest.approx([0.4, 0.7, 0.8])
    assert g["a"]["final"] == [0.8, 0.9] and g["a"]["wall_s"] == [10.0, 11.0]
    assert g["b"]["baselines"] == base
    assert plot_curves(runs, g, tmp_path / "c.png").stat().st_size > 1000
    md = "\n".join(ablation_markdown(runs))
    assert "| a | per_request | two_way | 0.9 |" in md and "| 0.800 | 0.800 |" in md and "| 0.900 | 0.900 |" in md
    with pytest.raises(FileNotFoundError, match="result.json"):
        (dirs[2] / "result.json").unlink()
        read_run(dirs[2])


def test_rl_report_paired_table_by_hand():
    from deflectlab.experiments.rl_report import paired_table

    rows = []
    best = [0.90, 0.80, 0.70]
    mine = [0.92, 0.80, 0.74]
    for i, (b, m) in enumerate(zip(best, mine, strict=True)):
        rows.append({"policy": "best tuned (x)", "load": 2.0, "seed": i, "requests": 100, "slo_met": round(100 * b),
                     "slo_attainment": b, "ttft_p95_s": 1.0, "deflected": 0.5})
        rows.append({"policy": "rl", "load": 2.0, "seed": i, "requests": 100, "slo_met": round(100 * m),
                     "slo_attainment": m, "ttft_p95_s": 2.0, "deflected": 0.4})
    for i, v in enumerate([0.95, 0.85, 0.80]):  # another heuristic, better than the tuned one on these episodes
        rows.append({"policy": "proactive", "load": 2.0, "seed": i, "requests": 100, "slo_met": round(100 * v),
                     "slo_attainment": v, "ttft_p95_s": 1.0, "deflected": 0.5})
    ev = {"heuristics": {"best tuned (x)": "x", "proactive": "p"}, "learned": {"rl": "dir"}, "best": "best tuned (x)",
          "loads": [2.0], "rows": rows}
    t = {r["policy"]: r for r in paired_table(ev)}
    d = np.array([0.02, 0.0, 0.04])
    assert t["rl"]["diff_vs_best"] == pytest.approx(0.02)
    # Student t, 2 degrees of freedom: 4.303 x sd / sqrt(3)
    assert t["rl"]["ci95"] == pytest.approx(4.303 * d.std(ddof=1) / np.sqrt(3), rel=1e-3)
    assert (t["rl"]["better"], t["rl"]["worse"]) == (2, 0)
    assert t["rl"]["slo_attainment"] == pytest.approx(246 / 300)
    assert t["best tuned (x)"]["diff_vs_best"] == 0.0
    assert t["rl"]["top_heuristic"] == "proactive"
    assert t["rl"]["diff_vs_top"] == pytest.approx(np.mean([0.92 - 0.95, 0.80 - 0.85, 0.74 - 0.80]))


def test_two_way_network_runs_the_same_in_the_env_and_as_a_policy():
    """The kept from-scratch network (two-way actions): stepping the environment with its greedy actions and
    running it as an in-process policy on the same workload give the same requests' outcomes."""
    import torch

    from deflectlab.agents.policy_io import MaskedPolicyModule, load_policy_net
    from deflectlab.envs.simulator import ClusterSim
    from deflectlab.experiments.rl_report import learned_policy

    path = "experiments/rl/policy_scratch_s1"
    net, cfg, _ = load_policy_net(path, "final")
    assert cfg.env.actions == "two_way"
    mod = MaskedPolicyModule(net).eval()
    env = DeflectionEnv(actions="two_way", **SMALL)
    obs, _ = env.reset(seed=11)
    wl, _ = env.episode_workload(seed=11)
    done = False
    deflect = 0
    while not done:
        with torch.no_grad():
            a, _ = mod(torch.from_numpy(obs).reshape(1, -1), torch.from_numpy(env.action_masks()).reshape(1, -1))
        deflect += int(a[0])
        obs, _, done, _, info = env.step(int(a[0]))
    sim = ClusterSim(env.config, wl)
    s = sim.run(learned_policy(path)).summary
    assert 0 < deflect < info["metrics"]["requests"]  # it does choose, both ways
    assert sim.deflections == deflect
    assert s["slo_attainment"] == info["metrics"]["slo_attainment"]


def test_rl_report_command_on_a_tiny_case(tmp_path):
    """``deflectlab rl-report`` end to end: two fake runs for the curves, the kept network in a 2-episode paired
    evaluation at one load; every policy replays the same episodes."""
    from deflectlab.scripts.cli import main

    base = {"round_robin": 0.3}
    runs = [str(_fake_run(tmp_path, "a", s, [(0, 0.2), (10, 0.5)], base, 0.5)) for s in (0, 1)]
    out = tmp_path / "out"
    rc = main(["rl-report", "--runs", *runs, "--learned", "kept=experiments/rl/policy_scratch_s1", "--episodes", "2",
               "--loads", "2", "--window", "60", "--no-diagnosis", "--wandb-mode", "disabled", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    rows = res["final_eval"]["rows"]
    assert len(rows) == 2 * 4  # 2 episodes x (3 heuristics + kept)
    by_seed = {}
    for r in rows:
        by_seed.setdefault(r["seed"], set()).add(r["requests"])
    assert all(len(v) == 1 for v in by_seed.values())  # same episode (same request count) for every policy
    assert (out / "curves.png").is_file() and "| 2x | kept |" in (out / "report.md").read_text()
    assert res["groups"]["a"]["mean"] == pytest.approx([0.2, 0.5])
