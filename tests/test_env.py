"""The Gymnasium environment, its features, masks, rewards and registration."""

from __future__ import annotations

import math
import os
import warnings

os.environ.setdefault("WANDB_MODE", "offline")

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import deflectlab.envs  # noqa: E402,F401  (registers deflectlab/Deflection-v0)
from deflectlab.envs.features import (  # noqa: E402
    FEATURE_SCHEMA,
    MIN_CHUNK_TOKENS,
    ChunkSolver,
    FeatureBuilder,
    build_observation,
)
from deflectlab.envs.gym_env import DeflectionEnv  # noqa: E402
from deflectlab.envs.metrics import collect  # noqa: E402
from deflectlab.envs.profile import load_profile  # noqa: E402
from deflectlab.envs.rewards import Composite, SLOHinge, StepStats, TBTViolation, WaitingTimeIntegral, make_reward  # noqa: E402
from deflectlab.envs.view import ClusterView, DecodeNodeView, PrefillNodeView  # noqa: E402
from deflectlab.policies.registry import make_policy  # noqa: E402

SMALL = dict(window_s=60.0, load=(2.0, 3.0))


def _rollout(env: gym.Env, seed: int, policy=None, max_steps: int = 100_000):
    """Run one episode; ``policy(env, step) -> action`` (default: a fixed action cycle)."""
    obs, info = env.reset(seed=seed)
    out_obs, rewards = [obs], []
    done = False
    k = 0
    while not done and k < max_steps:
        a = policy(env, k) if policy else k % env.action_space.n
        obs, r, term, trunc, info = env.step(a)
        out_obs.append(obs)
        rewards.append(r)
        done = term or trunc
        k += 1
    return np.array(out_obs), np.array(rewards), info


def test_registered_and_made_by_id():
    env = gym.make("deflectlab/Deflection-v0", **SMALL)
    obs, _ = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    env2 = gym.make("envs:deflectlab/Deflection-v0", cluster="1p3d", **SMALL)
    assert env2.action_space.n == 4
    assert env2.observation_space.shape == (FEATURE_SCHEMA.size(1, 3),)


def test_check_env_without_warnings():
    from gymnasium.utils.env_checker import check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(gym.make("deflectlab/Deflection-v0", **SMALL).unwrapped)  # made by id: it has a spec
        sb3_check_env(DeflectionEnv(**SMALL), warn=True)
        sb3_check_env(gym.make("deflectlab/Deflection-v0", **SMALL), warn=True)


def test_observations_in_bounds_and_final_metrics():
    env = DeflectionEnv(**SMALL)
    obs, rewards, info = _rollout(env, seed=3)
    lo, hi = FEATURE_SCHEMA.bounds(2, 2)
    assert obs.dtype == np.float32 and obs.shape[1] == len(FEATURE_SCHEMA.names(2, 2)) == 3 + 6 * 2 + 11 * 2
    assert np.all(obs >= lo) and np.all(obs <= hi)
    assert np.all(np.isfinite(rewards)) and np.all(rewards <= 0)
    m = info["metrics"]
    assert m["requests"] == len(rewards) == m["completed"] + m["rejected"]  # one step per request, all done
    assert 0.0 <= m["slo_attainment"] <= 1.0


def test_same_seed_same_episode():
    env = DeflectionEnv(**SMALL)
    o1, r1, i1 = _rollout(env, seed=7)
    o2, r2, i2 = _rollout(DeflectionEnv(**SMALL), seed=7)
    np.testing.assert_array_equal(o1, o2)
    np.testing.assert_array_equal(r1, r2)
    keys = ("requests", "completed", "slo_attainment", "ttft_s", "tbt_s", "deflection_rate", "ttft_breakdown_p95")
    assert {k: i1["metrics"][k] for k in keys} == {k: i2["metrics"][k] for k in keys}
    o3, _, _ = _rollout(env, seed=8)
    assert len(o3) != len(o1) or not np.array_equal(o3, o1)


def test_episode_workload_is_what_reset_replays():
    env = DeflectionEnv(**SMALL)
    w, info = env.episode_workload(11)
    _, rinfo = env.reset(seed=11)
    np.testing.assert_array_equal(env.sim.workload.arrival_s, w.arrival_s)
    np.testing.assert_array_equal(env.sim.workload.input_tokens, w.input_tokens)
    assert rinfo == info
    assert 2.0 <= info["load"] <= 3.0 and info["requests"] == len(w)


