"""One simulation from a typed spec: workload + cluster + policy -> RunResult. The CLI and the main job use it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deflectlab.envs.config import ClusterConfig, ConfigError, from_mapping, read_yaml
from deflectlab.envs.metrics import RunResult
from deflectlab.envs.simulator import ClusterSim
from deflectlab.envs.workloads import make_workload
from deflectlab.policies.registry import make_policy


@dataclass(frozen=True)
class WorkloadSpec:
    """Which requests to replay; a pure function of these fields (see :func:`envs.workloads.make_workload`).

    :param trace: bundled trace name (``azure_code``, ``azure_conv``) or a path.
    :param rate: target mean arrival rate, requests/s (``None``: as recorded).
    :param start_s: window start in the trace, seconds.
    :param duration_s: window length, seconds (``None``: to the end).
    :param num_requests: at most this many requests of the window.
    :param arrival: ``trace`` (recorded times, rescaled), ``poisson``, ``gamma`` or ``onoff``.
    :param cv: coefficient of variation of gamma gaps.
    :param seed: seed of synthetic arrivals and length sampling.
    """

    trace: str = "azure_code"
    rate: float | None = None
    start_s: float = 0.0
    duration_s: float | None = None
    num_requests: int | None = None
    arrival: str = "trace"
    cv: float = 1.0
    seed: int = 0

    def build(self):
        return make_workload(self.trace, start_s=self.start_s, duration_s=self.duration_s,
                             num_requests=self.num_requests, rate=self.rate, arrival=self.arrival, cv=self.cv,
                             seed=self.seed)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WorkloadSpec:
        return from_mapping(cls, d, "workload")


@dataclass(frozen=True)
class SimulationSpec:
    workload: WorkloadSpec = field(default_factory=WorkloadSpec)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    policy: str = "round_robin"

    def to_dict(self) -> dict[str, Any]:
        return {"workload": asdict(self.workload), "cluster": self.cluster.to_dict(), "policy": self.policy}

    @classmethod
    def from_dict(cls, d: Any, origin: str = "config") -> SimulationSpec:
        if not isinstance(d, dict):
            raise ConfigError(f"{origin}: expected a mapping with workload, cluster, policy")
        extra = set(d) - {"workload", "cluster", "policy"}
        if extra:
            raise ConfigError(f"{origin}: unknown key(s) {sorted(extra)}; known: cluster, policy, workload")
        try:
            return cls(workload=WorkloadSpec.from_dict(d.get("workload") or {}),
                       cluster=ClusterConfig.from_dict(d.get("cluster") or {}),
                       policy=str(d.get("policy", "round_robin")))
        except (ConfigError, TypeError) as e:
            raise ConfigError(f"{origin}: {e}") from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> SimulationSpec:
        return cls.from_dict(read_yaml(path, "config file"), origin=str(path))


def run_simulation(spec: SimulationSpec, progress: bool = False, workload=None) -> RunResult:
    """Build the workload (unless given), the cluster and the policy, and replay."""
    wl = workload if workload is not None else spec.workload.build()
    sim = ClusterSim(spec.cluster, wl)
    result = sim.run(make_policy(spec.policy), progress=progress)
    result.summary["policy"] = spec.policy
    result.config = {**spec.to_dict(), "workload_meta": dict(wl.meta)}
    return result
