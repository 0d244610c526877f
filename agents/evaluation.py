"""Evaluation: every policy, learned or heuristic, replays exactly the same episodes through the same simulator.

An evaluation episode is ``DeflectionEnv.episode_workload(seed)`` for each evaluation seed; each policy runs it
with ``ClusterSim.run`` and the run's metrics are pooled over the episodes (SLO attainment = requests that met
both SLOs over all requests; P95 TTFT over all completed requests) and also averaged per episode.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from deflectlab.envs.features import FeatureBuilder
from deflectlab.envs.gym_env import DeflectionEnv
from deflectlab.envs.simulator import ClusterSim
from deflectlab.envs.view import ClusterView, Decision, Policy

if TYPE_CHECKING:
    from stable_baselines3.common.policies import BasePolicy

#: Per-episode numbers kept in reports.
EPISODE_KEYS = ("requests", "completed", "rejected", "slo_attainment", "ttft_slo_attainment", "tbt_slo_attainment",
                "deflection_rate", "goodput_rps")


class NetPolicy(Policy):
    """A trained SB3 policy network used in-process: features from :mod:`envs.features`, masked greedy action.

    :param net: the SB3 policy network (PPO, MaskablePPO or DQN).
    :param name: name in reports.
    """

    def __init__(self, net: BasePolicy, name: str = "learned") -> None:
        import torch
        from deflectlab.agents.policy_io import MaskedPolicyModule

        self.name = name
        self._torch = torch
        self._mod = MaskedPolicyModule(net).eval()
        self._fb = FeatureBuilder()

    def decide(self, view: ClusterView, request: Any) -> Decision:
        torch = self._torch
        obs = self._fb.build(view, request)
        with torch.no_grad():
            a, _ = self._mod(torch.from_numpy(obs).reshape(1, -1),
                             torch.from_numpy(self._fb.mask).reshape(1, -1))
        return self._fb.decision(int(a[0]))


PolicySource = Policy | Callable[[], Policy] | str


def _instantiate(src: PolicySource) -> Policy:
    if isinstance(src, Policy):
        return src
    if isinstance(src, str):
        from deflectlab.policies.registry import make_policy

        return make_policy(src)
    return src()


def available_baselines(names: list[str]) -> tuple[list[str], list[str]]:
    """``(available, missing)`` among heuristic registry specs (the optional ones may not exist yet)."""
    from deflectlab.policies.registry import available

    have = set(available())
    ok = [n for n in names if n.partition(":")[0] in have]
    return ok, [n for n in names if n not in ok]


def evaluate(policies: Mapping[str, PolicySource], env_kwargs: dict[str, Any], seeds: list[int],
             progress: bool = False) -> dict[str, Any]:
    """Run every policy on the episodes of ``seeds`` and report per-episode and pooled metrics.

    :param policies: report name -> a policy, a factory, or a registry spec (``"proactive:margin=0.1"``).
    :param env_kwargs: arguments of :class:`DeflectionEnv` defining the episodes.
    :param seeds: evaluation seeds.
    :return: ``{"seeds", "episodes": [episode info], "policies": {name: {"pooled", "mean", "std",
        "episodes"}}}``.
    """
    env = DeflectionEnv(**env_kwargs)
    workloads = []
    infos = []
    for s in seeds:
        w, info = env.episode_workload(s)
        workloads.append(w)
        infos.append({"seed": s, **info})
    out: dict[str, Any] = {"seeds": list(seeds), "episodes": infos, "policies": {}}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(policies) * len(seeds), desc="evaluate", unit="episode", leave=False)
    for name, src in policies.items():
        pol = _instantiate(src)
        eps: list[dict[str, Any]] = []
        ttft_all: list[np.ndarray] = []
        met = total = 0
        for w in workloads:
            sim = ClusterSim(env.config, w, env.prefill_profile, env.decode_profile)
            res = sim.run(pol)
            summ = res.summary
            ep: dict[str, Any] = {k: summ[k] for k in EPISODE_KEYS}
            ep["ttft_p50_s"] = summ["ttft_s"]["p50"]
            ep["ttft_p95_s"] = summ["ttft_s"]["p95"]
            ep["ttft_p99_s"] = summ["ttft_s"]["p99"]
            ep["tbt_p95_s"] = summ["tbt_s"]["p95"]
            eps.append(ep)
            ttft = res.records["ttft_s"]
            ttft_all.append(ttft[~np.isnan(ttft)])
            met += int(np.sum(res.records["slo_met"]))
            total += len(ttft)
            if bar is not None:
                bar.update(1)
        pooled_ttft = np.concatenate(ttft_all) if ttft_all else np.zeros(0)
        keys = list(eps[0]) if eps else []
        out["policies"][name] = {
            "pooled": {
                "slo_attainment": met / total if total else math.nan,
                "ttft_p50_s": float(np.percentile(pooled_ttft, 50)) if len(pooled_ttft) else math.nan,
                "ttft_p95_s": float(np.percentile(pooled_ttft, 95)) if len(pooled_ttft) else math.nan,
                "ttft_p99_s": float(np.percentile(pooled_ttft, 99)) if len(pooled_ttft) else math.nan,
                "requests": total,
            },
            "mean": {k: float(np.mean([e[k] for e in eps])) for k in keys},
            "std": {k: float(np.std([e[k] for e in eps])) for k in keys},
            "episodes": eps,
            "params": pol.params(),
        }
    if bar is not None:
        bar.close()
    return out


def table(report: dict[str, Any]) -> str:
    """A markdown table of an :func:`evaluate` report, best pooled SLO attainment first."""
    rows = sorted(report["policies"].items(), key=lambda kv: -kv[1]["pooled"]["slo_attainment"])
    lines = ["| policy | SLO attainment (pooled) | per-episode mean +- std | TTFT SLO | TBT SLO | P95 TTFT s (pooled) "
             "| P95 TTFT s (episode mean) | P50 TTFT s | deflection rate |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows:
        p, m, sd = r["pooled"], r["mean"], r["std"]
        lines.append(
            f"| {name} | {p['slo_attainment']:.3f} | {m['slo_attainment']:.3f} +- {sd['slo_attainment']:.3f} | "
            f"{m['ttft_slo_attainment']:.3f} | {m['tbt_slo_attainment']:.3f} | {p['ttft_p95_s']:.2f} | "
            f"{m['ttft_p95_s']:.2f} | {p['ttft_p50_s']:.2f} | {m['deflection_rate']:.2f} |")
    return "\n".join(lines)