def test_held_out_windows():
    env = DeflectionEnv(window_s=120.0, window_start_s=(1200.0, None))
    for s in range(5):
        _, info = env.episode_workload(s)
        assert info["start_s"] >= 1200.0


def test_latency_reward_integrates_ttft_and_deadline_misses_count_slo_misses():
    """Park-style additivity: the episode's latency reward is exactly -sum(TTFT)/SLO; deadline misses add up to
    the requests over the TTFT SLO."""
    for reward in ("latency", [{"name": "slo", "at": "deadline"}], [{"name": "slo", "at": "first_token"}]):
        env = DeflectionEnv(reward=reward, **SMALL)
        env.set_expert(make_policy("round_robin"))
        _, rewards, info = _rollout(env, seed=5, policy=lambda e, k: e.expert_action()
                                    if k % 3 else 2 + k % 2)
        ttft = collect(env.sim).records["ttft_s"]
        slo = env.config.ttft_slo_s
        if reward == "latency":
            assert rewards.sum() == pytest.approx(-np.nansum(ttft) / slo, rel=1e-9)
        else:
            assert rewards.sum() == -np.sum(~(ttft <= slo))


def test_rewards_units_and_parsing():
    s = StepStats(dt_s=0.5, waiting_integral=2.0, ttfts_s=[0.5, 1.5, 3.0], tbt_violation_gaps=10, rejected=1,
                  deadline_misses=2, ttft_slo_s=1.0, tbt_slo_s=0.1)
    assert WaitingTimeIntegral()(s) == -2.0
    assert SLOHinge()(s) == -3.0  # two late first tokens + one rejection
    assert SLOHinge(slope=1.0)(s) == pytest.approx(-3.0 - 0.5 - 2.0)
    assert SLOHinge(at="deadline")(s) == -3.0  # two deadline misses + one rejection
    assert TBTViolation(weight=0.1)(s) == pytest.approx(-1.0)
    comp = make_reward("composite")
    assert isinstance(comp, Composite) and comp.needs_first_tokens and comp.needs_tbt
    assert make_reward([{"name": "latency", "scale": 2}])(s) == -4.0
    obj = SLOHinge(miss=2.0)
    assert make_reward(obj) is obj
    assert make_reward(obj.spec())(s) == obj(s)
    for bad in ("nope", {"name": "latency", "scael": 1}, {"name": "slo", "at": "never"}, 3):
        with pytest.raises(ValueError):
            make_reward(bad)


def _view(P: int, D: int, kv_free: list[int], batch: list[int] | None = None) -> ClusterView:
    prof = load_profile("a100-80gb_deepseek-v2-lite")
    pv = [PrefillNodeView(index=i, profile=prof, max_batched_tokens=8192, kv_free_tokens=prof.kv_capacity_tokens)
          for i in range(P)]
    dv = [DecodeNodeView(index=j, profile=prof, max_batched_tokens=2048, max_num_seqs=256,
                         batch_size=(batch or [0] * D)[j], context_tokens=1000 * (batch or [0] * D)[j],
                         kv_free_tokens=kv_free[j]) for j in range(D)]
    return ClusterView(10.0, 1.0, 0.1, 3.0, prefill=pv, decode=dv)


class _Req:
    rid = 0
    arrival_s = 10.0

    def __init__(self, n: int) -> None:
        self.input_tokens = n


def test_masks_kv_room_and_never_all_false():
    fb = FeatureBuilder()
    fb.build(_view(2, 2, [10**6, 100]), _Req(2000))
    assert fb.mask.tolist() == [True, True, True, False]
    fb.build(_view(0, 2, [100, 100]), _Req(2000))
    assert fb.mask.tolist() == [True, True]  # nothing fits anywhere and no prefill node: allow everything
    obs = build_observation(_view(2, 2, [10**6, 100]), _Req(2000))
    names = FEATURE_SCHEMA.names(2, 2)
    assert obs[names.index("decode[0].kv_fits")] == 1.0 and obs[names.index("decode[1].kv_fits")] == 0.0
    assert obs[names.index("decode[1].est_ttft")] == 1.0  # infeasible reads as 1.0


