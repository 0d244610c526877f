"""Benchmark the Gymnasium environment and RL training; prints numbers (nothing is asserted).

    python scripts/bench_env.py                 # env decisions/s on one core, PPO steps/s on all cores
    python scripts/bench_env.py --calibrate     # also: round robin vs load on azure_code (choosing loads)
    python scripts/bench_env.py --skip-ppo --feature-schema 2 --trace mooncake_synthetic   # schema 2's cost

Environment: 2P2D A100 DeepSeek-V2-Lite, the default episodes (azure_code windows at 2-4x), a uniformly random
policy (actions drawn up front so the generator is not timed). Reported per decision: the simulator alone
(advance + route, no features), plus the cluster view, plus the feature builder, and the full ``env.step``
(direct, and through ``gymnasium.make``'s wrappers). The process is pinned to one CPU for this part, and times
are CPU seconds of this process (``time.process_time``), best of 3, so other jobs on a shared machine count less.

Training: MaskablePPO and PPO (64x64 MLP, n_steps 512 x n_envs, batch 256, 5 epochs) for ``--ppo-steps`` steps on
DummyVecEnv (4 envs, one process) and SubprocVecEnv (2 envs, two processes), with all CPUs available.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("WANDB_MODE", "offline")

import numpy as np

from deflectlab.envs.features import SCHEMAS


def bench_env(episodes: int, feature_schema: int = 1, trace: str = "azure_code") -> None:
    from deflectlab.envs.features import FeatureBuilder
    from deflectlab.envs.gym_env import DeflectionEnv
    from deflectlab.envs.simulator import ClusterSim
    from deflectlab.envs.view import Decision

    env = DeflectionEnv(feature_schema=feature_schema, trace=trace)
    acts = np.random.default_rng(0).integers(0, 4, size=2_000_000).tolist()
    seeds = list(range(episodes))
    workloads = [env.episode_workload(s)[0] for s in seeds]
    n_dec = sum(len(w) for w in workloads)

    def sim_only() -> float:
        k = 0
        t = time.process_time()
        for w in workloads:
            sim = ClusterSim(env.config, w, env.prefill_profile, env.decode_profile)
            while (r := sim.advance()) is not None:
                a = acts[k]
                k += 1
                sim.route(r, Decision.prefill(a) if a < 2 else Decision.deflect(a - 2, 512))
        return k / (time.process_time() - t)

    def sim_view() -> float:
        k = 0
        t = time.process_time()
        for w in workloads:
            sim = ClusterSim(env.config, w, env.prefill_profile, env.decode_profile)
            while (r := sim.advance()) is not None:
                sim.view().decode  # noqa: B018 - builds the node views
                a = acts[k]
                k += 1
                sim.route(r, Decision.prefill(a) if a < 2 else Decision.deflect(a - 2, 512))
        return k / (time.process_time() - t)

    def sim_view_features() -> float:
        k = 0
        fb = FeatureBuilder(feature_schema)
        t = time.process_time()
        for w in workloads:
            sim = ClusterSim(env.config, w, env.prefill_profile, env.decode_profile)
            while (r := sim.advance()) is not None:
                fb.build(sim.view(), r)
                a = acts[k]
                k += 1
                sim.route(r, fb.decision(a))
        return k / (time.process_time() - t)

    def env_steps(e) -> float:
        k = 0
        t = time.process_time()
        for s in seeds:
            e.reset(seed=s)
            done = False
            while not done:
                _, _, done, _, _ = e.step(acts[k])
                k += 1
        return k / (time.process_time() - t)

    import gymnasium as gym

    import deflectlab.envs  # noqa: F401

    made = gym.make("deflectlab/Deflection-v0", feature_schema=feature_schema, trace=trace)
    rows = [("simulator only (advance + route)", sim_only), ("+ cluster view (node lists)", sim_view),
            ("+ feature builder (observation, mask, chunk caps)", sim_view_features),
            ("env.step, DeflectionEnv direct (+ reward)", lambda: env_steps(env)),
            ("env.step via gymnasium.make (wrappers)", lambda: env_steps(made))]
    print(f"\n== environment, one core, random policy: {episodes} episodes of {trace}, {n_dec} decisions, "
          f"feature schema {feature_schema} ==")
    for name, fn in rows:
        fn()  # warm: caches (chunk solver, per-prompt estimates), imports
        best = max(fn() for _ in range(3))
        print(f"{name:55s} {best:10,.0f} decisions/s  ({1e6 / best:6.1f} us each)")


def bench_ppo(steps: int) -> None:
    import torch
    from stable_baselines3.common.logger import Logger

    from deflectlab.agents.config import load_config
    from deflectlab.agents.train import make_model, make_vec_env

    print(f"\n== training throughput, {os.cpu_count()} cores, {steps} steps each ==")
    for algo, n_envs, vec in (("maskable_ppo", 4, "dummy"), ("ppo", 4, "dummy"), ("maskable_ppo", 2, "subproc"),
                              ("dqn", 4, "dummy")):
        params = {"n_steps": 512, "batch_size": 256, "n_epochs": 5} if algo != "dqn" else {"learning_starts": 1000}
        cfg = load_config({"name": "bench", "algo": algo, "n_envs": n_envs, "vec_env": vec, "algo_params": params,
                           "wandb": {"enabled": False}})
        for threads in (1, 2):
            torch.set_num_threads(threads)
            venv = make_vec_env(cfg)
            model = make_model(cfg, venv)
            model.set_logger(Logger(None, []))  # no SB3-* folder in the temp dir
            t = time.perf_counter()
            model.learn(total_timesteps=steps)
            dt = time.perf_counter() - t
            venv.close()
            print(f"{algo:13s} {vec:8s} x{n_envs}  torch threads {threads}: {model.num_timesteps / dt:8,.0f} steps/s")


def calibrate() -> None:
    from deflectlab.envs.config import ClusterConfig
    from deflectlab.envs.simulator import ClusterSim
    from deflectlab.envs.workloads import make_workload
    from deflectlab.policies.registry import available, make_policy

    cfg = ClusterConfig()
    print("\n== choosing loads: whole azure_code trace (30 min), 2P2D, SLOs 1 s / 0.1 s ==")
    print("load | policy | P95 TTFT s | SLO attainment | mean prefill util | mean decode util")
    base = make_workload("azure_code").mean_rate
    pols = [p for p in ("round_robin", "proactive") if p in available()]
    for load in (1.0, 2.0, 3.0, 4.0):
        w = make_workload("azure_code", rate=base * load)
        for p in pols:
            s = ClusterSim(cfg, w).run(make_policy(p)).summary
            print(f"{load:4.1f} | {p:11s} | {s['ttft_s']['p95']:10.2f} | {s['slo_attainment']:14.3f} | "
                  f"{np.mean(s['utilization']['prefill']):17.2f} | {np.mean(s['utilization']['decode']):16.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--episodes", type=int, default=6, help="episodes per environment measurement")
    ap.add_argument("--ppo-steps", type=int, default=20_000, help="training steps per throughput measurement")
    ap.add_argument("--skip-ppo", action="store_true")
    ap.add_argument("--calibrate", action="store_true", help="also print round robin against load")
    ap.add_argument("--feature-schema", type=int, default=1, choices=tuple(SCHEMAS), help="the env's feature schema")
    ap.add_argument("--trace", default="azure_code", help="the env's trace (mooncake_synthetic has prefix hits)")
    args = ap.parse_args()
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    if allowed:
        os.sched_setaffinity(0, {min(allowed)})
    bench_env(args.episodes, args.feature_schema, args.trace)
    if allowed:
        os.sched_setaffinity(0, allowed)
    if not args.skip_ppo:
        bench_ppo(args.ppo_steps)
    if args.calibrate:
        calibrate()


if __name__ == "__main__":
    main()
