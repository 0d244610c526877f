"""Evaluation: every policy, learned or heuristic, replays exactly the same episodes through the same simulator.

An evaluation episode is ``DeflectionEnv.episode_workload(seed)`` for each evaluation seed; each policy runs it
with ``ClusterSim.run`` and the run's metrics are pooled over the episodes (SLO attainment = requests that met
both SLOs over all requests; P95 TTFT over all completed requests) and also averaged per episode.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

import numpy as np

from deflectlab.envs.actions import TwoWay
from deflectlab.envs.features import FeatureBuilder
from deflectlab.envs.gym_env import DeflectionEnv
from deflectlab.envs.simulator import ClusterSim
from deflectlab.envs.view import ClusterView, Decision, Policy

if TYPE_CHECKING:
    from stable_baselines3.common.policies import BasePolicy

#: Episode metrics read from the run summary's percentile mappings (the others are its top-level keys).
_PERCENTILES = {"ttft_p50_s": ("ttft_s", "p50"), "ttft_p95_s": ("ttft_s", "p95"), "ttft_p99_s": ("ttft_s", "p99"),
                "tbt_p95_s": ("tbt_s", "p95")}


class NetPolicy(Policy):
    """A trained SB3 policy network used in-process: features from :mod:`envs.features`, masked greedy action.

    :param net: the SB3 policy network (PPO, MaskablePPO or DQN).
    :param name: name in reports.
    :param feature_schema: the feature schema version the network was trained on (its run's
        ``env.feature_schema``).
    :param actions: the action space it was trained on (``envs.actions``: ``nodes`` or ``two_way``).
    """

    def __init__(self, net: BasePolicy, name: str = "learned", feature_schema: int = 1,
                 actions: str = "nodes") -> None:
        import torch

        from deflectlab.agents.policy_io import MaskedPolicyModule

        self.name = name
        self._torch = torch
        self._mod = MaskedPolicyModule(net).eval()
        self._fb = FeatureBuilder(feature_schema)
        self._feature_schema = feature_schema
        self._actions = actions
        self._two_way: TwoWay | None = None

    def decide(self, view: ClusterView, request: Any) -> Decision:
        torch = self._torch
        fb = self._fb
        obs = fb.build(view, request)
        tw = self._two_way
        if self._actions == "two_way" and (tw is None or (tw.num_prefill, tw.num_decode) != (fb.num_prefill,
                                                                                             fb.num_decode)):
            tw = self._two_way = TwoWay(fb.num_prefill, fb.num_decode, self._feature_schema)
        mask = fb.mask if tw is None else tw.mask(fb.mask)
        with torch.no_grad():
            a, _ = self._mod(torch.from_numpy(obs).reshape(1, -1), torch.from_numpy(mask).reshape(1, -1))
        act = int(a[0])
        return fb.decision(act if tw is None else tw.node_action(act, obs, fb.mask))

    def reset(self, seed: int | None = None) -> None:
        self._fb.reset()  # feature schema 3 keeps estimator state across a run


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


@dataclass
class Pooled:
    """Metrics over every request of every episode: SLO attainment (share of requests that met both SLOs), TTFT
    percentiles of the completed ones (seconds), and the request count."""

    slo_attainment: float
    ttft_p50_s: float
    ttft_p95_s: float
    ttft_p99_s: float
    requests: int


@dataclass
class EpisodeMetrics:
    """One episode's run summary (``envs.metrics``): counts, attainment shares, rates (req/s), times (s)."""

    requests: int
    completed: int
    rejected: int
    slo_attainment: float
    ttft_slo_attainment: float
    tbt_slo_attainment: float
    deflection_rate: float
    goodput_rps: float
    ttft_p50_s: float
    ttft_p95_s: float
    ttft_p99_s: float
    tbt_p95_s: float

    @classmethod
    def from_summary(cls, s: Mapping[str, Any]) -> EpisodeMetrics:
        return cls(**{f.name: s[_PERCENTILES[f.name][0]][_PERCENTILES[f.name][1]] if f.name in _PERCENTILES
                      else s[f.name] for f in fields(cls)})


@dataclass
class PolicyReport:
    """One policy over the evaluation episodes: pooled metrics, each episode's, and its parameters."""

    pooled: Pooled
    episodes: list[EpisodeMetrics]
    params: dict[str, Any] = field(default_factory=dict)

    def _column(self, key: str) -> list[float]:
        return [getattr(e, key) for e in self.episodes]

    @property
    def mean(self) -> dict[str, float]:
        """Per-episode mean of every episode metric."""
        return {f.name: float(np.mean(self._column(f.name))) for f in fields(EpisodeMetrics)} if self.episodes else {}

    @property
    def std(self) -> dict[str, float]:
        """Per-episode standard deviation of every episode metric."""
        return {f.name: float(np.std(self._column(f.name))) for f in fields(EpisodeMetrics)} if self.episodes else {}

    def to_json(self) -> dict[str, Any]:
        return {"pooled": asdict(self.pooled), "mean": self.mean, "std": self.std,
                "episodes": [asdict(e) for e in self.episodes], "params": self.params}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> PolicyReport:
        return cls(Pooled(**d["pooled"]), [EpisodeMetrics(**e) for e in d["episodes"]], dict(d.get("params") or {}))