def test_action_layout_and_chunk_cap():
    fb = FeatureBuilder()
    view = _view(2, 2, [10**6, 10**6], batch=[0, 64])
    fb.build(view, _Req(6000))
    assert fb.decision(1).prefill_node == 1 and not fb.decision(1).deflected
    d = fb.decision(3)
    assert d.deflected and d.decode_node == 1
    prof = view.decode[1].profile
    chunk, _ = ChunkSolver(prof, 0.1, 2048).solve(64, 64_000, 6000)
    assert d.chunk_cap == max(chunk, MIN_CHUNK_TOKENS)
    assert fb.decision(2).chunk_cap >= d.chunk_cap  # an idle node takes bigger chunks
    with pytest.raises(ValueError):
        fb.decision(4)


@pytest.mark.parametrize("profile", ["a100-80gb_deepseek-v2-lite", "h100-80gb_llama-3-8b"])
def test_chunk_solver_is_the_largest_slo_safe_chunk(profile):
    """Against brute force: the largest chunk whose slowest step (last chunk, L - c prior tokens) keeps the SLO."""
    prof = load_profile(profile)
    solver = ChunkSolver(prof, 0.1, 2048)
    rng = np.random.default_rng(0)
    for _ in range(60):
        B, C, L = int(rng.integers(0, 200)), int(rng.integers(0, 300_000)), int(rng.integers(1, 8000))
        c, step = solver.solve(B, C, L)
        ctx, Lr = math.ceil(C / 1024) * 1024, math.ceil(L / 256) * 256
        top = min(2048 - B, Lr)
        ok = [x for x in range(1, top + 1) if prof.step_s(B + x, B, ctx, x * x, x * (Lr - x)) <= 0.1]
        assert c == (max(ok) if ok else 0)
        if c:
            assert step == pytest.approx(prof.step_s(B + c, B, ctx, c * c, c * (Lr - c)))


def test_expert_action_follows_the_heuristic():
    env = DeflectionEnv(**SMALL)
    env.reset(seed=1)
    with pytest.raises(RuntimeError, match="set_expert"):
        env.expert_action()
    env.set_expert(make_policy("round_robin"))
    assert [env.expert_action() for _ in range(3)] == [0, 1, 0]
    assert env.expert_action(make_policy("always_deflect")) in (2, 3)
    with pytest.raises(ValueError, match="decide"):
        env.set_expert("round_robin")  # type: ignore[arg-type]


def test_bad_arguments_are_clear_errors():
    for kw, word in ((dict(load=(3.0, 2.0)), "load"), (dict(window_s=-1), "window_s"),
                     (dict(arrival="uniform"), "arrival"), (dict(cluster="2x2"), "shape"),
                     (dict(reward="fast"), "reward"), (dict(window_start_s=(5000.0, None)), "window_start_s")):
        with pytest.raises(ValueError, match=word):
            DeflectionEnv(**kw)
    env = DeflectionEnv(**SMALL)
    with pytest.raises(RuntimeError):
        env.step(0)
    with pytest.raises(ValueError, match=r"unknown DeflectionEnv key\(s\) \['lod'\]"):
        DeflectionEnv(lod=3.0)


def test_one_env_config_for_the_env_and_the_trainer():
    """The trainer's env section is the environment's own EnvConfig: same class, same defaults, same errors."""
    from deflectlab.agents import config as train_config
    from deflectlab.envs.gym_env import EnvConfig

    assert train_config.EnvConfig is EnvConfig
    cfg = train_config.load_config({"name": "t", "env": {"load": [3.0, 3.0], "window_s": 60.0}})
    assert isinstance(cfg.env, EnvConfig) and cfg.env.kwargs()["load"] == [3.0, 3.0]
    a, b = DeflectionEnv(config=cfg.env), DeflectionEnv(**cfg.env.kwargs())
    assert a.load_range == b.load_range == (3.0, 3.0) and a.window_s == b.window_s == 60.0
    assert a.episode_workload(3)[0].arrival_s.tolist() == b.episode_workload(3)[0].arrival_s.tolist()
    for bad, text in (({"lod": 1}, "env.lod: unknown key"), ({"window_s": 0}, "window_s must be a finite number > 0"),
                      ({"min_requests": 0}, "min_requests must be an integer >= 1")):
        with pytest.raises(ValueError, match=text):
            train_config.load_config({"name": "t", "env": bad})


