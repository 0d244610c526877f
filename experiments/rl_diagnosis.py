"""Why RL from scratch fails on the deflection environment: measurements that need no training.

On training windows of a trace (2P2D, the environment's defaults) it rolls out three behaviour policies (uniform
random over valid node actions, never-deflect, the best tuned threshold) and measures, per reward preset:

* how well an episode's return ranks episodes by SLO attainment (Spearman correlation over the episodes: the
  return is what PPO maximises, attainment what we want);
* the per-step reward's scale (mean, standard deviation) and the share of steps with a non-zero reward;
* credit delay: how many decisions pass between a decision and the step where its own request's penalty
  arrives (at its first token; at its deadline), and the weight ``gamma ** delay`` that discount leaves it;
* decisions per burst (arrivals with gaps under 1 s of simulated time), the episode length in decisions;
* the observation: features that barely move (standard deviation under 0.01);
* the action space: how often the two prefill actions are equivalent (equal estimated TTFT), and how often
  the per-request TTFT estimate (the ``request`` reward's estimate) agrees with the actual SLO outcome.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from deflectlab.envs.actions import est_ttft_columns
from deflectlab.envs.gym_env import DeflectionEnv
from deflectlab.envs.metrics import collect
from deflectlab.envs.rewards import Reward, StepStats

REWARDS = ("composite", "attainment", "per_request")


class _Spy(Reward):
    """Asks the environment for every statistic and keeps them, so each preset can be scored on one trajectory."""

    needs_first_tokens = needs_deadlines = needs_tbt = needs_estimates = True

    def __init__(self) -> None:
        self.seen: list[StepStats] = []

    def __call__(self, s: StepStats) -> float:
        self.seen.append(s)
        return 0.0


def _spearman(x: list[float], y: list[float]) -> float:
    if len(x) < 3:
        return math.nan
    rx = np.argsort(np.argsort(x)).astype(float)
    ry = np.argsort(np.argsort(y)).astype(float)
    return float(np.corrcoef(rx, ry)[0, 1])


def _policy_action(name: str, env: DeflectionEnv, rng: np.random.Generator) -> int:
    if name == "random":
        return int(rng.choice(np.flatnonzero(env.action_masks())))
    return env.expert_action()


def rollout(env_kwargs: dict[str, Any], policy: str, expert: Any, seed: int, gamma: float) -> dict[str, Any]:
    """One episode under ``policy`` (``random`` or a heuristic given as ``expert``) with every reward preset
    computed on the same trajectory (the rewards only read the step statistics)."""
    from deflectlab.envs.rewards import make_reward

    spy = _Spy()
    env = DeflectionEnv(reward=spy, **env_kwargs)
    others = {name: make_reward(name) for name in REWARDS}
    if expert is not None:
        env.set_expert(expert)
    rng = np.random.default_rng(seed)
    obs, _ = env.reset(seed=seed)
    p_cols, _ = est_ttft_columns(env.num_prefill, env.num_decode)
    rewards: dict[str, list[float]] = {k: [] for k in REWARDS}
    obs_rows, est_miss, equal_p = [], [], 0
    captured = spy.seen
    done = False
    while not done:
        obs_rows.append(obs)
        pe = [float(obs[c]) for c in p_cols]
        equal_p += int(max(pe) - min(pe) < 1e-3)
        a = _policy_action(policy, env, rng)
        obs, _, done, _, info = env.step(a)
        s = captured[-1]
        est_miss.append(s.decision_est_miss)
        for k, fn in others.items():
            rewards[k].append(float(fn(s)))
    sim = env.sim
    res = collect(sim)  # type: ignore[arg-type]
    arr = np.asarray(res.records["arrival_s"])
    ttft = np.asarray(res.records["ttft_s"])
    met = np.asarray(res.records["slo_met"], bool)
    n = len(arr)
    first = np.where(np.isfinite(ttft), arr + np.nan_to_num(ttft, nan=np.inf), np.inf)
    # the step whose interval holds an event at time t is the last decision at or before t
    idx = np.arange(n)
    d_first = np.searchsorted(arr, first, side="right") - 1 - idx
    d_dead = np.searchsorted(arr, arr + sim.config.ttft_slo_s, side="right") - 1 - idx  # type: ignore[union-attr]
    d_first = np.where(np.isfinite(first), d_first, n - idx)
    gaps = np.diff(arr)
    bursts = np.split(arr, np.flatnonzero(gaps > 1.0) + 1)
    actual_miss = ~(np.nan_to_num(ttft, nan=np.inf) <= sim.config.ttft_slo_s)  # type: ignore[union-attr]
    em = np.asarray(est_miss, bool)
    return {"policy": policy, "seed": seed, "load": env.episode_info.get("load"), "decisions": n,
            "slo_attainment": float(met.mean()), "returns": {k: float(np.sum(v)) for k, v in rewards.items()},
            "step_mean": {k: float(np.mean(v)) for k, v in rewards.items()},
            "step_std": {k: float(np.std(v)) for k, v in rewards.items()},
            "nonzero": {k: float(np.mean(np.asarray(v) != 0.0)) for k, v in rewards.items()},
            "delay_first_token": [float(np.median(d_first)), float(np.percentile(d_first, 95))],
            "delay_deadline": [float(np.median(d_dead)), float(np.percentile(d_dead, 95))],
            "gamma_weight_first_token": float(np.mean(gamma ** d_first)),
            "gamma_weight_deadline": float(np.mean(gamma ** d_dead)),
            "burst_decisions": [float(np.median([len(b) for b in bursts])), float(max(len(b) for b in bursts))],
            "equal_prefill_share": equal_p / n,
            "estimate_agreement": float(np.mean(em == actual_miss)),
            "obs_std": np.std(np.asarray(obs_rows), axis=0).tolist()}


def diagnose(loads: tuple[float, ...] = (2.0, 3.0), episodes: int = 4, window_s: float = 300.0,
             seed0: int = 500, gamma: float = 0.99) -> dict[str, Any]:
    """Roll out the behaviour policies on training windows at each load and summarise (see the module doc)."""
    from deflectlab.experiments.headroom import baseline_policies, winner_label
    from deflectlab.policies.registry import make_policy

    base = baseline_policies()
    best = base[winner_label(base)]
    pols = {"random": None, "never_deflect": "round_robin", "best_threshold": best}
    rows = []
    for load in loads:
        kw = {"load": [load, load], "window_s": window_s, "window_start_s": [0.0, 900.0]}
        for name, spec in pols.items():
            for i in range(episodes):
                r = rollout(kw, name, make_policy(spec) if spec else None, seed0 + i, gamma)
                r["policy"] = name
                rows.append(r)
    corr = {k: _spearman([r["returns"][k] for r in rows], [r["slo_attainment"] for r in rows]) for k in REWARDS}
    names = DeflectionEnv().feature_names
    std = np.mean([r["obs_std"] for r in rows], axis=0)
    return {"loads": list(loads), "episodes": episodes, "window_s": window_s, "seed0": seed0, "gamma": gamma,
            "best_threshold": best, "rows": [{k: v for k, v in r.items() if k != "obs_std"} for r in rows],
            "return_vs_attainment_spearman": corr,
            "flat_features": [n for n, s in zip(names, std, strict=True) if s < 0.01],
            "feature_std": dict(zip(names, std.tolist(), strict=True))}


def diagnosis_markdown(d: dict[str, Any]) -> str:
    """The diagnosis tables as markdown."""
    from deflectlab.experiments.markdown import table

    rows = d["rows"]
    out = [f"Training windows (start in [0, 900] s), {d['window_s']:g}-s windows, loads {d['loads']}, "
           f"{d['episodes']} episodes per (policy, load), seeds from {d['seed0']}; gamma {d['gamma']}.", ""]
    head = ["policy", "load", "SLO att.", "decisions", "burst decisions (median / max)",
            "delay to first token (median / P95 decisions)", "delay to deadline (median / P95)",
            "gamma^delay, first token / deadline", "prefill actions equal", "estimate = outcome"]
    body = []
    for pol in ("random", "never_deflect", "best_threshold"):
        for load in d["loads"]:
            rs = [r for r in rows if r["policy"] == pol and r["load"] == load]
            if not rs:
                continue

            def m(k: str, i: int | None = None, rs: list = rs) -> float:
                return float(np.mean([r[k] if i is None else r[k][i] for r in rs]))

            body.append([pol, f"{load:g}x", f"{m('slo_attainment'):.3f}", f"{m('decisions'):.0f}",
                         f"{m('burst_decisions', 0):.0f} / {m('burst_decisions', 1):.0f}",
                         f"{m('delay_first_token', 0):.0f} / {m('delay_first_token', 1):.0f}",
                         f"{m('delay_deadline', 0):.0f} / {m('delay_deadline', 1):.0f}",
                         f"{m('gamma_weight_first_token'):.2f} / {m('gamma_weight_deadline'):.2f}",
                         f"{m('equal_prefill_share'):.2f}", f"{m('estimate_agreement'):.2f}"])
    out += [*table(head, body), ""]
    head2 = ["reward", "Spearman(return, SLO att.) over episodes", "per-step mean", "per-step std",
             "non-zero steps"]
    body2 = [[k, f"{v:.2f}", f"{np.mean([r['step_mean'][k] for r in rows]):.3f}",
              f"{np.mean([r['step_std'][k] for r in rows]):.3f}", f"{np.mean([r['nonzero'][k] for r in rows]):.2f}"]
             for k, v in d["return_vs_attainment_spearman"].items()]
    out += [*table(head2, body2), "",
            f"Observation features whose standard deviation stays under 0.01 over these rollouts: "
            f"{', '.join(d['flat_features']) or 'none'}."]
    return "\n".join(out)