@dataclass
class EvaluationReport:
    """Every policy on the same episodes: the seeds, how each episode was drawn (``seed``, ``start_s``, ``load``,
    ``requests``, ``trace``), and a :class:`PolicyReport` per policy name."""

    seeds: list[int]
    episodes: list[dict[str, Any]]
    policies: dict[str, PolicyReport] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The JSON form (the keys ``evaluate`` has always printed: seeds, episodes, policies)."""
        return {"seeds": list(self.seeds), "episodes": list(self.episodes),
                "policies": {name: r.to_json() for name, r in self.policies.items()}}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> EvaluationReport:
        """A report read back from its JSON form (extra top-level keys, such as a training run's, are ignored)."""
        return cls(list(d["seeds"]), list(d["episodes"]),
                   {name: PolicyReport.from_json(r) for name, r in d["policies"].items()})


def _pooled(ttfts: list[np.ndarray], met: int, total: int) -> Pooled:
    pooled = np.concatenate(ttfts) if ttfts else np.zeros(0)
    pct = [float(np.percentile(pooled, q)) if len(pooled) else math.nan for q in (50, 95, 99)]
    return Pooled(met / total if total else math.nan, *pct, total)


def _run_policy(pol: Policy, env: DeflectionEnv, workloads: list[Any], bar: Any) -> PolicyReport:
    """``pol`` on each workload through the environment's cluster."""
    eps: list[EpisodeMetrics] = []
    ttft_all: list[np.ndarray] = []
    met = total = 0
    for w in workloads:
        res = ClusterSim(env.config, w, env.prefill_profile, env.decode_profile).run(pol)
        eps.append(EpisodeMetrics.from_summary(res.summary))
        ttft = res.records["ttft_s"]
        ttft_all.append(ttft[~np.isnan(ttft)])
        met += int(np.sum(res.records["slo_met"]))
        total += len(ttft)
        if bar is not None:
            bar.update(1)
    return PolicyReport(_pooled(ttft_all, met, total), eps, pol.params())


def evaluate(policies: Mapping[str, PolicySource], env_kwargs: dict[str, Any], seeds: list[int],
             progress: bool = False) -> EvaluationReport:
    """Run every policy on the episodes of ``seeds`` and report per-episode and pooled metrics.

    :param policies: report name -> a policy, a factory, or a registry spec (``"proactive:margin=0.1"``).
    :param env_kwargs: arguments of :class:`DeflectionEnv` defining the episodes.
    :param seeds: evaluation seeds.
    """
    env = DeflectionEnv(**env_kwargs)
    workloads = []
    report = EvaluationReport(list(seeds), [])
    for s in seeds:
        w, info = env.episode_workload(s)
        workloads.append(w)
        report.episodes.append({"seed": s, **info})
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(policies) * len(seeds), desc="evaluate", unit="episode", leave=False)
    for name, src in policies.items():
        report.policies[name] = _run_policy(_instantiate(src), env, workloads, bar)
    if bar is not None:
        bar.close()
    return report


def table(report: EvaluationReport | Mapping[str, Any]) -> str:
    """A markdown table of an evaluation report (or its JSON form), best pooled SLO attainment first."""
    if not isinstance(report, EvaluationReport):
        report = EvaluationReport.from_json(report)
    rows = sorted(report.policies.items(), key=lambda kv: -kv[1].pooled.slo_attainment)
    lines = ["| policy | SLO attainment (pooled) | per-episode mean +- std | TTFT SLO | TBT SLO | P95 TTFT s (pooled) "
             "| P95 TTFT s (episode mean) | P50 TTFT s | deflection rate |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows:
        p, m, sd = r.pooled, r.mean, r.std
        lines.append(
            f"| {name} | {p.slo_attainment:.3f} | {m['slo_attainment']:.3f} +- {sd['slo_attainment']:.3f} | "
            f"{m['ttft_slo_attainment']:.3f} | {m['tbt_slo_attainment']:.3f} | {p.ttft_p95_s:.2f} | "
            f"{m['ttft_p95_s']:.2f} | {p.ttft_p50_s:.2f} | {m['deflection_rate']:.2f} |")
    return "\n".join(lines)