def test_subproc_vec_env_with_masks():
    from functools import partial

    from stable_baselines3.common.vec_env import SubprocVecEnv

    venv = SubprocVecEnv([partial(DeflectionEnv, **SMALL) for _ in range(2)], start_method="forkserver")
    try:
        venv.seed(3)
        obs = venv.reset()
        assert obs.shape == (2, FEATURE_SCHEMA.size(2, 2))
        for _ in range(20):
            masks = np.stack(venv.env_method("action_masks"))
            assert masks.shape == (2, 4) and masks.any(axis=1).all()
            obs, rew, done, infos = venv.step(np.array([0, 3]))
        assert np.all(np.isfinite(rew))
    finally:
        venv.close()


def test_one_number_checker_names_owner_parameter_range_and_value():
    from deflectlab.envs.config import ConfigError, check_number, check_range
    from deflectlab.envs.workloads import WorkloadError, make_workload

    assert check_number(np.int64(3), "n", lo=1, integer=True) == 3 and isinstance(check_number(3, "x"), float)
    assert check_number(0.0, "x", lo=0.0) == 0.0 and check_number(1.0, "x", hi=1.0) == 1.0
    for value, kw, text in ((0.0, dict(lo=0.0, lo_open=True), "x must be a finite number > 0 (s), got 0.0"),
                            (1.0, dict(hi=1.0, hi_open=True), "x must be a finite number < 1 (s), got 1.0"),
                            (2.5, dict(lo=1, integer=True), "x must be an integer >= 1 (s), got 2.5"),
                            (True, {}, "x must be a finite number (s), got True"),
                            (math.inf, dict(lo=0.0), "x must be a finite number >= 0 (s), got inf")):
        with pytest.raises(ConfigError) as e:
            check_number(value, "x", unit="s", what="owner", **kw)
        assert str(e.value) == f"owner: {text}"
    assert check_range(2, "load", positive=True) == (2.0, 2.0) and check_range([1, 3], "load") == (1.0, 3.0)
    for bad in ((3, 2), (0, 1), "2", (1, 2, 3)):
        with pytest.raises(ConfigError, match="load"):
            check_range(bad, "load", positive=True)
    # every former private checker now speaks through it: policy, reward, workload, env
    with pytest.raises(ValueError, match=r"policy 'proactive': margin must be a finite number >= 0 and < 1"):
        make_policy("proactive:margin=1")
    with pytest.raises(ValueError, match=r"policy 'length_threshold': chunk must be an integer >= 1, got 0"):
        make_policy("length_threshold:chunk=0")
    with pytest.raises(ValueError, match=r"reward: scale must be a finite number >= 0, got -1"):
        make_reward({"name": "latency", "scale": -1})
    with pytest.raises(WorkloadError, match=r"make_workload: rate must be a finite number > 0 \(req/s\), got 0"):
        make_workload("azure_code", rate=0)
    with pytest.raises(ConfigError, match="load"):
        DeflectionEnv(load=(0.0, 2.0), **{k: v for k, v in SMALL.items() if k != "load"})


def test_typed_evaluation_report_matches_runs_done_by_hand():
    """evaluate() against the same episodes run directly: pooled SLO attainment and P95 TTFT recomputed from the
    per-request records, per-episode means by hand, and the JSON keys the CLI has always printed."""
    from deflectlab.agents.evaluation import EvaluationReport, evaluate, table
    from deflectlab.envs.simulator import ClusterSim

    kw = dict(trace="azure_code", load=[3.0, 3.0], window_s=40.0, window_start_s=[1200.0, None])
    seeds = [1_000_000, 1_000_001]
    rep = evaluate({"rr": "round_robin", "deflect": "always_deflect"}, kw, seeds)
    env = DeflectionEnv(**kw)
    for name, spec in (("rr", "round_robin"), ("deflect", "always_deflect")):
        met = total = 0
        ttfts, p95s = [], []
        pol = make_policy(spec)
        for s in seeds:
            res = ClusterSim(env.config, env.episode_workload(s)[0], env.prefill_profile, env.decode_profile).run(pol)
            met += int(res.records["slo_met"].sum())
            total += len(res.records["ttft_s"])
            ttfts += [t for t in res.records["ttft_s"] if t == t]
            p95s.append(res.summary["ttft_s"]["p95"])
        r = rep.policies[name]
        assert r.pooled.requests == total and r.pooled.slo_attainment == pytest.approx(met / total)
        assert r.pooled.ttft_p95_s == pytest.approx(float(np.percentile(ttfts, 95)))
        assert r.mean["ttft_p95_s"] == pytest.approx(sum(p95s) / len(p95s))
        assert [e.ttft_p95_s for e in r.episodes] == pytest.approx(p95s)
    j = rep.to_json()
    assert list(j) == ["seeds", "episodes", "policies"] and j["seeds"] == seeds
    assert list(j["policies"]["rr"]) == ["pooled", "mean", "std", "episodes", "params"]
    assert list(j["policies"]["rr"]["pooled"]) == ["slo_attainment", "ttft_p50_s", "ttft_p95_s", "ttft_p99_s",
                                                   "requests"]
    assert EvaluationReport.from_json(j).to_json() == j and table(j) == table(rep)
    assert table(rep).count("\n") == 3  # header, separator, two policies


def test_an_arrival_mix_draws_one_process_and_a_gamma_cv_per_episode():
    """``arrival`` as a list draws one process per episode, ``cv`` as a range a gamma CV: recorded episodes keep
    the window's gaps scaled by 1 / load, gamma ones draw gaps whose CV follows the drawn one; a single process and
    CV draw exactly the episodes they drew before mixes existed (replayed here draw by draw)."""
    from gymnasium.utils import seeding

    from deflectlab.envs.splits import pick
    from deflectlab.envs.workloads import load_trace, make_workload

    kw = dict(trace="azure_code", load=[1.0, 2.0], window_s=300.0, window_start_s=[0.0, 900.0])
    env = DeflectionEnv(arrival=["trace", "gamma"], cv=[1.0, 3.0], **kw)
    trace = load_trace("azure_code")
    seen = {"trace": 0, "gamma": 0}
    low_cv, high_cv = [], []
    for seed in range(60):
        w, info = env.episode_workload(seed=seed)
        seen[info["arrival"]] += 1
        gaps = np.diff(w.arrival_s)
        if info["arrival"] == "trace":
            assert info["cv"] is None
            i0 = int(np.searchsorted(trace.arrival_s, info["start_s"]))
            rec = np.diff(trace.arrival_s[i0:i0 + len(w)])
            assert np.allclose(gaps, rec / info["load"], rtol=1e-9, atol=1e-9)
        else:
            assert 1.0 <= info["cv"] <= 3.0
            emp = gaps.std() / gaps.mean()
            (low_cv if info["cv"] < 1.7 else high_cv if info["cv"] > 2.3 else []).append(emp)
    assert seen["trace"] > 15 and seen["gamma"] > 15
    assert low_cv and high_cv and np.mean(high_cv) > np.mean(low_cv) + 0.5
    with pytest.raises(ValueError, match="unknown arrival 'bursty'"):
        DeflectionEnv(arrival=["trace", "bursty"], **kw)
    with pytest.raises(ValueError, match="arrival must be a name or a non-empty list"):
        DeflectionEnv(arrival=[], **kw)
    with pytest.raises(ValueError, match="cv range must have low <= high"):
        DeflectionEnv(arrival="gamma", cv=[3.0, 1.0], **kw)
    # one process, one CV: the draws of before (window start, load, the workload's seed), nothing else
    one = DeflectionEnv(arrival="gamma", cv=4.0, **kw)
    w, info = one.episode_workload(seed=5)
    rng, _ = seeding.np_random(5)
    start = float(pick(rng.random(), [(0.0, 900.0)]))
    load = float(rng.uniform(1.0, 2.0))
    t = trace.arrival_s
    i0, i1 = np.searchsorted(t, start), np.searchsorted(t, start + 300.0)
    rate = load * ((i1 - i0 - 1) / float(t[i1 - 1] - t[i0]))  # the window's recorded rate x load
    ref = make_workload(trace, start_s=start, duration_s=300.0, rate=rate, arrival="gamma", cv=4.0,
                        seed=int(rng.integers(0, 2**31 - 1)))
    assert "arrival" not in info and (start, load) == (info["start_s"], info["load"])
    assert np.array_equal(w.arrival_s, ref.arrival_s) and np.array_equal(w.input_tokens, ref.input_tokens)
